"""Reading some of a project's tasks: those with a submitted annotation, or given ids."""

from __future__ import annotations

import pytest

from ml_backend.label_schema import task_query
from ml_backend.labelstudio import LabelStudioClient
from tests.support.shipped import BINARY_CONFIG, FROM_NAME, TO_NAME


def test_the_query_filters_on_submitted_annotations_and_selects_ids():
    assert task_query() is None
    assert task_query(annotated_only=True) == {"filters": {"conjunction": "and", "items": [
        {"filter": "filter:tasks:total_annotations", "operator": "greater",
         "type": "Number", "value": 0}]}}
    assert task_query(ids=[3, 1]) == {"selectedItems": {"all": False, "included": [3, 1]}}


def _choice(value: str) -> list[dict]:
    return [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
             "value": {"choices": [value]}}]


@pytest.mark.e2e
def test_live_label_studio_answers_annotated_only_and_ids(label_studio):
    sdk = label_studio.client
    project = sdk.projects.create(title="amls task reads", label_config=BINARY_CONFIG)
    sdk.projects.import_tasks(id=project.id, request=[
        {"image": "/static/images/logo.svg", "cutout_id": f"c{i}"} for i in range(6)])
    ids = sorted(t.id for t in sdk.tasks.list(project=project.id))
    sdk.annotations.create(id=ids[1], result=_choice("anomaly"))
    sdk.annotations.create(id=ids[4], result=_choice("normal"), ground_truth=True)
    sdk.annotations.create(id=ids[5], result=[], was_cancelled=True)  # skipped: no label
    client = LabelStudioClient(label_studio.url, label_studio.token)

    annotated = list(client.iter_tasks(project.id, annotated_only=True, page_size=1))
    assert sorted(t["id"] for t in annotated) == [ids[1], ids[4]]  # across pages
    assert all(t["annotations"] for t in annotated)
    chosen = list(client.iter_tasks(project.id, ids=[ids[0], ids[3]]))
    assert sorted(t["id"] for t in chosen) == [ids[0], ids[3]]
    assert chosen[0]["data"]["cutout_id"] in ("c0", "c3")
    assert list(client.iter_tasks(project.id, ids=[])) == []
    assert len(list(client.iter_tasks(project.id))) == 6
