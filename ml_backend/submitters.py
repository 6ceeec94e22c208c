"""Coalescing training-job submitters: in a thread of this process, or on RQ workers via Redis.

Both promise the same thing per project: at most one job queued and one running. A request
while a job is queued does nothing; a request while one runs queues exactly one more, so the
labels that arrived during a run are always trained on, and a burst of webhooks costs at most
two jobs. A queued job also waits until requests have been quiet for `debounce_s` (at most
MAX_DEBOUNCE_S in total), so an annotator's burst of labels is trained on at once.

On RQ a running job holds a per-project Redis lock with a short time-to-live (LOCK_TTL_S) that a
thread of the job renews; a worker killed with SIGKILL stops renewing it, so the next job for
that project waits at most LOCK_TTL_S, not the whole job timeout. A job waiting in its
debounce keeps a heartbeat key alive (HEARTBEAT_TTL_S); a started job whose heartbeat lapsed
is dead, so a worker killed during the debounce blocks its project for at most that long.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from ml_backend.config import MAX_DEBOUNCE_S

logger = logging.getLogger(__name__)

QUEUED, ALREADY_QUEUED = "queued", "already-queued"
# Seconds a dead job's project lock outlives it; the running job renews it every third of this.
LOCK_TTL_S = 30.0
# Seconds a debouncing job's heartbeat outlives it (renewed every 0.1 s while it waits).
HEARTBEAT_TTL_S = 10.0
# Seconds the web process waits for Redis when queueing a job; Label Studio gives a webhook
# about a second, so an unreachable Redis must fail fast rather than hang the request.
REDIS_TIMEOUT_S = 0.5


class QueueUnavailable(RuntimeError):
    """The job queue (Redis) cannot be reached; no job was queued."""


class JobSubmitter(Protocol):
    """Coalescing training-job queue (see the module docstring for the semantics)."""

    def submit(self, project_id: int) -> str: ...
    def state(self, project_id: int) -> dict[str, bool]: ...
    def health(self) -> str: ...  # "ok", or why jobs cannot be queued
    def close(self) -> None: ...


@dataclass
class _ProjectState:
    queued: bool = False
    running: bool = False


@dataclass
class InProcessSubmitter:
    """Runs jobs one at a time in a daemon thread of this process (the default, no Redis).

    `run(project_id)` is called in the worker thread; its exceptions are logged (with the
    traceback) and the thread goes on with the next job.
    """

    run: Callable[[int], Any]
    debounce_s: float = 0.0
    _states: dict[int, _ProjectState] = field(default_factory=dict)
    _last_request: dict[int, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _queue: queue.Queue[int | None] = field(default_factory=queue.Queue)
    _thread: threading.Thread | None = None

    def submit(self, project_id: int) -> str:
        with self._lock:
            state = self._states.setdefault(project_id, _ProjectState())
            self._last_request[project_id] = time.monotonic()
            if state.queued:
                return ALREADY_QUEUED
            state.queued = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="amls-jobs", daemon=True)
                self._thread.start()
        self._queue.put(project_id)
        return QUEUED

    def state(self, project_id: int) -> dict[str, bool]:
        with self._lock:
            state = self._states.get(project_id, _ProjectState())
            return {"queued": state.queued, "running": state.running}

    def health(self) -> str:
        """"ok" while the job thread can take jobs."""
        return "ok" if self._thread is None or self._thread.is_alive() else "job thread died"

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no job is queued or running (tests, benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not any(s.queued or s.running for s in self._states.values()):
                    return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)

    def _work(self) -> None:
        while (project_id := self._queue.get()) is not None:
            wait_for_quiet(lambda p=project_id: self._last_request[p], time.monotonic,
                           self.debounce_s)
            with self._lock:
                state = self._states[project_id]
                state.queued, state.running = False, True
            try:
                self.run(project_id)
            except Exception:
                # Not swallowed: run_training has already recorded the error in the project's
                # status (shown in /metrics); the worker thread must survive to serve the
                # next job, so we log the traceback and carry on.
                logger.exception("project %d: training job failed", project_id)
            finally:
                with self._lock:
                    state.running = False
                    if not state.queued:  # idle: forget it, so state stays bounded
                        del self._states[project_id]
                        self._last_request.pop(project_id, None)


class RQSubmitter:
    """Enqueues jobs on an RQ queue in Redis; `amls worker` processes run them.

    A Redis key per project marks "a job is queued" (set with NX, so concurrent webhooks in
    several server processes still enqueue one job); the job clears it when it starts and holds
    a per-project Redis lock while it runs (`project_lock`), so several workers never train one
    project at once.
    """

    def __init__(self, redis_url: str, queue_name: str, func: Callable[..., Any],
                 kwargs: dict[str, Any], job_timeout_s: int = 3600,
                 debounce_s: float = 0.0, lock_ttl_s: float = LOCK_TTL_S,
                 heartbeat_ttl_s: float = HEARTBEAT_TTL_S, job_name: str = "train") -> None:
        from redis import Redis
        from rq import Queue

        self.connection = Redis.from_url(redis_url, socket_timeout=REDIS_TIMEOUT_S,
                                         socket_connect_timeout=REDIS_TIMEOUT_S)
        self.queue = Queue(queue_name, connection=self.connection)
        self.func = func
        self.kwargs = dict(kwargs)
        self.job_timeout_s = job_timeout_s
        self.debounce_s = debounce_s
        self.lock_ttl_s = lock_ttl_s
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.job_name = job_name  # in RQ job ids and descriptions: "train", "rerank"

    def submit(self, project_id: int) -> str:
        """Queue a job (see the module docstring); QueueUnavailable if Redis is unreachable."""
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        try:
            return self._submit(project_id)
        except (RedisConnectionError, RedisTimeoutError) as err:
            raise QueueUnavailable(f"job queue at Redis is unreachable: {err}") from err

    def _submit(self, project_id: int) -> str:
        key = queued_key(self.queue.name, project_id)
        ttl = 4 * self.job_timeout_s
        self.connection.set(last_request_key(self.queue.name, project_id), time.time(), ex=ttl)
        # The job is saved before the mark names it, so a concurrent submit never sees a mark
        # whose job does not exist yet (it would take it for a vanished job and enqueue twice).
        job = self.queue.create_job(rq_entry, args=(project_id, self.func, self.kwargs,
                                                    self.queue.name, self.job_timeout_s,
                                                    self.debounce_s, self.lock_ttl_s,
                                                    self.heartbeat_ttl_s),
                                    job_id=f"amls-{self.job_name}-{project_id}-"
                                           f"{secrets.token_hex(6)}",
                                    timeout=self.job_timeout_s, result_ttl=24 * 3600,
                                    failure_ttl=7 * 24 * 3600,
                                    description=f"{self.job_name} project {project_id}")
        job.save()
        if not self.connection.set(key, job.id, nx=True, ex=ttl):
            if self._queued_job_alive(project_id):
                job.delete()
                return ALREADY_QUEUED
            self.connection.set(key, job.id, ex=ttl)  # the marked job vanished: replace it
        self.queue.enqueue_job(job)
        return QUEUED

    def state(self, project_id: int) -> dict[str, bool]:
        return {"queued": bool(self.connection.exists(queued_key(self.queue.name, project_id))),
                "running": bool(self.connection.exists(running_key(self.queue.name, project_id)))}

    def health(self) -> str:
        """"ok" when Redis answers a PING within its socket timeout."""
        from redis.exceptions import RedisError

        try:
            self.connection.ping()
        except (RedisError, OSError) as err:
            return f"Redis unreachable: {err}"
        return "ok"

    def close(self) -> None:
        self.connection.close()

    def _queued_job_alive(self, project_id: int) -> bool:
        """Whether the job the project's "queued" mark names will still run."""
        from rq.job import Job

        raw = self.connection.get(queued_key(self.queue.name, project_id))
        if raw is None:
            return False
        # Only the job hash's plain status field is read: Job.fetch would unpickle the job's
        # meta, and the web process must never unpickle what is in Redis.
        status, started_at = self.connection.hmget(Job.key_for(raw.decode()),
                                                   ["status", "started_at"])
        if status is None:
            return False
        if status.decode() == "started":
            # Started while the mark names it: it is waiting for quiet and has not read any
            # labels yet (it clears the mark before it does), unless its worker died there.
            # Its heartbeat says it lives; so does a start too recent for a first beat.
            beat = self.connection.get(heartbeat_key(self.queue.name, project_id))
            return beat == raw or _seconds_since(started_at) < self.heartbeat_ttl_s
        return status.decode() in ("queued", "deferred", "scheduled")


