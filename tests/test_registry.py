"""Model registry (versions, LATEST, pruning) and the service's model cache and predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ml_backend.config import Config
from ml_backend.core.config import TrainConfig
from ml_backend.registry import ModelRegistry
from ml_backend.service import UNTRAINED, AnomalyService
from ml_backend.submitters import InProcessSubmitter
from tests.support.shipped import BINARY_CONFIG

LABEL_CONFIG = BINARY_CONFIG


def fake_version(registry: ModelRegistry, project_id: int, name: str) -> None:
    """Publish a directory with an empty meta.json (registry-level tests need no weights)."""
    staging = registry.staging_dir(project_id)
    staging.mkdir()
    (staging / "meta.json").write_text('{"label_counts": {"anomaly": 1}}')
    registry.publish(project_id, staging, name)


NAMES = [f"amls-2026010{i}T000000Z-000{i}" for i in range(1, 6)]


def test_empty_registry(tmp_path: Path):
    registry = ModelRegistry(tmp_path / "models")
    assert registry.latest(1) is None
    assert registry.versions(1) == []
    assert registry.projects() == []


def test_publish_moves_latest_and_lists_versions_oldest_first(tmp_path: Path):
    registry = ModelRegistry(tmp_path)
    for name in reversed(NAMES[:3]):
        fake_version(registry, 4, name)
        assert registry.latest(4) == name
    assert registry.versions(4) == NAMES[:3]
    assert registry.projects() == [4]
    assert registry.read_meta(4, NAMES[0]) == {"label_counts": {"anomaly": 1}}


def test_unfinished_staging_is_neither_a_version_nor_publishable(tmp_path: Path):
    registry = ModelRegistry(tmp_path)
    fake_version(registry, 1, NAMES[0])
    staging = registry.staging_dir(1)
    staging.mkdir()
    assert registry.versions(1) == [NAMES[0]]
    with pytest.raises(FileNotFoundError, match="meta.json"):
        registry.publish(1, staging, NAMES[1])
    assert registry.latest(1) == NAMES[0]
    registry.discard(staging)
    assert not staging.exists()


def test_publishing_an_existing_version_fails_and_keeps_latest(tmp_path: Path):
    registry = ModelRegistry(tmp_path)
    fake_version(registry, 1, NAMES[0])
    fake_version(registry, 1, NAMES[1])
    with pytest.raises(FileExistsError):
        fake_version(registry, 1, NAMES[0])
    assert registry.latest(1) == NAMES[1]


@pytest.mark.parametrize("keep", [1, 2, 3, 7])
def test_prune_keeps_the_newest_and_never_latest(tmp_path: Path, keep: int):
    registry = ModelRegistry(tmp_path)
    for name in NAMES:
        fake_version(registry, 1, name)
    # Point LATEST back at the oldest (a rollback): pruning must not delete it.
    (registry.project_dir(1) / "LATEST").write_text(NAMES[0])
    removed = registry.prune(1, keep)
    remaining = registry.versions(1)
    assert set(remaining) == (set(NAMES[-keep:]) | {NAMES[0]})
    assert set(removed) | set(remaining) == set(NAMES)
    assert registry.latest(1) == NAMES[0]


def test_dangling_latest_is_a_clear_error(tmp_path: Path):
    registry = ModelRegistry(tmp_path)
    registry.project_dir(3).mkdir(parents=True)
    (registry.project_dir(3) / "LATEST").write_text("amls-gone")
    with pytest.raises(RuntimeError, match="amls-gone"):
        registry.latest(3)


@pytest.mark.parametrize("bad", ["../x", ".staging-1", "", "a/b"])
def test_version_names_cannot_escape_the_project_dir(tmp_path: Path, bad: str):
    with pytest.raises(ValueError):
        ModelRegistry(tmp_path).version_dir(1, bad)


def test_status_round_trip(tmp_path: Path):
    registry = ModelRegistry(tmp_path)
    assert registry.read_status(5) == {}
    registry.write_status(5, {"last_error": "x", "last_duration_s": 1.5})
    assert registry.read_status(5) == {"last_error": "x", "last_duration_s": 1.5}


# ---- the service on top of the registry --------------------------------------------------------

def make_service(tmp_path: Path, prelabel: bool = False) -> AnomalyService:
    cfg = Config(model_dir=tmp_path / "models", train=TrainConfig(device="cpu"),
                 store_roots=(tmp_path,), prelabel=prelabel)
    return AnomalyService(cfg, ModelRegistry(cfg.model_dir), InProcessSubmitter(lambda p: None))


def test_untrained_project_gets_empty_results_and_no_scores(tmp_path: Path):
    service = make_service(tmp_path)
    tasks = [{"id": 1, "data": {"image": "/a.png"}}, {"id": 2, "data": {"image": "/b.png"}}]
    results = service.predict(1, tasks, LABEL_CONFIG)
    assert results == [{"result": [], "model_version": UNTRAINED}] * 2
    assert service.model_version(1) == UNTRAINED
    assert service.metrics()["projects"] == {}


def save_tiny_model(model_dir: Path, version: str, seed: int) -> None:
    import torch

    from ml_backend.core.checkpoint import ModelMeta, save_model_dir
    from ml_backend.core.config import TrainConfig
    from ml_backend.core.model import build_model

    cfg = TrainConfig(image_size=32, pretrained=False, head_init_std=1.0, seed=seed)
    torch.manual_seed(seed)
    model = build_model(cfg, 1)
    meta = ModelMeta(version=version, parent=None, created="2026-01-01T00:00:00+00:00",
                     config=cfg.to_dict(), image_size=32, channels=1,
                     stretch={"name": "none"}, label_counts={"anomaly": 2, "normal": 3})
    save_model_dir(model_dir, ema=model, student=model, meta=meta)


@pytest.mark.slow
def test_service_scores_store_tasks_and_reloads_when_latest_moves(tmp_path: Path):
    from ml_backend.core.store import CutoutStore

    rng = np.random.default_rng(0)
    store_path = tmp_path / "s.h5"
    with CutoutStore.create(store_path, height=32, width=32, channels=1,
                            stretch={"name": "none"}) as store:
        store.append(["a", "b", "c"], rng.integers(0, 255, (3, 32, 32, 1), dtype=np.uint8))
    service = make_service(tmp_path, prelabel=True)
    registry = service.registry
    tasks = [{"id": i, "data": {"store": str(store_path), "cutout_id": cid}}
             for i, cid in enumerate(["c", "a", "missing", "b"])]
    tasks.append({"id": 9, "data": {"image": "/no-store.png"}})

    for seed, name in enumerate(NAMES[:2]):
        staging = registry.staging_dir(7)
        save_tiny_model(staging, name, seed)
        registry.publish(7, staging, name)
        results = service.predict(7, tasks, LABEL_CONFIG)
        assert [r["model_version"] for r in results] == [name] * 5
        scored = [r for r in results if r["result"]]
        assert len(scored) == 3
        for r in scored:
            assert 0.0 <= r["score"] <= 1.0
            expected = "anomaly" if r["score"] >= 0.5 else "normal"
            assert r["result"][0]["value"]["choices"] == [expected]
        assert results[2] == {"result": [], "model_version": name}  # missing cutout
        assert results[4] == {"result": [], "model_version": name}  # no pixels known
    # By default (no AMLS_PRELABEL) the same scores come with nothing pre-selected.
    plain = make_service(tmp_path).predict(7, tasks, LABEL_CONFIG)
    assert [r.get("score") for r in plain] == [r.get("score") for r in results]
    assert all(r["result"] == [] for r in plain)

    metrics = service.metrics()["projects"]["7"]
    assert metrics["model_version"] == NAMES[1]
    assert metrics["label_counts"] == {"anomaly": 2, "normal": 3}
    assert metrics["queue"]["queued"] is False
    assert metrics["queue"]["last_finished"] is None  # no job has finished yet
    assert service.versions(7)["versions"] == NAMES[:2]

    registry.write_status(7, {"last_finished": 1796301610.75, "last_duration_s": 3.5})
    queue = service.metrics()["projects"]["7"]["queue"]
    assert queue["last_finished"] == "2026-12-03T12:40:10Z" and queue["last_duration_s"] == 3.5


def test_prune_removes_what_killed_jobs_left_once_stale(tmp_path: Path):
    import os
    import time

    registry = ModelRegistry(tmp_path)
    for name in NAMES:
        fake_version(registry, 1, name)
    pdir = registry.project_dir(1)
    old_staging, new_staging = pdir / ".staging-dead", pdir / ".staging-busy"
    broken = pdir / "amls-20260101T000000Z-0bad"  # a version folder without meta.json
    for path in (old_staging, new_staging, broken):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"partial")
    day_ago = time.time() - 2 * 86_400
    for path in (old_staging, broken):
        os.utime(path, (day_ago, day_ago))
    registry.prune(1, keep=len(NAMES))
    assert not old_staging.exists() and not broken.exists()
    assert new_staging.exists(), "a running job's staging folder is left alone"
    assert registry.versions(1) == sorted(NAMES)


class RunningSubmitter:
    """A submitter whose every project has a job running."""

    def state(self, project_id: int) -> dict[str, bool]:
        return {"queued": False, "running": True}


def test_metrics_show_a_running_jobs_progress_with_iso_times(tmp_path: Path):
    cfg = Config(model_dir=tmp_path / "models", train=TrainConfig(device="cpu"))
    registry = ModelRegistry(cfg.model_dir)
    registry.write_progress(5, {"stage": "train", "done": 40, "total": 100,
                                "started": 1796301600.0, "updated": 1796301610.2})
    service = AnomalyService(cfg, registry, RunningSubmitter())
    queue = service.metrics()["projects"]["5"]["queue"]
    assert queue["running"] is True
    assert queue["progress"] == {"stage": "train", "done": 40, "total": 100,
                                 "started": "2026-12-03T12:40:00Z",
                                 "updated": "2026-12-03T12:40:10Z"}
    registry.write_progress(5, None)
    assert service.metrics()["projects"]["5"]["queue"]["progress"] is None
