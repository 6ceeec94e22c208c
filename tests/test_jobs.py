"""Training jobs: coalescing semantics of both submitters, label extraction, failure handling."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from demo.local_servers import free_port
from ml_backend.jobs import run_training
from ml_backend.label_schema import (
    LabelConfigError,
    ground_truth_labels,
    latest_labels,
    parse_label_config,
)
from ml_backend.registry import ModelRegistry
from ml_backend.submitters import (
    ALREADY_QUEUED,
    MAX_DEBOUNCE_S,
    QUEUED,
    InProcessSubmitter,
    RQSubmitter,
    wait_for_quiet,
)
from tests.support.json_server import json_server

LABEL_CONFIG = """<View><Image name="image" value="$image"/>
<Choices name="class" toName="image"><Choice value="normal"/><Choice value="anomaly"/>
<Choice value="artefact"/></Choices></View>"""


# ---- in-process submitter ----------------------------------------------------------------------

class BlockingRun:
    """A job body that records calls and blocks until released."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, project_id: int) -> None:
        self.calls.append(project_id)
        self.started.set()
        assert self.release.wait(10), "test never released the job"


def test_in_process_while_running_queues_exactly_one_more():
    run = BlockingRun()
    submitter = InProcessSubmitter(run)
    assert submitter.submit(1) == QUEUED
    assert run.started.wait(5)
    assert submitter.state(1) == {"queued": False, "running": True}
    outcomes = [submitter.submit(1) for _ in range(5)]
    assert outcomes == [QUEUED] + [ALREADY_QUEUED] * 4
    assert submitter.state(1) == {"queued": True, "running": True}
    run.release.set()
    assert submitter.wait_idle(10)
    assert run.calls == [1, 1]
    submitter.close()


def test_in_process_while_queued_does_nothing():
    run = BlockingRun()
    submitter = InProcessSubmitter(run)
    submitter.submit(1)
    assert run.started.wait(5)
    # Project 2 waits behind project 1 in the single worker thread.
    assert [submitter.submit(2) for _ in range(4)] == [QUEUED] + [ALREADY_QUEUED] * 3
    assert submitter.state(2) == {"queued": True, "running": False}
    run.release.set()
    assert submitter.wait_idle(10)
    assert sorted(run.calls) == [1, 2]


def test_in_process_failed_job_does_not_stop_the_worker():
    calls: list[int] = []

    def flaky(project_id: int) -> None:
        calls.append(project_id)
        if len(calls) == 1:
            raise RuntimeError("boom")

    submitter = InProcessSubmitter(flaky)
    submitter.submit(4)
    assert submitter.wait_idle(10)
    submitter.submit(4)
    assert submitter.wait_idle(10)
    assert calls == [4, 4]
    assert submitter.state(4) == {"queued": False, "running": False}


# ---- RQ submitter (live Redis) -----------------------------------------------------------------

def rq_job_body(project_id: int, *, redis_url: str, queue_name: str) -> str:
    """Recorded in Redis; on its first run it gets two more submissions, like webhooks would."""
    from redis import Redis

    conn = Redis.from_url(redis_url)
    runs = conn.rpush(f"test:{queue_name}:runs", project_id)
    if runs == 1:
        submitter = RQSubmitter(redis_url, queue_name, rq_job_body,
                                {"redis_url": redis_url, "queue_name": queue_name})
        state = submitter.state(project_id)
        outcomes = [submitter.submit(project_id), submitter.submit(project_id)]
        conn.rpush(f"test:{queue_name}:during", json.dumps({"state": state,
                                                            "outcomes": outcomes}))
    return "done"


@pytest.fixture
def rq_submitter(redis_url, request):
    queue_name = f"test-{request.node.name[:40]}"
    submitter = RQSubmitter(redis_url, queue_name, rq_job_body,
                            {"redis_url": redis_url, "queue_name": queue_name})
    submitter.connection.flushdb()
    yield submitter
    submitter.connection.flushdb()
    submitter.close()


def burst(submitter: RQSubmitter) -> None:
    from rq import SimpleWorker

    SimpleWorker([submitter.queue], connection=submitter.connection).work(
        burst=True, logging_level="WARNING")


