"""Jobs: small picklable descriptions of input items that a worker process decodes.

Each job's ``load()`` yields :class:`RawItem` (science pixels plus provenance) or a
:class:`~import_tools.report.Failure` for an item that cannot be decoded; it never raises for
bad input, so one corrupt file costs one report row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from import_tools import array_reader, cutana_reader, fits_reader
from import_tools.report import Failure


@dataclass(frozen=True)
class RawItem:
    """Decoded science pixels ``(H, W, C)`` and where they came from."""

    id: str
    pixels: np.ndarray
    source: str
    hdu: str
    ra: float | None = None
    dec: float | None = None


class Job(Protocol):
    def load(self) -> Iterator[RawItem | Failure]: ...


@dataclass(frozen=True)
class FitsImageJob:
    """One object from whole images: one file (C = number of HDUs) or several files."""

    paths: tuple[Path, ...]
    keys: tuple[fits_reader.HduKey, ...] | None
    id: str

    def load(self) -> Iterator[RawItem | Failure]:
        source = ",".join(map(str, self.paths))
        try:
            image = fits_reader.read_fits(self.paths, self.keys)
        except (fits_reader.FitsError, MemoryError) as err:
            yield Failure(source, fits_reader.hdu_label(self.keys), _reason(err))
            return
        ra, dec = fits_reader.image_center(image)
        yield RawItem(self.id, image.pixels, source, image.hdu, ra, dec)


_frame_cache: dict[tuple, fits_reader.FitsImage] = {}


def _frame(paths: tuple[Path, ...], keys: tuple | None) -> fits_reader.FitsImage:
    """The frame, kept while one worker cuts successive catalogue chunks from it."""
    key = (paths, keys)
    if key not in _frame_cache:
        _frame_cache.clear()
        _frame_cache[key] = fits_reader.read_fits(paths, keys)
    return _frame_cache[key]


@dataclass(frozen=True)
class FitsCatalogJob:
    """Cutouts at catalogue rows from one frame (rows already known to fall on it)."""

    paths: tuple[Path, ...]
    keys: tuple[fits_reader.HduKey, ...] | None
    rows: tuple[fits_reader.CatalogRow, ...]
    default_size: int

    def load(self) -> Iterator[RawItem | Failure]:
        source = ",".join(map(str, self.paths))
        try:
            frame = _frame(self.paths, self.keys)
        except (fits_reader.FitsError, MemoryError) as err:
            for row in self.rows:
                yield Failure(source, f"catalogue line {row.line}", _reason(err))
            return
        if frame.wcs is None:
            for row in self.rows:
                yield Failure(source, f"catalogue line {row.line}", "frame has no celestial WCS")
            return
        xs, ys = fits_reader.sky_to_pixel(frame.wcs, np.array([r.ra for r in self.rows]),
                                          np.array([r.dec for r in self.rows]))
        for row, x, y in zip(self.rows, xs, ys, strict=True):
            try:
                pixels = fits_reader.cut(frame, row, (x, y), row.size or self.default_size)
            except (fits_reader.FitsError, MemoryError) as err:
                yield Failure(source, f"catalogue line {row.line}", _reason(err))
                continue
            yield RawItem(row.id, pixels, source, frame.hdu, row.ra, row.dec)


@dataclass(frozen=True)
class StackJob:
    """Sorted indices of an HDF5 / Zarr image stack and their ids (only this job's ids)."""

    kind: array_reader.Kind
    path: Path
    dataset: str
    indices: tuple[int, ...]
    ids: tuple[str, ...]

    def load(self) -> Iterator[RawItem | Failure]:
        yield from _array_items(self.path, array_reader.read_stack(
            self.kind, self.path, self.dataset, self.indices, self.ids))


@dataclass(frozen=True)
class GroupJob:
    """Member groups of a one-group-per-image HDF5 / Zarr file."""

    kind: array_reader.Kind
    path: Path
    group: str
    image_key: str
    names: tuple[str, ...]

    def load(self) -> Iterator[RawItem | Failure]:
        yield from _array_items(self.path, array_reader.read_groups(
            self.kind, self.path, self.group, self.image_key, self.names))


@dataclass(frozen=True)
class CutanaJob:
    """Sorted indices of one Cutana ``images.zarr`` with their ids and positions."""

    zarr: Path
    layout: cutana_reader.Order
    indices: tuple[int, ...]
    ids: tuple[str, ...]
    ra: tuple[float | None, ...]
    dec: tuple[float | None, ...]

    def load(self) -> Iterator[RawItem | Failure]:
        yield from _array_items(self.zarr, cutana_reader.read_images(
            self.zarr, self.layout, self.indices, self.ids, self.ra, self.dec))


def _array_items(path: Path, items: Iterator) -> Iterator[RawItem | Failure]:
    try:
        for item in items:
            if isinstance(item, array_reader.ArrayInputError):
                yield Failure(str(path), "", str(item))
            else:
                yield RawItem(item.id, item.pixels, str(path), item.where, item.ra, item.dec)
    except (array_reader.ArrayInputError, OSError, ValueError, MemoryError) as err:
        yield Failure(str(path), "", f"read failed: {_reason(err)}")


def _reason(err: BaseException) -> str:
    """The report text of an error; MemoryError has no message of its own."""
    if isinstance(err, MemoryError):
        return f"out of memory reading it ({err or 'no detail'})"
    return str(err)
