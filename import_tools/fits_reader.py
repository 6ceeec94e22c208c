"""FITS input: whole images, or cutouts at catalogue positions, as float arrays with metadata.

HDU selection (``--hdu``): an index (``1``), a name (``SCI``), or a comma list for several
channels (``SCI,ERR,DQ``). A name repeated in the list means successive EXTVERs, so
``SCI,SCI,SCI`` reads (SCI, 1), (SCI, 2), (SCI, 3). Without a selection the first HDU with
image data is used (the primary HDU, or the first extension, e.g. a tile-compressed image).

Arrays with extra axes of length 1 (e.g. ``(1, 1, H, W)`` radio cubes) are squeezed; other
extra axes are an error. Coordinates come from ``WCS(header).celestial``; RA/Dec are in degrees.

Headers are untrusted: every problem with a file, including malformed cards that make astropy
itself fail, is a :class:`FitsError` that names the file (and the HDU once one is selected), so
one bad file costs one report row. Axis counts above :data:`MAX_AXES` are refused before any
WCS is built.
"""

from __future__ import annotations

import csv
import logging
import math
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyError
from astropy.nddata import Cutout2D, NoOverlapError
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import WCS, FITSFixedWarning

log = logging.getLogger(__name__)

HduKey = int | tuple[str, int]

# Most axes a header may declare in NAXIS or WCSAXESa. Real images have 2 to 4; wcslib's parse
# time grows with the square of WCSAXES (20000: ~80 s), so larger counts are refused up front.
MAX_AXES = 10
# Frames the header says are larger than this are refused before any pixel is read
# (a truncated or hostile file can claim 100000 x 100000); float32 -> 4 GB.
MAX_FRAME_PIXELS = 1_000_000_000
# Catalogue cutouts wider than this are refused per row.
MAX_CUTOUT_SIDE = 10_000
_AXIS_COUNT = re.compile(r"NAXIS|WCSAXES[A-Z]?")
_WCS_TEXT = re.compile(r"C(TYPE|UNIT)[0-9]+[A-Z]?")
_BITPIX = (8, 16, 32, 64, -32, -64)
# What astropy raises for malformed headers besides OSError / ValueError: AttributeError for an
# HDU it cannot classify (a repeated SIMPLE = 0) or a numeric CTYPEn inside WCS(); VerifyError
# for an unparsable card it needs (BLANK, BSCALE, ...).
_HEADER_ERRORS = (AttributeError, TypeError, KeyError, VerifyError)


class FitsError(ValueError):
    """A FITS file or HDU that cannot become a cutout; the message says which and why."""


@dataclass(frozen=True)
class FitsImage:
    """Pixels ``(H, W, C)`` float, the celestial WCS of the first HDU (or None), HDU label."""

    pixels: np.ndarray
    wcs: WCS | None
    hdu: str


@dataclass(frozen=True)
class CatalogRow:
    """A catalogue position: degrees, cutout size in pixels (None = the import's size), id."""

    line: int
    ra: float
    dec: float
    size: int | None
    id: str


def parse_hdu_spec(spec: str | None) -> tuple[HduKey, ...] | None:
    """``"1"`` -> (1,); ``"SCI,SCI"`` -> (("SCI", 1), ("SCI", 2)); None -> None (auto)."""
    if spec is None or not spec.strip():
        return None
    keys: list[HduKey] = []
    seen: Counter[str] = Counter()
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            raise ValueError(f"--hdu {spec!r} has an empty entry")
        if part.isdigit():
            keys.append(int(part))
        else:
            seen[part.upper()] += 1
            keys.append((part.upper(), seen[part.upper()]))
    return tuple(keys)


def hdu_label(keys: Sequence[HduKey] | None) -> str:
    """Text for reports and the store's ``hdu`` column, e.g. ``1`` or ``SCI,SCI:2``."""
    if keys is None:
        return "auto"
    return ",".join(str(k) if isinstance(k, int) else (k[0] if k[1] == 1 else f"{k[0]}:{k[1]}")
                    for k in keys)


def _card_value(card: fits.Card, where: str) -> object:
    try:
        return card.value
    except VerifyError as err:
        raise FitsError(f"{where}: card {card.keyword} cannot be parsed ({err})") from err


def _check_header(header: fits.Header, where: str) -> None:
    """FitsError for cards that astropy or wcslib mishandle instead of refusing cleanly.

    NAXIS and WCSAXESa must be integers in 0..MAX_AXES, BITPIX a FITS pixel type, CTYPEia and
    CUNITia strings. Every card is checked, not only the first of a keyword: astropy and
    wcslib read repeated cards too. ``where`` is ``"<path>: HDU <label>"``.
    """
    for card in header.cards:
        keyword = card.keyword
        if _AXIS_COUNT.fullmatch(keyword):
            value = _card_value(card, where)
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not 0 <= value <= MAX_AXES:
                raise FitsError(f"{where}: {keyword} = {value!r} is not an axis count "
                                f"from 0 to {MAX_AXES}")
        elif keyword == "BITPIX":
            value = _card_value(card, where)
            if isinstance(value, bool) or value not in _BITPIX:
                raise FitsError(f"{where}: BITPIX = {value!r} is not one of {_BITPIX}")
        elif _WCS_TEXT.fullmatch(keyword):
            value = _card_value(card, where)
            if not isinstance(value, str):
                raise FitsError(f"{where}: {keyword} = {value!r} is not a string")


