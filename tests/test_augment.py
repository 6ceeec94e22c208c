"""WeakStrong: shapes, ranges, label-preserving weak views, reproducibility, per-channel ops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ml_backend.core.augment import RANDAUGMENT_OPS, RANDAUGMENT_POOLS, WeakStrong, cutout
from ml_backend.core.config import RANDAUG_POOLS, TrainConfig


def _batch(b: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, size, size, generator=torch.Generator().manual_seed(seed))


def _dihedral(img: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips / 90° rotations of one (C, H, W) image."""
    views = []
    for t in (img, img.transpose(-1, -2)):
        views += [t, t.flip(-1), t.flip(-2), t.flip(-1).flip(-2)]
    return views


@pytest.mark.parametrize("channels", [1, 3, 5])
def test_views_keep_shape_dtype_and_range(channels):
    x = _batch(6, channels, 16)
    weak, strong = WeakStrong(TrainConfig())(x, torch.Generator().manual_seed(1))
    for view in (weak, strong):
        assert view.shape == x.shape and view.dtype == x.dtype
        assert view.min() >= 0 and view.max() <= 1
        assert torch.isfinite(view).all()


@pytest.mark.parametrize("channels", [1, 3, 5])
@pytest.mark.parametrize("name", sorted(RANDAUGMENT_OPS))
def test_each_randaugment_op_keeps_shape_and_range(name, channels):
    x = _batch(4, channels, 12)
    m = torch.full((4,), 0.8)
    s = torch.tensor([1.0, -1.0, 1.0, -1.0])
    h = torch.tensor([True, True, False, False])
    out = RANDAUGMENT_OPS[name](x, m, s, h)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1


def test_weak_without_shift_is_a_flip_or_rotation_of_each_image():
    x = _batch(16, 3, 8)
    weak = WeakStrong(TrainConfig(translate_fraction=0.0)).weak(x, torch.Generator())
    seen = set()
    for img, view in zip(x, weak, strict=True):
        matches = [k for k, d in enumerate(_dihedral(img)) if torch.equal(d, view)]
        assert matches, "weak view is not a flip/rotation of its input"
        seen.add(matches[0])
    assert len(seen) > 2  # parameters really differ per sample


def test_weak_with_shift_is_a_shifted_flip_of_each_image():
    size, shift = 8, 2
    x = _batch(8, 2, size)
    cfg = TrainConfig(translate_fraction=shift / size)
    weak = WeakStrong(cfg).weak(x, torch.Generator().manual_seed(3))
    padded = torch.nn.functional.pad(x, (shift,) * 4, mode="reflect")
    for img, view in zip(padded, weak, strict=True):
        crops = [img[:, dy:dy + size, dx:dx + size]
                 for dy in range(2 * shift + 1) for dx in range(2 * shift + 1)]
        assert any(torch.equal(d, view) for crop in crops for d in _dihedral(crop))


def test_non_square_images_get_flips_only():
    x = _batch(8, 1, 6)[..., :4]
    weak = WeakStrong(TrainConfig(translate_fraction=0.0)).weak(x, torch.Generator())
    assert weak.shape == x.shape
    for img, view in zip(x, weak, strict=True):
        assert any(torch.equal(d, view) for d in _dihedral(img)[:4])


def test_same_seed_same_views_and_input_unchanged():
    x = _batch(5, 3, 16)
    before = x.clone()
    aug = WeakStrong(TrainConfig())
    w1, s1 = aug(x, torch.Generator().manual_seed(7))
    w2, s2 = aug(x, torch.Generator().manual_seed(7))
    w3, s3 = aug(x, torch.Generator().manual_seed(8))
    assert torch.equal(w1, w2) and torch.equal(s1, s2)
    assert not torch.equal(s1, s3)
    assert torch.equal(x, before)


def test_strong_differs_from_weak():
    x = _batch(8, 3, 16)
    weak, strong = WeakStrong(TrainConfig())(x, torch.Generator().manual_seed(0))
    assert not torch.allclose(weak, strong)


def test_cutout_fills_a_square_with_half():
    x = torch.zeros(3, 2, 20, 20)
    out = cutout(x, 6, torch.Generator().manual_seed(0))
    filled = (out == 0.5).sum(dim=(1, 2, 3))
    assert ((filled > 0) & (filled <= 2 * 6 * 6)).all()
    assert torch.equal(out[:, 0], out[:, 1])  # same square in every channel


