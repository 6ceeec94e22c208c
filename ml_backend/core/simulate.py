"""The paper's active-learning protocol with a simulated oracle.

Start from a few labelled anomalies and normals drawn from a pool, then repeat: train one
cycle, score the unlabelled pool, and let the oracle label the ``per_cycle`` highest-scoring
true anomalies (confirmed finds) and the ``per_cycle`` highest-scoring normals (corrected
false positives). Metrics are always measured on the pool minus everything labelled.

Methods: ``fixmatch`` (the product), ``supervised`` (the same training on the labels alone),
``isolation-forest`` (unsupervised, on ImageNet features) and ``linear-probe`` (the instant
re-ranking's head on frozen ImageNet features, refit on each cycle's labels; no training).

With ``fast_head`` each cycle's row also measures the instant re-ranking (`core.fast_head`)
on the same unlabelled images, the oracle picking from the FixMatch scores unless
``picks_from`` names a blend (what annotators of a blend's queue pick from):

- ``head_*``: the head refit on this cycle's embeddings with this cycle's labels;
- ``blend_*``: the mean of the FixMatch and head ranks;
- ``interim_*``: what annotators see while this cycle trains: the head on the previous
  cycle's embeddings (ImageNet ones before cycle 1) with this cycle's labels;
- ``stale_*``: the alternative without a fast path, the previous cycle's FixMatch scores
  (absent in cycle 1, which has no previous model);
- ``zblend_*`` and ``interim_zblend_*``: the head blended with the model whose embeddings it
  reads (`fast_head.blend_with_model`: the mean of both standardised logits on the model's
  logit scale, one linear head, what the product publishes) after the cycle and while the
  next one trains;
- ``ens_*``: the mean rank of this cycle's and the previous cycle's FixMatch scores (an
  ensemble of the last two models at no extra forward pass; absent in cycle 1).
- ``probe_*``: the head on the ImageNet embeddings (not the model's) refit with this
  cycle's labels, the ``linear-probe`` method's ranking given FixMatch's picks;
  ``pblend_*``: the mean rank of the model and that head; ``pzblend_*``: the mean rank of
  the ``zblend`` ranking and that head (two feature spaces, one trained, one not);
  ``lblend_*``: the mean of three standardised logits, the model's, the head's on its
  embeddings and the head's on the ImageNet ones (linear in both embeddings together, so a
  model carrying both backbones could publish it as one head).
- ``mknn_*``: the same neighbour score on the model's own embeddings; ``mkblend_*``: the
  mean of the model's, its head's and that score's standardised logits (photographs' blend
  with a neighbour term).
- ``knn_*``: nearest labelled neighbours on the ImageNet embeddings (`fast_head.NeighbourTerm`);
  ``kblend_*``: ``lblend``'s three logits and that score, standardised and averaged over
  the unlabelled rows; ``blend4_*``: the same four terms blended exactly as the backend
  published them for sky cutouts in session 30 (`fast_head.blend_with_model`: the linear terms
  standardised over the whole pool, the neighbour term over the rows it did not learn from);
  ``blend3_*``: the same without the model's own logit (head, ImageNet head, neighbours:
  what the backend publishes for sky cutouts since session 31, `Config.model_term`).
- with ``imagenet_framing`` (crop, size) and/or ``imagenet_block``, also ``fprobe_*`` and
  ``fblend_*``: the same two with a second set of ImageNet embeddings, framed their own way
  (a tighter crop, more pixels) and/or pooled after another stage of the backbone
  (`model.truncate_after_block`, or uncut), so one run pairs two versions of the third term.

Every FixMatch row also reads out calibration: ``mean_score_top_1pct`` is the mean score
the model gives its own top 1 % (what an annotator reads there), to set beside
``precision_top_1pct`` (what is true there); ``zblend_mean_score_top_1pct`` the same for the
blend annotators see.

With ``compare_tta`` each cycle's row also holds ``tta_*``: the same model scored the other
way round (with test-time augmentation when the config has none, without it when it has),
on the same unlabelled images, so one run pairs the two scoring rules; the oracle still
picks from the config's own scores.

With ``compare_shift`` (a fraction of the input size, as `TrainConfig.test_time_shift`) each
cycle's row also holds ``shift_*``: the same model scored with that test-time shift instead
of its own (``shift_mean_score_top_1pct`` its calibration), and with ``fast_head``
``shift_zblend_*``: the photographs' published blend (the head refit on those embeddings,
blended with the model) from it; the oracle still picks from the config's own scores, so
each cycle pairs two scorings of one model on one set of picks.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ml_backend.core import metrics
from ml_backend.core.checkpoint import (
    IMAGENET_STAGE,
    ModelMeta,
    imagenet_model,
    load_model_dir,
    read_meta,
)
from ml_backend.core.config import TrainConfig, check_test_time_shift
from ml_backend.core.fixmatch import StepStats
from ml_backend.core.model import anomaly_logit_weights
from ml_backend.core.scoring import score_store
from ml_backend.core.sources import StoreSubset
from ml_backend.core.store import CutoutStore
from ml_backend.core.train import save_cycle, train_cycle

if TYPE_CHECKING:  # fast_head imports scikit-learn: loaded when a run needs it
    from ml_backend.core.fast_head import FastHead, NeighbourTerm

log = logging.getLogger(__name__)

METHODS = ("fixmatch", "supervised", "isolation-forest", "linear-probe")
# What the oracle picks from: the trained model's scores, or (with fast_head) the two-term
# blend (`zblend`), the three-term one (`lblend`), the four-term one (`blend4`) or that
# without the model's own logit, which the backend publishes for sky cutouts (`blend3`), as
# annotators of a blend's queue would.
PICKS_FROM = ("model", "zblend", "lblend", "blend4", "blend3")
# `SimulationPlan.imagenet_block`: the ImageNet backbone uncut (its last stage).
IMAGENET_UNCUT = -1
# The methods that train the network each cycle (the others score with a fixed feature map).
TRAINED = ("fixmatch", "supervised")


@dataclass(frozen=True)
class SimulationPlan:
    method: str = "fixmatch"
    initial_anomalies: int = 5
    initial_normals: int = 495
    cycles: int = 3
    per_cycle: int = 10
    pool: int = 10_000
    seed: int = 42
    fast_head: bool = False
    compare_tta: bool = False
    compare_shift: float | None = None
    picks_from: str = "model"
    # (center crop, image size) of a second set of ImageNet embeddings for the third term
    # (`fprobe_*`, `fblend_*`); None: only the model's framing.
    imagenet_framing: tuple[float, int] | None = None
    # Stage of the ImageNet backbone the second set of embeddings is pooled after
    # (`model.truncate_after_block`); IMAGENET_UNCUT: its last, the 1,280 channels of its
    # head convolution (the backend's term before session 22); None: the backend's stage
    # (`checkpoint.IMAGENET_STAGE`, at the model's framing unless imagenet_framing says
    # otherwise).
    imagenet_block: int | None = None
    # With fast_head: write each cycle's logits over the unlabelled pool here
    # (`cycle<N>.npz`: `rows`, `truth`, `model`, `head`, `probe`, `knn`, and `fprobe` with a second
    # ImageNet embedding), so that other blends of the same runs can be measured afterwards.
    scores_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.picks_from not in PICKS_FROM:
            raise ValueError(f"unknown picks_from {self.picks_from!r}; choose one of "
                             f"{', '.join(PICKS_FROM)}")
        if self.picks_from != "model" and not (self.fast_head and self.method in TRAINED):
            raise ValueError(f"picks_from={self.picks_from!r} needs fast_head and a trained "
                             f"method ({', '.join(TRAINED)})")
        second = self.imagenet_framing is not None or self.imagenet_block is not None
        if (second or self.scores_dir is not None) and not (self.fast_head
                                                            and self.method in TRAINED):
            raise ValueError(f"imagenet_framing, imagenet_block and scores_dir need fast_head "
                             f"and a trained method ({', '.join(TRAINED)})")
        if self.imagenet_framing is not None:
            crop, size = self.imagenet_framing
            TrainConfig(center_crop=crop, image_size=size)  # its checks, with its messages
        if self.imagenet_block is not None and self.imagenet_block < IMAGENET_UNCUT:
            raise ValueError(f"imagenet_block must be >= 0, or {IMAGENET_UNCUT} for the uncut "
                             f"backbone, got {self.imagenet_block}")
        if self.compare_shift is not None:
            check_test_time_shift(self.compare_shift)
            if self.method not in TRAINED:
                raise ValueError(f"compare_shift needs a trained method ({', '.join(TRAINED)})")
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
    fast = plan.fast_head and plan.method in TRAINED
    needs_features = fast or plan.method == "linear-probe" or cfg.uses_teacher
    features = _imagenet_features(store, pool, cfg) if needs_features else None
    # `features` becomes the model's each cycle
    imagenet = features.copy() if fast or cfg.uses_teacher else None
    framed = None
    if fast and (plan.imagenet_framing is not None or plan.imagenet_block is not None):
        crop, size = plan.imagenet_framing or (cfg.center_crop, cfg.image_size)
        stage = plan.imagenet_block
        if stage is None:
            stage = IMAGENET_STAGE
        elif stage == IMAGENET_UNCUT:
            stage = None
        framed = _imagenet_features(store, pool, cfg.replace(center_crop=crop, image_size=size),
                                    stage=stage)
    stale: np.ndarray | None = None  # the previous cycle's FixMatch scores over the pool
    previous: np.ndarray | None = None  # after training, the same (stale is then this cycle's)
    logit: tuple[np.ndarray, float] | None = None  # that model's anomaly logit over features
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        parent: Path | None = None
        for cycle in range(1, plan.cycles + 1):
            unlabelled = np.setdiff1d(pool, labelled, assume_unique=True)
            extra: dict[str, Any] = {}
            if fast:
                ranked = _head_rankings(features, pool, labelled, unlabelled, truth, logit)
                extra |= _prefixed("interim", truth[unlabelled], ranked["head"])
                if "zblend" in ranked:
                    extra |= _prefixed("interim_zblend", truth[unlabelled], ranked["zblend"])
                if stale is not None:
                    extra |= _prefixed("stale", truth[unlabelled],
                                       stale[np.searchsorted(pool, unlabelled)])
            started = time.perf_counter()
            if plan.method == "isolation-forest":
                from ml_backend.core.baselines import isolation_forest_scores

                fn = score_fn or isolation_forest_scores
                train_seconds = 0.0
                score_started = time.perf_counter()
                scores = fn(cfg, store, unlabelled)
            elif plan.method == "linear-probe":
                score_started = started
                scores = _head_rankings(features, pool, labelled, unlabelled, truth, None)["head"]
                train_seconds = time.perf_counter() - started
            else:
                model_dir = Path(tmp) / f"cycle{cycle}"
                teacher = None
                if cfg.uses_teacher:
                    teacher = frozen_ranking(imagenet, np.searchsorted(pool, labelled),
                                             truth[labelled], np.searchsorted(pool, unlabelled))
                    extra |= _teacher_quality(teacher, truth[unlabelled], cfg)
                parent, steps = _train_one_cycle(store, truth, labelled, unlabelled, plan, cfg,
                                                 model_dir, parent, teacher)
                train_seconds = time.perf_counter() - started
                model, meta = load_model_dir(parent)
                score_started = time.perf_counter()
                if features is None:
                    scores = score_store(store, model, meta, indices=unlabelled,
                                         batch_size=cfg.score_batch_size, device=cfg.device)
                else:  # the whole pool: the next interim head needs the new labels' features
                    previous = stale
                    if features.shape[1] != model.num_features:  # not the ImageNet term's width
                        features = np.empty((len(pool), model.num_features), dtype=np.float16)
                    stale = score_store(store, model, meta, indices=pool, features=features,
                                        batch_size=cfg.score_batch_size, device=cfg.device)
                    scores = stale[np.searchsorted(pool, unlabelled)]
            score_seconds = time.perf_counter() - score_started
            result = metrics.evaluate(truth[unlabelled], scores)
            if plan.method != "isolation-forest":
                result["mean_score_top_1pct"] = mean_top_score(scores)
            if plan.method in TRAINED:
                result.update(_step_summary(steps))
                if plan.compare_tta:
                    extra |= _prefixed("tta", truth[unlabelled], score_store(
                        store, model, _tta_toggled(meta), indices=unlabelled,
                        batch_size=cfg.score_batch_size, device=cfg.device))
                if plan.compare_shift is not None:
                    extra |= _shift_compared(store, model, meta, plan.compare_shift, pool,
                                             labelled, unlabelled, truth, cfg, fast)
            result.update(
                cycle=cycle,
                method=plan.method,
                labelled_anomalies=int((truth[labelled] == 1).sum()),
                labelled_normals=int((truth[labelled] == 0).sum()),
                train_seconds=round(train_seconds, 3),
                seconds_per_cycle=round(time.perf_counter() - started, 3),
                score_images_per_second=round(len(unlabelled) / max(score_seconds, 1e-9), 1),
            )
            if fast:
                logit = anomaly_logit_weights(model)
                ranked = _head_rankings(features, pool, labelled, unlabelled, truth, logit)
                extra |= _prefixed("head", truth[unlabelled], ranked["head"])
                extra |= _prefixed("zblend", truth[unlabelled], ranked["zblend"])
                extra["zblend_mean_score_top_1pct"] = mean_top_score(ranked["zblend"])
                if previous is not None:
                    extra |= _prefixed("ens", truth[unlabelled], _mean_rank(
                        scores, previous[np.searchsorted(pool, unlabelled)]))
                extra |= _prefixed("blend", truth[unlabelled],
                                   _mean_rank(scores, ranked["head"]))
                probe = _head_rankings(imagenet, pool, labelled, unlabelled, truth, None)
                extra |= _prefixed("probe", truth[unlabelled], probe["head"])
                extra |= _prefixed("pblend", truth[unlabelled], _mean_rank(scores, probe["head"]))
                extra |= _prefixed("pzblend", truth[unlabelled],
                                   _mean_rank(ranked["zblend"], probe["head"]))
                logits = {"model": ranked["model_logit"], "head": ranked["head_logit"],
                          "probe": probe["head_logit"]}
                lblend = mean_z(*logits.values())
                extra |= _prefixed("lblend", truth[unlabelled], lblend)
                from ml_backend.core.fast_head import fit_neighbour_term

                known, rows = np.searchsorted(pool, labelled), np.searchsorted(pool, unlabelled)
                term = fit_neighbour_term(imagenet, known, truth[labelled])
                logits["knn"] = term.logits(imagenet[rows])
                extra |= _prefixed("knn", truth[unlabelled], logits["knn"])
                extra |= _prefixed("kblend", truth[unlabelled], mean_z(*logits.values()))
                logits["mknn"] = fit_neighbour_term(features, known, truth[labelled]).logits(
                    features[rows])
                extra |= _prefixed("mknn", truth[unlabelled], logits["mknn"])
                extra |= _prefixed("mkblend", truth[unlabelled], mean_z(
                    logits["model"], logits["head"], logits["mknn"]))
                blend4, blend3 = (_published_blend(ranked["fitted"], probe["fitted"],
                                                   (term, known), logit, features, imagenet,
                                                   rows, model_term=with_model)
                                  for with_model in (True, False))
                extra |= _prefixed("blend4", truth[unlabelled], blend4)
                extra |= _prefixed("blend3", truth[unlabelled], blend3)
                if framed is not None:
                    fprobe = _head_rankings(framed, pool, labelled, unlabelled, truth, None)
                    extra |= _prefixed("fprobe", truth[unlabelled], fprobe["head"])
                    extra |= _prefixed("fblend", truth[unlabelled], mean_z(
                        ranked["model_logit"], ranked["head_logit"], fprobe["head_logit"]))
                    logits["fprobe"] = fprobe["head_logit"]
                if plan.scores_dir is not None:
                    Path(plan.scores_dir).mkdir(parents=True, exist_ok=True)
                    np.savez_compressed(Path(plan.scores_dir) / f"cycle{cycle}.npz",
                                        rows=unlabelled, truth=truth[unlabelled], **logits)
                picked_from = {"model": scores, "zblend": ranked["zblend"], "lblend": lblend,
                               "blend4": blend4, "blend3": blend3}
            else:
                picked_from = {"model": scores}
            result.update(extra)
            log.info("cycle %d: %s", cycle, result)
            yield result
            if cycle < plan.cycles:
                picks = oracle_picks(unlabelled, picked_from[plan.picks_from], truth,
                                     plan.per_cycle)
                labelled = np.union1d(labelled, picks)


_HEAD_KEYS = ("auroc", "ap", "precision_top_1pct")


def _scored_as(meta: ModelMeta, **overrides: Any) -> ModelMeta:
    """`meta` with its config's scoring settings replaced by `overrides`."""
    return dataclasses.replace(meta, config={**meta.config, **overrides})


