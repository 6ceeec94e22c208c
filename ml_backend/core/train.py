"""One active-learning training cycle: weighted labelled sampling, FixMatch steps, EMA.

The loop in `train_cycle` reads top to bottom:
    sample labelled batch -> read unlabelled batch -> weak / strong views -> normalise ->
    fixmatch_step (forward, backward, SGD step) -> EMA update -> progress.
A cycle starts from ImageNet weights or continues from a saved model directory (student,
EMA and SGD momentum), and `save_cycle` writes the result as a new model directory.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ml_backend.core.augment import WeakStrong
from ml_backend.core.checkpoint import (
    ModelMeta,
    TrainingState,
    lineage_mismatch,
    load_training_state,
    new_version,
    save_model_dir,
    utc_now_iso,
)
from ml_backend.core.config import TrainConfig
from ml_backend.core.fast_head import FastHead, fit_fast_head, install_head
from ml_backend.core.fixmatch import (
    DistributionAlignment,
    ModelEMA,
    StepStats,
    WeightedLabeledSampler,
    fixmatch_step,
    make_optimizer,
    teacher_pseudo_labels,
)
from ml_backend.core.model import (
    batch_statistics,
    build_model,
    pooled_features,
    resolve_device,
    set_seed,
)
from ml_backend.core.preprocess import fit, normalise, to_unit_tensor
from ml_backend.core.progress import progress
from ml_backend.core.scoring import score_images
from ml_backend.core.sources import ImageSource

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, StepStats], None]
_MOMENTUM = "momentum_buffer"


@dataclass
class CycleResult:
    """A finished cycle. Models are on the training device; optimizer_state is flat tensors."""

    ema: nn.Module
    student: nn.Module
    optimizer_state: dict[str, torch.Tensor]
    steps: list[StepStats]
    seconds: float
    iterations: int
    channels: int = 0  # image channels the models take
    init_meta: ModelMeta | None = field(default=None, repr=False)  # the model continued from


def train_cycle(cfg: TrainConfig, labeled: np.ndarray, labels: np.ndarray,
                unlabeled: ImageSource, *, init_dir: Path | None = None,
                on_progress: ProgressCallback | None = None,
                teacher: np.ndarray | None = None) -> CycleResult:
    """Train cfg.iterations FixMatch steps and return student, EMA model and statistics.

    labeled: uint8 (n, H, W, C) images with labels (n,) in {0 = normal, 1 = anomaly}; at least
    one of each. unlabeled: images of the same (H, W, C), read cfg.uratio * cfg.batch_size
    random rows per step; an empty pool trains supervised only. init_dir: a model directory to
    continue from (its image size and channels must match). teacher: a frozen ranking (n,)
    of the unlabelled rows (higher = more anomalous), needed when `cfg.uses_teacher`; its
    top and bottom shares become pseudo-labels (`teacher_pseudo_labels`). Seeds Python,
    NumPy and torch with cfg.seed. Raises ValueError on bad inputs.
    """
    channels = _check_inputs(labeled, labels, unlabeled)
    pseudo_labels = _teacher_labels(cfg, teacher, len(unlabeled))
    device = resolve_device(cfg.device)
    set_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)  # sampling and augmentation

    init = load_training_state(init_dir) if init_dir is not None else None
    if init is not None:
        _check_compatible(init.meta, cfg, channels, init_dir)
    student, ema, optimizer = _start_models(cfg, channels, init, device)
    x_all = fit(to_unit_tensor(labeled, device), cfg.image_size, cfg.center_crop)  # [0, 1]
    if cfg.probe_head_init and init is None:
        head = _linear_probe(student, x_all, labels, cfg.batch_size * (1 + 2 * cfg.uratio))
        for model in (student, ema.module):
            install_head(model, head)

    augment = WeakStrong(cfg)
    hardness = None
    if cfg.hard_normal_share > 0 and init is not None:
        hardness = score_images(ema.module, labeled, cfg.image_size, device,
                                batch_size=cfg.score_batch_size, crop=cfg.center_crop)
    sampler = WeightedLabeledSampler(labels, cfg.batch_size, cfg.anomaly_fraction, gen,
                                     hardness=hardness, hard_share=cfg.hard_normal_share)
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
    n_unlabeled = cfg.uratio * cfg.batch_size if len(unlabeled) else 0
    if n_unlabeled == 0:
        logger.warning("unlabelled pool is empty: training supervised only")
    logger.info("training %d iterations on %s: %d labelled (%d anomalies), %d unlabelled",
                cfg.iterations, device, len(labels), int(y_all.sum()), len(unlabeled))

    align = None
    if cfg.distribution_alignment and n_unlabeled:
        share = cfg.alignment_share or float(np.mean(np.asarray(labels) == 1))
        align = DistributionAlignment([1.0 - share, share])
    steps: list[StepStats] = []
    start = time.perf_counter()
    with (_PoolReader(unlabeled, n_unlabeled, gen) as pool,
          progress(range(cfg.iterations), desc="train", unit="it") as bar):
        for it in bar:
            idx = sampler.sample().to(device)
            x = augment.weak(x_all[idx], gen)
            rows, images = pool.next()
            u01 = _unit_images(images, cfg, x_all.shape[1:], device)
            u_weak, u_strong = augment(u01, gen)
            taught = None if pseudo_labels is None else pseudo_labels[rows].to(device)
            stats = fixmatch_step(student, _model_input(x), y_all[idx], _model_input(u_weak),
                                  _model_input(u_strong), optimizer, cfg, align, taught)
            if not math.isfinite(stats.loss):
                raise FloatingPointError(f"training loss became {stats.loss} at iteration "
                                         f"{it + 1}; try a lower learning rate")
            ema.update(student)
            steps.append(stats)
            bar.set_postfix(loss=f"{stats.loss:.3f}", mask=f"{stats.mask_rate:.2f}")
            if on_progress is not None:
                on_progress(it + 1, cfg.iterations, stats)
    seconds = time.perf_counter() - start
    logger.info("cycle done in %.1f s, final loss %.4f, mask rate %.2f", seconds,
                steps[-1].loss if steps else float("nan"),
                steps[-1].mask_rate if steps else float("nan"))
    return CycleResult(ema=ema.module, student=student,
                       optimizer_state=_momentum_state(optimizer, student), steps=steps,
                       seconds=seconds, iterations=cfg.iterations, channels=channels,
                       init_meta=init.meta if init is not None else None)


def save_cycle(result: CycleResult, out_dir: str | Path, *, cfg: TrainConfig,
               stretch: dict[str, Any], parent: ModelMeta | None,
               label_counts: dict[str, int], metrics: dict[str, Any] | None = None) -> ModelMeta:
    """Write `result` as a new model directory; returns its ModelMeta.

    parent: the meta of the model this cycle continued from (None for a fresh model);
    iterations_total = parent's iterations_total + result.iterations. metrics are stored
    alongside the cycle's own summary (seconds, final loss / mask rate).
    """
    if result.channels < 1:
        raise ValueError(f"CycleResult.channels must be >= 1, got {result.channels}")
    last = result.steps[-1] if result.steps else None
    summary: dict[str, Any] = {
        "seconds": round(result.seconds, 3),
        "final_loss": last.loss if last else None,
        "final_mask_rate": last.mask_rate if last else None,
        "final_pseudo_anomaly_rate": last.pseudo_anomaly_rate if last else None,
    }
    meta = ModelMeta(
        version=new_version(),
        parent=parent.version if parent is not None else None,
        created=utc_now_iso(),
        config=cfg.to_dict(),
        image_size=cfg.image_size,
        center_crop=cfg.center_crop,
        channels=result.channels,
        stretch=dict(stretch),
        label_counts=dict(label_counts),
        metrics={**summary, **(metrics or {})},
        iterations_total=(parent.iterations_total if parent is not None else 0)
        + result.iterations,
    )
    save_model_dir(out_dir, ema=result.ema, student=result.student, meta=meta,
                   optimizer_state=result.optimizer_state)
    return meta


def _start_models(cfg: TrainConfig, channels: int, init: TrainingState | None,
                  device: torch.device) -> tuple[nn.Module, ModelEMA, torch.optim.SGD]:
    """Student, EMA and optimiser: fresh (ImageNet weights if cfg.pretrained) or continued
    from `init` (student, EMA and SGD momentum exactly as saved)."""
    student = build_model(cfg.replace(pretrained=cfg.pretrained and init is None), channels)
    if init is not None:
        student.load_state_dict(init.student)
    student.to(device, memory_format=torch.channels_last)
    ema = ModelEMA(student, cfg.ema_decay, warmup=cfg.ema_warmup,
                   step=init.meta.iterations_total if init is not None else 0)
    if init is not None:
        ema.module.load_state_dict(init.ema)
    optimizer = make_optimizer(student, cfg)
    if init is not None and init.optimizer is not None:
        _load_momentum(optimizer, student, init.optimizer)
    return student, ema, optimizer


def _linear_probe(model: nn.Module, x01: torch.Tensor, labels: np.ndarray,
                  batch: int) -> FastHead:
    """The fast head fitted on the pooled features of `x01` (labelled images in [0, 1]) as a
    training step sees them: BatchNorm on the statistics of batches of about `batch` images,
    the running statistics untouched, everything else in eval mode."""
    chunks = torch.tensor_split(x01, max(1, round(len(x01) / batch)))
    with torch.no_grad(), batch_statistics(model):
        features = torch.cat([pooled_features(model, _model_input(c)) for c in chunks])
    return fit_fast_head(features.float().cpu().numpy(), np.arange(len(labels)),
                         np.asarray(labels))


def _model_input(x01: torch.Tensor) -> torch.Tensor:
    return normalise(x01).contiguous(memory_format=torch.channels_last)


class _PoolReader:
    """Random unlabelled batches (rows drawn with replacement), read one step ahead.

    Row indices come from `gen` in the calling thread, so the sequence is reproducible; the
    store read of the next batch runs in a background thread while the current step computes.
    """

    def __init__(self, source: ImageSource, n: int, gen: torch.Generator) -> None:
        self.source, self.n, self.gen = source, n, gen
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pool-reader")
        self.pending: tuple[np.ndarray, Future[np.ndarray]] | None = None

    def __enter__(self) -> _PoolReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    def _submit(self) -> tuple[np.ndarray, Future[np.ndarray]]:
        rows = torch.randint(0, len(self.source), (self.n,), generator=self.gen).numpy()
        return rows, self.executor.submit(self.source.read, rows)

    def next(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(rows, uint8 (n, H, W, C) images); no rows and None when n is 0 (no pool)."""
        if self.n == 0:
            return np.zeros(0, dtype=np.int64), None
        rows, current = self.pending if self.pending is not None else self._submit()
        self.pending = self._submit()
        return rows, current.result()


