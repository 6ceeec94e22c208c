"""What an import did: per-item failures (written as JSON lines) and a one-line summary."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Failure:
    """One item that could not be imported: the file, where in it (HDU / index / row), why."""

    file: str
    item: str
    reason: str


@dataclass
class ImportSummary:
    """Counts of one import run; ``nonfinite`` = NaN/inf pixels replaced by the stretch."""

    imported: int = 0
    skipped: int = 0
    failures: list[Failure] = field(default_factory=list)
    nonfinite: int = 0

    @property
    def failed(self) -> int:
        return len(self.failures)

    def line(self) -> str:
        return (f"imported {self.imported}, skipped {self.skipped} (already in the store), "
                f"failed {self.failed}; {self.nonfinite} non-finite pixels replaced")


def write_report(path: Path, failures: list[Failure]) -> None:
    """Write one JSON object per failure (``file``, ``item``, ``reason``); empty when none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for failure in failures:
            fh.write(json.dumps(asdict(failure)) + "\n")