def _tta_toggled(meta: ModelMeta) -> ModelMeta:
    """`meta` with test-time augmentation switched the other way."""
    on = TrainConfig.from_dict(meta.config).test_time_augmentation
    return _scored_as(meta, test_time_augmentation=not on)


def _shift_compared(store: CutoutStore, model: Any, meta: ModelMeta, shift: float,
                    pool: np.ndarray, labelled: np.ndarray, unlabelled: np.ndarray,
                    truth: np.ndarray, cfg: TrainConfig, fast: bool) -> dict[str, Any]:
    """``shift_*`` (and with `fast`, ``shift_zblend_*``): `model` scored with test-time shift
    `shift` over the unlabelled rows, and the two-term blend refit on those embeddings."""
    shifted = _scored_as(meta, test_time_shift=shift)
    rows = pool if fast else unlabelled  # the refit head needs the labelled rows' features
    features = np.empty((len(rows), model.num_features), dtype=np.float16) if fast else None
    scores = score_store(store, model, shifted, indices=rows, features=features,
                         batch_size=cfg.score_batch_size, device=cfg.device)
    scores = scores[np.searchsorted(rows, unlabelled)]
    out = _prefixed("shift", truth[unlabelled], scores)
    out["shift_mean_score_top_1pct"] = mean_top_score(scores)
    if fast:
        ranked = _head_rankings(features, pool, labelled, unlabelled, truth,
                                anomaly_logit_weights(model))
        out |= _prefixed("shift_zblend", truth[unlabelled], ranked["zblend"])
    return out


