"""`amls import fits` on FITS files shipped in astropy / astroquery, and corrupt copies."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import astropy
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from PIL import Image

from amls_cli import main
from ml_backend.core.store import CutoutStore
from ml_backend.core.stretch import make_stretch
from ml_backend.task_rows import read_tasks, sky_anchor, sky_url, tasks_path

FITS_DATA = Path(astropy.__file__).parent / "io" / "fits"
M13 = FITS_DATA / "hdu" / "compressed" / "tests" / "data" / "m13.fits"
M13_GZIP = M13.with_name("m13_gzip.fits")
M13_RICE = M13.with_name("m13_rice.fits")
TEST0 = FITS_DATA / "tests" / "data" / "test0.fits"  # PRIMARY + 4 x SCI (40 x 40)
TABLE = FITS_DATA / "tests" / "data" / "tb.fits"      # a binary table in HDU 1
ASINH = {"name": "asinh", "a": 0.1, "lower_percentile": 0.5, "upper_percentile": 99.5}


def amls_import(tmp_path: Path, *args: str, store: str = "s.h5") -> int:
    return main(["import", "fits", *args, "--store", str(tmp_path / store),
                 "--previews", str(tmp_path / "root" / "previews"),
                 "--report", str(tmp_path / "report.jsonl")])


def report_rows(tmp_path: Path) -> list[dict]:
    text = (tmp_path / "report.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def png(tmp_path: Path, cutout_id: str) -> np.ndarray:
    return np.asarray(Image.open(tmp_path / "root" / "previews" / f"{cutout_id}.png"))


def test_whole_image_store_preview_and_task_agree(tmp_path):
    assert amls_import(tmp_path, str(M13)) == 0
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert store.ids() == ["m13"] and store.shape == (300, 300, 1)
        assert store.stretch == ASINH
        pixels = store.read([0])[0]
        meta = store.meta(0)
    data = fits.getdata(M13).astype(np.float64)
    np.testing.assert_array_equal(pixels[..., 0], make_stretch(ASINH)(data))
    np.testing.assert_array_equal(png(tmp_path, "m13"), pixels[..., 0])  # what the model sees
    centre = WCS(fits.getheader(M13)).celestial.pixel_to_world(149.5, 149.5)
    assert (meta["ra"], meta["dec"]) == pytest.approx((centre.ra.deg, centre.dec.deg))
    task = read_tasks(tasks_path(tmp_path / "s.h5"))["m13"]
    assert task == {"image": "/data/local-files/?d=previews/m13.png", "cutout_id": "m13",
                    "store": str((tmp_path / "s.h5").resolve()), "source": M13.name,
                    "hdu": "0", "ra": meta["ra"], "dec": meta["dec"],
                    "sky": sky_url(meta["ra"], meta["dec"], "esasky"),
                    "sky_link": sky_anchor(task["sky"], "esasky"), "full_link": ""}
    assert task["sky"].startswith("https://sky.esa.int/esasky/?target=250.4")  # M13


def test_tile_compressed_hdus_give_the_same_pixels(tmp_path):
    assert amls_import(tmp_path, str(M13), str(M13_GZIP), str(M13_RICE), "--size", "64") == 0
    with CutoutStore.open(tmp_path / "s.h5") as store:
        images = store.read([0, 1, 2])
        assert store.meta_table([0, 1, 2])["hdu"].tolist() == ["0", "1", "1"]
    np.testing.assert_array_equal(images[0], images[1])  # gzip is lossless
    np.testing.assert_array_equal(images[0], images[2])  # rice on int16 is lossless


def test_three_hdus_make_three_channels(tmp_path):
    assert amls_import(tmp_path, str(TEST0), "--hdu", "SCI,SCI,SCI", "--stretch", "linear") == 0
    with fits.open(TEST0) as hdul:
        planes = [make_stretch("linear")(hdul["SCI", v].data.astype(float)) for v in (1, 2, 3)]
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert store.shape == (40, 40, 3)
        image = store.read([0])[0]
        assert store.meta(0)["hdu"] == "SCI,SCI:2,SCI:3"
    np.testing.assert_array_equal(image, np.stack(planes, axis=-1))
    np.testing.assert_array_equal(png(tmp_path, "test0"), image)  # an RGB preview


def test_named_hdu_from_astroquery(tmp_path):
    astroquery = pytest.importorskip("astroquery")
    image = Path(astroquery.__file__).parent / "ukidss" / "tests" / "data" / "image.fits"
    assert amls_import(tmp_path, str(image), "--hdu", "WSAIMAGE", "--size", "50") == 0
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert store.shape == (50, 50, 1) and store.meta(0)["hdu"] == "WSAIMAGE"
        assert np.isfinite(store.meta(0)["ra"])


def write_catalog(path: Path, rows: list[tuple], header: str = "ra,dec,size,id") -> None:
    path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))


def sky_of(x: float, y: float) -> tuple[float, float]:
    sky = WCS(fits.getheader(M13)).celestial.pixel_to_world(x, y)
    return sky.ra.deg, sky.dec.deg


def test_catalog_cutouts_match_frame_slices(tmp_path):
    centres = [(50, 60), (150, 150), (240, 30)]
    rows = [(*sky_of(x, y), 15, f"obj{i}") for i, (x, y) in enumerate(centres)]
    rows.append((10.0, -10.0, 15, "far_away"))
    write_catalog(tmp_path / "cat.csv", rows)
    assert amls_import(tmp_path, str(M13), "--catalog", str(tmp_path / "cat.csv")) == 1
    data = fits.getdata(M13).astype(float)
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert store.ids() == ["obj0", "obj1", "obj2"] and store.shape == (15, 15, 1)
        for i, (x, y) in enumerate(centres):
            expected = make_stretch(ASINH)(data[y - 7:y + 8, x - 7:x + 8])
            np.testing.assert_array_equal(store.read([i])[0, ..., 0], expected)
            assert store.meta(i)["ra"] == pytest.approx(rows[i][0])
    [failure] = report_rows(tmp_path)
    assert "far_away" in failure["item"] and "outside every frame" in failure["reason"]


def test_partial_overlap_is_filled_and_counted(tmp_path, capsys):
    write_catalog(tmp_path / "cat.csv", [(*sky_of(0, 0), 11, "corner")])
    assert amls_import(tmp_path, str(M13), "--catalog", str(tmp_path / "cat.csv")) == 0
    # an 11 x 11 box on pixel (0, 0) has 6 x 6 = 36 pixels on the frame, 85 off it
    assert "85 non-finite pixels replaced" in capsys.readouterr().out


def test_rerun_resumes_without_duplicates(tmp_path, capsys):
    rows = [(*sky_of(20 + 25 * i, 40 + 20 * i), 16, f"o{i}") for i in range(8)]
    write_catalog(tmp_path / "cat.csv", rows[:3])  # the "interrupted" first run
    assert amls_import(tmp_path, str(M13), "--catalog", str(tmp_path / "cat.csv")) == 0
    write_catalog(tmp_path / "cat.csv", rows)
    capsys.readouterr()
    assert amls_import(tmp_path, str(M13), "--catalog", str(tmp_path / "cat.csv")) == 0
    assert "imported 5, skipped 3" in capsys.readouterr().out
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert sorted(store.ids()) == [f"o{i}" for i in range(8)]
    lines = tasks_path(tmp_path / "s.h5").read_text().splitlines()
    assert len(lines) == 8


def test_workers_give_the_same_store(tmp_path):
    rows = [(*sky_of(20 + 9 * i, 280 - 9 * i), 24, f"o{i}") for i in range(30)]
    write_catalog(tmp_path / "cat.csv", rows)
    for name, workers in (("one.h5", "1"), ("two.h5", "2")):
        assert main(["import", "fits", str(M13), "--catalog", str(tmp_path / "cat.csv"),
                     "--workers", workers, "--store", str(tmp_path / name),
                     "--previews", str(tmp_path / f"p{workers}")]) == 0
    with CutoutStore.open(tmp_path / "one.h5") as one, CutoutStore.open(tmp_path / "two.h5") as two:
        assert one.ids() == two.ids()
        np.testing.assert_array_equal(one.read(range(30)), two.read(range(30)))


def test_ids_escaping_the_preview_root_fail_per_item(tmp_path):
    rows = [(*sky_of(100, 100), 9, "../escape"), (*sky_of(120, 100), 9, "/etc/abs"),
            (*sky_of(140, 100), 9, "sub/fine")]
    write_catalog(tmp_path / "cat.csv", rows)
    assert amls_import(tmp_path, str(M13), "--catalog", str(tmp_path / "cat.csv")) == 1
    reasons = {r["item"].split("id=")[1]: r["reason"] for r in report_rows(tmp_path)}
    assert set(reasons) == {"../escape", "/etc/abs"}
    assert all("escape the preview folder" in reason for reason in reasons.values())
    assert (tmp_path / "root" / "previews" / "sub" / "fine.png").is_file()
    assert not list(tmp_path.glob("escape*")) and not Path("/etc/abs.png").exists()


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    """Corrupt and awkward variants of m13 made here, plus astropy's table file."""
    raw = M13.read_bytes()
    files = {"truncated": tmp_path / "truncated.fits", "scrambled": tmp_path / "scrambled.fits",
             "allnan": tmp_path / "allnan.fits", "mismatch": tmp_path / "mismatch.fits",
             "cube": tmp_path / "cube.fits"}
    files["truncated"].write_bytes(raw[:2880 + 5000])
    files["scrambled"].write_bytes(b"\x00\xff" * 40 + raw[80:])  # SIMPLE card destroyed
    data, header = fits.getdata(M13, header=True)
    fits.PrimaryHDU(np.full(data.shape, np.nan, dtype=np.float32)).writeto(files["allnan"])
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, name="SCI"),
                  fits.ImageHDU(data[:100], name="ERR")]).writeto(files["mismatch"])
    fits.PrimaryHDU(data[None, None], header).writeto(files["cube"])  # (1, 1, H, W)
    return files


