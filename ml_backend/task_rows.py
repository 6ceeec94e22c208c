"""Label Studio task rows written next to a store (``<store>.tasks.jsonl``) for a later push."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def tasks_path(store_path: Path) -> Path:
    """``<store>.tasks.jsonl`` beside the store."""
    return store_path.with_name(store_path.name + ".tasks.jsonl")


def make_task(*, image_url: str, cutout_id: str, store_path: Path, source: str, hdu: str,
              ra: float | None, dec: float | None) -> dict[str, Any]:
    """Task ``data``: image URL, cutout id, absolute store path, source, hdu, ra, dec (deg)."""
    def coord(value: float | None) -> float | None:
        return None if value is None or not math.isfinite(value) else float(value)

    return {"image": image_url, "cutout_id": cutout_id, "store": str(store_path.resolve()),
            "source": source, "hdu": hdu, "ra": coord(ra), "dec": coord(dec)}


def append_tasks(path: Path, tasks: Iterable[dict[str, Any]]) -> None:
    """Append task data dicts as JSON lines (flushed, so a crash loses at most a partial line)."""
    with path.open("a", encoding="utf-8") as fh:
        for task in tasks:
            fh.write(json.dumps(task) + "\n")
        fh.flush()


def read_tasks(path: Path) -> dict[str, dict[str, Any]]:
    """Task data by cutout id, last line winning; a truncated last line is ignored."""
    tasks: dict[str, dict[str, Any]] = {}
    with path.open(encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            task = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # an interrupted write; the item is re-imported later
                break
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err
        tasks[task["cutout_id"]] = task
    return tasks
