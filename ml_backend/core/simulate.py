"""The paper's active-learning protocol with a simulated oracle.

Start from a few labelled anomalies and normals drawn from a pool, then repeat: train one
cycle, score the unlabelled pool, and let the oracle label the ``per_cycle`` highest-scoring
true anomalies (confirmed finds) and the ``per_cycle`` highest-scoring normals (corrected
false positives). Metrics are always measured on the pool minus everything labelled.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.core import metrics
from ml_backend.core.checkpoint import load_model_dir, read_meta
from ml_backend.core.config import TrainConfig
from ml_backend.core.fixmatch import StepStats
from ml_backend.core.scoring import score_store
from ml_backend.core.sources import StoreSubset
from ml_backend.core.store import CutoutStore
from ml_backend.core.train import save_cycle, train_cycle

log = logging.getLogger(__name__)

METHODS = ("fixmatch", "supervised", "isolation-forest")


@dataclass(frozen=True)
class SimulationPlan:
    method: str = "fixmatch"
    initial_anomalies: int = 5
    initial_normals: int = 495
    cycles: int = 3
    per_cycle: int = 10
    pool: int = 10_000
    seed: int = 42

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.initial_anomalies < 1 or self.initial_normals < 1:
            raise ValueError("need at least one initial anomaly and one initial normal")
        if self.cycles < 1:
            raise ValueError("cycles must be >= 1")


def choose_pool(truth: np.ndarray, plan: SimulationPlan) -> tuple[np.ndarray, np.ndarray]:
    """Return (pool store indices, initially labelled subset of them), drawn with plan.seed.

    truth: (N,) 0/1 per store row, -1 where the row has no truth (never drawn).
    """
    rng = np.random.default_rng(plan.seed)
    known = np.flatnonzero(truth >= 0)
    pool = known if len(known) <= plan.pool else rng.choice(known, plan.pool, replace=False)
    pool = np.sort(pool)
    anomalies = pool[truth[pool] == 1]
    normals = pool[truth[pool] == 0]
    if len(anomalies) < plan.initial_anomalies or len(normals) < plan.initial_normals:
        raise ValueError(
            f"pool of {len(pool)} has {len(anomalies)} anomalies and {len(normals)} normals; "
            f"the plan needs {plan.initial_anomalies} and {plan.initial_normals} to start"
        )
    labelled = np.concatenate([
        rng.choice(anomalies, plan.initial_anomalies, replace=False),
        rng.choice(normals, plan.initial_normals, replace=False),
    ])
    return pool, np.sort(labelled)


def oracle_picks(
    candidates: np.ndarray, scores: np.ndarray, truth: np.ndarray, per_cycle: int
) -> np.ndarray:
    """The per_cycle highest-scoring true anomalies and highest-scoring normals of candidates."""
    order = candidates[np.argsort(-scores, kind="stable")]
    top_anomalies = order[truth[order] == 1][:per_cycle]
    top_normals = order[truth[order] == 0][:per_cycle]
    return np.concatenate([top_anomalies, top_normals])


def run_simulation(
    store: CutoutStore,
    truth: np.ndarray,
    plan: SimulationPlan,
    cfg: TrainConfig,
    *,
    work_dir: Path | None = None,
    score_fn: Callable[..., np.ndarray] | None = None,
) -> Iterator[dict[str, Any]]:
    """Run the protocol, yielding one metrics dict per cycle (the last one is the final result).

    truth: (len(store),) ints, 1 anomaly / 0 normal / -1 unknown. ``score_fn`` replaces the
    isolation-forest baseline in tests.
    """
    pool, labelled = choose_pool(truth, plan)
    cfg = cfg.replace(seed=plan.seed)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        parent: Path | None = None
        for cycle in range(1, plan.cycles + 1):
            unlabelled = np.setdiff1d(pool, labelled, assume_unique=True)
            started = time.perf_counter()
            if plan.method == "isolation-forest":
                from ml_backend.core.baselines import isolation_forest_scores

                fn = score_fn or isolation_forest_scores
                train_seconds = 0.0
                score_started = time.perf_counter()
                scores = fn(cfg, store, unlabelled)
            else:
                model_dir = Path(tmp) / f"cycle{cycle}"
                parent, steps = _train_one_cycle(store, truth, labelled, unlabelled, plan, cfg,
                                                 model_dir, parent)
                train_seconds = time.perf_counter() - started
                model, meta = load_model_dir(parent)
                score_started = time.perf_counter()
                scores = score_store(store, model, meta, indices=unlabelled,
                                     batch_size=cfg.score_batch_size, device=cfg.device)
            score_seconds = time.perf_counter() - score_started
            result = metrics.evaluate(truth[unlabelled], scores)
            if plan.method != "isolation-forest":
                result.update(_step_summary(steps))
            result.update(
                cycle=cycle,
                method=plan.method,
                labelled_anomalies=int((truth[labelled] == 1).sum()),
                labelled_normals=int((truth[labelled] == 0).sum()),
                train_seconds=round(train_seconds, 3),
                seconds_per_cycle=round(time.perf_counter() - started, 3),
                score_images_per_second=round(len(unlabelled) / max(score_seconds, 1e-9), 1),
            )
            log.info("cycle %d: %s", cycle, result)
            yield result
            if cycle < plan.cycles:
                picks = oracle_picks(unlabelled, scores, truth, plan.per_cycle)
                labelled = np.union1d(labelled, picks)


def _train_one_cycle(
    store: CutoutStore,
    truth: np.ndarray,
    labelled: np.ndarray,
    unlabelled: np.ndarray,
    plan: SimulationPlan,
    cfg: TrainConfig,
    out_dir: Path,
    parent: Path | None,
) -> tuple[Path, list[StepStats]]:
    """Train one cycle continuing from ``parent``, save it to ``out_dir``; (out_dir, steps)."""
    images = store.read(labelled)
    labels = truth[labelled].astype(np.int64)
    pool = StoreSubset(store, unlabelled if plan.method == "fixmatch" else unlabelled[:0])
    result = train_cycle(cfg, images, labels, pool, init_dir=parent)
    counts = {"anomaly": int(labels.sum()), "normal": int((labels == 0).sum())}
    save_cycle(result, out_dir, cfg=cfg, stretch=store.stretch,
               parent=None if parent is None else read_meta(parent), label_counts=counts)
    return out_dir, result.steps


def _step_summary(steps: list[StepStats]) -> dict[str, float]:
    """Mean mask rate and anomaly share of the pseudo-labels over a cycle, and the last step's."""
    if not steps:
        return {}
    return {
        "mean_mask_rate": round(float(np.mean([s.mask_rate for s in steps])), 4),
        "final_mask_rate": round(steps[-1].mask_rate, 4),
        "mean_pseudo_anomaly_rate": round(float(np.mean([s.pseudo_anomaly_rate for s in steps])),
                                          4),
    }
