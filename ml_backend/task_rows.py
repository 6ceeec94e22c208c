"""Label Studio task rows written next to a store (``<store>.tasks.jsonl``) for a later push."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote


def tasks_path(store_path: Path) -> Path:
    """``<store>.tasks.jsonl`` beside the store."""
    return store_path.with_name(store_path.name + ".tasks.jsonl")


# Sky viewers a task links to at its RA/Dec (ICRS degrees), `{ra}` / `{dec}` URL-encoded.
SKY_VIEWERS: dict[str, str] = {
    "esasky": "https://sky.esa.int/esasky/?target={ra}%20{dec}&fov=0.05&cooframe=J2000",
    "legacysurvey": "https://www.legacysurvey.org/viewer?ra={ra}&dec={dec}&layer=ls-dr10&zoom=15",
    "aladin": "https://aladin.cds.unistra.fr/AladinLite/?target={ra}%20{dec}&fov=0.05",
}


SKY_VIEWER_NAMES = {"esasky": "ESASky", "legacysurvey": "Legacy Survey viewer",
                    "aladin": "Aladin Lite"}


def sky_anchor(url: str | None, viewer: str = "esasky") -> str:
    """An HTML link to `url` that opens in a new tab, named after the viewer ("" without a
    url): what the coordinates label config shows (Label Studio's HyperText)."""
    return _anchor(url, f"Open in {SKY_VIEWER_NAMES.get(viewer, viewer)} ↗")


def full_field_anchor(url: str | None) -> str:
    """An HTML link to the whole cutout of a framed preview ("" without one)."""
    return _anchor(url, "Full field (uncropped) ↗")


def _anchor(url: str | None, text: str) -> str:
    if url is None:
        return ""
    return (f'<a href="{html.escape(url, quote=True)}" target="_blank" '
            f'rel="noopener noreferrer">{html.escape(text)}</a>')


def sky_url(ra: float | None, dec: float | None, viewer: str = "esasky") -> str | None:
    """The viewer's page centred on (ra, dec), or None without valid coordinates or viewer
    "none". RA is wrapped into [0, 360); a Dec outside [-90, 90] gives None."""
    if viewer == "none":
        return None
    if viewer not in SKY_VIEWERS:
        raise ValueError(f"sky viewer must be one of {', '.join([*SKY_VIEWERS, 'none'])}, "
                         f"got {viewer!r}")
    if ra is None or dec is None or not (math.isfinite(ra) and math.isfinite(dec)):
        return None
    if not -90.0 <= dec <= 90.0:
        return None
    wrapped = round(ra % 360.0, 6) % 360.0  # 359.9999999 would print as 360.000000
    return SKY_VIEWERS[viewer].format(ra=quote(f"{wrapped:.6f}"), dec=quote(f"{dec:+.6f}"))


def source_names(source: str) -> str:
    """The file names of a comma-separated list of source paths: what an annotator needs to
    know, without the server's folders."""
    return ",".join(Path(p).name for p in source.split(",")) if source else source


def make_task(*, image_url: str, cutout_id: str, store_path: Path, source: str, hdu: str,
              ra: float | None, dec: float | None, sky_viewer: str = "esasky",
              full_field_url: str | None = None) -> dict[str, Any]:
    """Task ``data``: image URL, cutout id, absolute store path, source file name(s) (the
    store keeps the full paths), hdu, ra, dec (deg),
    ``sky_link`` (an HTML link for the labelling page, "" without coordinates), with
    coordinates ``sky``: the sky viewer's URL at that position (a Data Manager column), and
    ``full_link``: an HTML link to the whole cutout when the image is a framed preview
    (else "")."""
    def coord(value: float | None) -> float | None:
        return None if value is None or not math.isfinite(value) else float(value)

    data = {"image": image_url, "cutout_id": cutout_id, "store": str(store_path.resolve()),
            "source": source_names(source), "hdu": hdu, "ra": coord(ra), "dec": coord(dec)}
    link = sky_url(data["ra"], data["dec"], sky_viewer)
    if link is not None:
        data["sky"] = link
    data["sky_link"] = sky_anchor(link, sky_viewer)
    data["full_link"] = full_field_anchor(full_field_url)
    return data


def append_tasks(path: Path, tasks: Iterable[dict[str, Any]]) -> None:
    """Append task data dicts as JSON lines (flushed, so a crash loses at most a partial line)."""
    with path.open("a", encoding="utf-8") as fh:
        for task in tasks:
            fh.write(json.dumps(task) + "\n")
        fh.flush()


def read_tasks(path: Path) -> dict[str, dict[str, Any]]:
    """Task data by cutout id, last line winning; a truncated last line is ignored."""
    tasks: dict[str, dict[str, Any]] = {}
    with path.open(encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            task = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # an interrupted write; the item is re-imported later
                break
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err
        tasks[task["cutout_id"]] = task
    return tasks
