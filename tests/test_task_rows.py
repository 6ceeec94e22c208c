"""Task data rows: the sky-viewer link at a task's RA/Dec."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from ml_backend.task_rows import make_task, sky_anchor, sky_url


def target(url: str) -> tuple[float, float]:
    ra, dec = parse_qs(urlparse(url).query)["target"][0].split(" ")
    return float(ra), float(dec)


@pytest.mark.parametrize("ra,dec,expected", [
    (0.0, -89.5, (0.0, -89.5)),
    (359.9999995, 12.0, (0.0, 12.0)),  # would print as 360.000000
    (360.0, 0.0, (0.0, 0.0)),
    (-0.25, -30.5, (359.75, -30.5)),
    (-1e-17, -5.0, (0.0, -5.0)),  # -1e-17 % 360 is 360.0 in floating point
    (720.5, 45.0, (0.5, 45.0)),
    (150.1123, 2.2041, (150.1123, 2.2041)),
])
def test_the_esasky_link_wraps_ra_and_keeps_the_sign_of_dec(ra, dec, expected):
    url = sky_url(ra, dec)
    assert url is not None and url.startswith("https://sky.esa.int/esasky/?target=")
    got = target(url)
    assert got[1] == pytest.approx(expected[1], abs=1e-6)
    assert got[0] == pytest.approx(expected[0], abs=1e-6) and 0.0 <= got[0] < 360.0


def test_a_positive_dec_survives_url_decoding():
    url = sky_url(10.0, 5.0, "legacysurvey")
    query = parse_qs(urlparse(url).query)
    assert query["dec"] == ["+5.000000"] and query["ra"] == ["10.000000"]
    assert target(sky_url(10.0, 5.0, "aladin")) == (10.0, 5.0)


@pytest.mark.parametrize("ra,dec", [(None, 1.0), (1.0, None), (float("nan"), 1.0),
                                    (1.0, float("inf")), (1.0, 91.0), (1.0, -90.5)])
def test_no_link_without_valid_coordinates(ra, dec):
    assert sky_url(ra, dec) is None
    task = make_task(image_url="/a.png", cutout_id="a", store_path=Path("s.h5"), source="x",
                     hdu="0", ra=ra, dec=dec)
    assert "sky" not in task and task["sky_link"] == ""


def test_viewer_none_and_unknown_viewers():
    assert sky_url(1.0, 1.0, "none") is None
    with pytest.raises(ValueError, match="sky viewer must be one of"):
        sky_url(1.0, 1.0, "google")


def test_the_labelling_page_link_opens_the_viewer_in_a_new_tab():
    task = make_task(image_url="/a.png", cutout_id="a", store_path=Path("s.h5"), source="x",
                     hdu="0", ra=359.9, dec=-30.5, sky_viewer="aladin")
    assert task["sky"] == "https://aladin.cds.unistra.fr/AladinLite/?target=359.900000%20-30.500000&fov=0.05"
    href = task["sky"].replace("&", "&amp;")  # as HTML attributes spell it
    assert task["sky_link"] == (f'<a href="{href}" target="_blank" '
                                'rel="noopener noreferrer">Open in Aladin Lite ↗</a>')
    # a URL with characters that mean something in HTML stays one attribute
    assert sky_anchor('https://x.test/?a=1&b="2"') == (
        '<a href="https://x.test/?a=1&amp;b=&quot;2&quot;" target="_blank" '
        'rel="noopener noreferrer">Open in ESASky ↗</a>')


def test_the_task_names_its_source_files_without_server_folders():
    task = make_task(image_url="/a.png", cutout_id="a", store_path=Path("s.h5"),
                     source="/data/survey/f1.fits,/data/survey/f2.fits", hdu="SCI",
                     ra=None, dec=None)
    assert task["source"] == "f1.fits,f2.fits"