def _imagenet_features(store: CutoutStore, pool: np.ndarray, cfg: TrainConfig, *,
                       stage: int | None = IMAGENET_STAGE) -> np.ndarray:
    """float16 pooled features of the pool rows from the ImageNet backbone (before cycle 1),
    embedded as the backend's first ranking embeds them (`checkpoint.imagenet_model`: with
    test-time augmentation, the mean over the views); pooled after `stage` (None: uncut)."""
    model, meta = imagenet_model(cfg, int(store.shape[-1]), store.stretch, stage=stage)
    features = np.empty((len(pool), model.num_features), dtype=np.float16)
    score_store(store, model, meta, indices=pool, features=features,
                batch_size=cfg.score_batch_size, device=cfg.device, progress_desc="features")
    return features


def _head_rankings(features: np.ndarray, pool: np.ndarray, labelled: np.ndarray,
                   unlabelled: np.ndarray, truth: np.ndarray,
                   logit: tuple[np.ndarray, float] | None) -> dict[str, np.ndarray]:
    """Scores of the unlabelled pool rows by the fast head fitted on the labelled ones
    ("head"; its logits "head_logit"; the head itself "fitted") and, given the `logit` of the
    model behind the features, by the head blended with it ("zblend"; the model's logits
    "model_logit")."""
    from ml_backend.core.fast_head import blend_with_model, fit_fast_head

    head = fit_fast_head(features, np.searchsorted(pool, labelled), truth[labelled])
    rows = features[np.searchsorted(pool, unlabelled)]
    out = {"head": head.scores(rows), "head_logit": head.logits(rows), "fitted": head}
    if logit is not None:
        out["zblend"] = blend_with_model(head, *logit, features).head.scores(rows)
        out["model_logit"] = rows.astype(np.float32) @ logit[0].astype(np.float32) + logit[1]
    return out