def _quiet_wcs(header: fits.Header, where: str) -> WCS | None:
    """The 2-D celestial WCS of a header already passed by ``_check_header``, or None.

    FitsError if astropy / wcslib refuse it (singular matrix, unknown projection, ...).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        warnings.simplefilter("ignore", AstropyWarning)
        try:
            wcs = WCS(header).celestial
        except (ValueError, MemoryError, *_HEADER_ERRORS) as err:
            reason = " ".join(str(err).split())  # wcslib messages span several lines
            raise FitsError(f"{where}: invalid WCS in header ({type(err).__name__}: "
                            f"{reason})") from err
    return wcs if wcs.has_celestial and wcs.naxis == 2 else None


def _select(hdul: fits.HDUList, key: HduKey | None, path: Path) -> fits.hdu.base.ExtensionHDU:
    if key is None:
        for hdu in hdul:
            if hdu.is_image and hdu.header.get("NAXIS", 0) > 0:
                return hdu
        raise FitsError(f"{path}: no HDU holds image data")
    try:
        return hdul[key]
    except (KeyError, IndexError):
        where = f"index {key}" if isinstance(key, int) else f"{key[0]} (EXTVER {key[1]})"
        names = [f"{i}:{h.name}" for i, h in enumerate(hdul)]
        raise FitsError(f"{path}: HDU {where} not found; the file has {names}") from None


def _image_data(hdu: fits.hdu.base.ExtensionHDU, path: Path, label: str) -> np.ndarray:
    if not hdu.is_image:
        raise FitsError(f"{path}: HDU {label} is a {type(hdu).__name__}, not an image")
    _check_header(hdu.header, f"{path}: HDU {label}")  # before astropy or wcslib use it
    claimed = math.prod(int(hdu.header.get(f"NAXIS{i}", 1))
                        for i in range(1, int(hdu.header.get("NAXIS", 0)) + 1))
    if claimed > MAX_FRAME_PIXELS:
        raise FitsError(f"{path}: HDU {label} claims {claimed} pixels, more than "
                        f"{MAX_FRAME_PIXELS}; refused before reading")
    try:
        data = hdu.data
    except _HEADER_ERRORS as err:
        raise FitsError(f"{path}: HDU {label}: malformed header ({type(err).__name__}: "
                        f"{err})") from err
    if data is None or data.size == 0:
        raise FitsError(f"{path}: HDU {label} has no pixels (zero-size image)")
    data = np.squeeze(np.asarray(data))
    if data.ndim != 2:
        raise FitsError(f"{path}: HDU {label} has shape {hdu.data.shape}; need a 2-D image "
                        "(extra axes of length 1 are dropped)")
    return data.astype(np.float32, copy=False)


def read_fits(paths: Sequence[Path], keys: Sequence[HduKey] | None) -> FitsImage:
    """Read one object: one file with one or more HDUs, or several files (one channel each).

    With several files the same HDU selection applies to each. Raises FitsError, naming the
    file and HDU, for corrupt or truncated files, malformed headers (including WCS cards and
    axis counts above MAX_AXES), missing HDUs, tables, zero-size or cube data and mismatched
    shapes.
    """
    planes: list[np.ndarray] = []
    labels: list[str] = []
    wcs: WCS | None = None
    for path in paths:
        # astropy reports truncation as a warning before failing: keep it for the message
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AstropyWarning)
            try:
                with fits.open(path, memmap=False) as hdul:
                    for key in (keys or [None]):
                        hdu = _select(hdul, key, path)
                        label = str(hdul.index_of(hdu)) if key is None else hdu_label([key])
                        planes.append(_image_data(hdu, path, label))
                        labels.append(label)
                        if len(planes) == 1:
                            wcs = _quiet_wcs(hdu.header, f"{path}: HDU {label}")
            except FitsError:
                raise
            except (OSError, ValueError, IndexError, *_HEADER_ERRORS) as err:
                notes = "; ".join(str(w.message) for w in caught)
                hint = ("its structure cards (SIMPLE, XTENSION, BITPIX, NAXIS) cannot be "
                        "interpreted; " if isinstance(err, AttributeError) else "")
                raise FitsError(f"{path}: not a readable FITS file ({hint}{type(err).__name__}: "
                                f"{err}{'; ' + notes if notes else ''})") from err
    shapes = {p.shape for p in planes}
    if len(shapes) > 1:
        raise FitsError(f"{', '.join(map(str, paths))}: channel shapes differ "
                        f"{[p.shape for p in planes]}")
    hdu = ",".join(labels[:len(labels) // len(paths)])  # the same selection in every file
    return FitsImage(pixels=np.stack(planes, axis=-1), wcs=wcs, hdu=hdu)


def image_center(image: FitsImage) -> tuple[float | None, float | None]:
    """ICRS RA, Dec (degrees) of the image centre, or (None, None) without a celestial WCS."""
    if image.wcs is None:
        return None, None
    h, w = image.pixels.shape[:2]
    sky = image.wcs.pixel_to_world((w - 1) / 2, (h - 1) / 2).icrs  # galactic WCS too
    return float(sky.ra.deg), float(sky.dec.deg)


def sky_to_pixel(wcs: WCS, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0-based pixel (x, y) of ICRS positions (degrees) on a frame, vectorised.

    Goes through SkyCoord, so frames whose WCS is in another celestial frame (FK5, galactic)
    are handled. Positions off the projection come back as NaN.
    """
    from astropy.coordinates import SkyCoord
    from astropy.wcs.utils import skycoord_to_pixel

    x, y = skycoord_to_pixel(SkyCoord(np.asarray(ra), np.asarray(dec), unit="deg"), wcs)
    return np.asarray(x, dtype=float), np.asarray(y, dtype=float)


