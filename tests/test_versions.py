"""`amls versions list | rollback`: every kept version shown; a rollback switches both sides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amls_cli import main
from ml_backend.registry import ModelRegistry
from ml_backend.versions import version_rows
from tests.support.json_server import json_server

OLD, NEW = "amls-20260101T000000Z-0001", "amls-20260102T000000Z-0002"


def publish(registry: ModelRegistry, project_id: int, name: str, parent: str | None) -> None:
    staging = registry.staging_dir(project_id)
    staging.mkdir()
    meta = {"created": name[5:21], "parent": parent,
            "label_counts": {"anomaly": 5, "normal": 20}, "metrics": {"final_loss": 0.25}}
    (staging / "meta.json").write_text(json.dumps(meta))
    registry.publish(project_id, staging, name)


@pytest.fixture
def registry(tmp_path: Path, monkeypatch) -> ModelRegistry:
    registry = ModelRegistry(tmp_path / "models")
    publish(registry, 4, OLD, None)
    publish(registry, 4, NEW, OLD)
    monkeypatch.setenv("MODEL_DIR", str(registry.root))
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    return registry


class ScriptedLabelStudio:
    """Label Studio's model-version count and project update, over HTTP."""

    def __init__(self, held: dict[str, int]) -> None:
        self.held, self.model_version = held, NEW

    def answer(self, method: str, path: str, body: object) -> tuple[int, object]:
        if method == "GET" and path.startswith("/api/projects/4/model-versions"):
            return 200, self.held
        if method == "PATCH" and path.rstrip("/") == "/api/projects/4":
            self.model_version = body["model_version"]
            return 200, {"id": 4, "model_version": self.model_version}
        return 404, {"detail": f"not scripted: {method} {path}"}


def test_list_shows_every_version_and_stars_the_current_one(registry, capsys):
    assert main(["versions", "list", "--project", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [OLD, "*"]
    assert NEW in lines[1] and f"parent {OLD}" in lines[1]
    assert "5 anomaly, 20 normal" in lines[0] and "final loss 0.250" in lines[0]
    rows = version_rows(registry, 4, {OLD: 7})
    assert [(r.version, r.current, r.predictions) for r in rows] == [(OLD, False, 7),
                                                                     (NEW, True, 0)]


def test_rollback_switches_here_then_in_label_studio_and_keeps_the_newer(registry, monkeypatch,
                                                                        capsys):
    ls = ScriptedLabelStudio({OLD: 30, NEW: 30})
    with json_server(ls.answer) as url:
        monkeypatch.setenv("LABEL_STUDIO_URL", url)
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", "k")
        assert main(["versions", "rollback", "--project", "4", OLD]) == 0
        assert main(["versions", "list", "--project", "4"]) == 0
    assert registry.latest(4) == OLD and ls.model_version == OLD
    assert registry.versions(4) == [OLD, NEW]  # nothing deleted
    out = capsys.readouterr().out
    assert f"* {OLD}" in out and "30 predictions in Label Studio" in out


def test_rollback_refuses_a_version_label_studio_holds_no_predictions_of(registry, monkeypatch,
                                                                        capsys):
    ls = ScriptedLabelStudio({NEW: 30})
    with json_server(ls.answer) as url:
        monkeypatch.setenv("LABEL_STUDIO_URL", url)
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", "k")
        assert main(["versions", "rollback", "--project", "4", OLD]) == 2
        assert main(["versions", "rollback", "--project", "4", "amls-nope"]) == 2
    err = capsys.readouterr().err
    assert "holds no predictions of" in err and "has no model version 'amls-nope'" in err
    assert registry.latest(4) == NEW and ls.model_version == NEW


def test_rollback_needs_label_studio(registry, capsys):
    assert main(["versions", "rollback", "--project", "4", OLD]) == 2
    assert "needs LABEL_STUDIO_URL" in capsys.readouterr().err
    assert registry.latest(4) == NEW
