"""What the dashboard shows about one model version, computed once when the version is made.

A job knows every task's score, the labels it trained on and the ground truth it held out. It
writes a small `dashboard.json` into the version's directory (so it is versioned and pruned
with the version), and the page (`ml_backend.dashboard_page`) only reads these files: its cost
does not grow with the number of tasks.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ml_backend.core.atomic import atomic_write_text
from ml_backend.core.metrics import efficiency_curve, evaluate, pr_curve, roc_curve

if TYPE_CHECKING:
    from ml_backend.core.fixmatch import StepStats

logger = logging.getLogger(__name__)

SUMMARY = "dashboard.json"
BINS = 20            # score histogram bins over [0, 1]
GALLERY = 24         # top unlabelled candidates shown with their images
TOP_COMPARED = 100   # the top of the queue compared between consecutive versions
CURVE_POINTS = 200   # points kept per curve
_STEP_FIELDS = ("loss", "loss_x", "loss_u", "mask_rate", "pseudo_anomaly_rate")


def summarise_version(scores: Mapping[int, float], labels: Mapping[int, int],
                      held_out: Mapping[int, int], *, images: Mapping[int, str],
                      steps: Sequence[StepStats] = (), previous: Mapping[str, Any] | None = None,
                      label_times: Sequence[float] = (), now: float | None = None,
                      ) -> dict[str, Any]:
    """The dashboard's numbers for a version: score histograms, the top candidates, held-out
    curves, training curves and, against the `previous` version's summary, how the top of the
    queue moved and how much of it annotators confirmed.

    scores: task id -> P(anomaly) for every scored task; labels: the trained-on labels;
    held_out: ground-truth labels; images: task id -> image URL (for the gallery);
    label_times: epoch seconds of the project's annotations (labels per hour)."""
    now = datetime.now().timestamp() if now is None else now
    unlabelled = [t for t in scores if t not in labels and t not in held_out]
    top = sorted(unlabelled, key=lambda t: (-scores[t], t))[:max(GALLERY, TOP_COMPARED)]
    summary: dict[str, Any] = {
        "scored": len(scores), "unlabelled": len(unlabelled),
        "histogram": _histograms(scores, labels, unlabelled),
        "unlabelled_quantiles": _quantiles([scores[t] for t in unlabelled]),
        "top": [{"task": t, "score": round(float(scores[t]), 5), "image": images.get(t, "")}
                for t in top[:GALLERY]],
        "top_ids": top[:TOP_COMPARED],
        "held_out": _held_out(scores, held_out),
        "steps": _step_curves(steps),
        "labels_last_hour": sum(1 for t in label_times if now - 3600 <= t <= now),
        "labels_last_day": sum(1 for t in label_times if now - 86_400 <= t <= now),
    }
    if previous:
        summary["versus_previous"] = _versus(previous, top[:TOP_COMPARED], labels)
    return summary


def write_summary(version_dir: Path, summary: Mapping[str, Any]) -> None:
    atomic_write_text(Path(version_dir) / SUMMARY, json.dumps(summary, separators=(",", ":")))