def on_frame(x: np.ndarray, y: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Whether pixel positions fall on a frame of shape (H, W) (pixel centres at integers)."""
    h, w = shape
    with np.errstate(invalid="ignore"):
        return np.isfinite(x) & np.isfinite(y) & (x >= -0.5) & (x < w - 0.5) \
            & (y >= -0.5) & (y < h - 0.5)


def cut(image: FitsImage, row: CatalogRow, xy: tuple[float, float], size: int) -> np.ndarray:
    """A ``(size, size, C)`` cutout centred on pixel ``xy`` (the row's position).

    Parts beyond the frame edge are NaN (then replaced and counted by the stretch); a
    position off the frame raises FitsError.
    """
    if size > MAX_CUTOUT_SIDE:
        raise FitsError(f"catalogue line {row.line} asks for a {size} x {size} cutout, more "
                        f"than {MAX_CUTOUT_SIDE} pixels a side")
    planes = []
    for c in range(image.pixels.shape[-1]):
        try:
            cutout = Cutout2D(image.pixels[..., c], xy, (size, size), mode="partial",
                              fill_value=np.nan, copy=True)
        except (NoOverlapError, ValueError) as err:
            raise FitsError(f"catalogue line {row.line} (ra={row.ra}, dec={row.dec}) is "
                            f"outside the frame ({err})") from err
        planes.append(cutout.data)
    return np.stack(planes, axis=-1)


def read_catalog(path: Path) -> list[CatalogRow]:
    """Rows of a CSV with columns ``ra,dec[,size][,id]`` (degrees, pixels).

    Without an id column the id is ``J<ra:.5f><dec:+.5f>``. Raises ValueError naming the line
    for a missing column, a non-number, a position out of range or a repeated id.
    """
    rows: list[CatalogRow] = []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = {f.strip().lower(): f for f in reader.fieldnames or []}
        if "ra" not in fields or "dec" not in fields:
            raise ValueError(f"{path}: catalogue needs 'ra' and 'dec' columns, got "
                             f"{reader.fieldnames}")
        for line, record in enumerate(reader, start=2):
            rows.append(_catalog_row(path, line, record, fields))
    repeated = [cid for cid, n in Counter(r.id for r in rows).items() if n > 1]
    if repeated:
        raise ValueError(f"{path}: ids repeated in the catalogue: {repeated[:10]}")
    return rows


def _catalog_row(path: Path, line: int, record: dict[str, str],
                 fields: dict[str, str]) -> CatalogRow:
    def number(name: str) -> float:
        text = (record.get(fields[name]) or "").strip()
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{path}:{line}: {name} {text!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{path}:{line}: {name} must be finite, got {text!r}")
        return value

    ra, dec = number("ra"), number("dec")
    if not (0 <= ra < 360 and -90 <= dec <= 90):
        raise ValueError(f"{path}:{line}: position ra={ra}, dec={dec} is out of range")
    size = None
    if "size" in fields and (record.get(fields["size"]) or "").strip():
        size_value = number("size")
        if size_value < 1 or size_value != int(size_value):
            raise ValueError(f"{path}:{line}: size must be a positive integer, got {size_value}")
        size = int(size_value)
    cid = (record.get(fields["id"]) or "").strip() if "id" in fields else ""
    return CatalogRow(line=line, ra=ra, dec=dec, size=size, id=cid or f"J{ra:.5f}{dec:+.5f}")


def file_id(paths: Sequence[Path]) -> str:
    """Id of a whole-image object: the first file's name without FITS suffixes."""
    return re.sub(r"(\.fits?|\.fz|\.gz)+$", "", paths[0].name, flags=re.IGNORECASE)


def first_shape(objects: Sequence[Sequence[Path]],
                keys: Sequence[HduKey] | None) -> tuple[int, int] | None:
    """(H, W) of the first object that reads; None if none does (each then fails per item)."""
    for paths in objects:
        try:
            return read_fits(paths, keys).pixels.shape[:2]
        except FitsError as err:
            log.debug("size probe skipped %s: %s", paths[0], err)
    return None
