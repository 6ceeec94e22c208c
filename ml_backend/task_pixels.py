"""A project's tasks as pixels: each task resolved to a row of a cutout store.

Tasks imported by `amls import` name their own store (`data.store`, `data.cutout_id`); any
other task's image URL is downloaded once into the project's cache store. Stores are opened
only inside the configured roots (`allowed_store_path`), and image URLs are fetched only from
allowed hosts (`LabelStudioClient.fetch_image`).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.labelstudio import ChoiceSchema, LabelStudioClient
from ml_backend.registry import ModelRegistry

logger = logging.getLogger(__name__)

# Side in pixels of images cached from Label Studio (plain projects); the model resizes them.
CACHE_SIDE = 128
# Task images above this many pixels are refused from their header (decompression bombs).
MAX_DECODE_PIXELS = 40_000_000


class StoreRefused(ValueError):
    """A task's `data.store` is not a path we may open (type, location or file kind)."""


def allowed_store_path(raw: object, roots: Sequence[Path], registry_root: Path,
                       project_id: int) -> Path:
    """The resolved path of a task's `data.store`, if it is a file inside one of `roots` and
    not inside another project's folder of the model registry (`registry_root/<id>/`).

    Symlinks and `..` are resolved first, so neither can lead outside the roots. Raises
    StoreRefused naming the reason; whether the file really is a cutout store is left to
    `CutoutStore.open`.
    """
    if not isinstance(raw, str) or not raw.strip():
        raise StoreRefused(f"store must be a path string, got {type(raw).__name__}")
    try:
        path = Path(raw).resolve()
    except (OSError, ValueError) as err:  # NUL bytes, symlink loops, over-long names
        raise StoreRefused(f"store path cannot be resolved: {err}") from None
    if not any(path.is_relative_to(root) for root in roots):
        raise StoreRefused(f"store {path} is outside the allowed store roots "
                           f"({', '.join(map(str, roots))}; set AMLS_STORE_ROOTS)")
    registry_root = Path(registry_root).resolve()
    if path.is_relative_to(registry_root):
        first = path.relative_to(registry_root).parts[0]
        if first.isdigit() and first != str(project_id):
            raise StoreRefused(f"store {path} belongs to another project's models and caches "
                               f"(project {first}); project {project_id} may not read it")
    if not path.is_file():
        raise StoreRefused(f"store {path} is not an existing regular file")
    return path


@dataclass
class ProjectPixels:
    """A project's tasks resolved to store rows; stores stay open until `close()`."""

    stores: dict[str, Any]                         # store path -> open CutoutStore
    rows: dict[int, tuple[str, int]]               # task id -> (store path, row)

    def close(self) -> None:
        for store in self.stores.values():
            store.close()


def resolve_pixels(project_id: int, tasks: list[dict[str, Any]], schema: ChoiceSchema,
                    registry: ModelRegistry, client: LabelStudioClient,
                    image_hosts: frozenset[str], store_roots: Sequence[Path]) -> ProjectPixels:
    """Map every task to a store row: its own cutout store, or the project's image cache.

    Tasks whose store is refused (outside `store_roots`, missing, not a cutout store) are
    skipped, with one warning per store.
    """
    from ml_backend.core.store import CutoutStore

    stores: dict[str, Any] = {}
    refused: set[str] = set()  # repr of refused `data.store` values, warned about once
    rows: dict[int, tuple[str, int]] = {}
    to_fetch: list[dict[str, Any]] = []
    try:
        for task in tasks:
            data = task.get("data")
            if not isinstance(data, dict):
                logger.warning("project %d: task %s: data is not an object; skipped",
                               project_id, task.get("id"))
                continue
            if data.get("store") and data.get("cutout_id") is not None:
                key = repr(data["store"])
                if key in refused:
                    continue
                try:
                    path = str(allowed_store_path(data["store"], store_roots,
                                                  registry.root, project_id))
                    if path not in stores:
                        stores[path] = CutoutStore.open(path)
                except (OSError, ValueError) as err:  # StoreRefused is a ValueError
                    refused.add(key)
                    logger.warning("project %d: task %s: skipping tasks of store %s: %s",
                                   project_id, task.get("id"), key, err)
                    continue
                cid = str(data["cutout_id"])
                if cid not in stores[path]:
                    logger.warning("task %s: cutout %r is not in %s; skipped", task["id"], cid,
                                   path)
                    continue
                rows[int(task["id"])] = (path, stores[path].index_of(cid))
            elif isinstance(data.get(schema.image_key), str):
                to_fetch.append(task)
            else:
                logger.warning("task %s has neither store/cutout_id nor an image URL in %r; "
                               "skipped", task["id"], schema.image_key)
        if to_fetch:
            path = str(registry.cache_path(project_id))
            cache = _fill_cache(path, to_fetch, schema, client, image_hosts)
            stores[path] = cache
            rows.update({int(t["id"]): (path, cache.index_of(f"task-{t['id']}"))
                         for t in to_fetch if f"task-{t['id']}" in cache})
    except BaseException:
        for store in stores.values():
            store.close()
        raise
    _check_same_pixels(stores)
    return ProjectPixels(stores=stores, rows=rows)


