"""CSV files of labels (`id,label`) and scores (`id,score`), with line-numbered errors.

Labels are 1 = anomaly, 0 = normal in memory and ``anomaly`` / ``normal`` on disk
(case-insensitive, surrounding whitespace ignored when reading). Files are UTF-8; a byte
order mark is accepted. Blank lines are skipped; extra columns are ignored.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ml_backend.core.store import CutoutStore

LABEL_NAMES = {1: "anomaly", 0: "normal"}
_LABEL_VALUES = {name: value for value, name in LABEL_NAMES.items()}


def _rows(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line number, row) for the data rows of a CSV with the given header columns."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [name.strip().lower() for name in reader.fieldnames or []]
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{path}: line 1: header must contain columns {list(columns)}; "
                             f"missing {missing} (header is {reader.fieldnames})")
        reader.fieldnames = header
        for row in reader:
            values = {c: (row.get(c) or "").strip() for c in columns}
            if not any(values.values()):
                continue
            yield reader.line_num, values


def read_labels_csv(path: str | Path) -> dict[str, int]:
    """`id,label` file -> {id: 1 for anomaly, 0 for normal}, in file order.

    A repeated id with the same label is accepted; with a different label it is an error.
    """
    path = Path(path)
    labels: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for line, row in _rows(path, ("id", "label")):
        cutout_id, name = row["id"], row["label"].lower()
        if not cutout_id:
            raise ValueError(f"{path}: line {line}: empty id")
        if name not in _LABEL_VALUES:
            raise ValueError(f"{path}: line {line}: label {row['label']!r} for id "
                             f"{cutout_id!r} must be 'anomaly' or 'normal'")
        label = _LABEL_VALUES[name]
        if cutout_id in labels and labels[cutout_id] != label:
            raise ValueError(f"{path}: line {line}: id {cutout_id!r} is labelled {name!r} but "
                             f"was {LABEL_NAMES[labels[cutout_id]]!r} on line "
                             f"{first_line[cutout_id]}")
        labels[cutout_id] = label
        first_line.setdefault(cutout_id, line)
    return labels


def write_labels_csv(path: str | Path, labels: dict[str, int]) -> None:
    """Write {id: 0/1} as `id,label` with `anomaly` / `normal`, in dict order."""
    bad = {k: v for k, v in labels.items() if v not in LABEL_NAMES}
    if bad:
        raise ValueError(f"labels must be 0 or 1, got {dict(list(bad.items())[:5])}")
    with Path(path).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "label"])
        writer.writerows((cid, LABEL_NAMES[label]) for cid, label in labels.items())


def write_scores_csv(path: str | Path, ids: Sequence[str], scores: Sequence[float] | np.ndarray,
                     *, top: int | None = None) -> None:
    """Write `id,score` sorted by descending score (ties keep input order).

    `top` keeps only the first `top` rows. Scores are written with full float precision;
    NaN scores and repeated ids are errors.
    """
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(ids) != values.size:
        raise ValueError(f"{len(ids)} ids but {values.size} scores")
    if np.isnan(values).any():
        first = ids[int(np.flatnonzero(np.isnan(values))[0])]
        raise ValueError(f"{int(np.isnan(values).sum())} scores are NaN (e.g. id {first!r})")
    if len(set(ids)) != len(ids):
        raise ValueError("ids must be unique")
    if top is not None and top < 0:
        raise ValueError(f"top must be >= 0, got {top}")
    order = np.argsort(-values, kind="stable")[:top]
    with Path(path).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "score"])
        writer.writerows((ids[i], repr(float(values[i]))) for i in order)


def read_scores_csv(path: str | Path) -> tuple[list[str], np.ndarray]:
    """`id,score` file -> (ids, float64 scores) in file order. NaN or repeated ids: errors."""
    path = Path(path)
    ids: list[str] = []
    scores: list[float] = []
    seen: dict[str, int] = {}
    for line, row in _rows(path, ("id", "score")):
        cutout_id = row["id"]
        try:
            score = float(row["score"])
        except ValueError:
            raise ValueError(f"{path}: line {line}: score {row['score']!r} for id "
                             f"{cutout_id!r} is not a number") from None
        if math.isnan(score):
            raise ValueError(f"{path}: line {line}: score for id {cutout_id!r} is NaN")
        if cutout_id in seen:
            raise ValueError(f"{path}: line {line}: id {cutout_id!r} repeats line "
                             f"{seen[cutout_id]}")
        seen[cutout_id] = line
        ids.append(cutout_id)
        scores.append(score)
    return ids, np.asarray(scores, dtype=np.float64)


def truth_vector(store: CutoutStore, truth_csv: str | Path) -> np.ndarray:
    """(len(store),) ints: 1 anomaly, 0 normal, -1 for store rows the truth file lacks."""
    labels = read_labels_csv(truth_csv)
    truth = np.full(len(store), -1, dtype=np.int64)
    missing = [i for i in labels if i not in store]
    if missing:
        raise ValueError(f"{truth_csv}: {len(missing)} ids are not in {store.path}, "
                         f"e.g. {missing[:3]}")
    truth[store.indices_of(list(labels))] = list(labels.values())
    return truth
