"""Survey progress (done / pending / failed, images/s) and the merged ranking."""

from __future__ import annotations

import csv
import heapq
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml_backend.core.atomic import atomic_file
from ml_backend.survey.layout import (
    COLUMNS,
    MANIFEST,
    read_manifest,
    read_rows,
    shard_path,
    sort_key,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardState:
    """Progress of a survey: shard indices by state plus scoring statistics."""

    done: list[int]
    failed: dict[int, str]      # shard -> last error message
    pending: list[int]          # neither done nor failed (queued, running or lost)
    images_done: int
    worker_seconds: float       # summed scoring time of finished shards
    wall_seconds: float         # first shard start to last shard finish (0 if none done)

    @property
    def images_per_s_per_worker(self) -> float:
        return self.images_done / self.worker_seconds if self.worker_seconds > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        """Aggregate throughput over all workers (finished shards only)."""
        return self.images_done / self.wall_seconds if self.wall_seconds > 0 else 0.0


def survey_state(survey_dir: str | Path) -> ShardState:
    """Which shards are done, failed or pending, and how fast finished shards went."""
    survey_dir = Path(survey_dir)
    manifest = read_manifest(survey_dir / MANIFEST)
    done, pending, failed = [], [], {}
    images, worker_s, first, last = 0, 0.0, float("inf"), 0.0
    for shard in manifest["shards"]:
        i = shard["index"]
        if shard_path(survey_dir, i, ".csv").exists():
            done.append(i)
            stats = _read_stats(shard_path(survey_dir, i, ".json"))
            images += int(stats.get("images", shard["stop"] - shard["start"]))
            worker_s += float(stats.get("seconds", 0.0))
            first = min(first, float(stats.get("started", first)))
            last = max(last, float(stats.get("finished", last)))
        elif shard_path(survey_dir, i, ".error").exists():
            failed[i] = shard_path(survey_dir, i, ".error").read_text(encoding="utf-8").strip()
        else:
            pending.append(i)
    wall = last - first if done and last > first else 0.0
    return ShardState(done=done, failed=failed, pending=pending, images_done=images,
                      worker_seconds=worker_s, wall_seconds=wall)


def _read_stats(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as err:
        logger.warning("ignoring unreadable shard statistics %s: %s", path, err)
        return {}


def iter_merged(survey_dir: str | Path) -> Iterator[tuple[str, str, str]]:
    """All (id, score text, store) rows by descending score; ValueError if a shard is missing.

    A k-way merge of the sorted shard files: memory holds one row per shard. Ties keep
    global row order (shard order, then row order within a shard).
    """
    survey_dir = Path(survey_dir)
    manifest = read_manifest(survey_dir / MANIFEST)
    paths = [shard_path(survey_dir, s["index"], ".csv") for s in manifest["shards"]]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise ValueError(f"{len(missing)} shard(s) of {survey_dir} are not done yet "
                         f"(e.g. {missing[:5]}); run `amls survey resume` and wait")
    yield from heapq.merge(*(read_rows(p) for p in paths), key=lambda r: sort_key(float(r[1])))


def merge(survey_dir: str | Path, top: int = 1000) -> tuple[Path, Path, int]:
    """Write `scores.csv` (every row) and `top.csv` (first `top`); return (paths..., rows)."""
    if top < 0:
        raise ValueError(f"--top must be >= 0, got {top}")
    survey_dir = Path(survey_dir)
    scores_path, top_path = survey_dir / "scores.csv", survey_dir / "top.csv"
    n = 0
    with atomic_file(scores_path) as all_fh, atomic_file(top_path) as top_fh:
        all_writer, top_writer = csv.writer(all_fh), csv.writer(top_fh)
        all_writer.writerow(COLUMNS)
        top_writer.writerow(COLUMNS)
        for row in iter_merged(survey_dir):
            all_writer.writerow(row)
            if n < top:
                top_writer.writerow(row)
            n += 1
    return scores_path, top_path, n


def read_merged(path: str | Path) -> list[tuple[str, float, str]]:
    """Rows of a merged `scores.csv` / `top.csv` as (id, score, store)."""
    return [(cid, float(score), store) for cid, score, store in read_rows(Path(path))]