def test_bad_files_are_reported_and_the_rest_imported(tmp_path, bad_files):
    files = [bad_files["truncated"], bad_files["scrambled"], bad_files["allnan"], M13, TABLE]
    assert amls_import(tmp_path, *map(str, files), "--size", "32") == 1
    reasons = {Path(r["file"]).stem: r["reason"] for r in report_rows(tmp_path)}
    assert set(reasons) == {"truncated", "scrambled", "allnan", "tb"}
    assert "not a readable FITS file" in reasons["scrambled"]
    assert "truncated" in reasons["truncated"]
    assert "no finite pixel" in reasons["allnan"]
    assert "no HDU holds image data" in reasons["tb"]
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert store.ids() == ["m13"]
    # the same files again with --allow-failures: exit 0, nothing duplicated
    assert amls_import(tmp_path, *map(str, files), "--size", "32", "--allow-failures") == 0
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert store.ids() == ["m13"]


@pytest.mark.parametrize(
    ("name", "hdu", "message"),
    [
        ("table", "1", "BinTableHDU, not an image"),
        ("missing", "SCI", "HDU SCI (EXTVER 1) not found"),
        ("empty", "0", "zero-size image"),
        ("mismatch", "SCI,ERR", "channel shapes differ"),
    ],
)
def test_hdu_errors_name_the_problem(tmp_path, bad_files, name, hdu, message):
    path = {"table": TABLE, "missing": M13, "empty": M13_RICE, "mismatch": bad_files["mismatch"]}
    assert amls_import(tmp_path, str(path[name]), "--hdu", hdu, "--size", "16") == 1
    [row] = report_rows(tmp_path)
    assert message in row["reason"] and row["file"] == str(path[name])


