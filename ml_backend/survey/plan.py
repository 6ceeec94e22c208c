"""Planning a survey: contiguous shard ranges over the stores, written to manifest.json."""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ml_backend.core.atomic import atomic_write_text
from ml_backend.core.checkpoint import read_meta
from ml_backend.survey.layout import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SHARDS,
    read_manifest,
)

logger = logging.getLogger(__name__)


def shard_ranges(total: int, n_shards: int) -> list[tuple[int, int]]:
    """`n_shards` contiguous [start, stop) ranges covering 0..total, sizes differing by <= 1.

    Fewer shards than asked when total < n_shards (no empty shards); none when total is 0.
    """
    if n_shards < 1:
        raise ValueError(f"the number of shards must be >= 1, got {n_shards}")
    n = min(n_shards, total)
    bounds = [total * k // n for k in range(n + 1)] if n else [0]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def plan_survey(store_paths: Sequence[str | Path], model_dir: str | Path, n_shards: int,
                out_dir: str | Path, *, batch_size: int = 256) -> Path:
    """Write `out_dir/manifest.json` for a new survey, or check an existing one; return its path.

    An existing manifest is kept (a re-run resumes) if it names the same stores, lengths and
    model version; otherwise ValueError, naming what differs. Every store must be readable
    and compatible with the model (channels and stretch).
    """
    from ml_backend.core.scoring import check_compatible
    from ml_backend.core.store import CutoutStore

    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if not store_paths:
        raise ValueError("give at least one cutout store")
    out_dir = Path(out_dir)
    model_dir = Path(model_dir).resolve()
    meta = read_meta(model_dir)
    stores = []
    for path, name in zip(store_paths, _unique_names(store_paths), strict=True):
        with CutoutStore.open(path) as store:
            check_compatible(store, meta)
            stores.append({"path": str(Path(path).resolve()), "name": name,
                           "length": len(store)})
    total = sum(s["length"] for s in stores)
    manifest_path = out_dir / MANIFEST
    if manifest_path.exists():
        old = read_manifest(manifest_path)
        _check_same_survey(old, stores, meta.version, manifest_path)
        if len(old["shards"]) != len(shard_ranges(total, n_shards)):
            logger.warning("%s exists with %d shards; keeping them (asked for %d)",
                           manifest_path, len(old["shards"]), n_shards)
        return manifest_path
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "survey_id": secrets.token_hex(4),
        "model_dir": str(model_dir), "model_version": meta.version,
        "batch_size": batch_size, "stores": stores, "total": total,
        "shards": [{"index": i, "start": a, "stop": b}
                   for i, (a, b) in enumerate(shard_ranges(total, n_shards))],
    }
    (out_dir / SHARDS).mkdir(parents=True, exist_ok=True)
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    logger.info("survey %s: %d images in %d store(s), %d shard(s)", out_dir, total, len(stores),
                len(manifest["shards"]))
    return manifest_path


def _unique_names(paths: Sequence[str | Path]) -> list[str]:
    """Store file stems, with "~2", "~3" ... appended to repeats."""
    names: list[str] = []
    for path in paths:
        stem = Path(path).stem
        name, k = stem, 1
        while name in names:
            k += 1
            name = f"{stem}~{k}"
        names.append(name)
    return names


def _check_same_survey(old: dict[str, Any], stores: list[dict[str, Any]], version: str,
                       where: Path) -> None:
    before = [(s["path"], s["length"]) for s in old["stores"]]
    now = [(s["path"], s["length"]) for s in stores]
    if before != now:
        raise ValueError(f"{where} describes other stores or lengths ({before}) than given "
                         f"({now}); use a new output directory")
    if old["model_version"] != version:
        raise ValueError(f"{where} was planned with model {old['model_version']}, not "
                         f"{version}; use a new output directory")