def queued_key(queue_name: str, project_id: int) -> str:
    return f"amls:{queue_name}:queued:{project_id}"


def running_key(queue_name: str, project_id: int) -> str:
    return f"amls:{queue_name}:running:{project_id}"


def _seconds_since(stamp: bytes | None) -> float:
    """Seconds since an RQ timestamp (ISO 8601, UTC); infinity if absent or unreadable."""
    from datetime import UTC, datetime

    try:
        then = datetime.fromisoformat(stamp.decode()) if stamp else None
    except ValueError:
        then = None
    if then is None:
        return float("inf")
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    return (datetime.now(UTC) - then).total_seconds()


def heartbeat_key(queue_name: str, project_id: int) -> str:
    return f"amls:{queue_name}:debouncing:{project_id}"


def last_request_key(queue_name: str, project_id: int) -> str:
    return f"amls:{queue_name}:last-request:{project_id}"


def wait_for_quiet(last_request: Callable[[], float], now: Callable[[], float],
                   quiet_s: float) -> float:
    """Sleep until `quiet_s` passed since `last_request()` (at most MAX_DEBOUNCE_S); returns
    the seconds waited. Both callables use the same clock."""
    start = time.monotonic()
    while quiet_s > 0:
        remaining = last_request() + quiet_s - now()
        waited = time.monotonic() - start
        if remaining <= 0 or waited >= MAX_DEBOUNCE_S:
            break
        time.sleep(min(remaining, 0.1, MAX_DEBOUNCE_S - waited))
    return time.monotonic() - start