def _fill_cache(path: str, tasks: list[dict[str, Any]], schema: ChoiceSchema,
                client: LabelStudioClient, image_hosts: frozenset[str]) -> Any:
    """Download task images missing from the project's cache store; return it open."""
    from ml_backend.core.store import CutoutStore

    if Path(path).exists():
        cache = CutoutStore.open(path, mode="a")
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        cache = CutoutStore.create(path, height=CACHE_SIDE, width=CACHE_SIDE, channels=3,
                                   stretch={"name": "none"})
    missing = [t for t in tasks if f"task-{t['id']}" not in cache]
    for start in range(0, len(missing), 64):
        ids, images = [], []
        for task in missing[start:start + 64]:
            url = task["data"][schema.image_key]
            try:
                images.append(decode_image(client.fetch_image(url, image_hosts)))
            except (OSError, ValueError, SyntaxError) as err:  # PermissionError is an OSError
                logger.warning("task %s: cannot use image %r: %s", task["id"], url, err)
                continue
            ids.append(f"task-{task['id']}")
        if ids:
            cache.append(ids, np.stack(images))
    return cache


def decode_image(data: bytes) -> np.ndarray:
    """PNG/JPEG/TIFF bytes -> uint8 (CACHE_SIDE, CACHE_SIDE, 3).

    Raises ValueError for an image over MAX_DECODE_PIXELS (checked from the header, before
    decoding: decompression bombs), OSError / SyntaxError for truncated or unreadable data.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > MAX_DECODE_PIXELS:
                raise ValueError(f"image of {width} x {height} pixels is larger than "
                                 f"{MAX_DECODE_PIXELS} pixels")
            rgb = img.convert("RGB").resize((CACHE_SIDE, CACHE_SIDE),
                                            Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except Image.DecompressionBombError as err:
        raise ValueError(str(err)) from None


def _check_same_pixels(stores: dict[str, Any]) -> None:
    kinds = {(json.dumps(s.stretch, sort_keys=True), tuple(s.shape)) for s in stores.values()}
    if len(kinds) > 1:
        raise ValueError(f"the project's tasks come from stores with different stretches or "
                         f"image shapes ({', '.join(stores)}); one model cannot serve them")


def read_tasks(pixels: ProjectPixels, task_ids: list[int]) -> np.ndarray:
    """uint8 images (n, H, W, C) of tasks, read store by store."""
    out: np.ndarray | None = None
    for path, store in pixels.stores.items():
        positions = [i for i, t in enumerate(task_ids) if pixels.rows[t][0] == path]
        if not positions:
            continue
        rows = np.array([pixels.rows[task_ids[i]][1] for i in positions], dtype=np.int64)
        order = np.argsort(rows, kind="stable")  # HDF5 reads want increasing rows
        images = store.read(rows[order])
        if out is None:
            out = np.empty((len(task_ids), *images.shape[1:]), dtype=np.uint8)
        out[np.array(positions)[order]] = images
    if out is None:
        raise ValueError("no labelled task has readable pixels")
    return out


def unlabeled_pool(pixels: ProjectPixels, task_ids: list[int], default: str) -> Any:
    """FixMatch's unlabelled images: the tasks' rows in the store holding most of them
    (`default`'s empty subset if there are none)."""
    from ml_backend.core.sources import StoreSubset

    counts: dict[str, int] = {}
    for t in task_ids:
        counts[pixels.rows[t][0]] = counts.get(pixels.rows[t][0], 0) + 1
    path = max(counts, key=counts.__getitem__) if counts else default
    rows = sorted(pixels.rows[t][1] for t in task_ids if pixels.rows[t][0] == path)
    return StoreSubset(pixels.stores[path], np.array(rows, dtype=np.int64))


def score_tasks(pixels: ProjectPixels, task_ids: list[int], model: Any, meta: Any,
                 batch_size: int, device: str) -> list[tuple[int, float]]:
    """(task id, P(anomaly)) for tasks, scored store by store in streaming batches."""
    from ml_backend.core.scoring import score_store

    scores: list[tuple[int, float]] = []
    for path, store in pixels.stores.items():
        tids = [t for t in task_ids if pixels.rows[t][0] == path]
        if not tids:
            continue
        rows = np.array([pixels.rows[t][1] for t in tids], dtype=np.int64)
        probs = score_store(store, model, meta, indices=rows, batch_size=batch_size,
                            device=device)
        scores.extend(zip(tids, (float(p) for p in probs), strict=True))
    return scores