def _published_blend(head: FastHead, imagenet_head: FastHead,
                     neighbours: tuple[NeighbourTerm, np.ndarray], logit: tuple[np.ndarray, float],
                     features: np.ndarray, imagenet: np.ndarray, rows: np.ndarray, *,
                     model_term: bool = True) -> np.ndarray:
    """Scores of the pool `rows` by the blend the backend publishes for sky cutouts
    (`rerank.rerank_and_publish`) of the heads and neighbour term this cycle fitted, with or
    without the model's own logit (`fast_head.blend_with_model`'s `model_term`)."""
    from ml_backend.core.fast_head import blend_with_model

    blend = blend_with_model(head, *logit, features, imagenet=(imagenet_head, imagenet),
                             neighbours=neighbours, model_term=model_term)
    return blend.scores([features[rows], imagenet[rows]])


def mean_top_score(scores: np.ndarray, fraction: float = 0.01) -> float:
    """The mean of the highest `fraction` of scores (the same top as `precision_at_fraction`)."""
    k = metrics.top_count(len(scores), fraction)
    return float(np.sort(np.asarray(scores, dtype=np.float64))[::-1][:k].mean())


def _prefixed(prefix: str, labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    result = metrics.evaluate(labels, scores)
    return {f"{prefix}_{k}": result[k] for k in _HEAD_KEYS}


def mean_z(*logits: np.ndarray, weights: Sequence[float] | None = None) -> np.ndarray:
    """Mean of the logits each standardised to mean 0 and spread 1 (`blend_with_model`'s rule,
    over the rows given), weighted by `weights` (None: equally)."""
    return np.average([(v - v.mean()) / max(float(v.std()), 1e-6)
                       for v in (np.asarray(x, dtype=np.float64) for x in logits)], axis=0,
                      weights=weights)


def frozen_ranking(features: np.ndarray, labelled: np.ndarray, labels: np.ndarray,
                   rows: np.ndarray) -> np.ndarray:
    """The frozen terms of the sky blend on their own, as a teacher for training
    (`TrainConfig.teacher_top_share`): the fast head and the neighbour term fitted on
    `features[labelled]` with 0/1 `labels`, their logits over `rows` averaged by `mean_z`.
    Returns (len(rows),) float64, higher = more anomalous."""
    from ml_backend.core.fast_head import fit_fast_head, fit_neighbour_term

    head = fit_fast_head(features, labelled, labels)
    term = fit_neighbour_term(features, labelled, labels)
    return mean_z(head.logits(features[rows]), term.logits(features[rows]))


def _mean_rank(*scores: np.ndarray) -> np.ndarray:
    """Mean of the rank-normalised scores (0 = lowest, 1 = highest; ties share a rank)."""
    from scipy.stats import rankdata

    return np.mean([rankdata(s) / len(s) for s in scores], axis=0)


def _train_one_cycle(
    store: CutoutStore,
    truth: np.ndarray,
    labelled: np.ndarray,
    unlabelled: np.ndarray,
    plan: SimulationPlan,
    cfg: TrainConfig,
    out_dir: Path,
    parent: Path | None,
    teacher: np.ndarray | None = None,
) -> tuple[Path, list[StepStats]]:
    """Train one cycle continuing from ``parent``, save it to ``out_dir``; (out_dir, steps).
    ``teacher``: the frozen ranking of ``unlabelled`` when the config takes pseudo-labels
    from it."""
    images = store.read(labelled)
    labels = truth[labelled].astype(np.int64)
    pool = StoreSubset(store, unlabelled if plan.method == "fixmatch" else unlabelled[:0])
    result = train_cycle(cfg, images, labels, pool, init_dir=parent,
                         teacher=teacher if plan.method == "fixmatch" else None)
    counts = {"anomaly": int(labels.sum()), "normal": int((labels == 0).sum())}
    save_cycle(result, out_dir, cfg=cfg, stretch=store.stretch,
               parent=None if parent is None else read_meta(parent), label_counts=counts)
    return out_dir, result.steps


def _teacher_quality(ranking: np.ndarray, truth: np.ndarray,
                     cfg: TrainConfig) -> dict[str, float | None]:
    """How right the teacher's pseudo-labels are: the true anomaly share of its "anomaly"
    ones and of its "normal" ones (None where it gives none)."""
    from ml_backend.core.fixmatch import teacher_pseudo_labels

    taught = teacher_pseudo_labels(ranking, cfg.teacher_top_share, cfg.teacher_normal_share)
    return {f"teacher_{name}_anomaly_share": round(float(np.mean(truth[taught == value] == 1)), 4)
            if (taught == value).any() else None
            for name, value in (("anomaly", 1), ("normal", 0))}


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
