"""`amls import hdf5 / zarr`: firstgalaxydata's HDF5 (group per image) and stacks made from it."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import firstgalaxydata
import h5py
import numpy as np
import pytest
import zarr
from PIL import Image

from amls_cli import main
from ml_backend.core.store import CutoutStore
from ml_backend.core.stretch import make_stretch
from ml_backend.task_rows import read_tasks, sky_url, tasks_path

N_GALAXIES = 12


@pytest.fixture(scope="module")
def galaxies(tmp_path_factory) -> Path:
    """The first galaxies of firstgalaxydata's cross-validation HDF5, groups and attrs kept."""
    zipped = Path(firstgalaxydata.__file__).parent / "galaxy_data_crossvalid_0_h5.zip"
    work = tmp_path_factory.mktemp("first")
    with zipfile.ZipFile(zipped) as archive:
        big = Path(archive.extract("galaxy_data_crossvalid_0_h5.h5", work))
    small = work / "galaxies.h5"
    with h5py.File(big, "r") as src, h5py.File(small, "w") as dst:
        for name in sorted(src)[:N_GALAXIES]:
            src.copy(src[name], dst, name=name)
    big.unlink()
    return small


def galaxy_images(path: Path) -> tuple[list[str], np.ndarray, list[tuple[float, float]]]:
    with h5py.File(path, "r") as f:
        names = sorted(f)
        images = np.stack([f[n]["Img"][...] for n in names])
        coords = [(float(f[n]["Img"].attrs["RA"]), float(f[n]["Img"].attrs["DEC"]))
                  for n in names]
    return names, images, coords


def amls_import(tmp_path: Path, kind: str, *args: str) -> int:
    return main(["import", kind, *args, "--store", str(tmp_path / "s.h5"),
                 "--previews", str(tmp_path / "previews"),
                 "--report", str(tmp_path / "report.jsonl")])


def test_group_per_image_layout(tmp_path, galaxies):
    names, images, coords = galaxy_images(galaxies)
    assert amls_import(tmp_path, "hdf5", str(galaxies)) == 0
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert sorted(store.ids()) == names and store.stretch == {"name": "none"}
        order = store.indices_of(names)
        np.testing.assert_array_equal(store.read(order)[..., 0], images)
        table = store.meta_table(order)
    np.testing.assert_allclose(np.c_[table["ra"], table["dec"]], coords)
    preview = np.asarray(Image.open(tmp_path / "previews" / f"{names[3]}.png"))
    np.testing.assert_array_equal(preview, images[3])
    task = read_tasks(tasks_path(tmp_path / "s.h5"))[names[3]]
    assert task["hdu"] == f"/{names[3]}/Img" and task["ra"] == pytest.approx(coords[3][0])


@pytest.fixture
def stack(tmp_path, galaxies) -> tuple[Path, list[str], np.ndarray]:
    """The galaxies as a float (N, H, W) stack with byte-string ids, one image all NaN."""
    names, images, _ = galaxy_images(galaxies)
    data = images.astype(np.float32)
    data[5] = np.nan
    path = tmp_path / "stack.h5"
    with h5py.File(path, "w") as f:
        f["cutouts/images"] = data
        f["cutouts/names"] = np.array([f"gal-{n}".encode() for n in names])
    return path, [f"gal-{n}" for n in names], data


def test_stack_with_ids_stretch_and_resume(tmp_path, stack, capsys):
    path, ids, data = stack
    args = [str(path), "--dataset", "cutouts/images", "--ids", "cutouts/names",
            "--stretch", "asinh", "--size", "300"]
    assert amls_import(tmp_path, "hdf5", *args) == 1
    [failure] = [json.loads(line) for line in (tmp_path / "report.jsonl").read_text().splitlines()]
    assert failure["item"] == f"cutouts/images[5] id={ids[5]}"
    assert "no finite pixel" in failure["reason"]
    stretch = make_stretch("asinh")
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert store.ids() == [cid for i, cid in enumerate(ids) if i != 5]
        for row, i in enumerate(i for i in range(len(ids)) if i != 5):
            np.testing.assert_array_equal(store.read([row])[0, ..., 0], stretch(data[i]))
    capsys.readouterr()
    assert amls_import(tmp_path, "hdf5", *args, "--allow-failures", "--workers", "2") == 0
    assert f"imported 0, skipped {len(ids) - 1}" in capsys.readouterr().out