def rq_entry(project_id: int, func: Callable[..., Any], kwargs: dict[str, Any],
             queue_name: str, job_timeout_s: int, debounce_s: float = 0.0,
             lock_ttl_s: float = LOCK_TTL_S, heartbeat_ttl_s: float = HEARTBEAT_TTL_S) -> Any:
    """What RQ runs: wait for quiet, clear the "queued" mark, take the project's lock, call
    `func(project_id, **kwargs)`."""
    from rq import get_current_job

    job = get_current_job()
    if job is None:
        raise RuntimeError("rq_entry must run inside an RQ worker")
    connection = job.connection
    key = queued_key(queue_name, project_id)
    beat = heartbeat_key(queue_name, project_id)

    def beat_and_read_last_request() -> float:
        # Called every 0.1 s while the job waits: "alive" lapses heartbeat_ttl_s after a kill.
        connection.set(beat, job.id, px=max(1, int(heartbeat_ttl_s * 1000)))
        raw = connection.get(last_request_key(queue_name, project_id))
        return float(raw) if raw is not None else 0.0

    wait_for_quiet(beat_and_read_last_request, time.time, debounce_s)
    if connection.get(key) == job.id.encode():
        connection.delete(key)
    connection.delete(beat)
    with project_lock(connection, running_key(queue_name, project_id), ttl_s=lock_ttl_s,
                      wait_s=job_timeout_s):
        return func(project_id, **kwargs)


@contextmanager
def project_lock(connection: Any, name: str, *, ttl_s: float, wait_s: float) -> Iterator[None]:
    """Hold the Redis lock `name` while the body runs, waiting at most `wait_s` to take it.

    The lock expires `ttl_s` after it was last renewed, and a daemon thread renews it every
    ttl_s / 3; if this process dies, the lock is free again within `ttl_s`.
    TimeoutError if another holder kept it for `wait_s`.
    """
    from redis.exceptions import LockError, RedisError

    # thread_local=False: the renewing thread must see the token the acquiring thread got.
    lock = connection.lock(name, timeout=ttl_s, blocking_timeout=wait_s, thread_local=False)
    if not lock.acquire():
        raise TimeoutError(f"{name}: another job held the lock for {wait_s} s")
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl_s / 3):
            try:
                lock.reacquire()
            except LockError as err:  # expired and maybe taken by another job: nothing to renew
                logger.error("%s: lost the lock (%s); another job may run concurrently", name, err)
                return
            except RedisError as err:  # a blip: the lock still has up to ttl_s to live
                logger.warning("%s: could not renew the lock yet: %s", name, err)

    renewer = threading.Thread(target=renew, name=f"renew {name}", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        try:
            lock.release()
        except (LockError, RedisError) as err:
            logger.warning("%s: could not release the lock (%s); it expires within %g s",
                           name, err, ttl_s)
