"""Build a cutout store from a folder tree of PNG / JPEG / TIFF images.

Ids are the image paths relative to the folder, without extension, with "/" separators
(``spirals/NGC1300.png`` -> ``spirals/NGC1300``). 8-bit images are stored as they are
(stretch ``{"name": "none"}``). 16-bit, 32-bit integer and float images are scaled to uint8
by their own minimum and maximum (NaN pixels -> 0; a constant image -> 0); the store's
stretch then records that (``{"name": "minmax", "per_image": true, ...}``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ml_backend.core.progress import progress
from ml_backend.core.store import COMPRESSION, CutoutStore

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})
# Pillow modes with more than 8 bits per sample (16-bit PNG/TIFF open as "I" or "I;16*").
HIGH_BIT_MODES = frozenset({"I", "F", "I;16", "I;16B", "I;16L", "I;16N"})
STRETCH_NONE: dict[str, Any] = {"name": "none"}
STRETCH_MINMAX: dict[str, Any] = {
    "name": "minmax", "per_image": True,
    "applies_to": "images with more than 8 bits per sample; 8-bit images are stored unchanged",
}
# What a broken or unsupported file raises in Pillow (SyntaxError: some corrupt PNGs).
_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
_BATCH = 256


@dataclass
class BuildReport:
    """Outcome of a build: rows added, ids already in the store, files that failed."""

    added: int = 0
    skipped_existing: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def summary(self) -> str:
        return (f"{self.added} images added, {self.skipped_existing} already in the store, "
                f"{len(self.failed)} failed")


class BuildFailed(ValueError):
    """Some files could not be read (raised unless `skip_bad`); the good ones were stored."""

    def __init__(self, report: BuildReport) -> None:
        shown = "; ".join(f"{path}: {reason}" for path, reason in report.failed[:5])
        more = f" (and {len(report.failed) - 5} more)" if len(report.failed) > 5 else ""
        super().__init__(f"{len(report.failed)} image files failed: {shown}{more}")
        self.report = report


def find_images(images_dir: Path) -> list[Path]:
    """Image files under `images_dir`, recursively, sorted; hidden files and folders skipped."""
    return sorted(
        p for p in images_dir.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(images_dir).parts)
    )


def image_id(path: Path, images_dir: Path) -> str:
    """Relative path without extension, POSIX separators."""
    return path.relative_to(images_dir).with_suffix("").as_posix()


def minmax_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Scale finite pixels linearly so min -> 0 and max -> 255 (rounded); NaN/inf -> 0."""
    values = pixels.astype(np.float64)
    finite = np.isfinite(values)
    out = np.zeros(values.shape, dtype=np.uint8)
    if not finite.any():
        return out
    lo, hi = values[finite].min(), values[finite].max()
    if hi > lo:
        out[finite] = np.rint((values[finite] - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    return out


def load_image(path: Path, *, size: tuple[int, int] | None, channels: int) -> np.ndarray:
    """Decode one file to uint8 `(H, W, channels)`, resized to `size` = (H, W) if given.

    EXIF orientation is applied, as a browser would. Raises OSError / ValueError /
    SyntaxError for unreadable files.
    """
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in HIGH_BIT_MODES:
            grey = Image.fromarray(minmax_to_uint8(np.asarray(img)), mode="L")
            img = grey if channels == 1 else grey.convert("RGB")
        else:
            img = img.convert("L" if channels == 1 else "RGB")
        if size is not None and (img.height, img.width) != size:
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        pixels = np.asarray(img, dtype=np.uint8)
    return pixels.reshape(pixels.shape[0], pixels.shape[1], channels)


def _probe(path: Path) -> tuple[tuple[int, int], bool]:
    """((H, W), more than 8 bits per sample) from the file header, without decoding."""
    with Image.open(path) as img:
        height, width = img.height, img.width
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
            height, width = width, height
        return (height, width), img.mode in HIGH_BIT_MODES


def _check_compatible(store: CutoutStore, stretch: dict[str, Any], channels: int,
                      size: tuple[int, int] | None) -> None:
    if store.channels != channels:
        raise ValueError(f"store {store.path} has {store.channels} channel(s); "
                         f"--channels {channels} differs")
    if size is not None and store.shape[:2] != size:
        raise ValueError(f"store {store.path} holds {store.shape[0]}x{store.shape[1]} images; "
                         f"--size {size[0]} differs")
    ok = store.stretch == stretch or (store.stretch == STRETCH_MINMAX and stretch == STRETCH_NONE)
    if not ok:
        raise ValueError(f"store {store.path} was built with stretch {store.stretch}; these "
                         f"images need {stretch}: use a new store")


def build_store_from_folder(images_dir: str | Path, out_path: str | Path, *,
                            size: int | None = None, channels: int = 3,
                            skip_bad: bool = False, compression: str = COMPRESSION,
                            invariance: str | None = None,
                            preview_stretch: dict[str, Any] | None = None,
                            preview_crop: float | None = None) -> BuildReport:
    """Add every image under `images_dir` to the store `out_path` (created if missing).

    `size`: images are resized to size x size pixels (default: the size of the first new
    image, or the existing store's). `channels`: 1 (grey) or 3 (RGB). Ids already in the
    store are skipped, so re-running is idempotent. Unreadable files (and files whose id
    repeats another file's, e.g. ``a.png`` and ``a.jpg``) are skipped and listed in the
    report; unless `skip_bad`, :class:`BuildFailed` is raised at the end if there were any
    (the readable images are in the store by then). `compression` applies to a new store
    ("lzf", "gzip" or "none"; see :mod:`ml_backend.core.store`). `invariance` is recorded
    in a new store (default "dihedral"); an existing store with another one is refused.
    `preview_stretch` (a stretch spec) and `preview_crop` (the previews' framing) are
    recorded in a new store; an existing store that records others is refused.
    """
    images_dir, out_path = Path(images_dir), Path(out_path)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if size is not None and size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if not images_dir.is_dir():
        raise NotADirectoryError(f"{images_dir} is not a folder")
    report = BuildReport()
    files = _unique_ids(find_images(images_dir), images_dir, report)
    store = CutoutStore.open(out_path, mode="a") if out_path.exists() else None
    try:
        if store is not None:
            store.check_recorded(invariance=invariance, preview_stretch=preview_stretch,
                                 preview_crop=preview_crop)
            new = {cid: p for cid, p in files.items() if cid not in store}
            report.skipped_existing = len(files) - len(new)
            files = new
        todo, shape, high_bit = _probe_all(files, report)
        if todo:
            square = (size, size) if size is not None else None
            stretch = STRETCH_MINMAX if high_bit else STRETCH_NONE
            if high_bit:
                log.warning("%d of %d images have more than 8 bits per sample: each is scaled "
                            "to uint8 by its own min and max", high_bit, len(todo))
            if store is None:
                h, w = square or shape
                out_path.parent.mkdir(parents=True, exist_ok=True)
                store = CutoutStore.create(out_path, height=h, width=w, channels=channels,
                                           stretch=stretch, compression=compression,
                                           invariance=invariance or "dihedral",
                                           preview_stretch=preview_stretch,
                                           preview_crop=preview_crop or 1.0)
            else:
                _check_compatible(store, stretch, channels, square)
            report.added = _add_images(store, todo, report)
    finally:
        if store is not None:
            store.close()
    if not files and not report.skipped_existing and not report.failed:
        log.warning("no PNG/JPEG/TIFF images found under %s", images_dir)
    log.info("%s: %s", out_path, report.summary())
    if report.failed and not skip_bad:
        raise BuildFailed(report)
    return report


def _unique_ids(paths: Sequence[Path], images_dir: Path, report: BuildReport) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in paths:
        cid = image_id(path, images_dir)
        if cid in files:
            report.failed.append((str(path), f"id {cid!r} already taken by {files[cid].name}"))
        else:
            files[cid] = path
    return files


def _probe_all(files: dict[str, Path], report: BuildReport
               ) -> tuple[list[tuple[str, Path]], tuple[int, int], int]:
    """Readable (id, path) pairs, the first one's (H, W), how many are high bit depth."""
    todo: list[tuple[str, Path]] = []
    first_shape = (0, 0)
    high_bit = 0
    for cid, path in files.items():
        try:
            shape, high = _probe(path)
        except _READ_ERRORS as err:
            report.failed.append((str(path), f"{type(err).__name__}: {err}"))
            continue
        if not todo:
            first_shape = shape
        todo.append((cid, path))
        high_bit += high
    return todo, first_shape, high_bit


def _add_images(store: CutoutStore, todo: list[tuple[str, Path]], report: BuildReport) -> int:
    added = 0
    size = store.shape[:2]
    with progress(total=len(todo), desc=f"building {store.path.name}", unit="img") as bar:
        for start in range(0, len(todo), _BATCH):
            ids, images, sources = [], [], []
            for cid, path in todo[start:start + _BATCH]:
                try:
                    images.append(load_image(path, size=size, channels=store.channels))
                except _READ_ERRORS as err:
                    report.failed.append((str(path), f"{type(err).__name__}: {err}"))
                else:
                    ids.append(cid)
                    sources.append(str(path.resolve()))
                bar.update(1)
            if ids:
                added += store.append(ids, np.stack(images), source=sources)
    return added