# m13's primary header: cards 6..12 are COMMENTs, 13 CTYPE1, 19 CDELT1 (80 bytes per card).
MALFORMED_HEADERS = {
    "ctype": ({13: "CTYPE1  = 0"}, "HDU 0: CTYPE1 = 0 is not a string"),
    "cunit": ({8: "CUNIT1  = 1.5"}, "HDU 0: CUNIT1 = 1.5 is not a string"),
    "simple": ({6: "SIMPLE  = 0"}, "structure cards (SIMPLE"),
    "blank": ({6: "BZERO   = 1", 7: "BLANK   = False", 8: "BLANK   = 0"},
              "HDU 0: malformed header (VerifyError: Unparsable card (BLANK)"),
    "wcsaxes": ({8: "WCSAXES = 20000"}, "HDU 0: WCSAXES = 20000 is not an axis count"),
    "wcsaxesa": ({8: "WCSAXESA= 20000"}, "HDU 0: WCSAXESA = 20000 is not an axis count"),
    "singular": ({19: "CDELT1  = 0.0"}, "HDU 0: invalid WCS in header (SingularMatrixError"),
}


def m13_with_cards(path: Path, cards: dict[int, str]) -> Path:
    """A copy of m13 with raw header cards replaced (astropy would refuse to write them)."""
    raw = bytearray(M13.read_bytes())
    for slot, text in cards.items():
        raw[slot * 80:(slot + 1) * 80] = text.ljust(80).encode("ascii")
    path.write_bytes(bytes(raw))
    return path


