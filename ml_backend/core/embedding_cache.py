"""A model version's embeddings: the pooled features of every task its scoring pass saw.

Two files in the version's directory, written by the training job from the forward pass that
scores the project (no extra pass), read memory-mapped by the instant re-ranking and
"more like this": `embeddings.npy` (n, D) float16 (2.5 KB per task for EfficientNet-Lite0's
1,280 features) and `embedding_tasks.npy` (n,) int64 task ids, row for row. They live and are
pruned with the version, so they always match its preprocessing (stretch, crop, size).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ml_backend.core.atomic import atomic_file

FEATURES_FILE = "embeddings.npy"
TASKS_FILE = "embedding_tasks.npy"


@dataclass(frozen=True)
class Embeddings:
    """Task ids and their feature rows (a copy-on-write memory map when read from disk)."""

    task_ids: np.ndarray  # (n,) int64
    features: np.ndarray  # (n, D) float16

    def rows_of(self, task_ids: list[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the given task ids that have a row, their rows), in the given order."""
        wanted = np.asarray(task_ids, dtype=np.int64).reshape(-1)
        order = np.argsort(self.task_ids, kind="stable")
        sorted_ids = self.task_ids[order]
        found = np.searchsorted(sorted_ids, wanted).clip(max=max(len(sorted_ids) - 1, 0))
        hit = (sorted_ids[found] == wanted) if len(sorted_ids) else np.zeros(len(wanted), bool)
        return wanted[hit], order[found[hit]]


def write_embeddings(model_dir: Path, task_ids: np.ndarray, features: np.ndarray) -> None:
    """Write the two files into `model_dir` atomically (features first, ids last)."""
    task_ids = np.asarray(task_ids, dtype=np.int64).reshape(-1)
    if features.ndim != 2 or len(features) != len(task_ids):
        raise ValueError(f"{len(task_ids)} task ids but features of shape {features.shape}")
    if len(np.unique(task_ids)) != len(task_ids):
        raise ValueError("task ids of an embedding cache must be distinct")
    for name, array in ((FEATURES_FILE, features.astype(np.float16, copy=False)),
                        (TASKS_FILE, task_ids)):
        with atomic_file(Path(model_dir) / name, "wb") as fh:
            np.save(fh, array)


def read_embeddings(model_dir: Path) -> Embeddings | None:
    """The version's embeddings, or None when it has none (older versions) or they are torn."""
    features_path, tasks_path = Path(model_dir) / FEATURES_FILE, Path(model_dir) / TASKS_FILE
    if not (features_path.is_file() and tasks_path.is_file()):
        return None
    task_ids = np.load(tasks_path)
    features = np.load(features_path, mmap_mode="c")  # copy-on-write: nothing writes back
    if features.ndim != 2 or len(features) != len(task_ids):
        return None
    return Embeddings(task_ids=task_ids, features=features)
