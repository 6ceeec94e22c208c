"""A project's ImageNet embeddings: every task's pooled features from the ImageNet backbone.

The first ranking fits its head on them, and every re-ranking after a cycle adds a head on
them as the blend's third term (`fast_head.blend_with_model`). Unlike a version's cached
embeddings they do not change from cycle to cycle, so they live beside the versions in
MODEL_DIR/<project>/_imagenet/ (a name version pruning never matches) and each training job
only embeds the tasks added since. `signature.json` records what shapes them (size, crop,
channels, stretch, test-time views); embeddings of another signature are embedded afresh.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.core.atomic import atomic_file
from ml_backend.core.checkpoint import IMAGENET_STAGE, imagenet_model
from ml_backend.core.config import TrainConfig
from ml_backend.core.embedding_cache import Embeddings, read_embeddings, write_embeddings
from ml_backend.registry import ModelRegistry
from ml_backend.task_pixels import ProjectPixels, score_and_embed

logger = logging.getLogger(__name__)

STORE_DIR = "_imagenet"
SIGNATURE = "signature.json"


def imagenet_signature(cfg: TrainConfig, channels: int, stretch: dict[str, Any]) -> dict[str, Any]:
    """What ImageNet embeddings under `cfg` depend on: input size and crop, channels, the
    store's stretch, the test-time views and shifts they are averaged over, the backbone's
    stage they are pooled after (embeddings of the last stage, before session 22, lack it)
    and the zoomed second reading (`TrainConfig.imagenet_zoom`)."""
    return {"image_size": cfg.image_size, "center_crop": cfg.center_crop, "channels": channels,
            "stretch": dict(stretch), "invariance": cfg.invariance,
            "test_time_augmentation": cfg.test_time_augmentation,
            "test_time_shift": cfg.test_time_shift, "stage": IMAGENET_STAGE,
            "imagenet_zoom": cfg.imagenet_zoom}


def store_dir(registry: ModelRegistry, project_id: int) -> Path:
    return registry.project_dir(project_id) / STORE_DIR


def read_imagenet_embeddings(registry: ModelRegistry, project_id: int,
                             signature: dict[str, Any]) -> Embeddings | None:
    """The project's ImageNet embeddings if they were made under `signature`, else None."""
    folder = store_dir(registry, project_id)
    try:
        written = json.loads((folder / SIGNATURE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    # Through JSON both ways, so tuples and lists compare alike.
    if written != json.loads(json.dumps(signature)):
        return None
    return read_embeddings(folder)


def write_imagenet_embeddings(registry: ModelRegistry, project_id: int,
                              signature: dict[str, Any], embeddings: Embeddings) -> None:
    """Replace the project's ImageNet embeddings. The signature goes first and last: while
    the arrays are rewritten there is none, so a reader never pairs them with the wrong one."""
    folder = store_dir(registry, project_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SIGNATURE).unlink(missing_ok=True)
    write_embeddings(folder, embeddings.task_ids, embeddings.features)
    with atomic_file(folder / SIGNATURE, "w") as fh:
        fh.write(json.dumps(signature, sort_keys=True))


def embed_with_imagenet(pixels: ProjectPixels, task_ids: list[int], cfg: TrainConfig,
                        channels: int, stretch: dict[str, Any]) -> Embeddings:
    """The ImageNet backbone's pooled features of the given tasks (those with pixels in a
    compatible store), averaged over `cfg`'s test-time views as a cycle of `cfg` embeds."""
    model, meta = imagenet_model(cfg, channels, stretch)
    ids, _, features = score_and_embed(pixels, task_ids, model, meta, cfg.score_batch_size,
                                       cfg.device)
    return Embeddings(np.asarray(ids, dtype=np.int64), features)


def extend_imagenet_embeddings(registry: ModelRegistry, project_id: int, pixels: ProjectPixels,
                               cfg: TrainConfig, channels: int,
                               stretch: dict[str, Any]) -> Embeddings:
    """Embed the tasks of `pixels` that the project's ImageNet embeddings under `cfg` lack
    (all of them when those were made under another signature); returns them all."""
    signature = imagenet_signature(cfg, channels, stretch)
    held = read_imagenet_embeddings(registry, project_id, signature)
    if held is None and store_dir(registry, project_id).exists():
        logger.info("project %d: ImageNet embeddings of other settings; embedding afresh",
                    project_id)
        shutil.rmtree(store_dir(registry, project_id))
    have = set() if held is None else set(held.task_ids.tolist())
    missing = sorted(t for t in pixels.rows if t not in have)
    if held is not None and not missing:
        return held
    new = embed_with_imagenet(pixels, missing, cfg, channels, stretch)
    if held is not None:
        new = Embeddings(np.concatenate([held.task_ids, new.task_ids]),
                         np.concatenate([np.asarray(held.features), new.features]))
    write_imagenet_embeddings(registry, project_id, signature, new)
    logger.info("project %d: embedded %d task(s) with the ImageNet backbone", project_id,
                len(missing))
    return new
