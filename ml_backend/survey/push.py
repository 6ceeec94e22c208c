"""`push-top`: the best-scoring cutouts that are not yet tasks go to Label Studio."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ml_backend.label_schema import local_files_dir, parse_label_config
from ml_backend.labelstudio import LabelStudioClient
from ml_backend.survey.layout import MANIFEST, read_manifest
from ml_backend.survey.results import iter_merged

logger = logging.getLogger(__name__)


def push_top(client: LabelStudioClient, survey_dir: str | Path, k: int, project_id: int, *,
             anomaly_label: str = "anomaly", document_root: Path | None = None,
             batch_size: int = 500, prelabel: bool = False) -> dict[str, int]:
    """Create tasks for the `k` highest-scoring cutouts the project lacks, with predictions.

    Task data comes from each store's ``<store>.tasks.jsonl`` (written by `amls import`);
    a cutout without a task row is skipped and counted. The prediction carries the survey
    score and model version (with `prelabel`, also the more likely choice). Cutouts already
    in the project (by ``cutout_id``) are not counted towards `k`. Returns counts: created,
    already_in_project, without_task_row.
    """
    from ml_backend.task_rows import read_tasks, tasks_path

    if k < 1 or batch_size < 1:
        raise ValueError(f"K and the batch size must be >= 1, got {k} and {batch_size}")
    survey_dir = Path(survey_dir)
    manifest = read_manifest(survey_dir / MANIFEST)
    paths = {s["name"]: Path(s["path"]) for s in manifest["stores"]}
    schema = parse_label_config(client.label_config(project_id), anomaly_label,
                                prelabel=prelabel)
    existing = client.cutout_ids(project_id)
    task_rows: dict[str, dict[str, dict[str, Any]]] = {}
    counts = {"created": 0, "already_in_project": 0, "without_task_row": 0}
    tasks: list[dict[str, Any]] = []
    for cid, score_text, store in iter_merged(survey_dir):
        if len(tasks) >= k:
            break
        if cid in existing:
            counts["already_in_project"] += 1
            continue
        if store not in task_rows:
            rows_file = tasks_path(paths[store])
            task_rows[store] = read_tasks(rows_file) if rows_file.exists() else {}
        row = task_rows[store].get(cid)
        if row is None:
            counts["without_task_row"] += 1
            continue
        score = float(score_text)
        tasks.append({"data": row,
                      "predictions": [schema.prediction(score, manifest["model_version"])]})
    if tasks and document_root is not None:
        folder = local_files_dir([t["data"] for t in tasks], document_root)
        if folder is not None:
            client.ensure_local_storage(project_id, folder)
    for start in range(0, len(tasks), batch_size):
        client.import_tasks(project_id, tasks[start:start + batch_size])
        counts["created"] += len(tasks[start:start + batch_size])
    logger.info("project %d: pushed %d top cutouts from %s", project_id, counts["created"],
                survey_dir)
    return counts
