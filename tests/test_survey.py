"""Survey mode: shard planning, the shard job, merging, and RQ workers on a live Redis."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from amls_cli import main as amls_main
from ml_backend import survey
from ml_backend.core.checkpoint import (
    ModelMeta,
    load_model_dir,
    new_version,
    save_model_dir,
    utc_now_iso,
)
from ml_backend.core.config import TrainConfig
from ml_backend.core.model import build_model, set_seed
from ml_backend.core.scoring import score_store
from ml_backend.core.store import CutoutStore
from ml_backend.labelstudio import LabelStudioClient
from ml_backend.survey import queue as survey_queue
from ml_backend.survey import shard as survey_shard
from ml_backend.task_rows import append_tasks, make_task, tasks_path
from tests.support.live_services import kill_rq_worker
from tests.support.shipped import BINARY_CONFIG

SIZE = 32
STRETCH = {"name": "none"}
CFG = TrainConfig(pretrained=False, image_size=SIZE)
LENGTHS = (120, 80)  # two stores, so some shards span both
REPO = Path(__file__).resolve().parent.parent
LABEL_CONFIG = BINARY_CONFIG


# ---- fixtures ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A small untrained model whose scores spread out (not all ~0.5)."""
    set_seed(0)
    net = build_model(CFG.replace(head_init_std=0.5), 3)
    with torch.no_grad():
        net.train()(torch.randn(8, 3, SIZE, SIZE))  # non-trivial BatchNorm statistics
    meta = ModelMeta(version=new_version(), parent=None, created=utc_now_iso(),
                     config=CFG.to_dict(), image_size=SIZE, channels=3, stretch=STRETCH)
    return save_model_dir(tmp_path_factory.mktemp("model") / "m", ema=net.eval(), student=net,
                          meta=meta)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("stores")
    rng = np.random.default_rng(1)
    paths = []
    for k, n in enumerate(LENGTHS):
        path = root / f"field{k}.h5"
        with CutoutStore.create(path, height=SIZE, width=SIZE, channels=3,
                                stretch=STRETCH) as store:
            store.append([f"f{k}-{i:04d}" for i in range(n)],
                         rng.integers(0, 256, (n, SIZE, SIZE, 3), np.uint8))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def reference(model_dir, stores) -> dict[tuple[str, str], float]:
    """Single-process `score_store` scores by (store name, id)."""
    model, meta = load_model_dir(model_dir)
    out = {}
    for path in stores:
        with CutoutStore.open(path) as store:
            scores = score_store(store, model, meta, batch_size=16, device="cpu")
            out.update({(path.stem, cid): float(s) for cid, s in
                        zip(store.ids(), scores, strict=True)})
    return out


def assert_matches_reference(rows: list[tuple[str, float, str]], reference: dict) -> None:
    keys = [(store, cid) for cid, _, store in rows]
    assert len(keys) == len(set(keys)) == len(reference), "every cutout exactly once"
    assert set(keys) == set(reference)
    got = np.array([score for _, score, _ in rows])
    want = np.array([reference[k] for k in keys])
    # Same model, same pixels; only the batch composition differs between runs, which moves
    # float32 convolution results by a few ulps (observed <= 3e-6 relative on CPU).
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert np.all(np.diff(got) <= 0), "merged rows are sorted by descending score"


# ---- planning ---------------------------------------------------------------------------

@given(total=st.integers(0, 10_000), n=st.integers(1, 300))
@settings(max_examples=200, deadline=None)
def test_shard_ranges_cover_every_row_once_with_balanced_sizes(total, n):
    ranges = survey.shard_ranges(total, n)
    assert len(ranges) == min(total, n)
    rows = [r for a, b in ranges for r in range(a, b)]
    assert rows == list(range(total))
    sizes = [b - a for a, b in ranges]
    assert all(s >= 1 for s in sizes)
    assert not sizes or max(sizes) - min(sizes) <= 1


def test_shard_ranges_rejects_zero_shards():
    with pytest.raises(ValueError, match="shards"):
        survey.shard_ranges(10, 0)


def test_plan_records_stores_lengths_ranges_and_model(tmp_path, model_dir, stores):
    path = survey.plan_survey(stores, model_dir, 3, tmp_path / "s", batch_size=8)
    manifest = json.loads(path.read_text())
    assert [s["length"] for s in manifest["stores"]] == list(LENGTHS)
    assert [s["name"] for s in manifest["stores"]] == ["field0", "field1"]
    assert manifest["model_version"] == load_model_dir(model_dir)[1].version
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 66), (66, 133),
                                                                     (133, 200)]
    # Re-planning the same survey keeps the manifest (and so its survey id).
    assert survey.plan_survey(stores, model_dir, 7, tmp_path / "s").read_text() == \
        path.read_text()


