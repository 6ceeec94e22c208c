"""The framing probe's re-stretch: the same per-image stretch an import applies."""

import numpy as np
import pytest

from benchmarks.framing_probe import restretch
from ml_backend.core.stretch import make_stretch


def test_restretch_applies_the_named_stretch_to_each_image_on_its_own():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 40, size=(3, 8, 8, 1), dtype=np.uint8)
    images[1] *= 5  # another range: per-image limits must differ
    out = restretch(images, "log,a=100")
    stretch = make_stretch({"name": "log", "a": 100.0})
    assert out.shape == images.shape and out.dtype == np.uint8
    for image, got in zip(images, out, strict=True):
        np.testing.assert_array_equal(got, stretch(image))
    assert not np.array_equal(out, images)


def test_restretch_names_a_bad_parameter():
    with pytest.raises(ValueError, match="'log'"):
        restretch(np.zeros((1, 4, 4, 1), np.uint8), "log,a=-1")


def test_symmetry_views_np_are_the_models_views_in_image_layout():
    from benchmarks.framing_probe import symmetry_views_np

    images = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 1)
    assert [v.shape for v in symmetry_views_np(images, "")] == [images.shape]
    views = symmetry_views_np(images, "dihedral")
    assert len(views) == 8 and all(v.shape == images.shape for v in views)
    np.testing.assert_array_equal(views[0], images)
    np.testing.assert_array_equal(views[1], np.rot90(images, 1, axes=(1, 2)))
    assert len({v.tobytes() for v in views}) == 8
    flip = symmetry_views_np(images, "flip")
    np.testing.assert_array_equal(flip[1], images[:, :, ::-1])
