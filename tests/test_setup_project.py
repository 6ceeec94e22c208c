"""`amls setup-project` against a live Label Studio and a live `amls serve` backend."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from amls_cli import main
from demo.local_servers import free_port, stop_process, wait_for
from ml_backend.label_schema import (
    ALL_TITLE,
    HIDDEN_COLUMNS,
    LABELLED_TITLE,
    UNSURE_TITLE,
    VIEW_TITLE,
)
from ml_backend.labelstudio import LabelStudioClient
from ml_backend.project_setup import (
    TRAIN_EVERY_N_ANNOTATIONS,
    SetupRequest,
    basic_auth_header,
    setup_project,
)

REPO = Path(__file__).resolve().parent.parent
BINARY = REPO / "label_config" / "anomaly_binary.xml"
TYPES = REPO / "label_config" / "anomaly_types.xml"
AUTH = ("amls-test", "pa:ss word")  # a colon in the password must survive basic auth
BACKEND_START_TIMEOUT_S = 90.0


@pytest.mark.parametrize("user,password", [("u", "p"), AUTH, ("x", "")])
def test_basic_auth_header_round_trips(user, password):
    scheme, token = basic_auth_header(user, password).split(" ")
    assert scheme == "Basic"
    assert base64.b64decode(token).decode() == f"{user}:{password}"


def test_config_without_anomaly_choice_fails_before_contacting_label_studio(tmp_path, capsys,
                                                                              monkeypatch):
    bad = tmp_path / "bad.xml"
    bad.write_text(BINARY.read_text().replace('value="anomaly"', 'value="odd"'))
    # Nothing listens on this port: reaching out would fail with a connection error (rc 1).
    monkeypatch.setenv("LABEL_STUDIO_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "unused")
    assert main(["setup-project", "--config", str(bad)]) == 2
    assert main(["setup-project", "--config", str(tmp_path / "missing.xml")]) == 2


@pytest.fixture(scope="module")
def backend(label_studio, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """`amls serve` with basic auth on a free port: (url, access log path)."""
    port = free_port()
    workdir = tmp_path_factory.mktemp("backend")
    log_path = workdir / "backend.log"
    env = {**os.environ, "LABEL_STUDIO_URL": label_studio.url,
           "LABEL_STUDIO_API_KEY": label_studio.token, "MODEL_DIR": str(workdir / "models"),
           "BASIC_AUTH_USER": AUTH[0], "BASIC_AUTH_PASS": AUTH[1], "OMP_NUM_THREADS": "1"}
    env.pop("REDIS_URL", None)
    cmd = [sys.executable, "-m", "amls_cli", "serve", "--host", "127.0.0.1",
           "--port", str(port)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True,
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return requests.get(f"{url}/health", auth=AUTH, timeout=2).ok
        except requests.RequestException:
            return False

    try:
        wait_for(ready, BACKEND_START_TIMEOUT_S, "amls serve", proc, log_path)
        yield url, log_path
    finally:
        stop_process(proc)


@pytest.fixture
def ls_env(label_studio, monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    monkeypatch.setenv("BASIC_AUTH_USER", AUTH[0])
    monkeypatch.setenv("BASIC_AUTH_PASS", AUTH[1])
    monkeypatch.delenv("ANOMALY_LABEL", raising=False)


def _state(sdk, project_id: int, title: str) -> dict[str, object]:
    """Everything setup-project may create, as counts and the values that matter."""
    return {
        "projects": sorted(p.id for p in sdk.projects.list(title=title) if p.title == title),
        "backends": [(m.url, m.auth_method, m.basic_auth_user)
                     for m in sdk.ml.list(project=project_id)],
        "webhooks": [(h.url, h.headers) for h in sdk.webhooks.list(project=str(project_id))
                     if h.project == project_id],
        "storages": [s.path for s in sdk.import_storage.local.list(project=project_id)],
        "views": [(v.data or {}).get("title") for v in sdk.views.list(project=project_id)],
        "train_every": sdk.projects.get(id=project_id).min_annotations_to_start_training,
    }


@pytest.mark.e2e
def test_setup_creates_everything_and_a_rerun_changes_nothing(label_studio, backend, ls_env,
                                                              capsys):
    backend_url, backend_log = backend
    sdk = label_studio.client
    title = f"setup {uuid.uuid4().hex[:8]}"
    previews = label_studio.document_root / f"previews-{uuid.uuid4().hex[:8]}"
    previews.mkdir()
    args = ["setup-project", "--title", title, "--config", str(BINARY),
            "--backend-url", backend_url, "--previews", str(previews)]

    assert main(args) == 0
    first_out = capsys.readouterr().out
    (project_id,) = [p.id for p in sdk.projects.list(title=title) if p.title == title]
    state = _state(sdk, project_id, title)
    assert state == {
        "projects": [project_id],
        "backends": [(backend_url, "BASIC_AUTH", AUTH[0])],
        "webhooks": [(f"{backend_url}/webhook", {"Authorization": basic_auth_header(*AUTH)})],
        "storages": [str(previews)],
        "views": [VIEW_TITLE, LABELLED_TITLE, UNSURE_TITLE, ALL_TITLE],
        "train_every": TRAIN_EVERY_N_ANNOTATIONS,
    }
    assert f"{label_studio.url}/projects/{project_id}/data?tab=" in first_out
    assert "created project" in first_out

    assert main(args) == 0
    second_out = capsys.readouterr().out
    assert "nothing to change" in second_out
    assert _state(sdk, project_id, title) == state

    # The authorised webhook reaches the backend: an annotation is answered with 200, not 401.
    sdk.projects.import_tasks(id=project_id, request=[{"image": "/static/images/logo.svg"}])
    (task,) = list(sdk.tasks.list(project=project_id))
    sdk.annotations.create(id=task.id, result=[
        {"from_name": "label", "to_name": "image", "type": "choices",
         "value": {"choices": ["normal"]}}])
    answered = '"POST /webhook HTTP/1.1" 200'
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and answered not in backend_log.read_text():
        time.sleep(0.5)
    log = backend_log.read_text()
    assert answered in log
    assert '"POST /webhook HTTP/1.1" 401' not in log

    # The tabs filter as their titles say, and keep the columns an annotator needs.
    sdk.projects.import_tasks(id=project_id, request=[{"image": "/static/images/logo.svg"}])
    views = {(v.data or {}).get("title"): v for v in sdk.views.list(project=project_id)}
    listed = {title: {int(t.id) for t in sdk.tasks.list(project=project_id, view=v.id)}
              for title, v in views.items()}
    everything = {int(t.id) for t in sdk.tasks.list(project=project_id)}
    assert listed[LABELLED_TITLE] == {task.id}
    assert listed[VIEW_TITLE] == everything - {task.id} and len(everything) == 2
    assert listed[ALL_TITLE] == everything
    assert listed[UNSURE_TITLE] == set()  # nothing is scored yet: nothing near the boundary
    assert all(v.data["hiddenColumns"] == HIDDEN_COLUMNS for v in views.values())
    assert "tasks:predictions_score" not in HIDDEN_COLUMNS["explore"]


@pytest.mark.e2e
def test_rerun_repairs_drift_and_updates_the_label_config(label_studio, backend, ls_env):
    backend_url, _ = backend
    client = LabelStudioClient(label_studio.url, label_studio.token)
    request = SetupRequest(title=f"drift {uuid.uuid4().hex[:8]}", label_config=BINARY.read_text(),
                           backend_url=backend_url, basic_auth=AUTH)
    first = setup_project(client, request)
    sdk = client.sdk
    sdk.webhooks.update(id=first.webhook_id, headers={})
    sdk.projects.update(id=first.project_id, min_annotations_to_start_training=0)

    changed = setup_project(client, SetupRequest(**{**request.__dict__,
                                                    "label_config": TYPES.read_text()}))
    assert (changed.project_id, changed.ml_backend_id, changed.view_id) == (
        first.project_id, first.ml_backend_id, first.view_id)
    assert any("label_config" in c and "min_annotations_to_start_training" in c
               for c in changed.changes)
    assert f"set webhook {first.webhook_id} headers" in changed.changes
    # A changed header means changed credentials: the backend connection gets them again.
    assert f"updated ML backend {first.ml_backend_id} auth" in changed.changes
    project = sdk.projects.get(id=first.project_id)
    assert "anomaly_type" in project.label_config
    assert project.min_annotations_to_start_training == TRAIN_EVERY_N_ANNOTATIONS
    (hook,) = [h for h in sdk.webhooks.list(project=str(first.project_id))
               if h.id == first.webhook_id]
    assert hook.headers == {"Authorization": basic_auth_header(*AUTH)}
    assert setup_project(client, SetupRequest(**{**request.__dict__,
                                                 "label_config": TYPES.read_text()})).changes == []


@pytest.mark.e2e
def test_duplicate_titles_are_refused_unless_an_id_is_given(label_studio, backend, ls_env):
    backend_url, _ = backend
    client = LabelStudioClient(label_studio.url, label_studio.token)
    title = f"twin {uuid.uuid4().hex[:8]}"
    ids = [client.sdk.projects.create(title=title, label_config=BINARY.read_text()).id
           for _ in range(2)]
    request = SetupRequest(title=title, label_config=BINARY.read_text(), backend_url=backend_url,
                           basic_auth=AUTH)
    with pytest.raises(ValueError, match=f"{ids[0]}, {ids[1]}"):
        setup_project(client, request)
    result = setup_project(client, SetupRequest(**{**request.__dict__, "project_id": ids[1]}))
    assert result.project_id == ids[1]
    assert not list(client.sdk.ml.list(project=ids[0]))


# ---- the demo's setup path ---------------------------------------------------------------

def test_demo_sample_has_the_asked_rare_share_and_hides_the_class(tmp_path):
    from demo.run_demo import RARE_CLASS, sample_first

    sample = sample_first(tmp_path / "a", n_normal=80, rare_fraction=0.08, seed=3)
    files = sorted(p.stem for p in (tmp_path / "a").glob("*.png"))
    assert files == sorted(sample.classes)
    assert len(files) == 80 + sample.n_rare
    assert 0.05 <= sample.n_rare / len(files) <= 0.10
    assert all(c not in name for name in files for c in ("Bent", "Compact", "FRI"))
    assert sum(c != RARE_CLASS for c in sample.classes.values()) == 80
    again = sample_first(tmp_path / "b", n_normal=80, rare_fraction=0.08, seed=3)
    assert again == sample
    with pytest.raises(ValueError, match="rare fraction"):
        sample_first(tmp_path / "c", n_normal=10, rare_fraction=1.0, seed=0)


def test_demo_positions_are_the_first_file_names(tmp_path):
    from demo.run_demo import sample_first, write_positions
    from import_tools.images import read_positions

    sample = sample_first(tmp_path / "a", n_normal=20, rare_fraction=0.1, seed=0)
    write_positions(tmp_path / "positions.csv", sample)
    positions = read_positions(tmp_path / "positions.csv")
    assert sorted(positions) == sorted(sample.classes)
    for cid, (ra, dec) in positions.items():
        assert cid == f"{cid.split('_')[0]}_{cid.split('_')[1]}"
        assert (ra, dec) == (float(cid.split("_")[0]), float(cid.split("_")[1]))
        assert 0 <= ra < 360 and -90 <= dec <= 90


@pytest.mark.e2e
@pytest.mark.slow
def test_demo_headless_check_sets_up_and_stops_its_servers(tmp_path):
    ls_bin = Path(os.environ.get("AMLS_LABEL_STUDIO_BIN",
                                 REPO / ".ls-venv" / "bin" / "label-studio"))
    if not ls_bin.exists():
        from tests.support.live_services import missing_service

        missing_service(f"Label Studio binary not found at {ls_bin}")
    ls_port, backend_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "demo.run_demo", "--headless-check", "--data-dir",
           str(tmp_path / "demo"), "--ls-bin", str(ls_bin), "--ls-port", str(ls_port),
           "--backend-port", str(backend_port), "--n-normal", "30"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "rare class to look for is Bent" in done.stdout
    assert "headless check" in done.stdout and ": OK" in done.stdout
    for port in (ls_port, backend_port):  # both servers were stopped
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/health", timeout=2)
