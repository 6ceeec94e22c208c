"""The shard job: score one shard's rows and write its sorted result atomically."""

from __future__ import annotations

import csv
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.core.atomic import atomic_file, atomic_write_text
from ml_backend.survey.layout import (
    COLUMNS,
    read_manifest,
    shard_path,
    sort_key,
)

logger = logging.getLogger(__name__)


def score_shard(manifest_path: str, shard_index: int) -> dict[str, Any]:
    """Score one shard and write its result atomically; skip it if the result exists.

    Returns ``{"shard", "status": "done" | "skipped", "images", "seconds"}``. On failure an
    ``.error`` file records the message and the exception propagates (RQ marks the job
    failed). The model must still have the manifest's version.
    """
    survey_dir = Path(manifest_path).parent
    manifest = read_manifest(manifest_path)
    if not 0 <= shard_index < len(manifest["shards"]):
        raise ValueError(f"{manifest_path} has shards 0..{len(manifest['shards']) - 1}, not "
                         f"{shard_index}")
    shard = manifest["shards"][shard_index]
    result = shard_path(survey_dir, shard_index, ".csv")
    if result.exists():
        logger.info("shard %d already done; skipped", shard_index)
        return {"shard": shard_index, "status": "skipped", "images": 0, "seconds": 0.0}
    started = time.time()
    try:
        rows = _score_range(manifest, shard["start"], shard["stop"])
        seconds = time.time() - started
        stats = {"shard": shard_index, "images": len(rows), "seconds": seconds,
                 "started": started, "finished": time.time(), "host": socket.gethostname(),
                 "pid": os.getpid(), "model_version": manifest["model_version"]}
        # Statistics first: a shard counts as done once its CSV exists.
        atomic_write_text(shard_path(survey_dir, shard_index, ".json"), json.dumps(stats))
        _write_sorted_csv(result, rows)
    except Exception as err:
        atomic_write_text(shard_path(survey_dir, shard_index, ".error"),
                           f"{type(err).__name__}: {err}\n")
        logger.exception("shard %d of %s failed", shard_index, survey_dir)
        raise
    shard_path(survey_dir, shard_index, ".error").unlink(missing_ok=True)
    logger.info("shard %d: %d images in %.1f s", shard_index, len(rows), seconds)
    return {"shard": shard_index, "status": "done", "images": len(rows), "seconds": seconds}


def _score_range(manifest: dict[str, Any], start: int,
                 stop: int) -> list[tuple[str, float, str]]:
    """(id, score, store name) for global rows start..stop-1, in row order."""
    from ml_backend.core.checkpoint import load_model_dir
    from ml_backend.core.scoring import score_store
    from ml_backend.core.store import CutoutStore

    model, meta = load_model_dir(manifest["model_dir"], device="auto")
    if meta.version != manifest["model_version"]:
        raise ValueError(f"model {manifest['model_dir']} is now version {meta.version}, but "
                         f"the survey was planned with {manifest['model_version']}")
    rows: list[tuple[str, float, str]] = []
    offset = 0
    for entry in manifest["stores"]:
        lo, hi = max(start - offset, 0), min(stop - offset, entry["length"])
        offset += entry["length"]
        if lo >= hi:
            continue
        with CutoutStore.open(entry["path"]) as store:
            if len(store) < entry["length"]:
                raise ValueError(f"store {entry['path']} has {len(store)} rows, fewer than the "
                                 f"{entry['length']} the survey planned")
            scores = score_store(store, model, meta, indices=np.arange(lo, hi),
                                 batch_size=manifest["batch_size"], device="auto",
                                 progress_desc=f"shard rows {start}-{stop}")
            ids = store.ids()[lo:hi]
        rows.extend((cid, float(s), entry["name"]) for cid, s in zip(ids, scores, strict=True))
    return rows


def _write_sorted_csv(path: Path, rows: list[tuple[str, float, str]]) -> None:
    """`id,score,store` by descending score (ties keep row order), written atomically.

    NaN scores (a model that produced NaN) are written as "nan" and sort last.
    """
    order = sorted(range(len(rows)), key=lambda k: sort_key(rows[k][1]))
    with atomic_file(path) as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        writer.writerows((rows[k][0], repr(rows[k][1]), rows[k][2]) for k in order)
