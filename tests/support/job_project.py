"""A training-job project in memory: a fake Label Studio client over a small random store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ml_backend.config import Config
from ml_backend.core.config import TrainConfig
from tests.support.shipped import BINARY_CONFIG

LABEL_CONFIG = BINARY_CONFIG
N_TASKS, ANOMALIES, NORMALS = 16, (1, 2, 3), (4, 5, 6, 7, 8)


class FakeLabelStudio:
    """The client calls a job makes, in memory; `fail` names one method that raises."""

    def __init__(self, tasks: list[dict[str, Any]]) -> None:
        self.tasks = tasks
        self.model_version = ""
        self.predictions: dict[str, int] = {}
        self.scores: dict[str, dict[int, float]] = {}
        self.fail: str | None = None
        self.task_reads: list[tuple[bool, list[int] | None]] = []
        self.queue_statuses: list[str | None] = []  # the queue tab's title suffixes shown

    def _maybe_fail(self, name: str) -> None:
        if self.fail == name:
            raise ConnectionError(f"injected failure in {name}")

    def current_model_version(self, project_id: int) -> str:
        return self.model_version

    def label_config(self, project_id: int) -> str:
        self._maybe_fail("label_config")
        return LABEL_CONFIG

    def iter_tasks(self, project_id: int, *, annotated_only: bool = False,
                   ids: list[int] | None = None):
        """What Label Studio's task list answers for `LabelStudioClient.iter_tasks`."""
        self._maybe_fail("iter_tasks")
        self.task_reads.append((annotated_only, ids))
        return iter([t for t in self.tasks
                     if (not annotated_only or any(not a.get("was_cancelled")
                                                   for a in t.get("annotations") or []))
                     and (ids is None or t["id"] in ids)])

    def write_predictions(self, project_id, schema, scores, model_version, batch_size) -> int:
        self._maybe_fail("write_predictions")
        self.predictions[model_version] = len(scores)
        self.scores[model_version] = dict(scores)
        return len(scores)

    def set_model_version(self, project_id: int, model_version: str) -> None:
        self._maybe_fail("set_model_version")
        self.model_version = model_version

    def prediction_versions(self, project_id: int) -> dict[str, int]:
        return dict(self.predictions)

    def delete_predictions(self, project_id: int, model_version: str, count: int = 0) -> None:
        self._maybe_fail("delete_predictions")
        self.predictions.pop(model_version, None)

    def ensure_views(self, project_id: int) -> dict[str, int]:
        return {"Most anomalous first": 1}

    def set_queue_status(self, project_id: int, status: str | None) -> bool:
        self._maybe_fail("set_queue_status")
        self.queue_statuses.append(status)
        return True



def job_settings(tmp_path: Path) -> Config:
    """A two-iteration job on 32 px images, on the CPU, that publishes the cycle's own scores
    (the blend a job publishes after it is tested on its own: `rerank_blend=True`)."""
    return Config(label_studio_url="http://ls.test", model_dir=tmp_path / "models",
                  train=TrainConfig(image_size=32, batch_size=4, device="cpu"), iterations=2,
                  rerank_blend=False)