def _unit_images(images: np.ndarray | None, cfg: TrainConfig, chw: torch.Size,
                 device: torch.device) -> torch.Tensor:
    """uint8 (n, H, W, C) -> (n, C, S, S) in [0, 1] on device; None -> an empty batch."""
    if images is None:
        return torch.zeros(0, *chw, device=device)
    return fit(to_unit_tensor(images, device), cfg.image_size, cfg.center_crop)


def _check_inputs(labeled: np.ndarray, labels: np.ndarray, unlabeled: ImageSource) -> int:
    """Validate shapes and labels; returns the channel count."""
    if not isinstance(labeled, np.ndarray) or labeled.dtype != np.uint8 or labeled.ndim != 4:
        raise ValueError("labelled images must be a uint8 array (n, H, W, C), got "
                         f"{getattr(labeled, 'dtype', type(labeled))} "
                         f"{getattr(labeled, 'shape', '')}")
    labels = np.asarray(labels)
    if labels.shape != (len(labeled),):
        raise ValueError(f"labels have shape {labels.shape}, expected ({len(labeled)},) "
                         "to match the labelled images")
    bad = set(np.unique(labels).tolist()) - {0, 1}
    if bad:
        raise ValueError(f"labels must be 0 (normal) or 1 (anomaly), found {sorted(bad)}")
    n_anomalies = int((labels == 1).sum())
    if n_anomalies == 0 or n_anomalies == len(labels):
        raise ValueError(f"need at least one anomaly and one normal label, got {n_anomalies} "
                         f"anomalies and {len(labels) - n_anomalies} normals")
    if len(unlabeled):
        pool_shape = tuple(unlabeled.read(np.array([0])).shape[1:])
        if pool_shape != labeled.shape[1:]:
            raise ValueError(f"unlabelled images have shape (H, W, C) = {pool_shape}, "
                             f"labelled images {labeled.shape[1:]}")
    return int(labeled.shape[-1])