def test_equalize_is_per_channel_and_spreads_levels():
    x = torch.stack([torch.linspace(0.4, 0.6, 64), torch.linspace(0.0, 0.1, 64)]).view(1, 2, 8, 8)
    out = RANDAUGMENT_OPS["equalize"](x, torch.zeros(1), torch.ones(1), torch.ones(1, dtype=bool))
    assert out[0, 0].min() == 0 and out[0, 0].max() == 1
    assert out[0, 1].min() == 0 and out[0, 1].max() == 1


def test_flat_channel_survives_equalize_and_autocontrast():
    x = torch.full((1, 1, 4, 4), 0.3)
    args = (torch.ones(1), torch.ones(1), torch.ones(1, dtype=bool))
    assert torch.equal(RANDAUGMENT_OPS["equalize"](x, *args), x)
    assert torch.equal(RANDAUGMENT_OPS["autocontrast"](x, *args), x)


@pytest.mark.parametrize("pool, used", [("all", True), ("linear", False)])
def test_the_linear_pool_never_draws_a_non_linear_intensity_op(monkeypatch, pool, used):
    calls = []

    def record(x, *args):
        calls.append(len(x))
        return x

    for name in ("solarize", "posterize", "equalize"):
        monkeypatch.setitem(RANDAUGMENT_OPS, name, record)
    views = WeakStrong(TrainConfig(randaug_pool=pool, randaug_ops=3))
    for seed in range(4):  # 4 x 64 images x 3 ops: every op is drawn many times
        views.strong(_batch(64, 1, 8, seed), torch.Generator().manual_seed(seed))
    assert bool(calls) is used


def test_every_configurable_pool_has_its_ops():
    assert set(RANDAUGMENT_POOLS) == set(RANDAUG_POOLS)
    with pytest.raises(ValueError, match="randaug_pool"):
        TrainConfig(randaug_pool="gentle")


@pytest.mark.parametrize("bad", [dict(translate_fraction=1.0), dict(randaug_magnitude=2.0),
                                 dict(randaug_ops=-1), dict(cutout_fraction=-0.1)])
def test_bad_config_is_rejected(bad):
    with pytest.raises(ValueError):
        WeakStrong(TrainConfig(**bad))


def _orientation(img: torch.Tensor) -> float:
    """The angle in degrees, in [-45, 45), of the principal axis of a (1, H, W) image's
    intensity, modulo quarter turns."""
    h, w = img.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64) - (h - 1) / 2,
                            torch.arange(w, dtype=torch.float64) - (w - 1) / 2, indexing="ij")
    m = img[0].double()
    cxx, cyy, cxy = (m * xs * xs).sum(), (m * ys * ys).sum(), (m * xs * ys).sum()
    angle = 0.5 * math.degrees(math.atan2(2 * cxy, cxx - cyy))
    return (angle + 45) % 90 - 45


def test_weak_rotation_turns_each_image_by_its_own_angle_of_any_size():
    bar = torch.zeros(1, 1, 33, 33)
    bar[..., 14:19, 4:29] = 1.0  # a horizontal bar through the centre
    x = bar.repeat(64, 1, 1, 1)
    cfg = TrainConfig(translate_fraction=0.0, weak_rotation=True)
    angles = [_orientation(v) for v in WeakStrong(cfg).weak(x, torch.Generator().manual_seed(0))]
    assert min(angles) < -30 and max(angles) > 30  # the whole quarter turn is reached
    assert sum(abs(a) > 5 for a in angles) > 48  # most views are off the quarter turns
    plain = WeakStrong(TrainConfig(translate_fraction=0.0)).weak(x, torch.Generator())
    assert all(abs(_orientation(v)) < 1e-6 for v in plain)


def test_weak_rotation_reflects_at_the_edges_instead_of_blackening_the_corners():
    x = torch.full((8, 2, 16, 16), 0.7)
    weak, strong = WeakStrong(TrainConfig(weak_rotation=True, randaug_ops=0,
                                          cutout_fraction=0.0))(x, torch.Generator())
    assert torch.allclose(weak, x, atol=1e-6) and torch.allclose(strong, x, atol=1e-6)


