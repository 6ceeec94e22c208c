"""Framed previews: the model's centre-crop window, the full field beside it, colliding ids."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from import_tools.previews import write_preview
from ml_backend.core.config import crop_box


def test_an_unframed_preview_is_the_whole_cutout_and_nothing_else(tmp_path):
    pixels = np.arange(7 * 5, dtype=np.uint8).reshape(7, 5, 1)
    preview = write_preview(tmp_path, "a/b", pixels)
    assert preview.path == tmp_path / "a" / "b.png" and preview.full_field is None
    np.testing.assert_array_equal(np.asarray(Image.open(preview.path)), pixels[..., 0])
    assert not (tmp_path / "full-field").exists()


@pytest.mark.parametrize(("shape", "crop", "box"), [
    ((300, 300), 0.5, (75, 75, 150, 150)),
    ((7, 5), 0.5, (1, 1, 4, 2)),  # round(3.5) = 4, round(2.5) = 2 (half to even)
    ((3, 3), 0.01, (1, 1, 1, 1)),  # never empty
])
def test_a_framed_preview_shows_the_crop_box_and_keeps_the_full_field(tmp_path, shape, crop,
                                                                     box):
    assert crop_box(*shape, crop) == box
    rgb = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    preview = write_preview(tmp_path, "obj", rgb, crop=crop)
    top, left, h, w = box
    np.testing.assert_array_equal(np.asarray(Image.open(preview.path)),
                                  rgb[top:top + h, left:left + w])
    assert preview.full_field == tmp_path / "full-field" / "obj.png"
    np.testing.assert_array_equal(np.asarray(Image.open(preview.full_field)), rgb)


def test_an_id_inside_the_full_field_folder_is_refused_when_framing(tmp_path):
    pixels = np.zeros((4, 4, 1), np.uint8)
    with pytest.raises(ValueError, match="'full-field/x' lies in full-field/"):
        write_preview(tmp_path, "full-field/x", pixels, crop=0.5)
    assert not any(tmp_path.rglob("*.png"))
    write_preview(tmp_path, "full-field/x", pixels)  # unframed: no folder of full fields


def test_crop_box_refuses_fractions_outside_zero_to_one():
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="center_crop must be in"):
            crop_box(10, 10, bad)