def _teacher_labels(cfg: TrainConfig, teacher: np.ndarray | None,
                    n_unlabeled: int) -> torch.Tensor | None:
    """The teacher's pseudo-labels of the unlabelled rows (CPU int64), or None without one
    (or without unlabelled images)."""
    if not cfg.uses_teacher or n_unlabeled == 0:
        return None
    if teacher is None:
        raise ValueError("teacher_top_share / teacher_normal_share need the frozen teacher's "
                         "ranking of the unlabelled images (train_cycle's `teacher`)")
    if np.shape(teacher) != (n_unlabeled,):
        raise ValueError(f"the teacher ranks {np.shape(teacher)} images, the unlabelled pool "
                         f"holds ({n_unlabeled},)")
    return torch.from_numpy(teacher_pseudo_labels(teacher, cfg.teacher_top_share,
                                                  cfg.teacher_normal_share))


def _check_compatible(meta: ModelMeta, cfg: TrainConfig, channels: int,
                      init_dir: Path | None) -> None:
    changes = lineage_mismatch(meta, cfg, channels)
    if changes:
        raise ValueError(f"cannot continue from {init_dir}: {'; '.join(changes)}")


def _momentum_state(optimizer: torch.optim.SGD, model: nn.Module) -> dict[str, torch.Tensor]:
    """SGD momentum buffers keyed "<parameter name>.momentum_buffer"."""
    state = {}
    for name, param in model.named_parameters():
        buffer = optimizer.state.get(param, {}).get(_MOMENTUM)
        if buffer is not None:
            state[f"{name}.{_MOMENTUM}"] = buffer.detach()
    return state


def _load_momentum(optimizer: torch.optim.SGD, model: nn.Module,
                   state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for key, buffer in state.items():
        name = key.removesuffix(f".{_MOMENTUM}")
        if name not in params or params[name].shape != buffer.shape:
            raise ValueError(f"saved optimiser state {key!r} does not fit the model")
        optimizer.state[params[name]][_MOMENTUM] = buffer.to(params[name].device).clone()
