"""PNG previews: the store's uint8 pixels as files Label Studio can serve, and their URLs.

A preview may go through a display stretch first (`--preview-stretch`, recorded in the store
as ``preview_stretch``): for eyes only, e.g. ``log`` makes the faint tails of radio sources
on a black sky visible. The store's pixels, which the model sees, are never changed.

A preview may also be framed on the centre crop the model sees (`--preview-crop`, recorded
as ``preview_crop``; the same window as ``TrainConfig.center_crop``): ``<id>.png`` then shows
that window and ``full-field/<id>.png`` the whole cutout, so the full field stays one link
away.

Channel mapping: C = 1 -> greyscale PNG, C = 3 -> RGB PNG, any other C -> greyscale PNG of
channel 0 (the model still sees all channels; the preview shows the first).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image

from ml_backend.core.atomic import atomic_file
from ml_backend.core.config import crop_box
from ml_backend.core.stretch import Stretch
from ml_backend.label_schema import LOCAL_FILES_PREFIX


def preview_relpath(cutout_id: str) -> str:
    """``<id>.png`` relative to the preview root; ValueError if the id could escape it.

    Rejected: empty ids, absolute paths, ``..`` / ``.`` / empty components, backslashes, NUL and
    other control characters. A ``/`` inside an id makes a sub-folder below the root.
    """
    if not cutout_id or any(ord(ch) < 32 for ch in cutout_id) or "\\" in cutout_id:
        raise ValueError(f"id {cutout_id!r} is empty or has control characters / backslashes")
    # split by hand: PurePosixPath would fold "a//b" and "./a" into ids that collide
    if any(part in ("", ".", "..") for part in cutout_id.split("/")):
        raise ValueError(f"id {cutout_id!r} would escape the preview folder (absolute, "
                         "'..', '.' or empty path components)")
    return f"{cutout_id}.png"


def to_preview_image(pixels: np.ndarray) -> Image.Image:
    """A PIL image of uint8 ``(H, W, C)`` pixels using the module's channel mapping."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3:
        raise ValueError(f"previews need uint8 (H, W, C) pixels, got {pixels.dtype} "
                         f"{pixels.shape}")
    if pixels.shape[-1] == 3:
        return Image.fromarray(pixels, mode="RGB")
    return Image.fromarray(np.ascontiguousarray(pixels[..., 0]), mode="L")


FULL_FIELD_DIR = "full-field"  # below the preview root: the whole cutouts of framed previews


@dataclass(frozen=True)
class Preview:
    """The PNG an annotator sees and, for a framed preview, the whole cutout's PNG."""

    path: Path
    full_field: Path | None = None


def write_preview(root: Path, cutout_id: str, pixels: np.ndarray,
                  display: Stretch | None = None, crop: float = 1.0) -> Preview:
    """Write ``<root>/<id>.png`` atomically (temporary file + rename).

    `display` (a stretch of the uint8 values, per channel) is applied to a copy first. With
    `crop` < 1 the PNG shows the central `crop` of each side and ``<root>/full-field/<id>.png``
    the whole cutout; ValueError for an id inside that folder (it would collide)."""
    path = root / preview_relpath(cutout_id)
    shown = pixels if display is None else display(pixels.astype(np.float32))
    if crop == 1:
        _write_png(path, shown)
        return Preview(path)
    if cutout_id.split("/", 1)[0] == FULL_FIELD_DIR:
        raise ValueError(f"id {cutout_id!r} lies in {FULL_FIELD_DIR}/, where framed previews "
                         "keep their full fields; rename it or import with --preview-crop 1")
    top, left, h, w = crop_box(*shown.shape[:2], crop)
    full = root / FULL_FIELD_DIR / preview_relpath(cutout_id)
    _write_png(full, shown)
    _write_png(path, shown[top:top + h, left:left + w])
    return Preview(path, full)


def _write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "wb") as fh:
        to_preview_image(np.ascontiguousarray(pixels)).save(fh, format="PNG")


def preview_url(path: Path, *, document_root: Path | None = None,
                url_prefix: str | None = None, previews_root: Path | None = None) -> str:
    """The URL Label Studio loads for a preview.

    With ``url_prefix`` (cloud storage): ``<url_prefix>/<path relative to previews_root>``.
    Otherwise the local-files URL ``/data/local-files/?d=<path relative to document_root>``;
    ValueError when the preview lies outside the document root.
    """
    if url_prefix is not None:
        if previews_root is None:
            raise ValueError("url_prefix needs previews_root to make relative paths")
        rel = path.resolve().relative_to(previews_root.resolve()).as_posix()
        return f"{url_prefix.rstrip('/')}/{quote(rel)}"
    if document_root is None:
        raise ValueError("need a document_root or a url_prefix to make preview URLs")
    try:
        rel = path.resolve().relative_to(document_root.resolve()).as_posix()
    except ValueError as err:
        raise ValueError(f"preview {path} is outside the document root {document_root}") from err
    return LOCAL_FILES_PREFIX + quote(rel)
