"""Security properties of the backend: auth on every route, no leaked secrets, SSRF and paths.

A protection that is missing gets a test marked ``xfail(strict=True)`` and an entry in
SECURITY.md, "Known gaps"; the test fails the day the protection lands, so the marker is
removed together with the gap.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import logging
import threading
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from import_tools.previews import preview_relpath
from ml_backend.app import BadRequest, create_app, project_id_of
from ml_backend.config import Config
from ml_backend.core.config import TrainConfig
from ml_backend.labelstudio import MAX_REDIRECTS, LabelStudioClient
from ml_backend.registry import ModelRegistry
from ml_backend.service import AnomalyService
from tests.support.shipped import BINARY_CONFIG

USER, PASSWORD = "label-studio", "pw-Zq81-never-logged"
API_KEY = "key-7d1f0c-never-logged"
REDIS_PASSWORD = "redis-pw-Kx4-never-logged"
SECRETS = (PASSWORD, API_KEY, REDIS_PASSWORD)
LABEL_CONFIG = BINARY_CONFIG


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture
def service(tmp_path) -> Iterator[AnomalyService]:
    """The real service, jobs in a thread, Label Studio unreachable (jobs fail fast)."""
    cfg = Config(label_studio_url="http://127.0.0.1:9", label_studio_api_key=API_KEY,
                 model_dir=tmp_path / "models", basic_auth_user=USER, basic_auth_pass=PASSWORD,
                 debounce_s=0.0, train=TrainConfig(device="cpu"))
    svc = AnomalyService.from_config(cfg)
    yield svc
    svc.close()


# ---- basic auth -------------------------------------------------------------------------

def every_route(app: Any) -> Iterator[tuple[str, str]]:
    """(method, concrete path) for every rule in the app's URL map, HEAD/OPTIONS included."""
    for rule in app.url_map.iter_rules():
        path = rule.rule
        for arg in rule.arguments:
            path = path.replace(f"<path:{arg}>", "x").replace(f"<{arg}>", "x")
        for method in sorted(rule.methods or ()):
            yield method, path


def test_with_basic_auth_no_route_answers_without_it(service):
    app = create_app(service, service.cfg)
    client = app.test_client()
    routes = list(every_route(app))
    assert {"/predict", "/webhook", "/setup", "/metrics", "/health"} <= {p for _, p in routes}
    for method, path in routes:
        for headers in ({}, basic(USER, "wrong"), basic("wrong", PASSWORD),
                        {"Authorization": f"Bearer {PASSWORD}"}):
            response = client.open(path, method=method, headers=headers, json={})
            assert response.status_code == 401, (method, path, headers)
            if method != "HEAD":
                assert PASSWORD not in response.get_data(as_text=True)
        response = client.open(path, method=method, headers=basic(USER, PASSWORD), json={})
        assert response.status_code != 401, (method, path)


def raw_basic(user: str, password: str, encoding: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode(encoding)).decode()
    return {"Authorization": f"Basic {token}"}


# (configured password, encoding the client sends, HTTP status). `requests` (so Label Studio)
# encodes basic auth as latin-1, browsers and curl as UTF-8; "€" has no latin-1 form.
NON_ASCII_AUTH = [
    ("pässwörd", "latin-1", 200),
    ("pässwörd", "utf-8", 200),
    ("naïve-€", "utf-8", 200),
    ("pässwörd", "cp1252", 200),  # same bytes as latin-1 for these characters
    ("pässwörd", "utf-16", 401),
]


@pytest.mark.parametrize("password, encoding, status", NON_ASCII_AUTH)
def test_non_ascii_passwords_are_accepted_as_utf8_or_latin1(tmp_path, password, encoding,
                                                           status):
    cfg = Config(model_dir=tmp_path, basic_auth_user="ls-ü", basic_auth_pass=password)
    svc = AnomalyService.from_config(cfg)
    try:
        client = create_app(svc, cfg).test_client()
        given = client.get("/health", headers=raw_basic("ls-ü", password, encoding))
        assert given.status_code == status
        wrong = client.get("/health", headers=raw_basic("ls-ü", password + "x", encoding))
        assert wrong.status_code == 401
    finally:
        svc.close()


