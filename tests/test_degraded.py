"""One broken project or dependency degrades only itself: /metrics, /predict and /health."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from demo.local_servers import free_port
from ml_backend.app import create_app
from ml_backend.config import Config
from ml_backend.core.checkpoint import ModelMeta, new_version, save_model_dir, utc_now_iso
from ml_backend.core.config import TrainConfig
from ml_backend.core.model import build_model, set_seed
from ml_backend.core.store import CutoutStore
from ml_backend.registry import ModelRegistry
from ml_backend.service import AnomalyService
from ml_backend.submitters import RQSubmitter
from tests.support.json_server import json_server
from tests.support.shipped import BINARY_CONFIG

SIZE = 32
LABEL_CONFIG = BINARY_CONFIG


class QuietSubmitter:
    def __init__(self, broken_project: int | None = None) -> None:
        self.broken_project = broken_project

    def submit(self, project_id: int) -> str:
        return "queued"

    def state(self, project_id: int) -> dict[str, bool]:
        if project_id == self.broken_project:
            raise ConnectionError("Redis went away")
        return {"queued": False, "running": False}

    def health(self) -> str:
        return "ok"

    def close(self) -> None:
        pass


def publish(registry: ModelRegistry, project_id: int, seed: int) -> str:
    set_seed(seed)
    cfg = TrainConfig(pretrained=False, image_size=SIZE)
    net = build_model(cfg, 1).eval()
    version = new_version()
    meta = ModelMeta(version=version, parent=None, created=utc_now_iso(), config=cfg.to_dict(),
                     image_size=SIZE, channels=1, stretch={"name": "none"})
    staging = registry.staging_dir(project_id)
    save_model_dir(staging, ema=net, student=net, meta=meta)
    registry.publish(project_id, staging, version)
    return version


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Any, ModelRegistry, Path]:
    registry = ModelRegistry(tmp_path / "models")
    store = tmp_path / "s.h5"
    with CutoutStore.create(store, height=SIZE, width=SIZE, channels=1,
                            stretch={"name": "none"}) as s:
        s.append(["c0"], np.zeros((1, SIZE, SIZE, 1), np.uint8))
    return registry, store, tmp_path


def app_for(registry: ModelRegistry, root: Path, submitter: Any, ls_url: str = "") -> Any:
    cfg = Config(model_dir=registry.root, train=TrainConfig(device="cpu"), store_roots=(root,),
                 label_studio_url=ls_url, label_studio_api_key=API_KEY if ls_url else "")
    return create_app(AnomalyService(cfg, registry, submitter), cfg).test_client()


API_KEY = "ls-token-9f3c"
WHOAMI = {"id": 1, "username": "annotator", "email": "a@example.org"}


def test_metrics_answer_200_with_an_error_entry_per_broken_project(setup):
    registry, _, root = setup
    publish(registry, 1, 0)
    truncated = publish(registry, 2, 1)
    meta = registry.version_dir(2, truncated) / "meta.json"
    meta.write_text(meta.read_text()[:40])
    publish(registry, 3, 2)
    (registry.project_dir(3) / "LATEST").write_text("amls-20990101T000000Z-dead\n")
    publish(registry, 4, 3)
    client = app_for(registry, root, QuietSubmitter(broken_project=4))
    response = client.get("/metrics")
    assert response.status_code == 200
    projects = response.get_json()["projects"]
    assert "error" not in projects["1"] and projects["1"]["model_version"].startswith("amls-")
    assert "JSONDecodeError" in projects["2"]["error"]
    assert "Redis went away" in projects["4"]["error"]
    assert "amls-20990101T000000Z-dead" in projects["3"]["error"]
    assert set(projects) == {"1", "2", "3", "4"}


def test_predict_falls_back_to_the_newest_intact_version(setup, caplog):
    registry, store, root = setup
    good = publish(registry, 5, 0)
    broken = publish(registry, 5, 1)
    (registry.version_dir(5, broken) / "model.safetensors").write_bytes(b"garbage")
    client = app_for(registry, root, QuietSubmitter())
    body = {"project": 5, "label_config": LABEL_CONFIG,
            "tasks": [{"id": 1, "data": {"store": str(store), "cutout_id": "c0"}}]}
    with caplog.at_level("WARNING"):
        response = client.post("/predict", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 200
    [result] = response.get_json()["results"]
    assert result["model_version"] == good and 0.0 <= result["score"] <= 1.0
    assert f"cannot serve model version {broken}" in caplog.text
    # LATEST naming a version that is not there: the newest intact one serves.
    (registry.project_dir(5) / "LATEST").write_text("amls-20990101T000000Z-dead\n")
    response = client.post("/predict", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 200
    assert response.get_json()["results"][0]["model_version"] == good
    # No intact version at all: an empty prediction, still 200.
    (registry.version_dir(5, good) / "model.safetensors").write_bytes(b"garbage")
    (registry.project_dir(5) / "LATEST").write_text(good + "\n")
    response = client.post("/predict", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 200 and response.get_json()["results"][0]["result"] == []


def test_health_reports_an_unreachable_queue_and_an_unwritable_model_dir(setup):
    registry, _, root = setup
    with json_server(lambda method, path, body: (200, WHOAMI)) as ls:
        health = app_for(registry, root, QuietSubmitter(), ls).get("/health").get_json()
        assert health["status"] == "UP" and health["degraded"] == []
        dead = RQSubmitter("redis://127.0.0.1:9/0", "amls", lambda *a, **k: None, {})
        try:
            health = app_for(registry, root, dead, ls).get("/health").get_json()
        finally:
            dead.close()
        assert health["degraded"] == ["queue"]
        assert "Redis unreachable" in health["dependencies"]["queue"]
        blocker = root / "not-a-dir"
        blocker.write_text("")
        health = app_for(ModelRegistry(blocker / "models"), root, QuietSubmitter(), ls).get(
            "/health").get_json()
        assert health["degraded"] == ["model_dir"]


def test_health_reports_label_studio_unset_unreachable_or_refusing_the_key(setup):
    registry, _, root = setup
    health = app_for(registry, root, QuietSubmitter()).get("/health").get_json()
    assert health["status"] == "UP" and health["degraded"] == ["label_studio"]
    assert "LABEL_STUDIO_URL" in health["dependencies"]["label_studio"]
    url = f"http://127.0.0.1:{free_port()}"
    health = app_for(registry, root, QuietSubmitter(), url).get("/health").get_json()
    assert health["degraded"] == ["label_studio"]
    assert f"Label Studio at {url} is unreachable" in health["dependencies"]["label_studio"]
    with json_server(lambda method, path, body: (401, {"detail": "Invalid token."})) as ls:
        client = app_for(registry, root, QuietSubmitter(), ls)
        health = client.get("/health").get_json()
    assert health["dependencies"]["label_studio"] == (
        f"Label Studio at {ls} refuses the API key (401)")
    assert API_KEY not in json.dumps(health)
    # Asked at most every LABEL_STUDIO_CHECK_S: the stopped server is not asked again yet.
    assert client.get("/health").get_json()["dependencies"]["label_studio"].endswith("(401)")
