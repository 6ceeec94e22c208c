"""`amls import push`: create Label Studio tasks from ``<store>.tasks.jsonl``, idempotently.

The project's existing tasks are listed first and any ``cutout_id`` already there is left
out, so a second push (or one after an interrupted push) adds nothing twice. Only tasks whose
cutout is in the store are pushed. When task images are local-files URLs, a local-files
import storage covering the previews is registered (once) so Label Studio serves them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml_backend.core.progress import progress
from ml_backend.core.store import CutoutStore
from ml_backend.label_schema import ChoiceSchema, local_files_dir, parse_label_config
from ml_backend.labelstudio import LabelStudioClient
from ml_backend.task_rows import read_tasks, tasks_path

log = logging.getLogger(__name__)


@dataclass
class PushSummary:
    created: int = 0
    already_in_project: int = 0
    not_in_store: int = 0
    repeated: int = 0

    def line(self) -> str:
        return (f"created {self.created} tasks, skipped {self.already_in_project} already in "
                f"the project, {self.repeated} ids repeated across stores, "
                f"{self.not_in_store} task rows without a stored cutout")


def pending_tasks(store_paths: Sequence[Path], existing: set[str],
                  summary: PushSummary) -> list[dict[str, Any]]:
    """Task data rows of the stores that the project lacks, in store order, each id once."""
    rows: list[dict[str, Any]] = []
    queued: set[str] = set()
    for store_path in store_paths:
        tasks = read_tasks(tasks_path(store_path))
        with CutoutStore.open(store_path, "r") as store:
            stored = store.ids()
        summary.not_in_store += len(set(tasks) - set(stored))
        for cid in stored:
            if cid not in tasks:
                continue
            if cid in existing:
                summary.already_in_project += 1
            elif cid in queued:
                summary.repeated += 1  # the same id in two stores: the first store wins
            else:
                queued.add(cid)
                rows.append(tasks[cid])
    return rows


def attach_predictions(rows: list[dict[str, Any]], store_paths: Sequence[Path],
                       model_dir: Path, schema: ChoiceSchema) -> list[dict[str, Any]]:
    """Tasks ``{"data", "predictions": [{model_version, score, result}]}`` from scoring."""
    from ml_backend.core.checkpoint import load_model_dir
    from ml_backend.core.scoring import score_store

    model, meta = load_model_dir(model_dir)
    scores: dict[str, float] = {}
    wanted = {row["cutout_id"] for row in rows}
    for store_path in store_paths:
        with CutoutStore.open(store_path, "r") as store:
            ids = store.ids()
            indices = [i for i, cid in enumerate(ids) if cid in wanted]
            if not indices:
                continue
            values = score_store(store, model, meta, indices=_as_array(indices))
            scores.update((ids[i], float(s)) for i, s in zip(indices, values, strict=True))
    return [{"data": row,
             "predictions": [schema.prediction(scores[row["cutout_id"]], meta.version)]}
            for row in rows]


def _as_array(indices: list[int]) -> Any:
    import numpy as np

    return np.asarray(indices, dtype=np.int64)


def push(client: LabelStudioClient, project_id: int, store_paths: Sequence[Path], *,
         batch_size: int = 1000, document_root: Path | None = None, model_dir: Path | None = None,
         anomaly_label: str = "anomaly", prelabel: bool = False) -> PushSummary:
    """Create the stores' tasks the project lacks, in batches; see the module docstring.
    With `model_dir`, each task carries the model's score as a prediction (and, with
    `prelabel`, the more likely choice)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    summary = PushSummary()
    existing = client.cutout_ids(project_id)
    rows = pending_tasks(store_paths, existing, summary)
    if not rows:
        return summary
    if document_root is not None:
        folder = local_files_dir(rows, document_root)
        if folder is not None:
            client.ensure_local_storage(project_id, folder)
    if model_dir is not None:
        schema = parse_label_config(client.label_config(project_id), anomaly_label,
                                    prelabel=prelabel)
        tasks = attach_predictions(rows, store_paths, model_dir, schema)
    else:
        tasks = [{"data": row} for row in rows]
    with progress(total=len(tasks), desc="push", unit="task") as bar:
        for start in range(0, len(tasks), batch_size):
            batch = tasks[start:start + batch_size]
            client.import_tasks(project_id, batch)
            summary.created += len(batch)
            bar.update(len(batch))
    return summary