def test_label_studio_style_requests_auth_is_accepted(tmp_path):
    cfg = Config(model_dir=tmp_path, basic_auth_user="ls", basic_auth_pass="pässwörd")
    svc = AnomalyService.from_config(cfg)
    try:
        client = create_app(svc, cfg).test_client()
        prepared = requests.Request("GET", "http://backend/health",
                                    auth=("ls", "pässwörd")).prepare()
        headers = {"Authorization": prepared.headers["Authorization"]}
        assert client.get("/health", headers=headers).status_code == 200
    finally:
        svc.close()


def test_without_auth_configured_health_is_open(tmp_path):
    cfg = Config(model_dir=tmp_path)
    svc = AnomalyService.from_config(cfg)
    try:
        assert create_app(svc, cfg).test_client().get("/health").status_code == 200
    finally:
        svc.close()


# ---- secrets ----------------------------------------------------------------------------

def test_config_repr_hides_secrets():
    cfg = Config(label_studio_api_key=API_KEY, basic_auth_user=USER, basic_auth_pass=PASSWORD,
                 redis_url=f"redis://:{REDIS_PASSWORD}@127.0.0.1:6379/0")
    for secret in SECRETS:
        assert secret not in repr(cfg) and secret not in str(cfg)


def test_secrets_never_reach_logs_or_metrics(service, caplog):
    client = create_app(service, service.cfg).test_client()
    auth = basic(USER, PASSWORD)
    with caplog.at_level(logging.DEBUG):
        client.post("/setup", json={"project": 3, "schema": LABEL_CONFIG}, headers=auth)
        client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": "/x.png"}}],
                                      "label_config": LABEL_CONFIG, "project": 3},
                    headers=auth)
        response = client.post("/webhook", json={"action": "START_TRAINING",
                                                 "project": {"id": 3}}, headers=auth)
        assert response.status_code == 200
        assert service.submitter.wait_idle(60), "the training job did not finish"
        client.post("/predict", json={}, headers=basic(USER, "guess-" + PASSWORD))
        metrics = client.get("/metrics", headers=auth)
    assert metrics.status_code == 200
    # The job really failed (Label Studio is unreachable) and the failure is reported...
    assert metrics.get_json()["projects"]["3"]["queue"]["last_error"]
    assert any(r.levelno >= logging.ERROR for r in caplog.records)
    # ...without any secret, in the log text or in the metrics.
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    for secret in SECRETS:
        assert secret not in logged
        assert secret not in metrics.get_data(as_text=True)


# ---- SSRF: where task images may come from ----------------------------------------------

class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers GET with a PNG-ish body, or a redirect to `redirect_to` ("{host}" is this
    server's host:port); records requests."""

    seen: list[tuple[str, dict[str, str]]]
    redirect_to: str | None = None

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.seen.append((self.path, dict(self.headers)))
        if self.redirect_to:
            self.send_response(302)
            host = f"127.0.0.1:{self.server.server_address[1]}"
            self.send_header("Location", self.redirect_to.format(host=host))
            self.end_headers()
            return
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"image-bytes")

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def http_server(redirect_to: str | None = None) -> Iterator[tuple[str, list]]:
    seen: list = []
    handler = type("Handler", (Recorder,), {"seen": seen, "redirect_to": redirect_to})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


LS_HOST = "ls.example:8080"
HOSTILE_URLS = [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "file:///etc/passwd",
    "//169.254.169.254/x",
    "http://ls.example:8080@169.254.169.254/x",
    "http://169.254.169.254#@ls.example:8080/x",
    "http://ls.example:8080.evil.test/x",
    "gopher://127.0.0.1:6379/_FLUSHALL",
    "http://127.0.0.1:6379/",
    "http://localhost/x",
]