def test_malformed_headers_fail_per_file_naming_file_hdu_and_card(tmp_path):
    bad = {name: m13_with_cards(tmp_path / f"{name}.fits", cards)
           for name, (cards, _) in MALFORMED_HEADERS.items()}
    started = time.perf_counter()
    assert amls_import(tmp_path, *map(str, bad.values()), str(M13), "--size", "16") == 1
    assert time.perf_counter() - started < 30  # wcslib alone takes ~80 s on WCSAXES = 20000
    reasons = {Path(r["file"]).stem: r["reason"] for r in report_rows(tmp_path)}
    assert set(reasons) == set(bad)
    for name, (_, message) in MALFORMED_HEADERS.items():
        assert reasons[name].startswith(str(bad[name])) and message in reasons[name]
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert store.ids() == ["m13"]


def test_malformed_frame_header_fails_only_that_frame_in_catalogue_mode(tmp_path):
    frame = m13_with_cards(tmp_path / "huge_axes.fits", MALFORMED_HEADERS["wcsaxes"][0])
    write_catalog(tmp_path / "cat.csv", [(*sky_of(150, 150), 9, "centre")])
    assert amls_import(tmp_path, str(frame), str(M13), "--catalog", str(tmp_path / "cat.csv")) == 1
    [row] = report_rows(tmp_path)
    assert row["file"] == str(frame) and "WCSAXES = 20000" in row["reason"]
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert store.ids() == ["centre"]


def test_degenerate_axes_are_dropped(tmp_path, bad_files):
    assert amls_import(tmp_path, str(bad_files["cube"]), "--size", "30") == 0
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert store.shape == (30, 30, 1) and np.isfinite(store.meta(0)["ra"])


def test_three_files_per_object(tmp_path):
    copies = []
    for band in ("g", "r", "i"):
        copies.append(tmp_path / f"m13_{band}.fits")
        shutil.copy(M13, copies[-1])
    assert amls_import(tmp_path, *map(str, copies), "--files-per-object", "3",
                       "--size", "20") == 0
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert store.ids() == ["m13_g"] and store.shape == (20, 20, 3)


def test_store_with_another_stretch_is_refused(tmp_path, capsys):
    assert amls_import(tmp_path, str(M13), "--size", "16") == 0
    assert amls_import(tmp_path, str(M13_GZIP), "--size", "16", "--stretch", "zscale") == 2
    assert "holds pixels made with stretch" in capsys.readouterr().err


def test_bad_stretch_parameter_is_a_usage_error(tmp_path, capsys):
    assert amls_import(tmp_path, str(M13), "--stretch-param", "a=5") == 2
    assert "a must be in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "s.h5").exists()


@pytest.mark.parametrize("bad", ["", "../x", "a/../../x", "/abs", "a\\b", "nul\x00", "dir/", "a//b",
                                 "./x"])
def test_preview_relpath_rejects_escaping_ids(bad):
    from import_tools.previews import preview_relpath

    with pytest.raises(ValueError):
        preview_relpath(bad)


def test_preview_urls_local_files_and_prefix(tmp_path):
    from import_tools.previews import preview_url

    png_path = tmp_path / "root" / "previews" / "J1+2 x.png"
    assert preview_url(png_path, document_root=tmp_path / "root") == \
        "/data/local-files/?d=previews/J1%2B2%20x.png"
    assert preview_url(png_path, url_prefix="s3://bucket/cut/",
                       previews_root=tmp_path / "root" / "previews") == \
        "s3://bucket/cut/J1%2B2%20x.png"
    with pytest.raises(ValueError, match="outside the document root"):
        preview_url(png_path, document_root=tmp_path / "elsewhere")


