"""A real RQ worker SIGKILLed in the middle of the real training job.

The job (`ml_backend.jobs.run_training`, as the backend queues it) trains, stages its version
and starts writing predictions to a scripted Label Studio over HTTP; the import request hangs
and the worker dies there, between the staged checkpoint and the publish. The previous
version must keep serving, locally and in Label Studio, and the next job must run and publish
within about the lock's time-to-live.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from ml_backend import jobs
from ml_backend.config import Config
from ml_backend.core.config import TrainConfig
from ml_backend.registry import ModelRegistry
from ml_backend.service import AnomalyService
from ml_backend.submitters import QUEUED, RQSubmitter
from tests.support.json_server import json_server
from tests.support.live_services import kill_rq_worker, start_rq_worker
from tests.support.shipped import BINARY_CONFIG
from tests.support.store_tasks import random_store_tasks

PROJECT = 11
API_KEY = "scripted-key"
N_TASKS, ANOMALIES, NORMALS = 16, (1, 2, 3), (4, 5, 6, 7, 8)
KILLED_LOCK_TTL_S = 2.0  # the killed job's project lock: the next job waits about this long
JOB_START_TIMEOUT_S = 120  # a fresh worker imports torch, then trains two iterations


class ScriptedLabelStudio:
    """The Label Studio API calls a training job makes, in memory; `hold` hangs imports."""

    def __init__(self, tasks: list[dict[str, Any]]) -> None:
        self.tasks = tasks
        self.model_version = ""
        self.predictions: dict[str, int] = {}  # model version -> predictions imported
        self.hold = False
        self.import_hanging = threading.Event()
        self.release = threading.Event()

    def answer(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        url = urlsplit(path)
        parts = url.path.strip("/").split("/")
        if parts == ["api", "projects", str(PROJECT)]:
            if method == "PATCH":
                self.model_version = body["model_version"]
            return 200, {"id": PROJECT, "label_config": BINARY_CONFIG,
                         "model_version": self.model_version}
        if parts == ["api", "tasks"]:
            page = int(parse_qs(url.query).get("page", ["1"])[0])
            return 200, {"tasks": self.tasks if page == 1 else [], "total": len(self.tasks)}
        if parts == ["api", "projects", str(PROJECT), "import", "predictions"]:
            if self.hold:
                self.import_hanging.set()
                self.release.wait(JOB_START_TIMEOUT_S)
                return 503, {"detail": "released after the test"}
            version = body[0]["model_version"]
            self.predictions[version] = self.predictions.get(version, 0) + len(body)
            return 201, {"created": len(body)}
        if parts == ["api", "projects", str(PROJECT), "model-versions"]:
            if method == "DELETE":
                self.predictions.pop(body["model_version"], None)
                return 200, {}
            return 200, dict(self.predictions)
        if parts == ["api", "dm", "views"]:
            return (201, {"id": 1, "project": PROJECT, "data": body["data"]}) \
                if method == "POST" else (200, [])
        return 404, {"detail": f"not scripted: {method} {path}"}


def staged_versions(registry: ModelRegistry) -> list[Path]:
    """Staging folders a job left in the project's folder."""
    return [p for p in registry.project_dir(PROJECT).iterdir()
            if p.name.startswith(".staging-")]


@pytest.mark.e2e
@pytest.mark.slow
def test_sigkilled_worker_leaves_the_previous_version_serving(tmp_path, redis_url,
                                                               monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", API_KEY)  # workers read the key from the env
    (tmp_path / "stores").mkdir()
    ls = ScriptedLabelStudio(random_store_tasks(tmp_path / "stores" / "s.h5", N_TASKS,
                                                ANOMALIES, NORMALS))
    unlabelled = N_TASKS - len(ANOMALIES) - len(NORMALS)
    with json_server(ls.answer) as url:
        settings = Config(label_studio_url=url, label_studio_api_key=API_KEY,
                          model_dir=tmp_path / "models", store_roots=(tmp_path / "stores",),
                          train=TrainConfig(image_size=32, batch_size=4, device="cpu"),
                          iterations=2,
                          rerank_blend=False)  # the cycle itself serves (no blend after it)
        registry = ModelRegistry(settings.model_dir)
        first = jobs.run_training(PROJECT, settings)["model_version"]
        assert ls.model_version == first and ls.predictions == {first: unlabelled}

        queue_name = "test-worker-kill"
        submitter = RQSubmitter(redis_url, queue_name, jobs.run_training,
                                {"settings": settings.for_jobs()},
                                lock_ttl_s=KILLED_LOCK_TTL_S)
        submitter.connection.flushdb()
        ls.hold = True
        assert submitter.submit(PROJECT) == QUEUED
        worker = start_rq_worker(redis_url, queue_name)
        try:
            hung = ls.import_hanging.wait(JOB_START_TIMEOUT_S)
        finally:
            kill_rq_worker(worker)
            ls.release.set()
        killed = time.time()
        assert hung, "the queued job never reached its prediction writes"

        # Killed after staging a complete version, before publishing it.
        [staging] = staged_versions(registry)
        assert (staging / "meta.json").is_file()
        service = AnomalyService(settings, registry, submitter)
        assert registry.versions(PROJECT) == [first] and registry.latest(PROJECT) == first
        assert service.model_version(PROJECT) == first
        assert ls.model_version == first and set(ls.predictions) == {first}

        ls.hold = False
        next_start = run_next_job(redis_url, queue_name, settings)
        submitter.connection.flushdb()
        submitter.close()
    latest = registry.latest(PROJECT)
    assert latest not in (None, first) and set(registry.versions(PROJECT)) == {first, latest}
    assert ls.model_version == latest and ls.predictions[latest] == unlabelled
    # The dead job's lock expired on its own: the next job waited about its time-to-live,
    # not the job timeout.
    assert next_start - killed < KILLED_LOCK_TTL_S + 5


def run_next_job(redis_url: str, queue_name: str, settings: Config) -> float:
    """Queue the real job again and run it in this process; the time it started."""
    from redis import Redis
    from rq import SimpleWorker

    submitter = RQSubmitter(redis_url, queue_name, jobs.run_training,
                            {"settings": settings.for_jobs()}, job_timeout_s=60)
    try:
        assert submitter.submit(PROJECT) == QUEUED
        SimpleWorker([submitter.queue], connection=Redis.from_url(redis_url)).work(
            burst=True, logging_level="WARNING")
    finally:
        submitter.close()
    status = ModelRegistry(settings.model_dir).read_status(PROJECT)
    assert status.get("last_error") is None, status
    return status["last_finished"] - status["last_duration_s"]
