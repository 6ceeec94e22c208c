"""PNG previews: the store's uint8 pixels as files Label Studio can serve, and their URLs.

A preview may go through a display stretch first (`--preview-stretch`, recorded in the store
as ``preview_stretch``): for eyes only, e.g. ``log`` makes the faint tails of radio sources
on a black sky visible. The store's pixels, which the model sees, are never changed.

Channel mapping: C = 1 -> greyscale PNG, C = 3 -> RGB PNG, any other C -> greyscale PNG of
channel 0 (the model still sees all channels; the preview shows the first).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image

from ml_backend.core.atomic import atomic_file
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


def write_preview(root: Path, cutout_id: str, pixels: np.ndarray,
                  display: Stretch | None = None) -> Path:
    """Write ``<root>/<id>.png`` atomically (temporary file + rename); returns the path.

    `display` (a stretch of the uint8 values, per channel) is applied to a copy first."""
    path = root / preview_relpath(cutout_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    shown = pixels if display is None else display(pixels.astype(np.float32))
    with atomic_file(path, "wb") as fh:
        to_preview_image(shown).save(fh, format="PNG")
    return path


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
