"""Live Redis and Label Studio servers for integration tests.

Fixture API (registered in ``tests/conftest.py``; both are session-scoped):

``redis_url`` -> ``str``
    ``redis://127.0.0.1:<port>/0`` of a throw-away ``redis-server`` (Debian's
    ``/usr/bin/redis-server``, or ``AMLS_REDIS_SERVER_BIN``) on a free loopback port, no
    persistence, working directory in a temp dir. Killed at the end of the session.

``label_studio`` -> :class:`LiveLabelStudio`
    A real Label Studio started from the binary named by ``AMLS_LABEL_STUDIO_BIN`` (default
    ``.ls-venv/bin/label-studio``, as ``make test`` installs it) on a free loopback port, with a
    fresh data dir, local-file serving from a temp document root and loopback ML backends
    allowed. Fields: ``url`` (no trailing slash), ``token`` (legacy API token, also the
    ``LABEL_STUDIO_API_KEY`` the backend needs), ``document_root`` (a :class:`~pathlib.Path`;
    files under it are served as ``/data/local-files/?d=<path relative to it>``), ``client``
    (a ready ``label_studio_sdk.LabelStudio``), ``username``, ``password``. Start-up waits for
    ``/health`` up to ``AMLS_LS_START_TIMEOUT_S`` seconds (default 300: first start migrates a
    fresh SQLite database, slow on a busy machine). Stopped with SIGTERM (then SIGKILL).

Outside pytest, ``running_redis()`` and ``running_label_studio()`` are the same servers as
context managers (the benchmarks use them).

A missing binary makes the dependent tests SKIP locally with the reason, but FAIL when the
environment says ``CI=true``: in CI a silently skipped integration test is a lost test.
Tests that use these fixtures are marked ``@pytest.mark.e2e``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from demo.local_servers import (
    free_port,
    http_ok,
    label_studio_command,
    label_studio_env,
    start_process,
    stop_process,
    wait_for,
)

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LS_BIN = REPO_ROOT / ".ls-venv" / "bin" / "label-studio"
DEFAULT_REDIS_BIN = Path("/usr/bin/redis-server")
LS_START_TIMEOUT_S = float(os.environ.get("AMLS_LS_START_TIMEOUT_S", "300"))
REDIS_START_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class LiveLabelStudio:
    """A running Label Studio: where it is and how to talk to it."""

    url: str
    token: str
    document_root: Path
    client: object  # label_studio_sdk.LabelStudio (imported lazily: the SDK import is slow)
    username: str
    password: str


def missing_service(reason: str) -> None:
    """Skip the test locally; fail it in CI, where every integration test must run."""
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"{reason} (CI=true: integration tests must not be skipped)", pytrace=False)
    pytest.skip(reason)


def start_rq_worker(redis_url: str, queue_name: str) -> subprocess.Popen:
    """A real `rq worker --burst` in its own session, able to import the tests and the code."""
    tests_dir = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests_dir), str(tests_dir.parent)])}
    return subprocess.Popen([str(Path(sys.executable).parent / "rq"), "worker", "--burst",
                             "--url", redis_url, queue_name], cwd=tests_dir, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)


def kill_rq_worker(proc: subprocess.Popen) -> None:
    """SIGKILL an RQ worker and its work horse, as a lost machine would lose them.

    RQ moves the horse into a process group of its own, so killing the worker's group alone
    leaves the horse running its job to the end.
    """
    horses = [int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat")
              if _parent_pid(stat) == proc.pid]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in horses:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _parent_pid(stat: Path) -> int | None:
    try:  # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may contain spaces
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


@contextlib.contextmanager
def running_redis() -> Iterator[str]:
    """Start a private redis-server and yield its URL."""
    binary = Path(os.environ.get("AMLS_REDIS_SERVER_BIN", DEFAULT_REDIS_BIN))
    if not binary.exists():
        missing_service(f"redis-server not found at {binary} (apt-get install redis-server)")
    import redis

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="amls-redis-") as workdir:
        log_path = Path(workdir) / "redis.log"
        cmd = [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", workdir, "--logfile", str(log_path)]
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT)
        url = f"redis://127.0.0.1:{port}/0"

        def ready() -> bool:
            try:
                return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
            except redis.exceptions.ConnectionError:
                return False

        try:
            wait_for(ready, REDIS_START_TIMEOUT_S, "redis-server", proc, log_path)
            yield url
        finally:
            stop_process(proc)


@contextlib.contextmanager
def running_label_studio() -> Iterator[LiveLabelStudio]:
    """Start a private Label Studio and yield how to reach it."""
    binary = Path(os.environ.get("AMLS_LABEL_STUDIO_BIN", DEFAULT_LS_BIN))
    if not binary.exists():
        missing_service(f"Label Studio binary not found at {binary}; run `make test` or set "
                        "AMLS_LABEL_STUDIO_BIN")
    from label_studio_sdk import LabelStudio

    port = free_port()
    token = secrets.token_hex(20)
    # Hex: a password that is safe in any shell or log line.
    username, password = "amls-test@localhost", secrets.token_hex(12)
    base = Path(tempfile.mkdtemp(prefix="amls-ls-"))
    document_root = base / "docroot"
    document_root.mkdir()
    log_path = base / "label-studio.log"
    env = label_studio_env(os.environ, base / "data", document_root, username=username,
                           password=password, token=token)
    env["SSRF_PROTECTION_ENABLED"] = "false"  # allow URL imports from loopback addresses
    cmd = label_studio_command(binary, port, base / "data") + ["--log-level", "WARNING"]
    url = f"http://127.0.0.1:{port}"
    proc = start_process(cmd, env, log_path, cwd=base)
    try:
        wait_for(lambda: http_ok(f"{url}/health"), LS_START_TIMEOUT_S, "Label Studio", proc,
                 log_path)
        client = LabelStudio(base_url=url, api_key=token)
        yield LiveLabelStudio(url=url, token=token, document_root=document_root,
                              client=client, username=username, password=password)
    finally:
        stop_process(proc)
        shutil.rmtree(base, ignore_errors=True)