def test_project_lock_is_renewed_while_the_job_runs(rq_submitter):
    from ml_backend.submitters import project_lock

    conn, name, ttl = rq_submitter.connection, "test:lock:renewed", 0.6
    with project_lock(conn, name, ttl_s=ttl, wait_s=1):
        for _ in range(8):  # 2.4 s: four lifetimes of an unrenewed lock
            time.sleep(0.3)
            assert conn.pttl(name) > 0
            assert not conn.lock(name, timeout=ttl).acquire(blocking=False)
    assert not conn.exists(name)


def test_project_lock_waits_for_the_holder_then_times_out(rq_submitter):
    from ml_backend.submitters import project_lock

    conn, name = rq_submitter.connection, "test:lock:busy"
    with project_lock(conn, name, ttl_s=5, wait_s=1):
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="another job held the lock"), \
                project_lock(conn, name, ttl_s=5, wait_s=0.5):
            pass
        assert 0.4 < time.monotonic() - started < 3


def test_rq_while_queued_does_nothing(rq_submitter):
    outcomes = [rq_submitter.submit(7) for _ in range(5)]
    assert outcomes == [QUEUED] + [ALREADY_QUEUED] * 4
    assert rq_submitter.queue.count == 1
    assert rq_submitter.state(7) == {"queued": True, "running": False}
    assert rq_submitter.submit(8) == QUEUED  # other projects are independent
    assert rq_submitter.queue.count == 2


def test_rq_while_running_queues_exactly_one_more(rq_submitter):
    conn = rq_submitter.connection
    name = rq_submitter.queue.name
    rq_submitter.submit(7)
    burst(rq_submitter)
    runs = [int(x) for x in conn.lrange(f"test:{name}:runs", 0, -1)]
    assert runs == [7, 7]
    during = json.loads(conn.lindex(f"test:{name}:during", 0))
    assert during["state"] == {"queued": False, "running": True}
    assert during["outcomes"] == [QUEUED, ALREADY_QUEUED]
    assert rq_submitter.state(7) == {"queued": False, "running": False}


def test_rq_replaces_a_vanished_queued_job(rq_submitter):
    rq_submitter.submit(3)
    rq_submitter.queue.empty()  # the queued job is lost (e.g. an operator emptied the queue)
    assert rq_submitter.queue.count == 0
    assert rq_submitter.submit(3) == QUEUED
    assert rq_submitter.queue.count == 1


class _Planted:
    """Unpickling this writes a file: proof that something deserialised it."""

    path = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "unpickled"))


def test_rq_submit_never_unpickles_what_is_in_redis(rq_submitter, tmp_path):
    import pickle

    from rq.job import Job

    assert rq_submitter.submit(4) == QUEUED
    [job_id] = rq_submitter.queue.job_ids
    planted = _Planted()
    planted.path = str(tmp_path / "ran")
    rq_submitter.connection.hset(Job.key_for(job_id), "meta", pickle.dumps(planted))
    assert rq_submitter.submit(4) == ALREADY_QUEUED
    assert rq_submitter.state(4) == {"queued": True, "running": False}
    assert not (tmp_path / "ran").exists()


# ---- labels from Label Studio annotations ------------------------------------------------------

def choice(value: str, from_name: str = "class") -> list[dict]:
    return [{"from_name": from_name, "to_name": "image", "type": "choices",
             "value": {"choices": [value]}}]


def test_parse_label_config_reads_tag_names():
    schema = parse_label_config(LABEL_CONFIG, "anomaly")
    assert (schema.from_name, schema.to_name, schema.image_key) == ("class", "image", "image")
    assert (schema.anomaly_choice, schema.normal_choice) == ("anomaly", "normal")
    assert parse_label_config(LABEL_CONFIG, "artefact").normal_choice == "normal"


@pytest.mark.parametrize("config", [
    "<View><Image name='i' value='$i'/></View>",
    "<View><Text name='t' value='$t'/><Choices name='c' toName='t'><Choice value='anomaly'/>"
    "<Choice value='normal'/></Choices></View>",
    "<View><Image name='i' value='$i'/><Choices name='c' toName='i'><Choice value='anomaly'/>"
    "</Choices></View>",
    "<View><Image",
])
def test_parse_label_config_rejects_unusable_configs(config):
    with pytest.raises(LabelConfigError):
        parse_label_config(config, "anomaly")


