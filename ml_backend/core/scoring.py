"""Anomaly scores for images and whole stores: streamed, batched, bounded memory.

Score = softmax probability of the "anomaly" logit, float32 in [0, 1]; with the model's
`test_time_augmentation` that of the mean logits over the symmetry views of its invariance
(session 11; sessions 9-10 averaged the probabilities), and with its `test_time_shift` over
those views shifted too (session 33). A store
is read in batches by its prefetching reader, so memory holds one batch of images (plus the
prefetched ones) and one float32 per scored image, whatever the store's size.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ml_backend.core.augment import scoring_views
from ml_backend.core.checkpoint import ModelMeta
from ml_backend.core.config import TrainConfig
from ml_backend.core.model import anomaly_probability, pooled_features, resolve_device
from ml_backend.core.preprocess import to_model_input
from ml_backend.core.progress import progress

logger = logging.getLogger(__name__)

# Device results are copied to the host every this many batches (fewer synchronisations).
_FLUSH_EVERY = 8


class ScorableStore(Protocol):
    """What scoring needs from a `CutoutStore`."""

    stretch: dict[str, Any]
    shape: tuple[int, int, int]

    def __len__(self) -> int: ...

    def iter_batches(self, batch_size: int, *, indices: np.ndarray | None = None,
                     prefetch: int = 2) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...


def check_compatible(store: ScorableStore, meta: ModelMeta) -> None:
    """Raise ValueError if the store's channels or stretch differ from the model's."""
    channels = int(store.shape[-1])
    if channels != meta.channels:
        raise ValueError(f"store images have {channels} channel(s) but model {meta.version} "
                         f"was trained on {meta.channels}")
    if dict(store.stretch) != dict(meta.stretch):
        raise ValueError(f"store stretch {store.stretch} differs from the stretch model "
                         f"{meta.version} was trained on: {meta.stretch}")


@torch.inference_mode()
def score_images(model: nn.Module, images_uint8: np.ndarray | torch.Tensor, image_size: int,
                 device: str | torch.device = "cpu", *, batch_size: int = 256,
                 crop: float = 1.0) -> np.ndarray:
    """Anomaly probabilities of uint8 images (n, H, W, C) as float32 (n,), in input order.

    image_size and crop: the model's input (`ModelMeta.image_size`, `.center_crop`).

    Puts the model in eval mode; it must already be on `device`. Runs `batch_size` images
    per forward pass (bf16 autocast on CUDA). NaN logits give NaN scores; no images, an
    empty array.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    model.eval()
    parts = [_forward_scores(model, images_uint8[i:i + batch_size], image_size, crop, device)
             for i in range(0, len(images_uint8), batch_size)]
    if not parts:
        return np.zeros(0, dtype=np.float32)
    return torch.cat(parts).float().cpu().numpy()


def score_store(store: ScorableStore, model: nn.Module, meta: ModelMeta, *,
                indices: np.ndarray | None = None, batch_size: int = 256,
                device: str | torch.device = "auto", compile: bool = False,
                progress_desc: str = "scoring",
                features: np.ndarray | None = None) -> np.ndarray:
    """Anomaly probabilities for a store's images, float32, in store order or `indices` order.

    `indices`: store rows to score (default all; any order, repeats allowed). Each distinct
    row is read once, in ascending order (sequential HDF5 chunks). Moves the model to
    `device` ("auto": CUDA when available) in eval mode and channels_last; on CUDA the
    forward pass runs under bf16 autocast. `compile=True` wraps it in `torch.compile`.
    `features`: an (n scores, model.num_features) array (float16 is enough; a memmap for a
    big store) that receives each image's pooled features (`model.pooled_features`) from the
    same forward pass, row for row with the returned scores; costs no extra forward pass.
    Raises ValueError if the store's channels or stretch differ from `meta`.
    """
    check_compatible(store, meta)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows, inverse = _distinct_rows(indices, len(store))
    n = len(store) if rows is None else len(rows)
    n_out = n if inverse is None else len(inverse)
    if features is not None and (features.ndim != 2 or len(features) != n_out):
        raise ValueError(f"features must have shape ({n_out}, D), got {features.shape}")
    distinct_features = features if inverse is None or features is None else np.empty(
        (n, features.shape[1]), dtype=features.dtype)
    scores = np.full(n, np.nan, dtype=np.float32)
    filled = np.zeros(n, dtype=bool)
    if n > 0:
        device = resolve_device(device)
        net = _prepare(model, device, compile)
        start = time.perf_counter()
        _score_batches(store, net, device, meta, rows, batch_size, (scores, distinct_features),
                       filled, progress_desc)
        seconds = time.perf_counter() - start
        logger.debug("scored %d images on %s in %.2f s (%.0f images/s)", n, device, seconds,
                     n / max(seconds, 1e-9))
    if not filled.all():
        raise RuntimeError(f"the store reader skipped {int((~filled).sum())} of {n} images")
    if inverse is None:
        return scores
    if features is not None:
        features[:] = distinct_features[inverse]
    return scores[inverse]


