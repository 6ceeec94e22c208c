"""Start, wait for and stop local servers: Label Studio, `amls serve`, redis-server.

One launcher for the demo, the integration tests and the benchmarks, so that all three start
Label Studio the same way (legacy API token, local-file serving, loopback ML backends allowed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import requests

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 20.0


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def start_process(cmd: list[str], env: Mapping[str, str], log_path: Path,
                  cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start `cmd` in its own process group (Ctrl-C reaches us, and we stop it), output to
    `log_path`."""
    logger.info("starting %s (log: %s)", " ".join(cmd[:3]), log_path)
    with log_path.open("ab") as log:
        return subprocess.Popen(cmd, env=dict(env), cwd=cwd, start_new_session=True,
                                stdout=log, stderr=subprocess.STDOUT)


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group, wait, then SIGKILL it if it is still there."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        logger.warning("process %d ignored SIGTERM; killing it", proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)


def http_ok(url: str, auth: tuple[str, str] | None = None) -> bool:
    """True if GET `url` answers 2xx within 2 s."""
    try:
        return requests.get(url, auth=auth, timeout=2).ok
    except requests.RequestException:
        return False  # not listening yet


def wait_for(check: Callable[[], bool], timeout_s: float, what: str,
             proc: subprocess.Popen[bytes] | None = None, log_path: Path | None = None) -> None:
    """Poll `check()` every 0.5 s until it is true; RuntimeError with the log's tail if the
    process exits or `timeout_s` passes first."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc is not None and proc.poll() is not None:
            break
        if check():
            return
        time.sleep(0.5)
    tail = ""
    if log_path is not None and log_path.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
    state = (f"exited with status {proc.returncode}" if proc is not None and
             proc.poll() is not None else "not ready")
    raise RuntimeError(f"{what} {state} after {time.monotonic() - start:.0f} s "
                       f"(log: {log_path}); log tail:\n{tail}")


def label_studio_env(base_env: Mapping[str, str], data_dir: Path, document_root: Path, *,
                     username: str, password: str, token: str) -> dict[str, str]:
    """Environment for a local Label Studio: SQLite in `data_dir`, files under
    `document_root` served as local files, ML backends on loopback allowed, no telemetry.
    The first user and its legacy API token come from the environment, not the command
    line, so `ps` does not show them."""
    return {**base_env,
            "LABEL_STUDIO_USERNAME": username,
            "LABEL_STUDIO_PASSWORD": password,
            "LABEL_STUDIO_USER_TOKEN": token,
            "COLLECT_ANALYTICS": "false",
            "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
            # Label Studio refuses ML backends on loopback addresses unless this is off.
            "USE_DEFAULT_BANNED_SUBNETS": "false",
            "DJANGO_DB": "sqlite"}


def label_studio_command(binary: Path, port: int, data_dir: Path) -> list[str]:
    """`label-studio start` on 127.0.0.1:`port`; the user comes from `label_studio_env`."""
    return [str(binary), "start", "--no-browser", "--port", str(port),
            "--internal-host", "127.0.0.1", "--data-dir", str(data_dir),
            "--enable-legacy-api-token"]