def test_latest_annotation_wins_and_skips_are_ignored():
    schema = parse_label_config(LABEL_CONFIG, "anomaly")
    tasks = [
        {"id": 1, "annotations": [
            {"id": 10, "updated_at": "2026-01-02T00:00:00Z", "result": choice("anomaly")},
            {"id": 11, "updated_at": "2026-01-01T00:00:00Z", "result": choice("normal")}]},
        {"id": 2, "annotations": [
            {"id": 12, "updated_at": "2026-01-03T00:00:00Z", "result": [],
             "was_cancelled": True},
            {"id": 13, "updated_at": "2026-01-01T00:00:00Z", "result": choice("normal")}]},
        {"id": 3, "annotations": [{"id": 14, "was_cancelled": True, "result": []}]},
        {"id": 4, "annotations": []},
        {"id": 5, "annotations": [{"id": 15, "result": choice("artefact")}]},
        {"id": 6, "annotations": [{"id": 16, "result": choice("anomaly", from_name="x")}]},
    ]
    assert latest_labels(tasks, schema) == {1: 1, 2: 0, 5: 0}


# ---- a failed job keeps the serving version ----------------------------------------------------

def _published(registry: ModelRegistry, project_id: int, version: str) -> None:
    staging = registry.staging_dir(project_id)
    staging.mkdir(parents=True)
    (staging / "meta.json").write_text("{}")
    registry.publish(project_id, staging, version)


def test_a_job_that_cannot_reach_label_studio_keeps_latest_and_records_why(tmp_path: Path):
    from ml_backend.config import Config

    registry = ModelRegistry(tmp_path)
    _published(registry, 2, "amls-20260101T000000Z-abcd")
    settings = Config(label_studio_url=f"http://127.0.0.1:{free_port()}",
                      label_studio_api_key="k", model_dir=tmp_path)
    with pytest.raises(Exception, match="[Cc]onnect"):
        run_training(2, settings)  # the real client, against a port nobody listens on
    assert registry.latest(2) == "amls-20260101T000000Z-abcd"
    status = registry.read_status(2)
    assert "onnect" in status["last_error"] and status["last_duration_s"] >= 0
    assert status["jobs_total"] == 1
    assert status["last_traceback"].startswith("Traceback")
    assert "label_config" in status["last_traceback"]  # where it failed, not only what


def test_a_job_for_a_project_label_studio_does_not_have_writes_nothing(tmp_path: Path,
                                                                       caplog):
    from ml_backend.config import Config

    with json_server(lambda method, path, body: (404, {"detail": "Not found."})) as url:
        settings = Config(label_studio_url=url, label_studio_api_key="k",
                          model_dir=tmp_path / "models")
        with caplog.at_level("WARNING"):
            summary = run_training(41, settings)
    assert summary["status"] == "skipped" and "has no project 41" in summary["reason"]
    assert not (tmp_path / "models").exists()
    assert "has no project 41" in caplog.text


# ---- debounce: a burst of requests becomes one job ---------------------------------------------

def test_in_process_debounce_waits_for_a_quiet_period():
    starts: list[float] = []
    submitter = InProcessSubmitter(lambda p: starts.append(time.monotonic()), debounce_s=0.3)
    first = time.monotonic()
    for _ in range(4):
        submitter.submit(1)
        time.sleep(0.1)
    last = time.monotonic() - 0.1
    assert submitter.wait_idle(10)
    assert len(starts) == 1
    assert starts[0] - last >= 0.3 - 0.02
    assert starts[0] - first < MAX_DEBOUNCE_S


@pytest.mark.parametrize("quiet_s, expected", [(0.0, 0.0), (0.2, 0.2)])
def test_wait_for_quiet_counts_from_the_last_request(quiet_s, expected):
    last = time.monotonic()
    waited = wait_for_quiet(lambda: last, time.monotonic, quiet_s)
    assert expected - 0.01 <= waited <= expected + 0.15


