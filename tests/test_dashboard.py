"""The dashboard: what a job records per version, and the page built from those records."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from ml_backend import jobs
from ml_backend.app import create_app
from ml_backend.core.fixmatch import StepStats
from ml_backend.core.metrics import evaluate
from ml_backend.dashboard_data import (
    BINS,
    SUMMARY,
    annotation_times,
    read_summary,
    summarise_version,
    write_summary,
)
from ml_backend.registry import ModelRegistry
from ml_backend.service import AnomalyService
from ml_backend.submitters import InProcessSubmitter
from tests.support.job_project import ANOMALIES, N_TASKS, NORMALS, FakeLabelStudio, job_settings
from tests.support.store_tasks import random_store_tasks

NOW = 1_800_000_000.0


def _steps(n: int) -> list[StepStats]:
    return [StepStats(loss=1.0 / (i + 1), loss_x=0.5, loss_u=0.1, mask_rate=i / n,
                      pseudo_anomaly_rate=0.01, lr=0.03) for i in range(n)]


def test_a_summary_counts_ranks_and_compares_by_hand():
    scores = {1: 0.99, 2: 0.97, 3: 0.02, 4: 0.51, 5: 0.04, 6: 0.93, 7: 0.6}
    labels = {1: 1, 3: 0}          # trained on
    held_out = {5: 0}              # ground truth, never in the queue
    previous = {"top_ids": [1, 2, 3, 7, 9]}  # 1 and 3 labelled since; 2 and 7 still open
    summary = summarise_version(scores, labels, held_out, images={2: "/data/x.png"},
                                steps=_steps(500), previous=previous,
                                label_times=[NOW - 10, NOW - 7200, NOW - 90_000, NOW + 5],
                                now=NOW)
    assert summary["scored"] == 7 and summary["unlabelled"] == 4
    assert [t["task"] for t in summary["top"]] == [2, 6, 7, 4]
    assert summary["top"][0] == {"task": 2, "score": 0.97, "image": "/data/x.png"}
    hist = summary["histogram"]
    assert len(hist["unlabelled"]) == BINS and sum(hist["unlabelled"]) == 4
    assert hist["anomaly"][BINS - 1] == 1 and hist["normal"][0] == 1  # 0.99 and 0.02
    assert summary["unlabelled_quantiles"]["share_above_half"] == 1.0
    assert summary["held_out"] is None  # one class only
    assert summary["versus_previous"] == {"previous_top": 5, "reviewed": 2, "confirmed": 1,
                                          "still_on_top": 2, "still_open": 3}
    assert (summary["labels_last_hour"], summary["labels_last_day"]) == (1, 2)
    steps = summary["steps"]
    assert len(steps["loss"]) == 200 and steps["step"][0] == 1 and steps["step"][-1] == 500
    assert steps["loss"][0] == 1.0 and steps["mask_rate"][-1] == pytest.approx(499 / 500)


def test_held_out_metrics_and_curves_match_the_metrics_module():
    rng = np.random.default_rng(3)
    y = (rng.random(400) < 0.1).astype(int)
    s = np.clip(rng.normal(0.3 + 0.4 * y, 0.2), 0, 1)
    held_out = {i: int(y[i]) for i in range(400)}
    summary = summarise_version({i: float(s[i]) for i in range(400)}, {}, held_out,
                                images={}, now=NOW)
    held = summary["held_out"]
    expected = evaluate(y, s)
    assert held["metrics"]["auroc"] == pytest.approx(expected["auroc"])
    assert held["metrics"]["ap"] == pytest.approx(expected["ap"])
    for curve in ("roc", "pr", "efficiency"):
        assert 2 <= len(held[curve]) <= 200
    assert held["roc"][0] == [0.0, 0.0] and held["roc"][-1] == [1.0, 1.0]
    assert held["efficiency"][-1] == [1.0, 1.0]
    assert summary["unlabelled"] == 0 and summary["top"] == []


def test_annotation_times_skip_cancelled_and_unreadable_stamps():
    tasks = [{"annotations": [{"created_at": "2026-12-04T10:00:00Z"},
                              {"created_at": "2026-12-04T10:00:00.5+00:00",
                               "was_cancelled": True},
                              {"created_at": "yesterday"}, {"created_at": None}]},
             {"annotations": None}]
    assert annotation_times(tasks) == [pytest.approx(1796378400.0)]


def test_a_summary_round_trips_and_a_broken_one_reads_as_none(tmp_path):
    write_summary(tmp_path, {"scored": 3})
    assert read_summary(tmp_path) == {"scored": 3}
    (tmp_path / SUMMARY).write_text("{not json")
    assert read_summary(tmp_path) is None
    assert read_summary(tmp_path / "missing") is None


# ---- the page -------------------------------------------------------------------------------

def _app(settings, registry):
    service = AnomalyService(settings, registry, InProcessSubmitter(lambda p: None))
    return create_app(service, settings).test_client()


def _publish(registry: ModelRegistry, project: int, version: str, meta: dict,
             summary: dict | str | None) -> None:
    folder = registry.staging_dir(project)
    folder.mkdir()
    (folder / "meta.json").write_text(json.dumps({"version": version, **meta}))
    if isinstance(summary, dict):
        write_summary(folder, summary)
    elif isinstance(summary, str):
        (folder / SUMMARY).write_text(summary)
    registry.publish(project, folder, version)


def test_an_empty_project_gets_a_page_that_says_so(tmp_path):
    settings = job_settings(tmp_path)
    answer = _app(settings, ModelRegistry(settings.model_dir)).get("/dashboard/3")
    assert answer.status_code == 200 and answer.mimetype == "text/html"
    page = answer.get_data(as_text=True)
    assert "No model yet" in page and "project 3" in page and "idle" in page


def test_a_bad_project_id_is_a_400(tmp_path):
    settings = job_settings(tmp_path)
    answer = _app(settings, ModelRegistry(settings.model_dir)).get("/dashboard/abc")
    assert answer.status_code == 400


def test_a_version_without_a_readable_summary_is_named_not_fatal(tmp_path):
    settings = job_settings(tmp_path)
    registry = ModelRegistry(settings.model_dir)
    _publish(registry, 4, "amls-a", {"label_counts": {"anomaly": 2}}, "{broken")
    page = _app(settings, registry).get("/dashboard/4").get_data(as_text=True)
    assert "has no dashboard summary" in page and "amls-a ★" in page


def test_ground_truth_gives_curves_and_metrics_across_versions(tmp_path):
    settings = job_settings(tmp_path)
    registry = ModelRegistry(settings.model_dir)
    y = np.array([1, 0, 0, 1, 0, 0, 0, 0])
    for version, signal in (("amls-1", 0.1), ("amls-2", 0.6)):
        s = np.clip(0.3 + signal * y + np.linspace(0, 0.2, 8), 0, 1)
        summary = summarise_version({i: float(s[i]) for i in range(8)}, {},
                                    {i: int(y[i]) for i in range(8)}, images={}, now=NOW)
        _publish(registry, 5, version, {"kind": "fixmatch"}, summary)
    page = _app(settings, registry).get("/dashboard/5").get_data(as_text=True)
    for title in ("ROC", "Precision-recall", "Anomaly detection efficiency",
                  "Across kept versions"):
        assert f'aria-label="{title}"' in page
    assert "AUROC 1.000" in page  # amls-2 separates the classes
    across = page.split('aria-label="Across kept versions"')[1].split("</svg>")[0]
    assert across.count("<circle") == 6  # 2 versions x (AUROC, AP, top-1 %)


def test_task_data_cannot_inject_markup_or_script_urls(tmp_path):
    settings = job_settings(tmp_path)
    registry = ModelRegistry(settings.model_dir)
    summary = summarise_version({1: 0.9, 2: 0.8}, {}, {}, now=NOW, images={
        1: "javascript:alert(1)", 2: '/data/local-files/?d=a"><script>x()</script>'})
    _publish(registry, 6, "amls-x", {"label_counts": {"<b>odd</b>": 1}}, summary)
    page = _app(settings, registry).get("/dashboard/6").get_data(as_text=True)
    assert "javascript:" not in page and "<script>" not in page and "<b>odd" not in page
    assert 'src="http://ls.test/data/local-files/?d=a&quot;&gt;&lt;script&gt;' in page
    assert 'href="http://ls.test/projects/6/data?task=1"' in page


@pytest.mark.slow
def test_a_training_job_and_its_blend_record_what_the_page_shows(tmp_path):
    store = tmp_path / "stores" / "s.h5"
    store.parent.mkdir()
    tasks = random_store_tasks(store, N_TASKS, ANOMALIES, NORMALS, invariance="flip")
    for task in tasks:
        for annotation in task["annotations"]:
            annotation["created_at"] = "2026-12-04T10:00:00Z"
    settings = job_settings(tmp_path).replace(store_roots=(store.parent,), versions_kept=5,
                                              rerank_blend=True)
    fake, registry = FakeLabelStudio(tasks), ModelRegistry(settings.model_dir)
    jobs.run_training(7, settings, fake)
    cycle, blend = registry.versions(7)
    assert registry.latest(7) == blend  # the blend serves, its parent is the cycle
    labelled = set(ANOMALIES) | set(NORMALS)
    for version, scores in ((cycle, None), (blend, fake.scores[blend])):
        summary = read_summary(registry.version_dir(7, version))
        assert summary["scored"] == N_TASKS
        assert summary["unlabelled"] == N_TASKS - len(labelled)
        top = [item["task"] for item in summary["top"]]
        assert not set(top) & labelled and len(top) == N_TASKS - len(labelled)
        assert sum(map(sum, summary["histogram"].values())) == N_TASKS
        if scores is not None:  # the gallery shows the scores Label Studio was sent
            assert [round(scores[t], 5) for t in top] == [i["score"] for i in summary["top"]]
    assert read_summary(registry.version_dir(7, cycle))["steps"]["step"] == [1, 2]
    assert read_summary(registry.version_dir(7, blend))["steps"] is None
    assert read_summary(registry.version_dir(7, blend))["versus_previous"]["reviewed"] == 0
    page = _app(settings, registry).get("/dashboard/7").get_data(as_text=True)
    assert f"Training cycle {cycle}" in page  # the blend's curves are its cycle's
    assert len(re.findall(r'<img src="http://ls.test/x/c\d+\.png"', page)) == len(top)
    assert "re-ranked on the newest labels" in page
    assert "and ImageNet features" not in page  # photographs: a two-term blend


def test_the_serving_card_says_when_a_blend_reads_imagenet_features_too():
    from ml_backend.dashboard_page import _status

    meta = {"kind": "fast", "label_counts": {}, "created": ""}
    assert "and ImageNet features" not in _status({}, meta)
    assert "newest labels and ImageNet features" in _status({}, meta | {"imagenet_branch": True})
    assert "nearest labelled neighbours" not in _status({}, meta | {"imagenet_branch": True})
    assert "ImageNet features, with nearest labelled neighbours" in _status(
        {}, meta | {"imagenet_branch": True, "neighbour_term": True})
