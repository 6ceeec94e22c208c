"""Detection metrics for anomaly scores: AUROC, average precision, top-k precision.

`labels` are 0/1 (1 = anomaly), `scores` are floats where higher means more anomalous.
NaN scores are rejected with a ValueError (a NaN would silently sort to one end).
Ties are handled as in scikit-learn: AUROC counts a tied anomaly/normal pair as 1/2; the
ROC and PR curves have one point per distinct score. Rankings that need an order within
ties (top-k precision, efficiency curve) keep the input order (stable sort).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ArrayLike = Sequence[float] | np.ndarray


def _check(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.size != s.size:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    if y.size == 0:
        raise ValueError("no labels and scores to evaluate")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 (normal) or 1 (anomaly), got {np.unique(y)[:10]}")
    n_nan = int(np.isnan(s).sum())
    if n_nan:
        raise ValueError(f"{n_nan} of {s.size} scores are NaN; metrics need finite scores")
    return y.astype(np.int64), s


def _require_both_classes(y: np.ndarray, metric: str) -> None:
    if y.min() == y.max():
        raise ValueError(f"{metric} is undefined: all {y.size} labels are {int(y[0])}")


def _curve_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At each distinct score threshold (descending): true positives, false positives, thr."""
    order = np.argsort(-s, kind="stable")
    y_sorted, s_sorted = y[order], s[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s_sorted)), y.size - 1]
    tp = np.cumsum(y_sorted)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    return tp, fp, s_sorted[last_of_tie]


def roc_curve(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate), starting at (0, 0), one point per threshold."""
    y, s = _check(labels, scores)
    _require_both_classes(y, "ROC")
    tp, fp, _ = _curve_counts(y, s)
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]


def pr_curve(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision), one point per threshold from the highest score down."""
    y, s = _check(labels, scores)
    if y.sum() == 0:
        raise ValueError("precision-recall is undefined without anomalies")
    tp, fp, _ = _curve_counts(y, s)
    return tp / tp[-1], tp / (tp + fp)


def auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve in [0, 1] (trapezoid; ties count 1/2). Needs both classes."""
    fpr, tpr = roc_curve(labels, scores)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def average_precision(labels: ArrayLike, scores: ArrayLike) -> float:
    """Step-wise average precision: AP = sum_k (R_k - R_{k-1}) P_k over distinct thresholds.

    The same definition as scikit-learn's `average_precision_score`, not the trapezoid area
    under the PR curve (which interpolates optimistically). In [0, 1]; needs an anomaly.
    """
    recall, precision = pr_curve(labels, scores)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def top_count(n: int, fraction: float) -> int:
    """ceil(fraction * n), at least 1; guarded against float error (0.07 * 100 -> 7, not 8)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return max(1, math.ceil(fraction * n - 1e-9))


def precision_at_fraction(labels: ArrayLike, scores: ArrayLike, fraction: float) -> float:
    """Fraction of anomalies among the top ceil(fraction * n) scores (at least one item)."""
    y, s = _check(labels, scores)
    k = top_count(y.size, fraction)
    top = np.argsort(-s, kind="stable")[:k]
    return float(y[top].mean())


def efficiency_curve(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(fraction of the set inspected, fraction of anomalies found), inspecting by score.

    Both arrays have n + 1 points from (0, 0) to (1, 1); needs at least one anomaly.
    """
    y, s = _check(labels, scores)
    if y.sum() == 0:
        raise ValueError("the efficiency curve is undefined without anomalies")
    found = np.cumsum(y[np.argsort(-s, kind="stable")])
    return np.arange(y.size + 1) / y.size, np.r_[0, found] / found[-1]


def evaluate(labels: ArrayLike, scores: ArrayLike) -> dict[str, Any]:
    """All summary metrics as a JSON-ready dict.

    Keys: auroc, ap, precision_top_0_1pct, precision_top_1pct, n, n_anomalies. `auroc` is
    None unless both classes are present, `ap` is None without anomalies.
    """
    y, s = _check(labels, scores)
    both = y.min() != y.max()
    any_anomaly = bool(y.sum() > 0)
    return {
        "auroc": auroc(y, s) if both else None,
        "ap": average_precision(y, s) if any_anomaly else None,
        "precision_top_0_1pct": precision_at_fraction(y, s, 0.001),
        "precision_top_1pct": precision_at_fraction(y, s, 0.01),
        "n": int(y.size),
        "n_anomalies": int(y.sum()),
    }


def plot_evaluation(labels: ArrayLike, scores: ArrayLike, out_png: str | Path) -> Path:
    """Write a PNG with three panels: ROC, precision-recall and efficiency curve.

    Panels whose metric is undefined (one class only) say so instead of drawing a curve.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    y, s = _check(labels, scores)
    summary = evaluate(y, s)
    fig = Figure(figsize=(13, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    roc_ax, pr_ax, eff_ax = fig.subplots(1, 3)
    if summary["auroc"] is not None:
        roc_ax.plot(*roc_curve(y, s), drawstyle="default")
        roc_ax.plot([0, 1], [0, 1], ls=":", c="grey", label="random")
        roc_ax.legend(loc="lower right")
    else:
        _undefined(roc_ax)
    roc_ax.set(title=f"ROC (AUROC {_fmt(summary['auroc'])})", xlabel="false positive rate",
               ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.02))
    if summary["ap"] is not None:
        recall, precision = pr_curve(y, s)
        pr_ax.step(np.r_[0.0, recall], np.r_[precision[0], precision], where="pre")
        pr_ax.axhline(y.mean(), ls=":", c="grey", label="random")
        pr_ax.legend(loc="upper right")
        fraction, found = efficiency_curve(y, s)
        eff_ax.plot(fraction, found, label="model")
        eff_ax.plot([0, 1], [0, 1], ls=":", c="grey", label="random")
        eff_ax.legend(loc="lower right")
    else:
        _undefined(pr_ax)
        _undefined(eff_ax)
    pr_ax.set(title=f"Precision-recall (AP {_fmt(summary['ap'])})", xlabel="recall",
              ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    eff_ax.set(title=f"Efficiency ({summary['n_anomalies']} anomalies in {summary['n']})",
               xlabel="fraction inspected (by score)", ylabel="fraction of anomalies found",
               xlim=(0, 1), ylim=(0, 1.02))
    out = Path(out_png)
    fig.savefig(out, dpi=100)
    return out


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def _undefined(ax: Any) -> None:
    ax.text(0.5, 0.5, "undefined: one class only", ha="center", va="center",
            transform=ax.transAxes)