def test_rq_debounce_records_every_request(rq_submitter):
    from ml_backend.submitters import last_request_key

    rq_submitter.submit(5)
    key = last_request_key(rq_submitter.queue.name, 5)
    first = float(rq_submitter.connection.get(key))
    time.sleep(0.05)
    assert rq_submitter.submit(5) == ALREADY_QUEUED
    assert float(rq_submitter.connection.get(key)) > first


# ---- task stores: only allowed roots, bad stores skip the task, not the job --------------------

def make_store(path: Path, ids: list[str]) -> Path:
    import numpy as np

    from ml_backend.core.store import CutoutStore

    with CutoutStore.create(path, height=8, width=8, channels=1,
                            stretch={"name": "none"}) as store:
        store.append(ids, np.zeros((len(ids), 8, 8, 1), np.uint8))
    return path


def test_training_skips_tasks_whose_store_is_refused(tmp_path: Path, caplog):
    from ml_backend.task_pixels import resolve_pixels

    root = tmp_path / "stores"
    root.mkdir()
    good = make_store(root / "good.h5", ["a", "b"])
    outside = make_store(tmp_path / "outside.h5", ["a"])
    (root / "text.h5").write_text("not a store")
    (root / "escape.h5").symlink_to(outside)
    stores: list[object] = [str(good), str(outside), str(root / "text.h5"),
                            str(root / "escape.h5"), "/etc/passwd", 7, str(root)]
    tasks = [{"id": i + 10, "data": {"store": s, "cutout_id": "a"}} for i, s in enumerate(stores)]
    tasks += [{"id": 20, "data": {"store": str(good), "cutout_id": "b"}},
              {"id": 21, "data": {"store": str(outside), "cutout_id": "a"}},
              {"id": 22, "data": "not an object"}]
    with caplog.at_level("WARNING"):
        pixels = resolve_pixels(1, tasks, "image", ModelRegistry(tmp_path / "models"),
                                (root.resolve(),))
    try:
        assert pixels.rows == {10: (str(good.resolve()), 0), 20: (str(good.resolve()), 1)}
        assert list(pixels.stores) == [str(good.resolve())]
    finally:
        pixels.close()
    messages = [r.getMessage() for r in caplog.records]
    # One warning per refused store, naming the first task that used it.
    assert sum(repr(str(outside)) in m for m in messages) == 1
    assert any("task 11" in m and "outside the allowed store roots" in m for m in messages)
    assert any("task 12" in m and "not a readable HDF5 file" in m for m in messages)
    assert any("task 13" in m and "outside" in m for m in messages)
    assert any("task 15" in m and "path string" in m for m in messages)
    assert any("task 16" in m and "regular file" in m for m in messages)
    assert any("task 22" in m for m in messages)


def test_training_never_reads_another_projects_folder(tmp_path: Path, caplog):
    from ml_backend.task_pixels import resolve_pixels

    registry = ModelRegistry(tmp_path / "models")
    registry.project_dir(2).mkdir(parents=True)
    other = make_store(registry.project_dir(2) / "cache.h5", ["a"])
    tasks = [{"id": 1, "data": {"store": str(other), "cutout_id": "a"}}]
    with caplog.at_level("WARNING"):
        refused = resolve_pixels(1, tasks, "image", registry, (tmp_path.resolve(),))
        allowed = resolve_pixels(2, tasks, "image", registry, (tmp_path.resolve(),))
    try:
        assert refused.rows == {} and allowed.rows == {1: (str(other.resolve()), 0)}
    finally:
        refused.close()
        allowed.close()
    assert "belongs to another project's models and caches (project 2)" in caplog.text