def read_summary(version_dir: Path) -> dict[str, Any] | None:
    """A version's summary; None if it has none (older versions) or it cannot be read."""
    try:
        data = json.loads((Path(version_dir) / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def annotation_times(tasks: Sequence[Mapping[str, Any]]) -> list[float]:
    """Epoch seconds of every submitted (not skipped) annotation with a readable created_at."""
    times = []
    for task in tasks:
        for annotation in task.get("annotations") or []:
            stamp = annotation.get("created_at")
            if annotation.get("was_cancelled") or not isinstance(stamp, str):
                continue
            try:
                times.append(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
            except ValueError:
                continue
    return times


def _histograms(scores: Mapping[int, float], labels: Mapping[int, int],
                unlabelled: Sequence[int]) -> dict[str, list[int]]:
    edges = np.linspace(0.0, 1.0, BINS + 1)

    def counts(ids: Sequence[int]) -> list[int]:
        values = np.clip(np.array([scores[t] for t in ids], dtype=np.float64), 0.0, 1.0)
        return np.histogram(values, bins=edges)[0].astype(int).tolist()

    scored_labels = [t for t in labels if t in scores]
    return {"unlabelled": counts(unlabelled),
            "normal": counts([t for t in scored_labels if labels[t] == 0]),
            "anomaly": counts([t for t in scored_labels if labels[t] == 1])}


def _quantiles(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    q = np.quantile(np.asarray(values, dtype=np.float64), [0.5, 0.9, 0.99])
    share = float(np.mean(np.asarray(values) >= 0.5))
    return {"p50": round(float(q[0]), 5), "p90": round(float(q[1]), 5),
            "p99": round(float(q[2]), 5), "share_above_half": round(share, 5)}


def _held_out(scores: Mapping[int, float], held_out: Mapping[int, int]) -> dict[str, Any] | None:
    """Metrics and curves on the ground-truth tasks; None without both classes among them."""
    ids = sorted(t for t in held_out if t in scores)
    y = np.array([held_out[t] for t in ids], dtype=np.int64)
    if len(ids) == 0 or y.min() == y.max():
        return None
    s = np.array([scores[t] for t in ids], dtype=np.float64)
    result = evaluate(y, s)
    metrics = {k: v for k, v in result.items() if isinstance(v, int | float)
               and not isinstance(v, bool) and math.isfinite(v)}
    fpr, tpr = roc_curve(y, s)
    recall, precision = pr_curve(y, s)
    inspected, found = efficiency_curve(y, s)
    return {"metrics": metrics,
            "roc": _thin(fpr, tpr), "pr": _thin(recall, precision),
            "efficiency": _thin(inspected, found)}


def _thin(x: np.ndarray, y: np.ndarray) -> list[list[float]]:
    """At most CURVE_POINTS (x, y) points, first and last kept."""
    idx = np.unique(np.linspace(0, len(x) - 1, min(len(x), CURVE_POINTS)).round().astype(int))
    return [[round(float(x[i]), 5), round(float(y[i]), 5)] for i in idx]


def _step_curves(steps: Sequence[StepStats]) -> dict[str, list[float]] | None:
    if not steps:
        return None
    idx = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), CURVE_POINTS))
                    .round().astype(int))
    return {name: [round(float(getattr(steps[i], name)), 5) for i in idx]
            for name in _STEP_FIELDS} | {"step": [int(i) + 1 for i in idx]}


def _versus(previous: Mapping[str, Any], top: Sequence[int],
            labels: Mapping[int, int]) -> dict[str, Any]:
    """How the previous version's top of the queue fared: how many of it annotators have
    labelled since and how many of those were anomalies, and how much of the rest is still
    at the top now."""
    before = [int(t) for t in previous.get("top_ids") or []]
    reviewed = [t for t in before if t in labels]
    still_open = [t for t in before if t not in labels]
    now_top = set(top)
    return {"previous_top": len(before), "reviewed": len(reviewed),
            "confirmed": sum(labels[t] for t in reviewed),
            "still_on_top": sum(1 for t in still_open if t in now_top),
            "still_open": len(still_open)}


def record_version(staging: Path, previous_dir: Path | None, scores: Mapping[int, float],
                   labels: Mapping[int, int], held_out: Mapping[int, int],
                   tasks: Iterable[Mapping[str, Any]], image_key: str,
                   steps: Sequence[StepStats] = ()) -> None:
    """Write the summary of the version in `staging` (being built, or just published),
    against the one it replaces (`previous_dir`). `tasks` (read here, lazily) give the gallery
    its images. A failure is logged, never raised: the dashboard must not cost a model."""
    try:
        tasks = list(tasks)
        images = {int(t["id"]): str((t.get("data") or {}).get(image_key, "")) for t in tasks}
        previous = read_summary(previous_dir) if previous_dir is not None else None
        write_summary(staging, summarise_version(
            scores, labels, held_out, images=images, steps=steps, previous=previous,
            label_times=annotation_times(tasks)))
    except Exception as err:  # noqa: BLE001 - logged; the version is published without it
        logger.warning("dashboard summary for %s not written: %s", staging, err)