def test_plan_refuses_a_directory_of_another_survey(tmp_path, model_dir, stores):
    survey.plan_survey(stores, model_dir, 2, tmp_path / "s")
    with pytest.raises(ValueError, match="other stores"):
        survey.plan_survey(stores[:1], model_dir, 2, tmp_path / "s")


def test_plan_gives_repeated_store_names_a_suffix(tmp_path, model_dir, stores):
    path = survey.plan_survey([stores[0], stores[0]], model_dir, 2, tmp_path / "s")
    assert [s["name"] for s in json.loads(path.read_text())["stores"]] == ["field0", "field0~2"]


def test_plan_refuses_a_store_with_another_stretch(tmp_path, model_dir):
    other = tmp_path / "asinh.h5"
    CutoutStore.create(other, height=SIZE, width=SIZE, channels=3,
                       stretch={"name": "asinh", "a": 0.1}).close()
    with pytest.raises(ValueError, match="stretch"):
        survey.plan_survey([other], model_dir, 1, tmp_path / "s")


# ---- the shard job, in process ----------------------------------------------------------

def test_all_shards_in_process_merge_to_the_single_process_scores(tmp_path, model_dir, stores,
                                                                  reference):
    manifest = survey.plan_survey(stores, model_dir, 4, tmp_path / "s", batch_size=16)
    for i in range(4):
        assert survey.score_shard(str(manifest), i)["status"] == "done"
    scores_csv, top_csv, n = survey.merge(tmp_path / "s", top=10)
    assert n == sum(LENGTHS)
    rows = survey.read_merged(scores_csv)
    assert_matches_reference(rows, reference)
    assert survey.read_merged(top_csv) == rows[:10]
    state = survey.survey_state(tmp_path / "s")
    assert state.done == [0, 1, 2, 3] and not state.pending and not state.failed
    assert state.images_done == sum(LENGTHS) and state.images_per_s_per_worker > 0


def test_a_finished_shard_is_never_redone(tmp_path, model_dir, stores, monkeypatch):
    manifest = survey.plan_survey(stores, model_dir, 2, tmp_path / "s", batch_size=32)
    survey.score_shard(str(manifest), 1)
    result = survey.shard_path(tmp_path / "s", 1, ".csv")
    before = result.read_bytes()

    def must_not_score(*args):
        raise AssertionError("a finished shard was scored again")

    monkeypatch.setattr(survey_shard, "_score_range", must_not_score)
    assert survey.score_shard(str(manifest), 1)["status"] == "skipped"
    assert result.read_bytes() == before


def test_a_failed_shard_leaves_no_result_and_an_error(tmp_path, model_dir, stores, monkeypatch):
    manifest = survey.plan_survey(stores, model_dir, 2, tmp_path / "s")

    def broken(*args):
        raise OSError("disk on fire")

    monkeypatch.setattr(survey_shard, "_score_range", broken)
    with pytest.raises(OSError, match="disk on fire"):
        survey.score_shard(str(manifest), 0)
    shards = tmp_path / "s" / survey.SHARDS
    assert not survey.shard_path(tmp_path / "s", 0, ".csv").exists()
    assert [p.name for p in shards.iterdir()] == ["shard-00000.error"]  # no temp files left
    state = survey.survey_state(tmp_path / "s")
    assert state.failed == {0: "OSError: disk on fire"} and state.pending == [1]
    assert amls_main(["survey", "status", str(tmp_path / "s")]) == 1


def test_shard_refuses_a_model_that_changed_version(tmp_path, model_dir, stores):
    manifest = survey.plan_survey(stores, model_dir, 1, tmp_path / "s")
    data = json.loads(manifest.read_text())
    data["model_version"] = "amls-other"
    manifest.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="amls-other"):
        survey.score_shard(str(manifest), 0)


def test_merge_refuses_missing_shards_and_orders_ties_and_nan(tmp_path, model_dir, stores):
    manifest = survey.plan_survey(stores, model_dir, 2, tmp_path / "s")
    with pytest.raises(ValueError, match="2 shard"):
        survey.merge(tmp_path / "s")
    rows0 = [("a", 0.5, "x"), ("b", float("nan"), "x"), ("c", 0.9, "x"), ("d", 0.5, "x")]
    rows1 = [("e", 0.5, "y"), ("f", 1.0, "y")]
    survey_shard._write_sorted_csv(survey.shard_path(manifest.parent, 0, ".csv"), rows0)
    survey_shard._write_sorted_csv(survey.shard_path(manifest.parent, 1, ".csv"), rows1)
    scores_csv, _, n = survey.merge(tmp_path / "s", top=2)
    ids = [cid for cid, _, _ in survey.read_merged(scores_csv)]
    # Descending score; ties in shard order then row order; NaN last.
    assert ids == ["f", "c", "a", "d", "e", "b"] and n == 6


