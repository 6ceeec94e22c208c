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
from typing import TYPE_CHECKING, Any

import numpy as np

from ml_backend.labelstudio import LabelStudioClient
from ml_backend.registry import ModelRegistry

if TYPE_CHECKING:  # torch loads only when a job or /predict scores
    from torch import nn

    from ml_backend.core.checkpoint import ModelMeta

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


def is_task_id(value: object) -> bool:
    """Whether `value` can be a Label Studio task id (an int, not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def cache_id(task_id: object) -> str:
    """The cutout id of a task's downloaded image in its project's cache store."""
    return f"task-{task_id}"


@dataclass(frozen=True)
class ImageSource:
    """Where task image URLs are downloaded from: Label Studio's client, allowed hosts only."""

    client: LabelStudioClient
    hosts: frozenset[str]

    def fetch(self, url: str) -> bytes:
        return self.client.fetch_image(url, self.hosts)


@dataclass
class ProjectPixels:
    """A project's tasks resolved to store rows; stores stay open until `close()`."""

    stores: dict[str, Any]                         # store path -> open CutoutStore
    rows: dict[int, tuple[str, int]]               # task id -> (store path, row)

    def close(self) -> None:
        for store in self.stores.values():
            store.close()

    def __enter__(self) -> ProjectPixels:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_same_pixels(self) -> None:
        """Raise ValueError unless every store has one stretch and image shape (one model)."""
        kinds = {(json.dumps(s.stretch, sort_keys=True), tuple(s.shape))
                 for s in self.stores.values()}
        if len(kinds) > 1:
            raise ValueError(f"the project's tasks come from stores with different stretches "
                             f"or image shapes ({', '.join(self.stores)}); one model cannot "
                             "serve them")


def resolve_pixels(project_id: int, tasks: Sequence[dict[str, Any]], image_key: str,
                   registry: ModelRegistry, store_roots: Sequence[Path],
                   images: ImageSource | None = None) -> ProjectPixels:
    """Map every task to a store row: its own cutout store, or the project's image cache.

    Tasks with an image URL instead of a store use the project's cache store; with `images`
    the missing ones are downloaded into it first (training jobs), without it only images
    already cached are used (`/predict` never downloads). Tasks that have no usable pixels are
    skipped, with one warning per refused store (outside `store_roots`, missing, not a cutout
    store) and one per task otherwise.
    """
    from ml_backend.core.store import CutoutStore

    stores: dict[str, Any] = {}
    refused: set[str] = set()  # repr of refused `data.store` values, warned about once
    rows: dict[int, tuple[str, int]] = {}
    by_url: list[dict[str, Any]] = []
    try:
        for task in tasks:
            data, task_id = task.get("data"), task.get("id")
            if not isinstance(data, dict) or not is_task_id(task_id):
                logger.warning("project %d: task %r: no integer id or no data object; skipped",
                               project_id, task_id)
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
                    logger.warning("project %d: task %s: cutout %r is not in %s; skipped",
                                   project_id, task["id"], cid, path)
                    continue
                rows[task_id] = (path, stores[path].index_of(cid))
            elif isinstance(data.get(image_key), str):
                by_url.append(task)
            else:
                logger.warning("project %d: task %s has neither store/cutout_id nor an image "
                               "URL in %r; skipped", project_id, task["id"], image_key)
        cache = _cache_store(registry.cache_path(project_id), by_url, image_key, images)
        if cache is not None:
            path = str(registry.cache_path(project_id))
            stores[path] = cache
            rows.update({t["id"]: (path, cache.index_of(cache_id(t["id"])))
                         for t in by_url if cache_id(t["id"]) in cache})
    except BaseException:
        for store in stores.values():
            store.close()
        raise
    return ProjectPixels(stores=stores, rows=rows)


def _cache_store(path: Path, tasks: list[dict[str, Any]], image_key: str,
                 images: ImageSource | None) -> Any:
    """The project's cache store, open, with `tasks`' missing images downloaded when `images`
    is given; None when no task needs it or (without `images`) it does not exist."""
    from ml_backend.core.store import CutoutStore

    if not tasks or (images is None and not path.is_file()):
        return None
    if images is None:
        return CutoutStore.open(path)
    if path.exists():
        cache = CutoutStore.open(path, mode="a")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        cache = CutoutStore.create(path, height=CACHE_SIDE, width=CACHE_SIDE, channels=3,
                                   stretch={"name": "none"})
    missing = [t for t in tasks if cache_id(t["id"]) not in cache]
    for start in range(0, len(missing), 64):
        ids, decoded = [], []
        for task in missing[start:start + 64]:
            url = task["data"][image_key]
            try:
                decoded.append(decode_image(images.fetch(url)))
            except (OSError, ValueError, SyntaxError) as err:  # PermissionError is an OSError
                logger.warning("task %s: cannot use image %r: %s", task["id"], url, err)
                continue
            ids.append(cache_id(task["id"]))
        if ids:
            cache.append(ids, np.stack(decoded))
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


def score_tasks(pixels: ProjectPixels, task_ids: Sequence[int], model: nn.Module,
                meta: ModelMeta, batch_size: int, device: str) -> list[tuple[int, float]]:
    """(task id, P(anomaly)) for the tasks that have pixels, scored store by store in
    streaming batches. A store whose channels or stretch differ from the model's is skipped
    with a warning (its tasks get no score)."""
    scored, scores, _ = score_and_embed(pixels, task_ids, model, meta, batch_size, device,
                                        embed=False)
    return list(zip(scored, scores.tolist(), strict=True))


def score_and_embed(pixels: ProjectPixels, task_ids: Sequence[int], model: nn.Module,
                    meta: ModelMeta, batch_size: int, device: str, *, embed: bool = True
                    ) -> tuple[list[int], np.ndarray, np.ndarray | None]:
    """(scored task ids, their P(anomaly) float32, their pooled features float16 or None),
    from one forward pass per task; tasks without pixels or in an incompatible store (warned
    about) are left out, as in `score_tasks`. Ids stay Python ints: /predict may name any."""
    from ml_backend.core.scoring import check_compatible, score_store

    ids: list[int] = []
    scores: list[np.ndarray] = []
    features: list[np.ndarray] = []
    for path, store in pixels.stores.items():
        tids = [t for t in task_ids if t in pixels.rows and pixels.rows[t][0] == path]
        if not tids:
            continue
        try:
            check_compatible(store, meta)
        except ValueError as err:
            logger.warning("not scoring %d task(s) from %s: %s", len(tids), path, err)
            continue
        rows = np.array([pixels.rows[t][1] for t in tids], dtype=np.int64)
        out = np.empty((len(rows), model.num_features), dtype=np.float16) if embed else None
        scores.append(score_store(store, model, meta, indices=rows, batch_size=batch_size,
                                  device=device, features=out))
        ids.extend(tids)
        if out is not None:
            features.append(out)
    if not ids:
        return ([], np.zeros(0, np.float32),
                np.zeros((0, model.num_features), np.float16) if embed else None)
    return ids, np.concatenate(scores), np.concatenate(features) if embed else None