def test_store_roots_from_the_environment_reach_the_job(tmp_path: Path, monkeypatch):
    import os
    import pickle

    from ml_backend.config import Config

    env = {"MODEL_DIR": str(tmp_path / "m"),
           "AMLS_STORE_ROOTS": os.pathsep.join([str(tmp_path / "a"), "", str(tmp_path / "b")])}
    cfg = Config.from_env(env)
    assert cfg.store_roots == (tmp_path / "a", tmp_path / "b")
    settings = cfg.for_jobs()
    assert settings.store_roots == ((tmp_path / "a").resolve(), (tmp_path / "b").resolve())
    assert pickle.loads(pickle.dumps(settings)) == settings
    # Unset: MODEL_DIR and the working directory, but never the filesystem root.
    monkeypatch.chdir(tmp_path)
    assert Config(model_dir=tmp_path / "m").store_root_dirs == ((tmp_path / "m").resolve(),
                                                                tmp_path.resolve())
    monkeypatch.chdir("/")
    assert Config(model_dir=tmp_path / "m").store_root_dirs == ((tmp_path / "m").resolve(),)


# ---- held-out evaluation on ground-truth annotations ---------------------------------------


def test_ground_truth_annotations_form_the_held_out_set():
    schema = parse_label_config(LABEL_CONFIG, "anomaly")
    tasks = [
        {"id": 1, "annotations": [{"id": 10, "ground_truth": True, "result": choice("anomaly")},
                                  {"id": 11, "updated_at": "2026-01-02T00:00:00Z",
                                   "result": choice("normal")}]},
        {"id": 2, "annotations": [{"id": 12, "result": choice("anomaly")}]},
        {"id": 3, "annotations": [{"id": 13, "ground_truth": True, "was_cancelled": True,
                                   "result": []}]},
        {"id": 4, "annotations": [{"id": 14, "ground_truth": True, "result": choice("normal")}]},
    ]
    assert ground_truth_labels(tasks, schema) == {1: 1, 4: 0}


def test_held_out_evaluation_uses_the_scores_of_the_ground_truth_tasks(caplog):
    from ml_backend.jobs import _evaluate_held_out

    held_out = {10: 1, 11: 0, 12: 0, 13: 1, 99: 0}  # task 99 has no score (no pixels): ignored
    scores = {10: 0.9, 11: 0.2, 12: 0.95, 13: 0.5, 14: 0.7}  # 14 is not ground truth
    with caplog.at_level("INFO"):
        result = _evaluate_held_out(7, held_out, scores)
    assert result["n"] == 4 and result["n_anomalies"] == 2
    assert result["auroc"] == 0.5  # each anomaly beats one of the two normals
    assert "held-out evaluation on 4 ground-truth tasks" in caplog.text
    assert _evaluate_held_out(7, {}, scores) is None


def test_job_settings_travel_without_secrets_and_keep_every_training_setting(tmp_path: Path,
                                                                            monkeypatch):
    import pickle

    from ml_backend.config import Config

    monkeypatch.chdir(tmp_path)
    cfg = Config.from_env({"LABEL_STUDIO_URL": "http://ls:8080", "LABEL_STUDIO_API_KEY": "tok",
                           "REDIS_URL": "redis://:redis-pw@r:6379", "BASIC_AUTH_USER": "u",
                           "BASIC_AUTH_PASS": "auth-pw", "AMLS_CENTER_CROP": "0.5",
                           "AMLS_INVARIANCE": "flip", "AMLS_ITERATIONS": "7"})
    settings = cfg.for_jobs()
    sent = pickle.dumps(settings)  # what RQ stores in Redis
    for secret in (b"tok", b"redis-pw", b"auth-pw"):
        assert secret not in sent
    assert pickle.loads(sent) == settings and settings.train == cfg.train
    assert settings.train_config("dihedral").invariance == "flip"
    assert settings.train_config("dihedral").center_crop == 0.5
    assert cfg.replace(invariance="auto").train_config("dihedral").invariance == "dihedral"