def test_zarr_stack_with_channels_and_default_ids(tmp_path, galaxies):
    _, images, _ = galaxy_images(galaxies)
    rgb = np.stack([images, 255 - images, images // 2], axis=-1)  # (N, H, W, 3) uint8
    path = tmp_path / "stack.zarr"
    zarr.create_array(str(path), shape=rgb.shape, dtype=rgb.dtype, chunks=(4, 300, 300, 3))[:] = rgb
    assert amls_import(tmp_path, "zarr", str(path), "--size", "64") == 0
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert store.shape == (64, 64, 3) and store.ids()[:2] == ["stack_000000", "stack_000001"]
        stored = store.read([0])[0]
    resized = np.asarray(Image.fromarray(rgb[0]).resize((64, 64), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(stored, resized, atol=1)  # per-channel vs RGB resize rounding
    preview = np.asarray(Image.open(tmp_path / "previews" / "stack_000000.png"))
    np.testing.assert_array_equal(preview, stored)


def test_zarr_group_layout(tmp_path, galaxies):
    names, images, coords = galaxy_images(galaxies)
    root = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    for name, image, (ra, dec) in zip(names[:4], images, coords, strict=False):
        array = root.create_group(name).create_array("Img", shape=image.shape, dtype=image.dtype)
        array[:] = image
        array.attrs.update({"RA": ra, "DEC": dec})
    assert amls_import(tmp_path, "zarr", str(tmp_path / "g.zarr")) == 0
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert store.ids() == names[:4]
        assert store.meta(2)["dec"] == pytest.approx(coords[2][1])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dataset", "nope"], "no dataset or group 'nope'"),
        (["--dataset", "cutouts/images", "--ids", "cutouts/short"], "has 3 entries for 12"),
        (["--dataset", "cutouts/short"], "need (N, H, W)"),
        (["--dataset", "cutouts/images", "--stretch", "sqrt"], "unknown stretch 'sqrt'"),
    ],
)
def test_bad_arguments_are_clear_errors(tmp_path, stack, capsys, extra, message):
    path, _, _ = stack
    with h5py.File(path, "a") as f:
        f["cutouts/short"] = np.arange(3)
    assert amls_import(tmp_path, "hdf5", str(path), *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s.h5").exists()


def test_not_an_hdf5_file(tmp_path, capsys):
    bogus = tmp_path / "bogus.h5"
    bogus.write_bytes(b"\x89HDF but not really" * 10)
    assert amls_import(tmp_path, "hdf5", str(bogus)) == 2
    assert "not a readable HDF5 file" in capsys.readouterr().err


@pytest.fixture
def png_tree(tmp_path) -> Path:
    """A few of firstgalaxydata's PNGs in two class folders, plus one unreadable file."""
    zipped = Path(firstgalaxydata.__file__).parent / "galaxy_data.zip"
    root = tmp_path / "pngs"
    with zipfile.ZipFile(zipped) as archive:
        for folder in ("Compact", "FRI"):
            names = sorted(n for n in archive.namelist()
                           if n.startswith(f"galaxy_data/test/{folder}/") and n.endswith(".png"))
            for name in names[:3]:
                (root / folder).mkdir(parents=True, exist_ok=True)
                (root / folder / Path(name).name).write_bytes(archive.read(name))
    (root / "FRI" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def test_image_folder_reuses_the_store_builder(tmp_path, png_tree, capsys):
    assert amls_import(tmp_path, "images", str(png_tree), "--channels", "1") == 1
    out = capsys.readouterr().out
    assert "imported 6, skipped 0" in out and "failed 1" in out
    tasks = read_tasks(tasks_path(tmp_path / "s.h5"))
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert sorted(store.ids()) == sorted(tasks) and len(tasks) == 6
        cid = store.ids()[4]
        pixels = store.read([4])[0, ..., 0]
    assert cid.startswith(("Compact/", "FRI/"))
    original = np.asarray(Image.open(png_tree / f"{cid}.png").convert("L"))
    np.testing.assert_array_equal(pixels, original)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "previews" / f"{cid}.png")),
                                  pixels)
    assert tasks[cid]["image"] == f"/data/local-files/?d=previews/{cid}.png"
    # again, and after losing the tasks file (an interrupted run): nothing duplicated
    tasks_path(tmp_path / "s.h5").unlink()
    assert amls_import(tmp_path, "images", str(png_tree), "--channels", "1",
                       "--allow-failures") == 0
    assert "imported 0, skipped 6" in capsys.readouterr().out
    assert len(tasks_path(tmp_path / "s.h5").read_text().splitlines()) == 6


def test_import_records_the_invariance_and_refuses_another_on_append(tmp_path, galaxies,
                                                                      png_tree, capsys):
    assert amls_import(tmp_path, "hdf5", str(galaxies), "--invariance", "flip") == 0
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert store.invariance == "flip"
    assert amls_import(tmp_path, "hdf5", str(galaxies), "--invariance", "dihedral") == 2
    assert "records invariance flip" in capsys.readouterr().err
    assert amls_import(tmp_path, "hdf5", str(galaxies)) == 0  # not given: the store's stays

    images = tmp_path / "photos"
    assert main(["import", "images", str(png_tree), "--channels", "1", "--allow-failures",
                 "--store", str(images / "s.h5"), "--previews", str(images / "previews"),
                 "--invariance", "flip"]) == 0
    with CutoutStore.open(images / "s.h5") as store:
        assert store.invariance == "flip"
    assert main(["import", "images", str(png_tree), "--channels", "1", "--allow-failures",
                 "--store", str(images / "s.h5"), "--previews", str(images / "previews"),
                 "--invariance", "dihedral"]) == 2
    assert "records invariance flip" in capsys.readouterr().err


def test_a_preview_stretch_brightens_previews_and_leaves_the_models_pixels(tmp_path, galaxies,
                                                                           capsys):
    from PIL import Image

    plain, bright = tmp_path / "plain", tmp_path / "bright"
    assert amls_import(plain, "hdf5", str(galaxies)) == 0
    assert amls_import(bright, "hdf5", str(galaxies), "--preview-stretch", "log") == 0
    with CutoutStore.open(plain / "s.h5") as a, CutoutStore.open(bright / "s.h5") as b:
        np.testing.assert_array_equal(a.read(np.arange(len(a))), b.read(np.arange(len(b))))
        assert a.preview_stretch == {"name": "none"}
        assert b.preview_stretch["name"] == "log" and b.preview_stretch["a"] == 1000.0
        ids, pixels = b.ids(), b.read(np.arange(len(b)))[..., 0]
    for cid, stored in zip(ids, pixels, strict=True):
        before = np.asarray(Image.open(plain / "previews" / f"{cid}.png"))
        after = np.asarray(Image.open(bright / "previews" / f"{cid}.png"))
        np.testing.assert_array_equal(before, stored)  # "none": the model's pixels
        faint = (stored > 0) & (stored < 32)
        assert faint.any() and (after[faint] >= 48).all()  # faint tails (1-31) now visible
        assert (after[stored == 0] == 0).all()  # the empty sky stays black
        assert after.max() == 255
    # Appending with another preview stretch would mix two looks in one project: refused.
    assert amls_import(bright, "hdf5", str(galaxies), "--preview-stretch", "asinh") == 2
    assert "wrote its previews with stretch" in capsys.readouterr().err


def test_the_image_folder_import_applies_and_records_the_preview_stretch(tmp_path, png_tree,
                                                                         capsys):
    assert amls_import(tmp_path, "images", str(png_tree), "--preview-stretch", "linear",
                       "--allow-failures") == 0  # the tree holds one broken file
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert store.preview_stretch["name"] == "linear"
    assert amls_import(tmp_path, "images", str(png_tree)) == 2
    assert "wrote its previews with stretch" in capsys.readouterr().err


def test_framed_previews_show_the_models_crop_and_link_the_full_field(tmp_path, galaxies,
                                                                      capsys):
    import torch

    from ml_backend.core.preprocess import center_crop

    assert amls_import(tmp_path, "hdf5", str(galaxies), "--preview-crop", "0.5") == 0
    tasks = read_tasks(tasks_path(tmp_path / "s.h5"))
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert store.preview_crop == 0.5
        ids, pixels = store.ids(), store.read(np.arange(len(store)))
    # what the model sees at AMLS_CENTER_CROP=0.5, before resizing: the same window
    seen = center_crop(torch.from_numpy(pixels).permute(0, 3, 1, 2), 0.5)
    for k, cid in enumerate(ids):
        framed = np.asarray(Image.open(tmp_path / "previews" / f"{cid}.png"))
        full = np.asarray(Image.open(tmp_path / "previews" / "full-field" / f"{cid}.png"))
        np.testing.assert_array_equal(full, pixels[k, ..., 0])
        np.testing.assert_array_equal(framed, seen[k, 0].numpy())
        assert framed.shape == (pixels.shape[1] // 2, pixels.shape[2] // 2)
        assert tasks[cid]["image"].endswith(f"previews/{cid}.png")
        assert f'href="/data/local-files/?d=previews/full-field/{cid}.png"' in (
            tasks[cid]["full_link"])
    # Appending with another framing would mix two looks in one project: refused.
    assert amls_import(tmp_path, "hdf5", str(galaxies)) == 2
    assert "frames its previews on crop 0.5" in capsys.readouterr().err
    assert amls_import(tmp_path / "bad", "hdf5", str(galaxies), "--preview-crop", "0") == 2
    assert "--preview-crop must be in (0, 1]" in capsys.readouterr().err


def test_the_image_folder_import_frames_and_records_the_preview_crop(tmp_path, png_tree,
                                                                     capsys):
    assert amls_import(tmp_path, "images", str(png_tree), "--preview-crop", "0.25",
                       "--allow-failures") == 0
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert store.preview_crop == 0.25
        cid = store.ids()[0]
    assert (tmp_path / "previews" / "full-field" / f"{cid}.png").exists()
    assert "Full field" in read_tasks(tasks_path(tmp_path / "s.h5"))[cid]["full_link"]
    assert amls_import(tmp_path, "images", str(png_tree), "--preview-crop", "0.5") == 2
    assert "frames its previews on crop 0.25" in capsys.readouterr().err


def test_image_positions_fill_ra_dec_and_the_sky_link(tmp_path, png_tree, capsys):
    ids = sorted(p.relative_to(png_tree).with_suffix("").as_posix()
                 for p in png_tree.rglob("*.png"))
    positions = tmp_path / "positions.csv"
    positions.write_text("id,ra,dec\n" + f"{ids[0]},359.95,-30.25\n" + f"{ids[1]},0.5,12\n")
    assert amls_import(tmp_path, "images", str(png_tree), "--channels", "1",
                       "--positions", str(positions), "--allow-failures") == 0
    tasks = read_tasks(tasks_path(tmp_path / "s.h5"))
    assert (tasks[ids[0]]["ra"], tasks[ids[0]]["dec"]) == (359.95, -30.25)
    assert tasks[ids[0]]["sky"] == sky_url(359.95, -30.25)
    assert "Open in ESASky" in tasks[ids[0]]["sky_link"]
    assert tasks[ids[1]]["dec"] == 12.0
    others = [t for cid, t in tasks.items() if cid not in ids[:2]]
    assert others and all(t["ra"] is None and t["sky_link"] == "" for t in others)


@pytest.mark.parametrize(("text", "message"), [
    ("ra,dec\n1,2\n", "positions need an 'id' column"),
    ("id,ra,dec\na,400,2\n", "positions.csv:2: position ra=400.0, dec=2.0 is out of range"),
    ("id,ra,dec\na,x,2\n", "positions.csv:2: ra 'x' is not a number"),
])
def test_bad_positions_name_the_file_and_line(tmp_path, png_tree, capsys, text, message):
    (tmp_path / "positions.csv").write_text(text)
    assert amls_import(tmp_path, "images", str(png_tree), "--channels", "1",
                       "--positions", str(tmp_path / "positions.csv")) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s.h5").exists()  # refused before anything was written