def test_url_prefix_option_reaches_the_tasks(tmp_path):
    assert main(["import", "fits", str(M13), "--size", "8", "--store", str(tmp_path / "s.h5"),
                 "--previews", str(tmp_path / "p"), "--url-prefix", "gs://b/p"]) == 0
    assert read_tasks(tasks_path(tmp_path / "s.h5"))["m13"]["image"] == "gs://b/p/m13.png"


def test_galactic_wcs_frames_take_icrs_catalogues(tmp_path):
    data, header = fits.getdata(M13, header=True)
    centre = WCS(header).celestial.pixel_to_world(header["CRPIX1"] - 1, header["CRPIX2"] - 1)
    header["CTYPE1"], header["CTYPE2"] = "GLON-TAN", "GLAT-TAN"
    header["CRVAL1"], header["CRVAL2"] = centre.galactic.l.deg, centre.galactic.b.deg
    for key in ("EQUINOX", "EPOCH", "RADESYS", "RADECSYS"):
        header.remove(key, ignore_missing=True)
    frame = tmp_path / "galactic.fits"
    fits.PrimaryHDU(data, header).writeto(frame)
    sky = WCS(header).celestial.pixel_to_world(80, 200).icrs
    write_catalog(tmp_path / "cat.csv", [(sky.ra.deg, sky.dec.deg, 9, "star")])
    assert amls_import(tmp_path, str(frame), "--catalog", str(tmp_path / "cat.csv")) == 0
    with CutoutStore.open(tmp_path / "s.h5") as store:
        np.testing.assert_array_equal(store.read([0])[0, ..., 0],
                                      make_stretch(ASINH)(data[196:205, 76:85].astype(float)))


def test_a_header_claiming_a_giant_frame_is_one_report_row(tmp_path):
    giant = tmp_path / "giant.fits"
    header = fits.Header({"SIMPLE": True, "BITPIX": -32, "NAXIS": 2,
                          "NAXIS1": 100_000, "NAXIS2": 100_000})
    giant.write_bytes(header.tostring().encode() + b"\0" * 2880 * 3)  # then truncated
    assert amls_import(tmp_path, str(giant), str(M13), "--size", "32") == 1
    [failure] = report_rows(tmp_path)
    assert Path(failure["file"]).name == "giant.fits"
    assert "claims 10000000000 pixels" in failure["reason"]
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert store.ids() == ["m13"]  # the file after it was imported


def test_a_catalogue_row_asking_for_a_giant_cutout_fails_alone(tmp_path):
    write_catalog(tmp_path / "cat.csv", [(*sky_of(50, 60), 1_000_000, "huge"),
                                         (*sky_of(150, 150), 15, "fine")])
    assert amls_import(tmp_path, str(M13), "--catalog", str(tmp_path / "cat.csv"),
                       "--size", "15") == 1
    [failure] = report_rows(tmp_path)
    assert "1000000 x 1000000 cutout" in failure["reason"]
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert store.ids() == ["fine"]


def test_an_unexpected_error_is_a_message_and_exit_2(tmp_path, monkeypatch, capsys):
    from import_tools import pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("disk controller on fire")

    monkeypatch.setattr(pipeline, "run_jobs", broken)
    monkeypatch.setattr("amls_cli.imports.run_jobs", broken)
    assert amls_import(tmp_path, str(M13), "--size", "32") == 2
    assert "the run failed: RuntimeError: disk controller on fire" in capsys.readouterr().err


def test_a_fitsbolt_stretch_makes_the_store_and_is_recorded(tmp_path):
    """ESA's fitsbolt normalisation end to end: the store holds fitsbolt's pixels of the
    frame and records the spec; the preview shows the same pixels."""
    pytest.importorskip("fitsbolt")
    assert amls_import(tmp_path, str(M13), "--stretch", "fitsbolt-asinh",
                       "--stretch-param", "scale=2") == 0
    spec = {"name": "fitsbolt-asinh", "scale": 2.0, "clip": 99.8}
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert store.stretch == spec
        pixels = store.read([0])[0]
    expected = make_stretch(spec)(fits.getdata(M13).astype(np.float64))
    np.testing.assert_array_equal(pixels[..., 0], expected)
    np.testing.assert_array_equal(png(tmp_path, "m13"), pixels[..., 0])
    assert not np.array_equal(expected, make_stretch(ASINH)(fits.getdata(M13)))
