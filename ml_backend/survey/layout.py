"""The survey directory: manifest, shard file names and the `id,score,store` row format."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
SHARDS = "shards"
FORMAT = "amls-survey"
FORMAT_VERSION = 1
COLUMNS = ("id", "score", "store")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest JSON; ValueError if it is not a survey manifest of this version."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not an amls survey manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has survey format_version {data.get('format_version')}; "
                         f"this amls reads {FORMAT_VERSION}")
    return data


def shard_path(survey_dir: Path, index: int, suffix: str) -> Path:
    """`<survey>/shards/shard-00007<suffix>`; suffix ".csv" (result), ".json", ".error"."""
    return survey_dir / SHARDS / f"shard-{index:05d}{suffix}"


def sort_key(score: float) -> float:
    """Ascending key for descending scores; NaN sorts last."""
    return float("inf") if score != score else -score


def read_rows(path: Path) -> Iterator[tuple[str, str, str]]:
    """(id, score text, store) rows of a shard or merged CSV; ValueError on a wrong header."""
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or tuple(header) != COLUMNS:
            raise ValueError(f"{path}: expected header {','.join(COLUMNS)}, got {header}")
        for row in reader:
            yield row[0], row[1], row[2]
