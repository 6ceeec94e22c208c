import numpy as np
import pytest

from ml_backend.core.baselines import isolation_forest_scores, pretrained_feature_fn
from ml_backend.core.config import TrainConfig
from ml_backend.core.sources import ArraySource
from ml_backend.core.store import CutoutStore


def toy_images(n_normal=120, n_odd=4, size=32, seed=0):
    """Faint noisy discs (normal) and a few bright checkerboards (the outlier group)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    disc = np.exp(-((x - size / 2) ** 2 + (y - size / 2) ** 2) / (2 * (size / 8) ** 2))
    normal = 20 + 80 * disc[None] + rng.normal(0, 4, (n_normal, size, size))
    checker = ((x // 4 + y // 4) % 2) * 200.0 + 30
    odd = checker[None] + rng.normal(0, 4, (n_odd, size, size))
    images = np.clip(np.concatenate([normal, odd]), 0, 255).astype(np.uint8)[..., None]
    order = rng.permutation(len(images))
    is_odd = np.r_[np.zeros(n_normal, bool), np.ones(n_odd, bool)]
    return np.repeat(images[order], 3, axis=-1), is_odd[order]


def simple_features(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float32)
    return np.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)),
                     np.abs(np.diff(x, axis=2)).mean((1, 2, 3))], axis=1)


def test_outlier_group_gets_the_highest_scores():
    images, is_odd = toy_images()
    cfg = TrainConfig(seed=3, score_batch_size=16)
    scores = isolation_forest_scores(cfg, ArraySource(images), feature_fn=simple_features)
    assert scores.shape == (len(images),)
    top = np.argsort(-scores)[: is_odd.sum()]
    assert is_odd[top].all()


def test_scores_follow_indices_and_are_reproducible(tmp_path):
    images, _ = toy_images(n_normal=40)
    with CutoutStore.create(tmp_path / "s.h5", height=32, width=32, channels=3,
                            stretch={"name": "none"}) as store:
        store.append([str(i) for i in range(len(images))], images)
        cfg = TrainConfig(seed=5, score_batch_size=7)
        indices = np.array([30, 2, 17, 8, 40, 41, 0, 5, 11, 23])
        a = isolation_forest_scores(cfg, store, indices, feature_fn=simple_features)
        b = isolation_forest_scores(cfg, store, indices[::-1], feature_fn=simple_features)
    np.testing.assert_allclose(a, b[::-1])
    with pytest.raises(ValueError, match="no images"):
        isolation_forest_scores(cfg, ArraySource(images), [], feature_fn=simple_features)


def test_nan_features_rejected():
    images, _ = toy_images(n_normal=10)
    with pytest.raises(ValueError, match="NaN"):
        isolation_forest_scores(TrainConfig(), ArraySource(images),
                                feature_fn=lambda x: np.full((len(x), 2), np.nan))


def test_pretrained_backbone_features_find_the_outlier_group():
    images, is_odd = toy_images(n_normal=60, n_odd=3)
    cfg = TrainConfig(image_size=32, device="cpu", score_batch_size=32)
    feature_fn = pretrained_feature_fn(cfg, in_chans=3)
    feats = feature_fn(images[:2])
    assert feats.shape == (2, 1280) and feats.dtype == np.float32
    scores = isolation_forest_scores(cfg, ArraySource(images), feature_fn=feature_fn)
    assert is_odd[np.argsort(-scores)[:3]].all()
