import json

import numpy as np
import pytest
from PIL import Image

from amls_cli import main
from ml_backend.core.image_folder import (
    STRETCH_MINMAX,
    BuildFailed,
    build_store_from_folder,
    minmax_to_uint8,
)
from ml_backend.core.store import CutoutStore


def rgb(seed: int, size=(8, 6)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def smooth(size=(8, 6)) -> np.ndarray:
    y, x = np.mgrid[:size[0], :size[1]]
    return np.stack([y * 20, x * 30, 100 + 0 * x], axis=-1).astype(np.uint8)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    Image.fromarray(rgb(0)).save(root / "a.png")
    Image.fromarray(rgb(1)).save(root / "sub" / "b.PNG")
    Image.fromarray(rgb(2)[..., 0]).save(root / "sub" / "deeper" / "grey.tif")
    Image.fromarray(smooth()).save(root / "c.jpg", quality=95)
    Image.fromarray(rgb(4)).save(root / ".hidden" / "x.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_build_ids_pixels_and_metadata(folder, tmp_path):
    report = build_store_from_folder(folder, tmp_path / "s.h5")
    assert (report.added, report.skipped_existing, report.failed) == (4, 0, [])
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert store.ids() == ["a", "c", "sub/b", "sub/deeper/grey"]
        assert store.shape == (8, 6, 3) and store.stretch == {"name": "none"}
        np.testing.assert_array_equal(store.read_ids(["a", "sub/b"]), np.stack([rgb(0), rgb(1)]))
        grey = store.read_ids(["sub/deeper/grey"])[0]
        np.testing.assert_array_equal(grey[..., 0], rgb(2)[..., 0])
        np.testing.assert_array_equal(grey[..., 2], rgb(2)[..., 0])
        jpeg = store.read_ids(["c"])[0].astype(int)
        assert np.abs(jpeg - smooth()).mean() < 5  # lossy, but the same picture
        assert store.meta(0)["source"] == str((folder / "a.png").resolve())


def test_other_sizes_are_resized_to_first_and_size_option(folder, tmp_path):
    Image.fromarray(rgb(5, size=(16, 12))).save(folder / "big.png")
    build_store_from_folder(folder, tmp_path / "first.h5")
    with CutoutStore.open(tmp_path / "first.h5") as store:
        assert store.shape == (8, 6, 3)  # "a.png" sorts first
        big = store.read_ids(["big"])[0].astype(int)
        expected = np.asarray(Image.fromarray(rgb(5, size=(16, 12))).resize(
            (6, 8), Image.Resampling.BILINEAR), dtype=int)
        assert np.abs(big - expected).max() <= 1
    build_store_from_folder(folder, tmp_path / "sq.h5", size=5, channels=1)
    with CutoutStore.open(tmp_path / "sq.h5") as store:
        assert store.shape == (5, 5, 1) and len(store) == 5


def test_16_bit_images_scaled_by_min_max_and_recorded(tmp_path):
    root = tmp_path / "deep"
    root.mkdir()
    pixels = np.array([[1000, 2000], [4000, 61000]], dtype=np.uint16)
    Image.fromarray(pixels).save(root / "deep.png")
    build_store_from_folder(root, tmp_path / "s.h5", channels=1)
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert store.stretch == STRETCH_MINMAX
        np.testing.assert_array_equal(store.read([0])[0, ..., 0], [[0, 4], [13, 255]])


def test_minmax_to_uint8_nan_and_constant():
    np.testing.assert_array_equal(minmax_to_uint8(np.array([np.nan, 1.0, 3.0])), [0, 0, 255])
    np.testing.assert_array_equal(minmax_to_uint8(np.full(3, 7.0)), [0, 0, 0])
    np.testing.assert_array_equal(minmax_to_uint8(np.full(2, np.nan)), [0, 0])


def test_bad_files_listed_and_skipped(folder, tmp_path):
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.fromarray(rgb(6)).save(folder / "a.jpg")  # same id as a.png
    with pytest.raises(BuildFailed, match="2 image files failed") as info:
        build_store_from_folder(folder, tmp_path / "s.h5")
    failed = dict(info.value.report.failed)
    assert set(failed) == {str(folder / "broken.png"), str(folder / "a.png")}
    assert "already taken by a.jpg" in failed[str(folder / "a.png")]
    report = build_store_from_folder(folder, tmp_path / "s.h5", skip_bad=True)
    assert report.added == 0 and report.skipped_existing == 4 and len(report.failed) == 2


def test_rerun_is_idempotent_and_appends_new_files(folder, tmp_path):
    out = tmp_path / "s.h5"
    build_store_from_folder(folder, out)
    again = build_store_from_folder(folder, out)
    assert (again.added, again.skipped_existing) == (0, 4)
    Image.fromarray(rgb(7)).save(folder / "sub" / "new.png")
    more = build_store_from_folder(folder, out)
    assert (more.added, more.skipped_existing) == (1, 4)
    with CutoutStore.open(out) as store:
        assert len(store) == 5 and store.ids()[-1] == "sub/new"


def test_existing_store_with_other_channels_or_stretch_refused(folder, tmp_path):
    out = tmp_path / "s.h5"
    with CutoutStore.create(out, height=8, width=6, channels=3, stretch={"name": "asinh"}):
        pass
    with pytest.raises(ValueError, match="built with stretch"):
        build_store_from_folder(folder, out)
    with pytest.raises(ValueError, match="--channels 1 differs"):
        build_store_from_folder(folder, out, channels=1)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_cli_build_and_info(folder, tmp_path, capsys):
    out = tmp_path / "s.h5"
    assert main(["store", "build", str(folder), "-o", str(out), "--size", "4",
                 "--compression", "none"]) == 0
    assert "4 images added, 0 already in the store, 0 failed" in capsys.readouterr().out
    assert main(["store", "info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 4 and info["shape"] == [4, 4, 3]
    assert info["stretch"] == {"name": "none"}
    (folder / "broken.tif").write_bytes(b"II*\x00garbage")
    assert main(["store", "build", str(folder), "-o", str(out)]) == 1
    assert "failed: " in capsys.readouterr().out
    assert main(["store", "build", str(folder), "-o", str(out), "--skip-bad"]) == 0
    assert main(["store", "info", str(tmp_path / "missing.h5")]) == 2
    assert "amls store info: error:" in capsys.readouterr().err