def test_cli_merge_writes_top_n(tmp_path, model_dir, stores, capsys):
    manifest = survey.plan_survey(stores, model_dir, 1, tmp_path / "s", batch_size=64)
    survey.score_shard(str(manifest), 0)
    assert amls_main(["survey", "merge", str(tmp_path / "s"), "--top", "5"]) == 0
    assert len(survey.read_merged(tmp_path / "s" / "top.csv")) == 5
    assert "wrote 200 rows" in capsys.readouterr().out
    assert amls_main(["survey", "status", str(tmp_path / "s")]) == 0
    assert "shards: 1/1 done, 0 pending, 0 failed" in capsys.readouterr().out


def test_cli_score_without_redis_is_a_clear_error(tmp_path, model_dir, stores, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    argv = ["survey", "score", *map(str, stores), "--model", str(model_dir), "--shards", "2",
            "--out", str(tmp_path / "s")]
    assert amls_main(argv) == 2


# ---- push-top ---------------------------------------------------------------------------

def fake_label_studio() -> LabelStudioClient:
    """Our client over a fake SDK with the calls push-top makes; created tasks (in
    `client.sdk.created`) are listed back like a project's."""
    created: list[dict] = []
    client = LabelStudioClient("http://label-studio.invalid", "token")
    client.sdk = SimpleNamespace(
        created=created,
        projects=SimpleNamespace(
            import_tasks=lambda id, request: created.extend(request),
            get=lambda id: SimpleNamespace(label_config=LABEL_CONFIG)),
        tasks=SimpleNamespace(list=lambda project, page_size: [
            SimpleNamespace(data=t["data"]) for t in created]))
    return client


def test_push_top_creates_the_best_new_cutouts_with_their_scores(tmp_path, model_dir, stores):
    # Task rows for the first store only: the second store's cutouts cannot become tasks.
    rows_file = tasks_path(stores[0])
    rows_file.unlink(missing_ok=True)
    with CutoutStore.open(stores[0]) as store:
        append_tasks(rows_file, [make_task(image_url=f"/data/local-files/?d=p/{cid}.png",
                                           cutout_id=cid, store_path=stores[0], source="s",
                                           hdu="0", ra=None, dec=None) for cid in store.ids()])
    manifest = survey.plan_survey(stores, model_dir, 2, tmp_path / "s", batch_size=64)
    for i in range(2):
        survey.score_shard(str(manifest), i)
    ranked = [(cid, score) for cid, score, name in survey.iter_merged(tmp_path / "s")
              if name == "field0"]
    lab = fake_label_studio()
    lab.sdk.created.append({"data": {"cutout_id": ranked[0][0]}})  # already a task
    counts = survey.push_top(lab, tmp_path / "s", 3, project_id=1, batch_size=2)
    assert counts["created"] == 3 and counts["already_in_project"] == 1
    new = lab.sdk.created[1:]
    assert [t["data"]["cutout_id"] for t in new] == [cid for cid, _ in ranked[1:4]]
    version = json.loads(manifest.read_text())["model_version"]
    for task, (_, score) in zip(new, ranked[1:4], strict=True):
        prediction = task["predictions"][0]
        assert prediction["score"] == float(score) and prediction["model_version"] == version
        assert prediction["result"] == []  # the score orders the queue; nothing pre-selected
    # A second push continues down the ranking instead of repeating itself.
    survey.push_top(lab, tmp_path / "s", 2, project_id=1)
    assert [t["data"]["cutout_id"] for t in lab.sdk.created[4:]] == [cid for cid, _ in ranked[4:6]]
    rows_file.unlink()


@pytest.mark.e2e
def test_live_push_top_creates_tasks_with_predictions(label_studio, tmp_path, model_dir, stores):
    rows_file = tasks_path(stores[0])
    rows_file.unlink(missing_ok=True)
    with CutoutStore.open(stores[0]) as store:
        append_tasks(rows_file, [make_task(image_url=f"/data/upload/{cid}.png", cutout_id=cid,
                                           store_path=stores[0], source="s", hdu="0", ra=None,
                                           dec=None) for cid in store.ids()])
    try:
        manifest = survey.plan_survey(stores[:1], model_dir, 1, tmp_path / "s", batch_size=64)
        survey.score_shard(str(manifest), 0)
        client = label_studio.client
        project = client.projects.create(title="amls survey e2e", label_config=LABEL_CONFIG)
        ours = LabelStudioClient(label_studio.url, label_studio.token)
        first = survey.push_top(ours, tmp_path / "s", 3, project.id)
        second = survey.push_top(ours, tmp_path / "s", 2, project.id)
    finally:
        rows_file.unlink()
    assert (first["created"], second["created"], second["already_in_project"]) == (3, 2, 3)
    ranked = [cid for cid, _, _ in survey.iter_merged(tmp_path / "s")][:5]
    tasks = list(client.tasks.list(project=project.id, fields="all"))
    assert sorted(t.data["cutout_id"] for t in tasks) == sorted(ranked)
    assert all(t.total_predictions == 1 for t in tasks)


# ---- RQ workers on a live Redis ---------------------------------------------------------

def worker_env(redis_url: str, queue: str) -> dict[str, str]:
    return {**os.environ, "REDIS_URL": redis_url, "AMLS_QUEUE": queue, "OMP_NUM_THREADS": "1",
            "AMLS_DEVICE": "cpu", "PYTHONPATH": str(REPO)}


def start_worker(env: dict[str, str], log: Path, burst: bool = True) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "amls_cli", "worker"] + (["--burst"] if burst else [])
    with log.open("ab") as fh:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_exit(procs: list[subprocess.Popen], timeout_s: float, log: Path) -> None:
    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"worker did not finish; log:\n{log.read_text()[-3000:]}")


