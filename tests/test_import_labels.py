"""`amls import labels`: an id,label CSV becomes annotations, idempotently, never overwriting."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from amls_cli import main
from import_tools.labels import import_labels
from ml_backend.label_schema import parse_label_config
from tests.support.shipped import BINARY_CONFIG, FROM_NAME, TO_NAME


def choice(value: str) -> list[dict]:
    return [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
             "value": {"choices": [value]}}]


class FakeClient:
    """The three calls import_labels makes, over tasks in memory."""

    def __init__(self, tasks: list[dict]) -> None:
        self.tasks = tasks

    def label_config(self, project_id: int) -> str:
        return BINARY_CONFIG

    def iter_tasks(self, project_id: int):
        return iter(self.tasks)

    def create_annotation(self, task_id: int, result: list[dict]) -> None:
        task = next(t for t in self.tasks if t["id"] == task_id)
        task["annotations"].append({"id": len(task["annotations"]) + 100, "result": result})


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("id,label\n" + "".join(f"{i},{label}\n" for i, label in rows))
    return path


def test_labels_annotate_unlabelled_tasks_only_and_a_rerun_adds_nothing(tmp_path):
    tasks = [{"id": 10 + i, "data": {"cutout_id": cid}, "annotations": []}
             for i, cid in enumerate(["a", "b", "c"])]
    tasks[2]["annotations"].append({"id": 1, "result": choice("normal")})
    tasks.append({"id": 20, "data": {"image": "/x.png"}, "annotations": []})  # no cutout_id
    client = FakeClient(tasks)
    labels = write_csv(tmp_path / "labels.csv",
                       [("a", "anomaly"), ("b", "normal"), ("c", "anomaly"), ("zz", "normal")])
    first = import_labels(client, 1, labels)
    assert (first.created, first.already, first.conflicts, first.unmatched) == (
        2, 0, ["c"], ["zz"])
    schema = parse_label_config(BINARY_CONFIG, "anomaly")
    assert [schema.label_of(t["annotations"][-1]["result"]) for t in tasks[:3]] == [1, 0, 0]
    assert len(tasks[2]["annotations"]) == 1  # the annotator's "normal" was not overwritten
    again = import_labels(client, 1, labels)
    assert (again.created, again.already, again.conflicts) == (0, 2, ["c"])


@pytest.mark.e2e
def test_live_labels_import_reports_what_it_could_not_import(label_studio, tmp_path,
                                                             monkeypatch, capsys):
    sdk = label_studio.client
    project = sdk.projects.create(title="amls labels e2e", label_config=BINARY_CONFIG)
    sdk.projects.import_tasks(id=project.id, request=[
        {"image": "/static/images/logo.svg", "cutout_id": cid} for cid in ("a", "b", "c")])
    by_cutout = {t.data["cutout_id"]: t.id for t in sdk.tasks.list(project=project.id)}
    sdk.annotations.create(id=by_cutout["c"], result=choice("normal"))
    labels = write_csv(tmp_path / "labels.csv",
                       [("a", "anomaly"), ("b", "normal"), ("c", "anomaly"), ("zz", "normal")])
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    argv = ["import", "labels", str(labels), "--project", str(project.id)]
    assert main(argv) == 1
    assert "created 2 annotations" in capsys.readouterr().out
    with (tmp_path / "labels.not-imported.csv").open() as fh:
        report = list(csv.DictReader(fh))
    assert [(r["id"], r["label"]) for r in report] == [("zz", "normal"), ("c", "anomaly")]
    assert main([*argv, "--allow-failures"]) == 0
    assert "created 0 annotations; 2 tasks already had that label" in capsys.readouterr().out
    results = {cid: [a["result"][0]["value"]["choices"] for a in sdk.tasks.get(id=tid).annotations]
               for cid, tid in by_cutout.items()}
    assert results == {"a": [["anomaly"]], "b": [["normal"]], "c": [["normal"]]}
