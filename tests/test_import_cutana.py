"""`amls import cutana` on output made by ESA's Cutana itself and by images_to_zarr."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from astropy.io import fits
from astropy.wcs import WCS
from PIL import Image

from amls_cli import main
from ml_backend.core.store import CutoutStore
from ml_backend.task_rows import read_tasks, tasks_path


def amls_import(tmp_path: Path, path: Path, *args: str) -> int:
    return main(["import", "cutana", str(path), "--store", str(tmp_path / "s.h5"),
                 "--previews", str(tmp_path / "root" / "previews"),
                 "--report", str(tmp_path / "report.jsonl"), *args])


def sky_tile(path: Path) -> WCS:
    """A 200 x 200 noise frame with a TAN WCS at (150, 2) and a bright source at (100, 100)."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [100.5, 100.5]
    wcs.wcs.cdelt = [-0.1 / 3600, 0.1 / 3600]
    data = np.random.default_rng(0).normal(0.0, 1.0, (200, 200)).astype(np.float32)
    data[95:105, 95:105] += 50.0
    header = wcs.to_header()
    header["MAGZERO"] = 30.0
    fits.PrimaryHDU(data, header=header).writeto(path)
    return wcs


@pytest.fixture(scope="module")
def cutana_output(tmp_path_factory) -> tuple[Path, dict[str, tuple[float, float]]]:
    """Cutana 0.4's Orchestrator run on one tile: five 32 px cutouts as zarr."""
    from cutana import Orchestrator, get_default_config

    root = tmp_path_factory.mktemp("cutana")
    wcs = sky_tile(root / "tile.fits")
    positions = {}
    rows = []
    for i, (x, y) in enumerate([(50, 50), (99.5, 99.5), (150, 60), (70, 140), (120, 130)]):
        ra, dec = (float(v) for v in wcs.pixel_to_world_values(x, y))
        positions[f"src{i}"] = (ra, dec)
        rows.append({"SourceID": f"src{i}", "RA": ra, "Dec": dec, "diameter_pixel": 32,
                     "fits_file_paths": json.dumps([str(root / "tile.fits")])})
    pd.DataFrame(rows).to_csv(root / "catalogue.csv", index=False)
    cfg = get_default_config()
    cfg.source_catalogue = str(root / "catalogue.csv")
    cfg.output_dir = str(root / "out")
    cfg.output_format = "zarr"
    cfg.target_resolution = 32
    cfg.selected_extensions = [{"name": "PRIMARY", "ext": "PrimaryHDU"}]
    cfg.channel_weights = {"PRIMARY": [1.0]}
    cfg.max_workers = 1
    result = Orchestrator(cfg).run()
    assert result["status"] == "completed", result
    return root / "out", positions


def test_cutana_output_becomes_store_previews_and_tasks(tmp_path, cutana_output):
    out, positions = cutana_output
    assert amls_import(tmp_path, out) == 0
    (store_path,) = list(out.rglob("images.zarr"))
    cutana_pixels = np.asarray(zarr.open_group(str(store_path), mode="r")["images"][...])
    ids = pd.read_parquet(store_path.with_name("images_metadata.parquet"))["source_id"]
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert sorted(store.ids()) == sorted(positions)
        assert store.shape == (32, 32, 1)
        assert store.stretch == {"name": "unit"}  # Cutana's floats in [0, 1] kept as they are
        for i, cid in enumerate(ids):
            row = store.ids().index(cid)
            expected = np.rint(cutana_pixels[i] * 255).astype(np.uint8)
            np.testing.assert_array_equal(store.read([row])[0], expected)
            meta = store.meta(row)
            assert (meta["ra"], meta["dec"]) == pytest.approx(positions[cid], abs=1e-9)
    tasks = read_tasks(tasks_path(tmp_path / "s.h5"))
    assert set(tasks) == set(positions)
    assert tasks["src1"]["sky"].startswith("https://sky.esa.int/esasky/?target=150")
    preview = np.asarray(Image.open(tmp_path / "root" / "previews" / "src1.png"))
    assert preview.shape == (32, 32) and preview.max() == 255  # the bright source, centred


def test_a_second_import_adds_nothing(tmp_path, cutana_output, capsys):
    out, positions = cutana_output
    assert amls_import(tmp_path, out) == 0
    assert amls_import(tmp_path, out) == 0
    assert "imported 0, skipped 5" in capsys.readouterr().out
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert len(store.ids()) == len(positions)


def images_to_zarr_store(root: Path, images: np.ndarray) -> Path:
    """images_to_zarr's own conversion of a PNG folder: (N, C, H, W) uint8 + Parquet."""
    from images_to_zarr import convert

    folder = root / "pngs"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"obj{i}.png")
    return convert(output_dir=root / "zarr", folders=[folder], num_parallel_workers=1)


def test_images_to_zarr_folder_store_is_channels_first_and_named_by_file(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)
    store_path = images_to_zarr_store(tmp_path, images)
    assert zarr.open_group(str(store_path), mode="r")["images"].shape == (3, 3, 20, 20)
    assert amls_import(tmp_path, store_path) == 0
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert store.stretch == {"name": "none"} and store.shape == (20, 20, 3)
        for i in range(3):
            row = store.ids().index(f"obj{i}")
            np.testing.assert_array_equal(store.read([row])[0], images[i])


def write_store(path: Path, images: np.ndarray, metadata: pd.DataFrame | None) -> Path:
    group = zarr.open_group(str(path), mode="w")
    group.create_array("images", data=images)
    if metadata is not None:
        metadata.to_parquet(path.with_name(f"{path.stem}_metadata.parquet"))
    return path


def test_bad_inputs_fail_with_the_file_and_the_fix(tmp_path, capsys):
    four = np.zeros((2, 4, 4, 4), dtype=np.uint8)
    meta = pd.DataFrame({"source_id": ["a", "b"]})
    cases = [
        (tmp_path / "missing", None, "no such file or folder"),
        (write_store(tmp_path / "nometa.zarr", four[..., :1], None), None,
         "no metadata file nometa_metadata.parquet"),
        (write_store(tmp_path / "square.zarr", four, meta), None, "--layout nhwc"),
        (write_store(tmp_path / "rows.zarr", np.zeros((3, 8, 8, 1), np.uint8), meta), None,
         "2 metadata rows for 3 images"),
        (write_store(tmp_path / "noid.zarr", np.zeros((2, 8, 8, 1), np.uint8),
                     pd.DataFrame({"ra": [1.0, 2.0]})), None, "no id column"),
    ]
    for path, _, message in cases:
        assert amls_import(tmp_path, path) == 2
        err = capsys.readouterr().err
        assert message in err and "amls import cutana" in err, err
    assert not (tmp_path / "s.h5").exists()  # nothing half-written
    # the layout given by hand settles the ambiguous case
    assert amls_import(tmp_path, tmp_path / "square.zarr", "--layout", "nhwc", "--size", "4") == 0