@pytest.mark.e2e
@pytest.mark.slow
def test_four_shards_on_two_rq_workers_equal_single_process_scores(tmp_path, redis_url,
                                                                   model_dir, stores,
                                                                   reference):
    queue = f"survey-{secrets.token_hex(3)}"
    env = worker_env(redis_url, queue)
    argv = ["survey", "score", *map(str, stores), "--model", str(model_dir), "--shards", "4",
            "--out", str(tmp_path / "s"), "--redis-url", redis_url, "--batch-size", "16",
            "--queue", queue]
    assert amls_main(argv) == 0
    log = tmp_path / "workers.log"
    wait_exit([start_worker(env, log), start_worker(env, log)], 240, log)
    state = survey.survey_state(tmp_path / "s")
    assert state.done == [0, 1, 2, 3], log.read_text()[-3000:]
    scores_csv, _, _ = survey.merge(tmp_path / "s")
    assert_matches_reference(survey.read_merged(scores_csv), reference)


@pytest.mark.e2e
@pytest.mark.slow
def test_a_worker_killed_mid_shard_is_resumed_and_every_shard_is_done_once(
        tmp_path, redis_url, model_dir, stores, reference):
    from redis import Redis
    from rq import Queue
    from rq.registry import StartedJobRegistry

    queue_name = f"survey-{secrets.token_hex(3)}"
    env = worker_env(redis_url, queue_name)
    # Batch size 1 makes a shard take seconds, so the kill lands mid-shard.
    manifest = survey.plan_survey(stores, model_dir, 2, tmp_path / "s", batch_size=1)
    assert survey.enqueue_pending(manifest.parent, redis_url, queue_name) == [0, 1]
    log = tmp_path / "workers.log"
    victim = start_worker(env, log, burst=False)
    started = StartedJobRegistry(queue=Queue(queue_name, connection=Redis.from_url(redis_url)))
    deadline = time.monotonic() + 120
    while not started.get_job_ids() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert started.get_job_ids(), log.read_text()[-3000:]
    kill_rq_worker(victim)  # the worker and its work horse: a lost machine
    state = survey.survey_state(tmp_path / "s")
    assert len(state.done) < 2, "the kill came too late to interrupt a shard"
    assert not list((tmp_path / "s" / survey.SHARDS).glob("shard-*.csv.tmp*"))

    # Resume: a shard still waiting in the queue is not enqueued twice; the killed one is.
    waiting = _queued(redis_url, queue_name, manifest)
    again = survey.enqueue_pending(manifest.parent, redis_url, queue_name)
    assert again and set(again) == set(state.pending) - waiting
    wait_exit([start_worker(env, log)], 240, log)
    assert survey.survey_state(tmp_path / "s").done == [0, 1], log.read_text()[-3000:]
    scores_csv, _, _ = survey.merge(tmp_path / "s")
    assert_matches_reference(survey.read_merged(scores_csv), reference)


def _queued(redis_url: str, queue_name: str, manifest: Path) -> set[int]:
    from redis import Redis
    from rq import Queue

    prefix = f"{survey.JOB_PREFIX}-{json.loads(manifest.read_text())['survey_id']}-"
    ids = Queue(queue_name, connection=Redis.from_url(redis_url)).get_job_ids()
    return {survey_queue._shard_of(j, prefix) for j in ids if j.startswith(prefix)}
