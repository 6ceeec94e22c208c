"""Reliability: webhook bursts, Redis down, Label Studio down while writing predictions,
a worker killed during the debounce.

Job bodies here are fakes that record when they start; nothing trains (a worker killed while
the real job trains and writes: test_worker_kill.py).
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from demo.local_servers import free_port
from ml_backend.app import create_app
from ml_backend.config import Config
from ml_backend.label_schema import parse_label_config
from ml_backend.labelstudio import LabelStudioClient
from ml_backend.registry import ModelRegistry
from ml_backend.service import AnomalyService
from ml_backend.submitters import QUEUED, InProcessSubmitter, JobSubmitter, RQSubmitter
from tests.support.json_server import send_json
from tests.support.live_services import (
    DEFAULT_REDIS_BIN,
    kill_rq_worker,
    missing_service,
    start_rq_worker,
)
from tests.support.shipped import BINARY_CONFIG

PROJECT = 5
N_WEBHOOKS = 1000
N_THREADS = 8
DEBOUNCE_S = 0.5  # the job waits for this much quiet, so it starts after the burst
LABEL_CONFIG = BINARY_CONFIG


def webhook(i: int) -> dict[str, Any]:
    return {"action": "ANNOTATION_CREATED", "project": {"id": PROJECT},
            "annotation": {"id": i, "project": PROJECT}}


class AcceptTimes:
    """Wraps a submitter; records the wall-clock time each `submit` returned."""

    def __init__(self, inner: JobSubmitter) -> None:
        self.inner = inner
        self.accepted: list[float] = []
        self._lock = threading.Lock()

    def submit(self, project_id: int) -> str:
        outcome = self.inner.submit(project_id)
        with self._lock:
            self.accepted.append(time.time())
        return outcome

    def state(self, project_id: int) -> dict[str, bool]:
        return self.inner.state(project_id)

    def health(self) -> str:
        return self.inner.health()

    def close(self) -> None:
        self.inner.close()


def build_client(tmp_path: Path, submitter: JobSubmitter, redis_url: str = "") -> Any:
    cfg = Config(model_dir=tmp_path, redis_url=redis_url)
    service = AnomalyService(cfg, ModelRegistry(tmp_path), submitter)
    return create_app(service, cfg)


def post_burst(app: Any, statuses: list[int]) -> list[threading.Thread]:
    """Start N_THREADS threads that POST N_WEBHOOKS webhooks between them."""
    def worker(offset: int) -> None:
        client = app.test_client()
        for i in range(offset, N_WEBHOOKS, N_THREADS):
            statuses.append(client.post("/webhook", json=webhook(i)).status_code)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(N_THREADS)]
    for thread in threads:
        thread.start()
    return threads


def record_start(project_id: int, *, redis_url: str, key: str) -> str:
    """RQ job body: push the start time to a Redis list, pretend to work briefly."""
    from redis import Redis

    Redis.from_url(redis_url).rpush(key, json.dumps([project_id, time.time()]))
    time.sleep(0.1)
    return "done"


# ---- 1. a burst of webhooks costs at most two runs, the last after the last webhook -----------

def test_burst_in_process(tmp_path):
    starts: list[float] = []

    def run(project_id: int) -> None:
        starts.append(time.time())
        time.sleep(0.1)

    submitter = AcceptTimes(InProcessSubmitter(run, debounce_s=DEBOUNCE_S))
    app = build_client(tmp_path, submitter)
    statuses: list[int] = []
    for thread in post_burst(app, statuses):
        thread.join(60)
    assert submitter.inner.wait_idle(40)
    submitter.close()
    assert statuses == [200] * N_WEBHOOKS
    assert len(submitter.accepted) == N_WEBHOOKS
    assert 1 <= len(starts) <= 2, starts
    assert starts[-1] > max(submitter.accepted)


@pytest.mark.e2e
def test_burst_rq(tmp_path, redis_url):
    from redis import Redis
    from rq import SimpleWorker

    queue_name = "test-reliability-burst"
    key = f"test:{queue_name}:starts"
    inner = RQSubmitter(redis_url, queue_name, record_start,
                        {"redis_url": redis_url, "key": key}, debounce_s=DEBOUNCE_S)
    inner.connection.flushdb()
    submitter = AcceptTimes(inner)
    app = build_client(tmp_path, submitter, redis_url)
    worker_conn = Redis.from_url(redis_url)
    statuses: list[int] = []
    threads = post_burst(app, statuses)
    # A worker runs alongside the burst (in this, the main, thread: RQ wants signals).
    deadline = time.monotonic() + 60
    while (any(t.is_alive() for t in threads) or inner.queue.count) and \
            time.monotonic() < deadline:
        SimpleWorker([inner.queue], connection=worker_conn).work(burst=True,
                                                                 logging_level="WARNING")
        time.sleep(0.05)
    starts = [json.loads(x)[1] for x in worker_conn.lrange(key, 0, -1)]
    inner.connection.flushdb()
    submitter.close()
    assert statuses == [200] * N_WEBHOOKS
    assert 1 <= len(starts) <= 2, starts
    assert starts[-1] > max(submitter.accepted)


# ---- 2. Redis down: a fast 503, then normal queueing once it is back -------------------------

def start_redis(port: int, workdir: str) -> subprocess.Popen[bytes]:
    from redis import Redis
    from redis.exceptions import ConnectionError as RedisConnectionError

    if not DEFAULT_REDIS_BIN.exists():
        missing_service(f"redis-server not found at {DEFAULT_REDIS_BIN}")
    proc = subprocess.Popen([str(DEFAULT_REDIS_BIN), "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            Redis(port=port).ping()
            return proc
        except RedisConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


@pytest.mark.e2e
def test_webhook_with_redis_down_is_a_fast_503_then_recovers(tmp_path, caplog):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    submitter = RQSubmitter(url, "test-down", record_start, {"redis_url": url, "key": "k"})
    client = build_client(tmp_path, submitter, url).test_client()
    caplog.set_level(logging.INFO)

    began = time.monotonic()
    response = client.post("/webhook", json=webhook(1))
    assert time.monotonic() - began < 1.0
    assert response.status_code == 503
    assert response.json["status"] == "error"
    assert "Redis" in response.json["error"]
    assert "no training job queued" in caplog.text
    assert "Traceback" not in caplog.text

    with tempfile.TemporaryDirectory() as workdir:
        proc = start_redis(port, workdir)
        try:
            response = client.post("/webhook", json=webhook(2))
            assert response.status_code == 200
            assert response.json["status"] == QUEUED
            assert submitter.queue.count == 1
        finally:
            submitter.close()
            proc.kill()
            proc.wait(10)


# ---- 3. Label Studio down while writing predictions ------------------------------------------

class FakeLabelStudio(BaseHTTPRequestHandler):
    """Import-predictions and model-versions endpoints; `plan` scripts the POST answers.

    Plan entries, one per POST (then "ok"): "ok"; a status like 503 (nothing stored);
    "landed-502" (stored, but answers 502); "drop" (connection closed, nothing stored).
    """

    plan: list[Any]
    stored: list[dict[str, Any]]
    posts: list[int]

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.posts.append(len(body))
        step = self.plan.pop(0) if self.plan else "ok"
        if step == "drop":
            self.close_connection = True
            self.connection.close()
            return
        if step in ("ok", "landed-502"):
            self.stored.extend(body)
        status = {"ok": 201, "landed-502": 502}.get(step, step)
        self._json(status, {"created": len(body)} if status == 201 else {"detail": "down"})

    def do_GET(self) -> None:  # noqa: N802
        counts: dict[str, int] = {}
        for prediction in self.stored:
            counts[prediction["model_version"]] = counts.get(prediction["model_version"], 0) + 1
        self._json(200, counts)

    def _json(self, status: int, payload: Any) -> None:
        send_json(self, status, payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_ls():
    handler = type("Handler", (FakeLabelStudio,), {"plan": [], "stored": [], "posts": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", handler
    server.shutdown()
    server.server_close()


SCORES = [(task_id, task_id / 20) for task_id in range(1, 11)]  # 10 tasks, batches of 4


@pytest.mark.parametrize("plan, posts", [
    ([], [4, 4, 2]),
    ([503, 503, 503], [4, 4, 4, 4, 4, 2]),             # down for three tries, then back
    ([429], [4, 4, 4, 2]),
    (["ok", "drop"], [4, 4, 4, 2]),                     # connection lost on batch 2
    (["ok", "landed-502"], [4, 4, 2]),                  # batch 2 landed: not re-sent
    (["landed-502", 500, "landed-502"], [4, 4, 4, 2]),  # mixed
])
def test_write_predictions_retries_without_duplicates(fake_ls, plan, posts):
    url, handler = fake_ls
    handler.plan.extend(plan)
    client = LabelStudioClient(url, "token")
    schema = parse_label_config(LABEL_CONFIG, "anomaly")
    written = client.write_predictions(1, schema, SCORES, "amls-v1", batch_size=4,
                                       backoff_s=0.01)
    assert written == len(SCORES)
    assert handler.posts == posts
    assert sorted(p["task"] for p in handler.stored) == [t for t, _ in SCORES]


@pytest.mark.parametrize("plan, error", [
    ([400], "400"),                   # a client error is not retried
    ([503] * 5, "503"),               # still down after every try
])
def test_write_predictions_gives_up(fake_ls, plan, error):
    url, handler = fake_ls
    handler.plan.extend(plan)
    client = LabelStudioClient(url, "token")
    schema = parse_label_config(LABEL_CONFIG, "anomaly")
    with pytest.raises(Exception, match=error):
        client.write_predictions(1, schema, SCORES, "amls-v1", batch_size=4, backoff_s=0.01)
    assert handler.posts == [4] * len(plan)
    assert handler.stored == []


def test_write_predictions_refuses_an_inconsistent_count(fake_ls):
    url, handler = fake_ls
    handler.stored.append({"model_version": "amls-v1", "task": 99})  # someone else wrote it
    handler.plan.append(503)
    client = LabelStudioClient(url, "token")
    schema = parse_label_config(LABEL_CONFIG, "anomaly")
    with pytest.raises(RuntimeError, match="expected 0 or 4"):
        client.write_predictions(1, schema, SCORES, "amls-v1", batch_size=4, backoff_s=0.01)


# ---- 4. a worker killed during the debounce does not block its project ------------------------

KILLED_HEARTBEAT_TTL_S = 2.0


@pytest.mark.e2e
def test_a_worker_killed_during_the_debounce_frees_its_project(tmp_path, redis_url):
    from rq.job import Job

    from ml_backend.submitters import ALREADY_QUEUED, heartbeat_key

    queue_name = "test-reliability-debounce-kill"
    key = f"test:{queue_name}:starts"
    # A long debounce: the job will still be waiting for quiet when its worker dies.
    submitter = RQSubmitter(redis_url, queue_name, record_start,
                            {"redis_url": redis_url, "key": key}, debounce_s=25,
                            heartbeat_ttl_s=KILLED_HEARTBEAT_TTL_S)
    submitter.connection.flushdb()
    assert submitter.submit(PROJECT) == QUEUED
    [job_id] = submitter.queue.job_ids
    worker = start_rq_worker(redis_url, queue_name)
    try:
        beat = heartbeat_key(queue_name, PROJECT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and submitter.connection.get(beat) is None:
            time.sleep(0.05)  # the job is in its 25 s debounce once it beats
        assert submitter.connection.get(beat) == job_id.encode(), "the job never debounced"
        time.sleep(KILLED_HEARTBEAT_TTL_S + 0.5)  # past the start grace: only beats count
        assert submitter.submit(PROJECT) == ALREADY_QUEUED, "a live debouncing job coalesces"
    finally:
        kill_rq_worker(worker)
    killed = time.time()
    assert submitter.connection.hget(Job.key_for(job_id), "status") == b"started"
    from redis import Redis
    from rq import SimpleWorker

    quick = RQSubmitter(redis_url, queue_name, record_start,
                        {"redis_url": redis_url, "key": key}, job_timeout_s=30)
    try:
        while quick.submit(PROJECT) != QUEUED and time.time() - killed < 60:
            time.sleep(0.2)  # "already queued" while the dead job's heartbeat lives
        SimpleWorker([quick.queue], connection=Redis.from_url(redis_url)).work(
            burst=True, logging_level="WARNING")
        starts = quick.connection.lrange(key, 0, -1)
    finally:
        submitter.connection.flushdb()
        submitter.close()
        quick.close()
    assert starts, "the project stayed blocked for a minute after the kill"
    assert json.loads(starts[0])[1] - killed < KILLED_HEARTBEAT_TTL_S + 5
