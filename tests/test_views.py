"""The Data Manager tabs: what each one filters, orders and hides, kept in place idempotently."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from ml_backend.label_schema import (
    ALL_TITLE,
    HIDDEN_COLUMNS,
    LABELLED_TITLE,
    UNSURE_SCORES,
    UNSURE_TITLE,
    VIEW_TITLE,
    VIEWS,
)
from ml_backend.labelstudio import LabelStudioClient


class FakeViews:
    """`sdk.views` in memory: list / create / update, recording the writes."""

    def __init__(self) -> None:
        self.views: dict[int, dict[str, Any]] = {}
        self.writes: list[str] = []

    def list(self, project: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(id=i, data=d) for i, d in sorted(self.views.items())]

    def create(self, project: int, data: dict[str, Any]) -> SimpleNamespace:
        view_id = len(self.views) + 1
        self.views[view_id] = dict(data)
        self.writes.append(f"create {data['title']}")
        return SimpleNamespace(id=view_id, data=data)

    def update(self, id: str, project: int, data: dict[str, Any]) -> None:
        self.views[int(id)] = dict(data)
        self.writes.append(f"update {data['title']}")


def client_with(views: FakeViews) -> LabelStudioClient:
    client = LabelStudioClient("http://label-studio.invalid", "token")
    client.sdk = SimpleNamespace(views=views)
    return client


def test_the_tabs_are_created_once_in_order():
    views = FakeViews()
    ids = client_with(views).ensure_views(3)
    assert list(ids) == [VIEW_TITLE, LABELLED_TITLE, UNSURE_TITLE, ALL_TITLE]
    assert sorted(ids.values()) == [1, 2, 3, 4]
    assert client_with(views).ensure_views(3) == ids
    assert views.writes == [f"create {t}" for t in ids]  # the second call wrote nothing


def test_a_drifted_tab_is_reset_and_what_else_an_annotator_set_stays():
    views = FakeViews()
    client = client_with(views)
    ids = client.ensure_views(3)
    queue = views.views[ids[VIEW_TITLE]]
    queue["ordering"] = ["tasks:id"]
    queue["columnsWidth"] = {"tasks:data.image": 240}
    queue["hiddenColumns"] = {"explore": [], "labeling": []}  # the annotator shows everything
    del views.views[ids[ALL_TITLE]]["hiddenColumns"]  # a tab from before column choices
    client.ensure_views(3)
    assert views.views[ids[VIEW_TITLE]]["ordering"] == ["-tasks:predictions_score"]
    assert views.views[ids[VIEW_TITLE]]["columnsWidth"] == {"tasks:data.image": 240}
    assert views.views[ids[VIEW_TITLE]]["hiddenColumns"] == {"explore": [], "labeling": []}
    assert views.views[ids[ALL_TITLE]]["hiddenColumns"] == HIDDEN_COLUMNS
    assert views.writes[-2:] == [f"update {VIEW_TITLE}", f"update {ALL_TITLE}"]


def test_the_queue_shows_unlabelled_tasks_best_first_and_the_labelled_tab_the_rest():
    by_title = {v["title"]: v for v in VIEWS}
    (queue_filter,) = by_title[VIEW_TITLE]["filters"]["items"]
    (labelled_filter,) = by_title[LABELLED_TITLE]["filters"]["items"]
    assert queue_filter["filter"] == labelled_filter["filter"] == "filter:tasks:total_annotations"
    assert (queue_filter["operator"], labelled_filter["operator"]) == ("equal", "greater")
    assert by_title[ALL_TITLE]["filters"]["items"] == []
    assert by_title[VIEW_TITLE]["ordering"] == ["-tasks:predictions_score"]


def test_the_unsure_tab_shows_unlabelled_tasks_scored_near_the_boundary():
    unsure = next(v for v in VIEWS if v["title"] == UNSURE_TITLE)
    unlabelled, band = unsure["filters"]["items"]
    assert (unlabelled["filter"], unlabelled["operator"]) == ("filter:tasks:total_annotations",
                                                              "equal")
    assert band == {"filter": "filter:tasks:predictions_score", "operator": "in",
                    "type": "Number", "value": UNSURE_SCORES}
    assert UNSURE_SCORES["min"] < 0.5 < UNSURE_SCORES["max"]
    assert unsure["ordering"] == ["-tasks:predictions_score"]


def test_columns_for_eyes_no_server_paths():
    for mode in ("explore", "labeling"):
        hidden = set(HIDDEN_COLUMNS[mode])
        assert {"tasks:data.store", "tasks:storage_filename", "tasks:file_upload"} <= hidden
        assert not {"tasks:id", "tasks:predictions_score", "tasks:data.image"} & hidden
    shown = {"tasks:data.ra", "tasks:data.dec", "tasks:data.source", "tasks:data.cutout_id"}
    assert not shown & set(HIDDEN_COLUMNS["explore"])


def test_a_more_like_this_tab_selects_exactly_the_given_and_similar_tasks():
    from ml_backend.label_schema import SIMILAR_PREFIX, similar_view

    view = similar_view([12, 40], [7, 40, 3])
    assert view["title"] == SIMILAR_PREFIX + "12, 40"
    assert view["filters"]["conjunction"] == "or"
    assert [item["value"] for item in view["filters"]["items"]] == [12, 40, 7, 3]
    assert {item["filter"] for item in view["filters"]["items"]} == {"filter:tasks:id"}
    assert view["ordering"] == ["-tasks:predictions_score"]
    assert similar_view(list(range(1, 8)), [9])["title"].endswith("1, 2, 3, 4, 5 …")
    with pytest.raises(ValueError):
        similar_view([], [1])


def test_the_queue_title_carries_a_job_status_and_loses_it_again():
    views = FakeViews()
    client = client_with(views)
    ids = client.ensure_views(3)
    queue = ids[VIEW_TITLE]
    views.views[queue]["hiddenColumns"] = {"explore": ["tasks:id"]}  # an annotator's choice
    assert client.set_queue_status(3, "training 40/100")
    assert views.views[queue]["title"] == "training 40/100 · Most anomalous first"
    assert views.views[queue]["hiddenColumns"] == {"explore": ["tasks:id"]}  # kept
    assert client.ensure_views(3) == ids  # still the queue: no second tab
    assert client.set_queue_status(3, "scoring 1,000")
    writes = len(views.writes)
    assert client.set_queue_status(3, "scoring 1,000")
    assert len(views.writes) == writes  # unchanged: nothing written
    assert client.set_queue_status(3, None)
    assert views.views[queue]["title"] == VIEW_TITLE
    assert [v["title"] for v in views.views.values()].count(VIEW_TITLE) == 1


def test_no_queue_tab_no_status():
    assert client_with(FakeViews()).set_queue_status(3, "training 1/2") is False