def test_weak_rotation_needs_the_dihedral_invariance_and_is_off_in_older_configs():
    with pytest.raises(ValueError, match="weak_rotation"):
        TrainConfig(invariance="flip", weak_rotation=True)
    saved = TrainConfig(weak_rotation=True).to_dict()
    assert TrainConfig.from_dict(saved).weak_rotation is True
    del saved["weak_rotation"]
    assert TrainConfig.from_dict(saved).weak_rotation is False


def test_non_float_input_is_rejected():
    with pytest.raises(ValueError, match="float tensor"):
        WeakStrong(TrainConfig())(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.Generator())


def test_sharpness_matches_the_pil_kernel():
    x = _batch(2, 3, 9)
    factor = torch.tensor([0.4, 1.6])  # magnitude 2/3 of MAX_ENHANCE = 0.9, both signs
    out = RANDAUGMENT_OPS["sharpness"](x, torch.full((2,), 0.6 / 0.9), torch.tensor([-1.0, 1.0]),
                                       torch.ones(2, dtype=bool))
    kernel = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
    smooth = torch.nn.functional.conv2d(x.reshape(6, 1, 9, 9), kernel.view(1, 1, 3, 3))
    blurred = x.clone()
    blurred[..., 1:-1, 1:-1] = smooth.view(2, 3, 7, 7)
    f = factor.view(2, 1, 1, 1)
    assert torch.allclose(out, (f * x + (1 - f) * blurred).clamp(0, 1), atol=1e-6)


@pytest.mark.parametrize("invariance, n_views", [("dihedral", 8), ("flip", 2)])
def test_symmetry_views_are_the_distinct_group_members_input_first(invariance, n_views):
    from ml_backend.core.augment import symmetry_views

    x = torch.rand(3, 2, 5, 5)
    before = x.clone()
    views = symmetry_views(x, invariance)
    assert len(views) == n_views
    assert torch.equal(views[0], x) and torch.equal(x, before)
    flat = {tuple(v[0, 0].flatten().tolist()) for v in views}
    assert len(flat) == n_views  # no view repeats
    for v in views:  # each is a rearrangement of the same pixels
        assert torch.equal(v.flatten(-2).sort(-1).values, x.flatten(-2).sort(-1).values)


def test_dihedral_views_need_square_images():
    from ml_backend.core.augment import symmetry_views

    with pytest.raises(ValueError, match="square"):
        symmetry_views(torch.rand(1, 1, 4, 6), "dihedral")
    assert len(symmetry_views(torch.rand(1, 1, 4, 6), "flip")) == 2
    with pytest.raises(ValueError, match="invariance"):
        symmetry_views(torch.rand(1, 1, 4, 4), "rotate")


def test_shifted_moves_the_content_and_reflects_the_edges():
    from ml_backend.core.augment import shifted

    x = torch.arange(36.0).view(1, 1, 6, 6)
    out = shifted(x, 2, -1)
    assert out.shape == x.shape
    assert torch.equal(out[0, 0, 2:, :5], x[0, 0, :4, 1:])  # moved 2 down, 1 left
    padded = np.pad(x[0, 0].numpy(), 2, mode="reflect")  # the edges mirrored, not repeated
    assert np.array_equal(out[0, 0].numpy(), padded[0:6, 3:9])
    assert shifted(x, 0, 0) is x
    with pytest.raises(ValueError, match="6x6"):
        shifted(x, 6, 0)


@pytest.mark.parametrize("invariance, n_symmetry", [(None, 1), ("flip", 2), ("dihedral", 8)])
def test_scoring_views_are_the_symmetry_views_then_each_shifted_both_ways(invariance, n_symmetry):
    from ml_backend.core.augment import scoring_views, shifted, symmetry_views

    x = torch.rand(2, 1, 8, 8)
    plain = [x] if invariance is None else symmetry_views(x, invariance)
    assert all(torch.equal(a, b) for a, b in zip(scoring_views(x, invariance, 0), plain,
                                                  strict=True))
    views = scoring_views(x, invariance, 2)
    assert len(views) == 3 * n_symmetry
    expected = plain + [shifted(v, 2, 2) for v in plain] + [shifted(v, -2, -2) for v in plain]
    assert all(torch.equal(a, b) for a, b in zip(views, expected, strict=True))
