"""The cutout store: one HDF5 file of uint8 images `(N, H, W, C)` with string ids.

Layout (``format_version`` 1)::

    /images          uint8 (N, H, W, C), chunked along N, lzf-compressed
    /ra, /dec        float64 (N,), NaN when unknown (degrees)
    /ids             UTF-8 text column (see below), unique per store
    /source, /hdu    UTF-8 text columns: the file a cutout came from, its HDU ("" if none)
    attrs            format_version, stretch (JSON), created (ISO 8601, UTC), chunk_images,
                     invariance (the weak-view symmetries that suit the data: "dihedral" for
                     sky cutouts, "flip" for upright photographs; absent = "dihedral")

Text columns are stored as two datasets, ``<name>/data`` (uint8, the concatenated UTF-8
bytes) and ``<name>/ends`` (int64, end offset of each row), not as HDF5 variable-length
strings: the HDF5 SWMR writer may not append to variable-length data, and SWMR is what
lets a scorer read a store while an importer is still appending to it.

Concurrency: one writer (mode "a", which switches the file to SWMR mode) and any number of
readers (mode "r", opened with ``swmr=True``; call :meth:`CutoutStore.refresh` to see rows
appended since opening). A store's length is the shortest row-wise dataset, so a reader
never sees a row whose image or metadata is not yet written.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ml_backend.core.config import check_center_crop, check_invariance
from ml_backend.core.sources import as_index_array, prefetch_batches
from ml_backend.core.text_column import TextColumn

log = logging.getLogger(__name__)

FORMAT_NAME = "amls-cutout-store"
FORMAT_VERSION = 1
# Image compression. lzf is the fastest of lzf / gzip 1-4: on sparse radio cutouts (FIRST)
# it shrinks files ~65x; on noise-dominated optical cutouts it saves ~2% and reads ~10x slower
# than no compression, so create(..., compression=None) suits those.
COMPRESSION = "lzf"
COMPRESSIONS: dict[str, tuple[str | None, int | None]] = {
    "lzf": ("lzf", None), "gzip": ("gzip", 1), "none": (None, None)}
_MAX_CHUNK_BYTES = 4 * 2**20  # keep one chunk small enough for cheap random access
_CHUNK_CACHE_BYTES = 64 * 2**20
_TEXT_COLUMNS = ("ids", "source", "hdu")
_FLOAT_COLUMNS = ("ra", "dec")


class CutoutStore:
    """An HDF5 cutout store; see the module docstring for the layout and concurrency."""

    def __init__(self, file: h5py.File, path: Path) -> None:
        self._file = file
        self._path = path
        self._images: h5py.Dataset = file["images"]
        self._floats = {name: file[name] for name in _FLOAT_COLUMNS}
        self._texts = {name: TextColumn(file[name]) for name in _TEXT_COLUMNS}
        self._stretch: dict[str, Any] = json.loads(file.attrs["stretch"])
        self._ids_cache: list[str] | None = None
        self._index_cache: dict[str, int] | None = None

    # ---- opening -------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, *, height: int, width: int, channels: int,
               stretch: dict[str, Any], chunk_images: int = 16,
               compression: str = COMPRESSION, invariance: str = "dihedral",
               preview_stretch: dict[str, Any] | None = None,
               preview_crop: float = 1.0) -> CutoutStore:
        """Create an empty store at `path` (error if it exists), opened for appending.

        `stretch` describes how science pixels became uint8, e.g. ``{"name": "none"}``.
        `chunk_images` images per HDF5 chunk, reduced so that a chunk stays under 4 MiB.
        `compression` of the images: "lzf" (default), "gzip" (level 1) or "none".
        `invariance`: what training on this data should default to (`TrainConfig.invariance`).
        `preview_stretch`: the display stretch the import tools write previews with, applied
        to these uint8 pixels for eyes only (default ``{"name": "none"}``: the pixels as is).
        `preview_crop`: the central fraction of each side the previews show (1: all of it).
        """
        path = Path(path)
        if path.exists():
            raise FileExistsError(f"cutout store {path} already exists")
        if min(height, width, channels, chunk_images) < 1:
            raise ValueError(f"height, width, channels and chunk_images must be >= 1, got "
                             f"{(height, width, channels, chunk_images)}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {sorted(COMPRESSIONS)}, "
                             f"got {compression!r}")
        if "name" not in stretch:
            raise ValueError(f"stretch must have a 'name' key, got {stretch!r}")
        check_invariance(invariance)
        check_center_crop(preview_crop)
        image_bytes = height * width * channels
        chunk_images = max(1, min(chunk_images, _MAX_CHUNK_BYTES // image_bytes))
        file = h5py.File(path, "w-", libver="latest", rdcc_nbytes=_CHUNK_CACHE_BYTES)
        try:
            file.attrs["format"] = FORMAT_NAME
            file.attrs["format_version"] = FORMAT_VERSION
            file.attrs["stretch"] = json.dumps(stretch, sort_keys=True)
            file.attrs["created"] = datetime.now(UTC).isoformat(timespec="seconds")
            file.attrs["chunk_images"] = chunk_images
            file.attrs["invariance"] = invariance
            file.attrs["preview_stretch"] = json.dumps(preview_stretch or {"name": "none"},
                                                       sort_keys=True)
            file.attrs["preview_crop"] = float(preview_crop)
            file.create_dataset("images", shape=(0, height, width, channels),
                                maxshape=(None, height, width, channels), dtype=np.uint8,
                                chunks=(chunk_images, height, width, channels),
                                compression=COMPRESSIONS[compression][0],
                                compression_opts=COMPRESSIONS[compression][1])
            for name in _FLOAT_COLUMNS:
                file.create_dataset(name, shape=(0,), maxshape=(None,), dtype=np.float64,
                                    chunks=(8192,), compression=COMPRESSION)
            for name in _TEXT_COLUMNS:
                TextColumn.create(file, name)
            file.swmr_mode = True
        except BaseException:
            file.close()
            path.unlink(missing_ok=True)
            raise
        log.info("created cutout store %s (%dx%dx%d, stretch %s)", path, height, width,
                 channels, stretch.get("name"))
        return cls(file, path)

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> CutoutStore:
        """Open an existing store: mode "r" (SWMR reader) or "a" (the single writer)."""
        path = Path(path)
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        if not path.is_file():
            raise FileNotFoundError(f"cutout store {path} does not exist")
        try:
            if mode == "r":
                file = h5py.File(path, "r", libver="latest", swmr=True,
                                 rdcc_nbytes=_CHUNK_CACHE_BYTES)
            else:
                file = h5py.File(path, "a", libver="latest", rdcc_nbytes=_CHUNK_CACHE_BYTES)
        except OSError as err:
            raise ValueError(f"{path} is not a readable HDF5 file ({err}); if another process "
                             "writes it, only one writer at a time is allowed") from err
        try:
            cls._check_format(file, path)
            store = cls(file, path)
            if mode == "a":
                store._repair()
                _start_swmr(file, path)
        except BaseException:
            file.close()
            raise
        return store

    @staticmethod
    def _check_format(file: h5py.File, path: Path) -> None:
        if file.attrs.get("format") != FORMAT_NAME:
            raise ValueError(f"{path} is an HDF5 file but not a cutout store "
                             "(build one with `amls store build` or `amls import`)")
        version = int(file.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise ValueError(f"{path} has store format_version {version}; this version of "
                             f"amls reads format_version {FORMAT_VERSION}")

    def _repair(self) -> None:
        """Truncate rows left half-written by an interrupted append."""
        n = len(self)
        lengths = self._row_lengths()
        if any(length != n for length in lengths):
            log.warning("store %s: truncating a half-written append to %d complete rows "
                        "(dataset lengths were %s)", self._path, n, lengths)
            self._images.resize(n, axis=0)
            for ds in self._floats.values():
                ds.resize((n,))
            for col in self._texts.values():
                col.truncate(n)

    # ---- basic properties ----------------------------------------------------------------

    def _row_lengths(self) -> list[int]:
        return ([self._images.shape[0]] + [ds.shape[0] for ds in self._floats.values()]
                + [len(col) for col in self._texts.values()])

    def __len__(self) -> int:
        return min(self._row_lengths())

    def __enter__(self) -> CutoutStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CutoutStore({str(self._path)!r}, n={len(self)}, shape={self.shape})"

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        _, h, w, c = self._images.shape
        return (h, w, c)

    @property
    def channels(self) -> int:
        return self.shape[2]

    @property
    def stretch(self) -> dict[str, Any]:
        return dict(self._stretch)

    @property
    def invariance(self) -> str:
        """The weak-view invariance this data suits (stores made before it existed: dihedral)."""
        return str(self._file.attrs.get("invariance", "dihedral"))

    @property
    def preview_stretch(self) -> dict[str, Any]:
        """The display stretch of the previews (stores made before it existed: none)."""
        return json.loads(self._file.attrs.get("preview_stretch", '{"name": "none"}'))

    @property
    def preview_crop(self) -> float:
        """The central fraction of each side the previews show (stores before it: 1)."""
        return float(self._file.attrs.get("preview_crop", 1.0))

    def check_recorded(self, *, invariance: str | None = None,
                       preview_stretch: dict[str, Any] | None = None,
                       preview_crop: float | None = None) -> None:
        """ValueError naming the first given setting that differs from what the store records
        (an append with it would mix two kinds of data, or two looks, in one project)."""
        if invariance is not None and self.invariance != invariance:
            raise ValueError(f"store {self.path} records invariance {self.invariance}; this "
                             f"import asks for {invariance}. Use another store or drop "
                             "--invariance.")
        if preview_stretch is not None and self.preview_stretch != preview_stretch:
            raise ValueError(f"store {self.path} wrote its previews with stretch "
                             f"{self.preview_stretch}; this import asks for {preview_stretch}. "
                             "Use another store or the same --preview-stretch.")
        if preview_crop is not None and self.preview_crop != preview_crop:
            raise ValueError(f"store {self.path} frames its previews on crop "
                             f"{self.preview_crop}; this import asks for {preview_crop}. Use "
                             "another store or the same --preview-crop.")

    @property
    def created(self) -> str:
        return str(self._file.attrs["created"])

    def refresh(self) -> None:
        """Reader: see rows appended by the writer since this store was opened."""
        for ds in (self._images, *self._floats.values()):
            ds.refresh()
        for col in self._texts.values():
            col.refresh()
        if self._ids_cache is not None and len(self._ids_cache) != len(self):
            self._ids_cache = self._index_cache = None

    # ---- ids -----------------------------------------------------------------------------

    def ids(self) -> list[str]:
        """All cutout ids in row order (cached; the list must not be modified)."""
        if self._ids_cache is None:
            self._ids_cache = self._texts["ids"].span(0, len(self))
        return self._ids_cache

    def _index(self) -> dict[str, int]:
        if self._index_cache is None:
            self._index_cache = {cid: i for i, cid in enumerate(self.ids())}
        return self._index_cache

    def __contains__(self, cutout_id: object) -> bool:
        return cutout_id in self._index()

    def index_of(self, cutout_id: str) -> int:
        try:
            return self._index()[cutout_id]
        except KeyError:
            raise KeyError(f"cutout id {cutout_id!r} is not in store {self._path}") from None

    def indices_of(self, ids: Sequence[str]) -> np.ndarray:
        """Row indices (int64) of `ids`; KeyError naming the first few unknown ids."""
        index = self._index()
        missing = [cid for cid in ids if cid not in index]
        if missing:
            raise KeyError(f"{len(missing)} cutout ids not in store {self._path}, e.g. "
                           f"{missing[:5]}")
        return np.fromiter((index[cid] for cid in ids), dtype=np.int64, count=len(ids))

    # ---- reading -------------------------------------------------------------------------

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Images at `indices` as uint8 `(n, H, W, C)`, in the order given.

        Indices may be unsorted and repeated. Rows are read chunk by chunk: each HDF5 chunk
        that holds any requested row is read once as one slice.
        """
        idx = as_index_array(indices, len(self), f"store {self._path}")
        out = np.empty((idx.size, *self.shape), dtype=np.uint8)
        if idx.size == 0:
            return out
        unique, inverse = np.unique(idx, return_inverse=True)
        rows = np.empty((unique.size, *self.shape), dtype=np.uint8)
        chunk = self._images.chunks[0]
        groups = np.flatnonzero(np.diff(unique // chunk)) + 1
        for part, where in zip(np.split(unique, groups), np.split(np.arange(unique.size), groups),
                               strict=True):
            lo, hi = int(part[0]), int(part[-1]) + 1
            rows[where] = self._images[lo:hi][part - lo]
        out[:] = rows[inverse]
        return out

    def read_ids(self, ids: Sequence[str]) -> np.ndarray:
        return self.read(self.indices_of(ids))

    def meta(self, index: int) -> dict[str, Any]:
        """Metadata of one row: ra, dec (float degrees, NaN unknown), source, hdu (str)."""
        table = self.meta_table([index])
        return {"ra": float(table["ra"][0]), "dec": float(table["dec"][0]),
                "source": table["source"][0], "hdu": table["hdu"][0]}

    def meta_table(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Columns ra, dec (float64) and source, hdu (object arrays of str) for `indices`."""
        idx = as_index_array(indices, len(self), f"store {self._path}")
        table: dict[str, np.ndarray] = {}
        lo, hi = (int(idx.min()), int(idx.max()) + 1) if idx.size else (0, 0)
        for name, ds in self._floats.items():
            table[name] = ds[lo:hi][idx - lo]
        for name in ("source", "hdu"):
            table[name] = np.array(self._texts[name].get(idx), dtype=object)
        return table

    def iter_batches(self, batch_size: int, *, indices: Sequence[int] | np.ndarray | None = None,
                     prefetch: int = 2) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield `(indices, images)` batches in order, read ahead by a background thread.

        At most `prefetch` batches wait in memory. An exception in the reader thread is
        raised in the consumer; leaving the loop early stops the thread.
        """
        return prefetch_batches(self, batch_size, indices, prefetch)

    # ---- writing -------------------------------------------------------------------------

    def append(self, ids: Sequence[str], images: np.ndarray, *,
               ra: Sequence[float] | np.ndarray | None = None,
               dec: Sequence[float] | np.ndarray | None = None,
               source: Sequence[str] | str | None = None,
               hdu: Sequence[str] | str | None = None) -> int:
        """Append rows; returns the number of rows added. Nothing is written on a bad batch.

        `images` uint8 `(n, H, W, C)` matching the store. `ids` must be new and unique.
        `ra`, `dec` in degrees (None = NaN); `source`, `hdu` a string per row or one string
        for all rows (None = "").
        """
        if self._file.mode != "r+":
            raise PermissionError(f"store {self._path} is open read-only; open it with mode 'a'")
        ids = [str(cid) for cid in ids]
        n = len(ids)
        self._check_images(images, n)
        self._check_new_ids(ids)
        columns = {"ra": _float_column(ra, n, "ra"), "dec": _float_column(dec, n, "dec"),
                   "source": _text_column(source, n, "source"), "hdu": _text_column(hdu, n, "hdu")}
        if n == 0:
            return 0
        start = len(self)
        self._images.resize(start + n, axis=0)
        self._images[start:] = images
        for name in _FLOAT_COLUMNS:
            self._floats[name].resize((start + n,))
            self._floats[name][start:] = columns[name]
        self._texts["source"].append(columns["source"], start)
        self._texts["hdu"].append(columns["hdu"], start)
        self._texts["ids"].append(ids, start)  # last: a row counts once its id exists
        self._file.flush()
        if self._ids_cache is not None:
            self._ids_cache.extend(ids)
        if self._index_cache is not None:
            self._index_cache.update((cid, start + i) for i, cid in enumerate(ids))
        return n

    def _check_images(self, images: np.ndarray, n: int) -> None:
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            dtype = getattr(images, "dtype", type(images).__name__)
            raise ValueError(f"images must be a uint8 numpy array, got {dtype} "
                             f"(store {self._path})")
        if images.shape != (n, *self.shape):
            raise ValueError(f"images must have shape {(n, *self.shape)} (n, H, W, C) for "
                             f"{n} ids in store {self._path}, got {images.shape}")

    def _check_new_ids(self, ids: list[str]) -> None:
        repeated = sorted(cid for cid, count in Counter(ids).items() if count > 1)
        if repeated:
            raise ValueError(f"ids repeated within the batch: {repeated[:10]}")
        existing = [cid for cid in ids if cid in self]
        if existing:
            raise ValueError(f"{len(existing)} ids already in store {self._path}: "
                             f"{existing[:10]}")


def _start_swmr(file: h5py.File, path: Path) -> None:
    try:
        file.swmr_mode = True
    except (RuntimeError, OSError) as err:
        raise ValueError(f"cannot open {path} for appending ({err}): close other handles on "
                         "it in this process first (only one writer, readers in other "
                         "processes are fine)") from err


def _float_column(values: Sequence[float] | np.ndarray | None, n: int, name: str) -> np.ndarray:
    if values is None:
        return np.full(n, np.nan)
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size != n:
        raise ValueError(f"{name} has {arr.size} values for {n} images")
    return arr


def _text_column(values: Sequence[str] | str | None, n: int, name: str) -> list[str]:
    if values is None:
        return [""] * n
    if isinstance(values, str):
        return [values] * n
    out = [str(v) for v in values]
    if len(out) != n:
        raise ValueError(f"{name} has {len(out)} values for {n} images")
    return out