@pytest.mark.parametrize("url", HOSTILE_URLS)
def test_task_image_urls_outside_the_allow_list_are_never_fetched(url, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(requests, "get", lambda u, **kw: calls.append(u))
    monkeypatch.setattr(requests, "request", lambda m, u, **kw: calls.append(u))
    cfg = Config(label_studio_url=f"http://{LS_HOST}", label_studio_api_key=API_KEY)
    client = LabelStudioClient(cfg.label_studio_url, API_KEY)
    with pytest.raises(PermissionError, match="not allowed"):
        client.fetch_image(url, cfg.image_hosts)
    assert calls == []


def test_relative_urls_resolve_against_label_studio_and_carry_the_key():
    with http_server() as (host, seen):
        client = LabelStudioClient(f"http://{host}", API_KEY)
        assert client.fetch_image("/data/upload/1/a.png", frozenset({host})) == b"image-bytes"
    assert seen[0][0] == "/data/upload/1/a.png"
    assert seen[0][1].get("Authorization") == f"Token {API_KEY}"


def test_the_api_key_goes_only_to_label_studio():
    with http_server() as (ls_host, _), http_server() as (cdn_host, seen):
        client = LabelStudioClient(f"http://{ls_host}", API_KEY)
        client.fetch_image(f"http://{cdn_host}/a.png", frozenset({ls_host, cdn_host}))
    assert "Authorization" not in seen[0][1]


def test_a_redirect_from_an_allowed_host_to_another_host_is_not_followed():
    with http_server() as (target, target_seen), \
            http_server(redirect_to=f"http://{target}/secret") as (allowed, _):
        client = LabelStudioClient(f"http://{allowed}", API_KEY)
        with pytest.raises(PermissionError, match="not allowed"):
            client.fetch_image("/data/upload/a.png", frozenset({allowed}))
    assert target_seen == [], "the backend followed a redirect to a host not on the list"


@pytest.mark.parametrize("location", ["file:///etc/passwd", "http://169.254.169.254/x",
                                      "gopher://{host}/x", "http://{host}@169.254.169.254/x",
                                      "//127.0.0.1:6379/"])
def test_redirects_to_hostile_urls_are_refused(location):
    with http_server(redirect_to=location) as (allowed, seen):
        client = LabelStudioClient(f"http://{allowed}", API_KEY)
        with pytest.raises(PermissionError, match="not allowed"):
            client.fetch_image("/data/upload/a.png", frozenset({allowed}))
    assert len(seen) == 1


def test_redirect_loops_stop_after_max_redirects():
    with http_server(redirect_to="/again") as (allowed, seen):
        client = LabelStudioClient(f"http://{allowed}", API_KEY)
        with pytest.raises(PermissionError, match="redirects more than"):
            client.fetch_image("/data/upload/a.png", frozenset({allowed}))
    assert len(seen) == MAX_REDIRECTS + 1


def test_a_redirect_to_another_allowed_host_is_followed_without_the_key():
    with http_server() as (cdn, cdn_seen), \
            http_server(redirect_to=f"http://{cdn}/presigned.png") as (ls_host, ls_seen):
        client = LabelStudioClient(f"http://{ls_host}", API_KEY)
        data = client.fetch_image("/tasks/1/presign/?fileuri=x", frozenset({ls_host, cdn}))
    assert data == b"image-bytes"
    assert ls_seen[0][1].get("Authorization") == f"Token {API_KEY}"
    assert [path for path, _ in cdn_seen] == ["/presigned.png"]
    assert "Authorization" not in cdn_seen[0][1]


# ---- ids and paths from task data -------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(cutout_id=st.text(min_size=1, max_size=30))
def test_preview_paths_never_leave_the_preview_root(cutout_id):
    try:
        rel = preview_relpath(cutout_id)
    except ValueError:
        return
    path = PurePosixPath(rel)
    assert not path.is_absolute() and ".." not in path.parts and "\x00" not in rel


@pytest.mark.parametrize("value", ["../../etc", "/etc/passwd", "1/../2", "1;rm -rf /", "-1",
                                   {"id": "../1"}, 0, "", [1]])
def test_project_ids_from_requests_are_positive_integers_only(value):
    with pytest.raises(BadRequest):
        project_id_of(value)


@pytest.mark.parametrize("version", ["../1", "/etc", "amls-x/../../y", ".", "..", "a\x00b", ""])
def test_registry_refuses_version_names_that_are_paths(tmp_path, version):
    with pytest.raises(ValueError):
        ModelRegistry(tmp_path).version_dir(1, version)


def test_versions_route_refuses_a_path_as_project(service):
    client = create_app(service, service.cfg).test_client()
    response = client.get("/versions?project=../../etc", headers=basic(USER, PASSWORD))
    assert response.status_code == 400


def test_task_data_store_paths_outside_allowed_roots_are_not_opened(service, monkeypatch,
                                                                    tmp_path, caplog):
    from ml_backend.core import store as store_module

    opened: list[str] = []

    def record(path: Any, mode: str = "r") -> Any:
        opened.append(str(path))
        raise FileNotFoundError(path)

    monkeypatch.setattr(store_module.CutoutStore, "open", staticmethod(record))
    root = tmp_path / "stores"
    root.mkdir()
    (root / "ok.h5").write_bytes(b"not really a store")
    (tmp_path / "outside.h5").write_bytes(b"x")
    (root / "link.h5").symlink_to(tmp_path / "outside.h5")
    (root / "dir.h5").mkdir()
    service.cfg = service.cfg.replace(store_roots=(root,))
    service._model = lambda project_id: ("v", None, None)  # type: ignore[method-assign]
    stores = ["/etc/../etc/shadow", f"{root}/../outside.h5", str(root / "link.h5"),
              str(root / "dir.h5"), str(root / "missing.h5"), str(root), 7, ["/etc/passwd"],
              str(root / "ok.h5")]
    tasks = [{"id": i, "data": {"store": p, "cutout_id": "a"}} for i, p in enumerate(stores)]
    with caplog.at_level(logging.WARNING):
        results = service.predict(1, tasks + tasks[:1], LABEL_CONFIG)
    assert opened == [str(root / "ok.h5")], "only the regular file inside the root is opened"
    assert results == [{"result": [], "model_version": "v"}] * (len(tasks) + 1)
    warnings = [r.getMessage() for r in caplog.records if "shadow" in r.getMessage()]
    assert len(warnings) == 1 and "task 0" in warnings[0] and "outside" in warnings[0]


def test_the_api_key_never_travels_over_http_to_an_https_label_studio():
    with http_server() as (host, seen):
        client = LabelStudioClient(f"https://{host}", API_KEY)
        client.fetch_image(f"http://{host}/a.png", frozenset({host}))
    assert seen and "Authorization" not in seen[0][1]


@pytest.mark.parametrize("url, other, same", [
    ("http://ls:8080/a", "http://ls:8080", True),
    ("http://LS/a", "http://ls:80", True),
    ("https://ls/a", "https://ls:443/", True),
    ("http://ls/a", "https://ls", False),
    ("http://ls:8081/a", "http://ls:8080", False),
    ("http://ls.evil/a", "http://ls", False),
    ("http://ls:x/a", "http://ls", False),
    ("//ls/a", "http://ls", False),
])
def test_same_origin_compares_scheme_host_and_port(url, other, same):
    from ml_backend.labelstudio import same_origin

    assert same_origin(url, other) is same


def test_task_image_downloads_stop_at_the_byte_cap(monkeypatch):
    from ml_backend import labelstudio

    monkeypatch.setattr(labelstudio, "MAX_IMAGE_BYTES", 5)
    with http_server() as (host, _):
        client = LabelStudioClient(f"http://{host}", API_KEY)
        with pytest.raises(ValueError, match="larger than 5 bytes"):
            client.fetch_image("/a.png", frozenset({host}))
