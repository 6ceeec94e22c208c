"""Cutouts made by ESA's Cutana (or images_to_zarr): Zarr v3 ``images`` + Parquet metadata.

Cutana's zarr output is a folder holding one ``batch_*/images.zarr`` per worker process, each a
Zarr v3 group with an ``images`` array and a sibling ``images_metadata.parquet`` whose rows
(``source_id``, ``ra``, ``dec``, ...) describe the images in order. Cutana writes
``(N, H, W, C)``; ``images_to_zarr`` run on a folder of files writes ``(N, C, H, W)``.
``layout="auto"`` tells them apart by the channel axis (at most :data:`MAX_CHANNELS` long,
beside two equal or longer image axes) and refuses to guess when both readings fit.
Reading Parquet needs pyarrow (``pip install 'anomalymatch-labelstudio[esa]'``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from import_tools.array_reader import ArrayInputError, ArrayItem

Layout = Literal["auto", "nhwc", "nchw"]
Order = Literal["nhwc", "nchw"]
LAYOUTS: tuple[str, ...] = ("auto", "nhwc", "nchw")
MAX_CHANNELS = 16  # an axis this short is channels, not pixels
ID_COLUMNS = ("source_id", "SourceID", "id")
FILE_COLUMNS = ("filename", "original_filename")  # images_to_zarr on files: id = file stem


@dataclass(frozen=True)
class CutanaBatch:
    """One ``images.zarr`` of a Cutana output: its layout and, per image, id and position."""

    zarr: Path
    layout: Order
    ids: tuple[str, ...]
    ra: tuple[float | None, ...]
    dec: tuple[float | None, ...]
    dtype: str
    hwc: tuple[int, int, int]


def find_batches(path: Path) -> list[Path]:
    """The ``*.zarr`` stores of a Cutana output folder, or ``[path]`` for one store."""
    if not path.exists():
        raise ArrayInputError(f"{path}: no such file or folder")
    if path.suffix == ".zarr" or (path / "zarr.json").exists():
        return [path]
    stores = sorted(p for p in path.rglob("*.zarr") if p.is_dir())
    if not stores:
        raise ArrayInputError(f"{path}: no *.zarr store inside; give Cutana's output_dir (run "
                              "with output_format='zarr') or one images.zarr")
    return stores


def metadata_path(store: Path) -> Path:
    """The Parquet side-car images_to_zarr writes next to ``<name>.zarr``."""
    return store.with_name(f"{store.stem}_metadata.parquet")


def _read_metadata(store: Path, n: int) -> Any:
    path = metadata_path(store)
    if not path.exists():
        raise ArrayInputError(f"{store}: no metadata file {path.name} beside it (Cutana and "
                              "images_to_zarr write one); cannot tell the images' ids")
    try:
        import pandas as pd

        table = pd.read_parquet(path)
    except ImportError as err:
        raise ArrayInputError(f"{path}: reading Parquet needs pyarrow: pip install "
                              "'anomalymatch-labelstudio[esa]'") from err
    except (OSError, ValueError) as err:
        raise ArrayInputError(f"{path}: not a readable Parquet file ({err})") from err
    if len(table) != n:
        raise ArrayInputError(f"{path}: {len(table)} metadata rows for {n} images in {store}")
    return table


def _ids(table: Any, store: Path) -> tuple[str, ...]:
    column = next((c for c in ID_COLUMNS + FILE_COLUMNS if c in table.columns), None)
    if column is None:
        raise ArrayInputError(f"{metadata_path(store)}: no id column (one of "
                              f"{', '.join(ID_COLUMNS + FILE_COLUMNS)}); columns are "
                              f"{list(table.columns)}")
    values = [str(v) for v in table[column].tolist()]
    ids = tuple(Path(v).stem for v in values) if column in FILE_COLUMNS else tuple(values)
    if len(set(ids)) != len(ids):
        raise ArrayInputError(f"{metadata_path(store)}: column {column!r} repeats ids")
    return ids


def _coordinate(table: Any, names: Sequence[str]) -> tuple[float | None, ...]:
    column = next((c for c in names if c in table.columns), None)
    if column is None:
        return (None,) * len(table)
    out: list[float | None] = []
    for value in table[column].tolist():
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        out.append(number if math.isfinite(number) else None)
    return tuple(out)


def _layout(shape: tuple[int, ...], wanted: Layout, store: Path) -> Order:
    if len(shape) != 4:
        raise ArrayInputError(f"{store}: images has shape {shape}; need 4 axes "
                              "(N, H, W, C) or (N, C, H, W)")
    if wanted != "auto":
        return wanted
    nhwc = shape[3] <= MAX_CHANNELS and (shape[1] == shape[2] or shape[1] > MAX_CHANNELS)
    nchw = shape[1] <= MAX_CHANNELS and (shape[2] == shape[3] or shape[3] > MAX_CHANNELS)
    if nhwc != nchw:
        return "nhwc" if nhwc else "nchw"
    raise ArrayInputError(f"{store}: cannot tell the channel axis of images {shape}; pass "
                          "--layout nhwc (Cutana) or nchw (images_to_zarr on files)")


def inspect_batch(store: Path, layout: Layout = "auto") -> CutanaBatch:
    """Open one store's ``images`` array and metadata without reading any pixel."""
    import zarr

    try:
        images = zarr.open_group(str(store), mode="r")["images"]
    except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
        raise ArrayInputError(f"{store}: not a Zarr group with an 'images' array "
                              f"({err})") from err
    shape = tuple(int(s) for s in images.shape)
    order = _layout(shape, layout, store)
    n, hwc = shape[0], shape[1:] if order == "nhwc" else (shape[2], shape[3], shape[1])
    table = _read_metadata(store, n)
    return CutanaBatch(zarr=store, layout=order, ids=_ids(table, store),
                       ra=_coordinate(table, ("ra", "RA")),
                       dec=_coordinate(table, ("dec", "Dec", "DEC")),
                       dtype=str(images.dtype), hwc=(int(hwc[0]), int(hwc[1]), int(hwc[2])))


def read_images(store: Path, layout: Order, indices: Sequence[int],
                ids: Sequence[str], ra: Sequence[float | None],
                dec: Sequence[float | None]) -> Iterator[ArrayItem]:
    """Images at sorted ``indices`` as ``(H, W, C)``, read as one spanning slice."""
    import zarr

    if not indices:
        return
    images = zarr.open_group(str(store), mode="r")["images"]
    lo, hi = indices[0], indices[-1] + 1
    block = np.asarray(images[lo:hi])
    if layout == "nchw":
        block = block.transpose(0, 2, 3, 1)
    for i, cid, r, d in zip(indices, ids, ra, dec, strict=True):
        yield ArrayItem(id=cid, pixels=block[i - lo], where=f"images[{i}]", ra=r, dec=d)


def default_stretch(batch: CutanaBatch) -> str:
    """``none`` for uint8, ``unit`` for floats in [0, 1] (Cutana's normalised output), else
    ``asinh`` (unnormalised fluxes, as ``amls import fits`` does); decided on the first image."""
    if batch.dtype == "uint8" or not batch.ids:
        return "none"
    first = next(read_images(batch.zarr, batch.layout, [0], batch.ids[:1], [None], [None]))
    finite = first.pixels[np.isfinite(first.pixels)]
    if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
        return "unit"
    return "asinh"