def _score_batches(store: ScorableStore, net: nn.Module, device: torch.device, meta: ModelMeta,
                   rows: np.ndarray | None, batch_size: int,
                   out: tuple[np.ndarray, np.ndarray | None], filled: np.ndarray,
                   progress_desc: str) -> None:
    """Fill out[0][k] (score) and out[1][k] (features, when wanted) for the k-th of `rows`
    (or store row k when rows is None)."""
    pending: list[tuple[np.ndarray, torch.Tensor, torch.Tensor | None]] = []
    with torch.inference_mode(), progress(total=len(filled), desc=progress_desc,
                                          unit="img") as bar:
        for batch_rows, images in store.iter_batches(batch_size, indices=rows, prefetch=2):
            probabilities, pooled = _forward(net, images, meta.image_size, meta.center_crop,
                                             device, features=out[1] is not None,
                                             views=view_rule(meta))
            pending.append((_positions(batch_rows, rows), probabilities, pooled))
            if len(pending) >= _FLUSH_EVERY:
                _flush(pending, out, filled)
            bar.update(len(batch_rows))
        _flush(pending, out, filled)


def _prepare(model: nn.Module, device: torch.device, compile: bool) -> nn.Module:
    model.to(device=device, memory_format=torch.channels_last).eval()
    return torch.compile(model) if compile else model


def _forward_scores(model: nn.Module, images: np.ndarray | torch.Tensor, image_size: int,
                    crop: float, device: torch.device) -> torch.Tensor:
    return _forward(model, images, image_size, crop, device, features=False)[0]


def _forward(model: nn.Module, images: np.ndarray | torch.Tensor, image_size: int, crop: float,
             device: torch.device, *, features: bool,
             views: tuple[str | None, int] = (None, 0)
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(anomaly probabilities, pooled features or None) of one batch.

    One forward pass, or with `views` (an invariance or None, a shift in pixels: `view_rule`)
    the probability of the mean logits over every view they make (`augment.scoring_views`),
    and the mean features. A linear classifier's mean logits are the classifier of the mean
    features, so a head fitted on those features (`fast_head`, the instant re-ranking) scores
    exactly as the model it is published as; any other classifier (a blend with a neighbour
    term, `fast_head.NeighbourClassifier`) reads the mean features, as the re-ranking scored
    them.
    """
    x = to_model_input(images, image_size, device, crop)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    batches = scoring_views(x, *views)
    classifier = _unwrapped(model).get_classifier()
    linear = type(classifier) is nn.Linear
    logits, pooled = [], []
    with autocast:
        for view in batches:
            if not features and linear:
                logits.append(model(view).float())
                continue
            pooled.append(pooled_features(_unwrapped(model), view))
            if linear:
                logits.append(classifier(pooled[-1]).float())
    mean_features = torch.stack(pooled).float().mean(0) if pooled else None
    if not linear:
        logits = [classifier(mean_features).float()]
    return anomaly_probability(torch.stack(logits).mean(0)), mean_features


def view_rule(meta: ModelMeta) -> tuple[str | None, int]:
    """What scoring averages over (`augment.scoring_views`): the invariance whose symmetry views
    it takes (None: the image alone) and the test-time shift in pixels (0: none)."""
    cfg = TrainConfig.from_dict(meta.config)
    return (cfg.invariance if cfg.test_time_augmentation else None,
            round(cfg.test_time_shift * meta.image_size))


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module under `torch.compile` (which hides `forward_head` and the classifier)."""
    return getattr(model, "_orig_mod", model)


def _distinct_rows(indices: np.ndarray | None,
                   size: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(sorted distinct rows, map from `indices` into them); (None, None) for all rows."""
    if indices is None:
        return None, None
    indices = np.asarray(indices)
    if indices.ndim != 1 or not (np.issubdtype(indices.dtype, np.integer) or indices.size == 0):
        raise ValueError(f"indices must be a 1-D integer array, got {indices.dtype} "
                         f"{indices.shape}")
    indices = indices.astype(np.int64)
    if len(indices) and (indices.min() < 0 or indices.max() >= size):
        raise ValueError(f"indices must lie in [0, {size}), got {indices.min()}..{indices.max()}")
    rows, inverse = np.unique(indices, return_inverse=True)
    return rows, inverse.reshape(-1)


def _positions(batch_rows: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """Positions in the score array of the store rows in a batch."""
    batch_rows = np.asarray(batch_rows)
    if rows is None:
        return batch_rows
    found = np.searchsorted(rows, batch_rows).clip(max=len(rows) - 1)
    if not np.array_equal(rows[found], batch_rows):
        raise RuntimeError("the store reader returned rows that were not requested")
    return found


def _flush(pending: list[tuple[np.ndarray, torch.Tensor, torch.Tensor | None]],
           out: tuple[np.ndarray, np.ndarray | None], filled: np.ndarray) -> None:
    scores, features = out
    for positions, probabilities, pooled in pending:
        scores[positions] = probabilities.float().cpu().numpy()
        if features is not None and pooled is not None:
            features[positions] = pooled.float().cpu().numpy()
        filled[positions] = True
    pending.clear()