def test_a_job_after_input_settings_changed_starts_a_new_lineage(tmp_path: Path, caplog):
    import json

    from ml_backend.core.checkpoint import ModelMeta
    from ml_backend.core.config import TrainConfig
    from ml_backend.jobs import _parent_to_continue

    registry = ModelRegistry(tmp_path)
    cfg = TrainConfig(image_size=64, center_crop=1.0)
    staging = registry.staging_dir(3)
    staging.mkdir()
    meta = ModelMeta(version="amls-20260101T000000Z-abcd", parent=None, created="",
                     config=cfg.to_dict(), image_size=64, channels=1, stretch={"name": "none"})
    (staging / "meta.json").write_text(json.dumps({"format": 1, **meta.to_dict(), "files": {}}))
    registry.publish(3, staging, meta.version)

    plain = {"name": "none"}
    assert _parent_to_continue(3, registry, cfg, 1, plain) == registry.latest_dir(3)
    assert _parent_to_continue(4, registry, cfg, 1, plain) is None  # no model yet
    with caplog.at_level("WARNING"):
        assert _parent_to_continue(3, registry, cfg.replace(center_crop=0.5), 1, plain) is None
        assert _parent_to_continue(3, registry, cfg, 3, plain) is None
        assert _parent_to_continue(3, registry, cfg.replace(invariance="flip"), 1, plain) is None
        assert _parent_to_continue(3, registry, cfg, 1, {"name": "asinh", "a": 0.1}) is None
    assert "centre crop 1.0 in the model, 0.5 now" in caplog.text
    assert "channels 1 in the model, 3 now" in caplog.text
    assert "invariance dihedral in the model, flip now" in caplog.text
    assert "stretch {'name': 'none'} in the model" in caplog.text
    assert registry.latest(3) == meta.version  # the old version keeps serving meanwhile


def test_in_process_state_forgets_idle_projects():
    submitter = InProcessSubmitter(lambda project_id: None)
    for project_id in range(1, 51):
        submitter.submit(project_id)
    assert submitter.wait_idle(10)
    assert submitter._states == {} and submitter._last_request == {}
    assert submitter.state(3) == {"queued": False, "running": False}
    submitter.close()


def test_projects_seen_are_bounded(tmp_path: Path):
    from ml_backend import service as service_module
    from ml_backend.config import Config
    from ml_backend.service import AnomalyService

    submitter = InProcessSubmitter(lambda project_id: None)
    svc = AnomalyService(Config(model_dir=tmp_path), ModelRegistry(tmp_path), submitter)
    for project_id in range(1, service_module.MAX_SEEN + 50):
        svc.request_training(project_id)
    assert len(svc._seen) == service_module.MAX_SEEN
    assert max(svc._seen) == service_module.MAX_SEEN + 49 and 1 not in svc._seen
    submitter.wait_idle(10)
    submitter.close()


def test_a_burst_queues_a_rerank_beside_the_training_cycle_and_metrics_show_both(tmp_path):
    from ml_backend.config import Config
    from ml_backend.registry import RERANK_STATUS
    from ml_backend.service import AnomalyService

    trained, reranked = [], []
    training = InProcessSubmitter(trained.append)
    rerank = InProcessSubmitter(reranked.append)
    registry = ModelRegistry(tmp_path)
    svc = AnomalyService(Config(model_dir=tmp_path), registry, training, rerank)
    assert svc.request_training(4) == QUEUED
    assert training.wait_idle(10) and rerank.wait_idle(10)
    assert trained == reranked == [4]
    registry.write_status(4, {"last_finished": 0.0, "last_duration_s": 1.5, "last_error": None,
                              "last_result": {"status": "reranked"}}, RERANK_STATUS)
    shown = svc.metrics()["projects"]["4"]["rerank"]
    assert shown["last_duration_s"] == 1.5 and shown["last_result"] == {"status": "reranked"}
    assert shown["queued"] is False and shown["last_finished"] == "1970-01-01T00:00:00Z"
    svc.close()
    only_training = AnomalyService(Config(model_dir=tmp_path), registry, training)
    assert only_training.metrics()["projects"]["4"]["rerank"] is None


def test_from_config_builds_the_rerank_queue_unless_turned_off(tmp_path):
    from ml_backend.config import Config
    from ml_backend.service import AnomalyService

    on = AnomalyService.from_config(Config(model_dir=tmp_path))
    off = AnomalyService.from_config(Config(model_dir=tmp_path, fast_rerank=False))
    assert isinstance(on.rerank_submitter, InProcessSubmitter)
    assert on.rerank_submitter.debounce_s == 1.0 and off.rerank_submitter is None
    assert Config.from_env({"AMLS_FAST_RERANK": "false"}).fast_rerank is False
    assert Config(queue_name="q").fast_queue_name == "q-fast"
    on.close()
    off.close()
