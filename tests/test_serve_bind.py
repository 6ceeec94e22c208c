"""`amls serve` fails closed: no non-loopback bind without authentication unless --insecure."""

from __future__ import annotations

import pytest

from amls_cli import main
from amls_cli import serve as server_cli


@pytest.fixture
def started(monkeypatch) -> list[dict]:
    """Record the gunicorn options instead of serving."""
    calls: list[dict] = []

    class Recorder:
        def __init__(self, cfg, options):
            calls.append(options)

        def run(self):
            pass

    monkeypatch.setattr(server_cli, "_gunicorn_app", Recorder)
    for name in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_default_bind_is_loopback(started):
    assert main(["serve"]) == 0
    assert started[0]["bind"] == "127.0.0.1:9090"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "backend.example"])
def test_a_network_bind_without_auth_is_refused(started, host, caplog):
    assert main(["serve", "--host", host]) == 2
    assert not started
    assert "without authentication" in caplog.text and "BASIC_AUTH_USER" in caplog.text


def test_insecure_allows_it_with_a_warning(started, caplog):
    assert main(["serve", "--host", "0.0.0.0", "--insecure"]) == 0
    assert started[0]["bind"] == "0.0.0.0:9090"
    assert "WITHOUT authentication" in caplog.text


def test_a_network_bind_with_auth_is_allowed(started, monkeypatch):
    monkeypatch.setenv("BASIC_AUTH_USER", "amls")
    monkeypatch.setenv("BASIC_AUTH_PASS", "secret")
    assert main(["serve", "--host", "0.0.0.0"]) == 0


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.3.4.5", True),
                                            ("::1", True), ("[::1]", True),
                                            ("localhost", True), ("0.0.0.0", False),
                                            ("10.0.0.1", False), ("example.org", False)])
def test_is_loopback(host, loopback):
    assert server_cli.is_loopback(host) is loopback
