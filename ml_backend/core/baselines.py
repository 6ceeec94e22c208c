"""Unsupervised baseline in the style of Astronomaly: pretrained features + isolation forest.

Every image is embedded with the ImageNet-pretrained EfficientNet-Lite0 backbone (global
average pooled `forward_features`, 1280 numbers per image) and an isolation forest is fitted
on those features. Score = minus the forest's `score_samples`: higher = more isolated =
more anomalous. No labels are used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from sklearn.ensemble import IsolationForest

from ml_backend.core.config import TrainConfig
from ml_backend.core.progress import progress
from ml_backend.core.sources import ImageSource, prefetch_batches

log = logging.getLogger(__name__)

# uint8 images (n, H, W, C) -> float features (n, D)
FeatureFn = Callable[[np.ndarray], np.ndarray]


def pretrained_feature_fn(cfg: TrainConfig, in_chans: int,
                          block: int | None = None) -> FeatureFn:
    """Pooled EfficientNet-Lite0 features (n, 1280) float32 of cfg's model input, on cfg.device;
    `block`: pooled after that stage instead (`model.truncate_after_block`).

    The backbone is ImageNet-pretrained when `cfg.pretrained` (random otherwise) and runs in
    eval mode (BatchNorm running statistics).
    """
    from ml_backend.core.model import (
        build_model,
        pooled_features,
        resolve_device,
        truncate_after_block,
    )
    from ml_backend.core.preprocess import to_model_input

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)  # the unused head is randomly initialised
    model = build_model(cfg, in_chans)
    if block is not None:
        truncate_after_block(model, block)
    model = model.to(device).eval()

    @torch.inference_mode()
    def features(images: np.ndarray) -> np.ndarray:
        x = to_model_input(images, cfg.image_size, device, cfg.center_crop)
        return pooled_features(model, x).float().cpu().numpy()  # (n, model.num_features)

    return features


def extract_features(source: ImageSource, indices: Sequence[int] | np.ndarray | None,
                     feature_fn: FeatureFn, batch_size: int) -> np.ndarray:
    """Features of `source` rows `indices` (default all), in that order: (n, D) float32."""
    n = len(source) if indices is None else len(indices)
    parts: list[np.ndarray] = []
    with progress(total=n, desc="features", unit="img") as bar:
        for _, images in prefetch_batches(source, batch_size, indices):
            parts.append(np.asarray(feature_fn(images), dtype=np.float32))
            bar.update(len(images))
    if not parts:
        raise ValueError("no images to compute features for")
    return np.concatenate(parts)


def isolation_forest_scores(cfg: TrainConfig, source: ImageSource,
                            indices: Sequence[int] | np.ndarray | None = None, *,
                            feature_fn: FeatureFn | None = None,
                            n_estimators: int = 200) -> np.ndarray:
    """Anomaly scores (float64, higher = more anomalous) for `source` rows `indices`.

    The forest is fitted on, and scores, exactly those rows (default all), seeded with
    `cfg.seed`. `feature_fn` defaults to :func:`pretrained_feature_fn`; batches of
    `cfg.score_batch_size` images. Raises ValueError if the features contain NaN.
    """
    if (len(source) if indices is None else len(indices)) == 0:
        raise ValueError("no images to score")
    if feature_fn is None:
        channels = int(source.read([0]).shape[-1])
        feature_fn = pretrained_feature_fn(cfg, channels)
    feats = extract_features(source, indices, feature_fn, cfg.score_batch_size)
    if not np.isfinite(feats).all():
        raise ValueError("image features contain NaN or infinity; cannot fit the forest")
    forest = IsolationForest(n_estimators=n_estimators, random_state=cfg.seed)
    forest.fit(feats)
    log.info("isolation forest: %d images, %d features", *feats.shape)
    return -forest.score_samples(feats)
