"""`AnomalyService`: the backend's only stateful object.

It holds the loaded model of each project (cached by version and reloaded when the registry's
LATEST pointer moves), turns Label Studio tasks into predictions, and hands training requests
to a coalescing job submitter. Built once at startup and passed to `create_app`.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.config import Config
from ml_backend.jobs import run_training
from ml_backend.label_schema import parse_label_config
from ml_backend.labelstudio import LabelStudioClient
from ml_backend.registry import RERANK_STATUS, ModelRegistry
from ml_backend.rerank import run_rerank
from ml_backend.submitters import InProcessSubmitter, JobSubmitter, RQSubmitter
from ml_backend.task_pixels import is_task_id, resolve_pixels, score_tasks

logger = logging.getLogger(__name__)

UNTRAINED = "untrained"
MAX_SEEN = 1000
MODEL_CLASS = "AnomalyMatch"
# /health asks Label Studio at most this often, and waits at most LABEL_STUDIO_TIMEOUT_S.
LABEL_STUDIO_CHECK_S = 15.0
LABEL_STUDIO_TIMEOUT_S = 1.0


def iso_utc(epoch_s: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC to the second ("2026-12-03T12:40:10Z"); None stays None."""
    if epoch_s is None:
        return None
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _progress(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    """A running job's progress for /metrics: stage, done / total, ISO 8601 times."""
    if raw is None:
        return None
    return {"stage": raw.get("stage"), "done": raw.get("done"), "total": raw.get("total"),
            "started": iso_utc(raw.get("started")), "updated": iso_utc(raw.get("updated"))}


class AnomalyService:
    """Predictions from each project's latest model; training requests to `submitter`."""

    def __init__(self, cfg: Config, registry: ModelRegistry, submitter: JobSubmitter,
                 rerank_submitter: JobSubmitter | None = None) -> None:
        self.cfg = cfg
        self.registry = registry
        self.submitter = submitter
        self.rerank_submitter = rerank_submitter  # instant re-rankings; None when disabled
        # project -> ((version served, model, meta), the LATEST it was chosen for)
        self._models: dict[int, tuple[tuple[str, Any, Any], str]] = {}
        self._lock = threading.Lock()
        # Projects asked to train, newest last, at most MAX_SEEN (shown in /metrics).
        self._seen: dict[int, None] = {}
        # (monotonic time, answer) of the last Label Studio check made by /health.
        self._ls_state: tuple[float, str] | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> AnomalyService:
        """Registry under cfg.model_dir; RQ jobs when cfg.redis_url is set, else threads: one
        for training cycles and, with cfg.fast_rerank, one for instant re-rankings."""
        registry = ModelRegistry(cfg.model_dir)
        jobs = [(run_training, cfg.queue_name, cfg.debounce_s, "train")]
        if cfg.fast_rerank:
            jobs.append((run_rerank, cfg.fast_queue_name, cfg.rerank_debounce_s, "rerank"))
        submitters: list[JobSubmitter] = []
        for func, queue_name, debounce_s, name in jobs:
            if cfg.redis_url:
                submitters.append(RQSubmitter(cfg.redis_url, queue_name, func,
                                              {"settings": cfg.for_jobs()}, cfg.job_timeout_s,
                                              debounce_s, job_name=name))
            else:  # the thread is in this process: it may keep the API key
                settings = cfg.for_jobs().replace(label_studio_api_key=cfg.label_studio_api_key)
                submitters.append(InProcessSubmitter(functools.partial(func, settings=settings),
                                                     debounce_s=debounce_s))
        return cls(cfg, registry, *submitters)

    def close(self) -> None:
        self.submitter.close()
        if self.rerank_submitter is not None:
            self.rerank_submitter.close()

    # ---- what Label Studio asks ----------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """"UP" (the process answers) plus the state of what jobs depend on: MODEL_DIR
        writable, the job queue reachable, Label Studio reachable with a valid API key (asked
        at most every LABEL_STUDIO_CHECK_S); `degraded` lists those that are not."""
        checks = {"model_dir": _model_dir_state(self.registry.root),
                  "queue": self.submitter.health(),
                  "label_studio": self._label_studio_state()}
        return {"status": "UP", "model_class": MODEL_CLASS,
                "queue": "rq" if self.cfg.redis_url else "in-process",
                "anomaly_label": self.cfg.anomaly_label, "dependencies": checks,
                "degraded": sorted(name for name, state in checks.items() if state != "ok")}

    def _label_studio_state(self) -> str:
        cfg = self.cfg
        if not cfg.label_studio_url or not cfg.label_studio_api_key:
            return ("not configured: training needs LABEL_STUDIO_URL and "
                    "LABEL_STUDIO_API_KEY")
        now = time.monotonic()
        with self._lock:
            if self._ls_state is not None and now - self._ls_state[0] < LABEL_STUDIO_CHECK_S:
                return self._ls_state[1]
        state = LabelStudioClient(cfg.label_studio_url, cfg.label_studio_api_key,
                                  timeout_s=LABEL_STUDIO_TIMEOUT_S).state()
        with self._lock:
            self._ls_state = (now, state)
        return state

    def model_version(self, project_id: int) -> str:
        """The serving version, or "untrained" before the project's first training job."""
        return self.registry.latest(project_id) or UNTRAINED

    def request_training(self, project_id: int) -> str:
        """Queue a training job unless one is already queued: "queued" / "already-queued"."""
        self._seen.pop(project_id, None)
        self._seen[project_id] = None
        while len(self._seen) > MAX_SEEN:
            del self._seen[next(iter(self._seen))]
        if self.rerank_submitter is not None:  # seconds, from the last cycle's embeddings
            logger.info("project %d: re-ranking %s", project_id,
                        self.rerank_submitter.submit(project_id))
        outcome = self.submitter.submit(project_id)
        logger.info("project %d: training %s", project_id, outcome)
        return outcome

    def predict(self, project_id: int, tasks: list[dict[str, Any]],
                label_config: str) -> list[dict[str, Any]]:
        """One prediction per task, in order.

        Before the first model, or for a task whose pixels we cannot find or may not read
        (unusable `data`, a store outside `cfg.store_root_dirs` or not a cutout store), the
        prediction has an empty `result` and no score: Label Studio accepts it and nothing is
        invented.
        """
        schema = parse_label_config(label_config, self.cfg.anomaly_label,
                                    prelabel=self.cfg.prelabel)
        loaded = self._model(project_id)
        if loaded is None:
            return [schema.prediction(None, UNTRAINED) for _ in tasks]
        version, model, meta = loaded
        scores = self._score(project_id, tasks, schema.image_key, model, meta)
        return [schema.prediction(score, version) for score in scores]

    def versions(self, project_id: int) -> dict[str, Any]:
        names = self.registry.versions(project_id)
        return {"versions": names, "latest": self.registry.latest(project_id),
                "details": {v: _meta_summary(self.registry.read_meta(project_id, v))
                            for v in names}}

    def metrics(self) -> dict[str, Any]:
        """Per project: serving version, queue state, last job outcome, label counts."""
        try:
            projects = sorted(set(self.registry.projects()) | set(self._seen))
        except OSError as err:
            return {"projects": {}, "error": f"cannot list {self.registry.root}: {err}"}
        return {"projects": {str(p): self._safe_project_metrics(p) for p in projects}}

    def project_metrics(self, project_id: int) -> dict[str, Any]:
        """One project's /metrics entry (also for projects with no directory yet)."""
        return self._safe_project_metrics(project_id)

    def _safe_project_metrics(self, project_id: int) -> dict[str, Any]:
        """One project's metrics, or {"error": ...}: one broken project never hides others."""
        try:
            return self._project_metrics(project_id)
        except Exception as err:  # noqa: BLE001 - reported in the answer, and logged
            logger.warning("project %d: metrics unavailable: %s", project_id, err)
            return {"error": f"{type(err).__name__}: {err}"}

    # ---- internals -------------------------------------------------------------------------

    def _project_metrics(self, project_id: int) -> dict[str, Any]:
        latest = self.registry.latest(project_id)
        meta = self.registry.read_meta(project_id, latest) if latest else {}
        status = self.registry.read_status(project_id)
        state = self.submitter.state(project_id)
        return {
            "model_version": latest or UNTRAINED,
            "versions": self.registry.versions(project_id),
            "queue": {**state,
                      "progress": _progress(self.registry.read_progress(project_id))
                      if state["running"] else None,
                      "last_duration_s": status.get("last_duration_s"),
                      "last_finished": iso_utc(status.get("last_finished")),
                      "last_error": status.get("last_error"),
                      "jobs_total": status.get("jobs_total", 0),
                      "last_result": status.get("last_result")},
            "rerank": self._rerank_metrics(project_id),
            "label_counts": meta.get("label_counts", {}),
            "metrics": meta.get("metrics", {}),
        }

    def _rerank_metrics(self, project_id: int) -> dict[str, Any] | None:
        """The instant re-ranking's queue state and last outcome; None when disabled."""
        if self.rerank_submitter is None:
            return None
        status = self.registry.read_status(project_id, RERANK_STATUS)
        return {**self.rerank_submitter.state(project_id),
                "last_duration_s": status.get("last_duration_s"),
                "last_finished": iso_utc(status.get("last_finished")),
                "last_error": status.get("last_error"),
                "last_result": status.get("last_result")}

    def _model(self, project_id: int) -> tuple[str, Any, Any] | None:
        """(version, model, meta) of LATEST, loading it when LATEST moved; None if untrained.

        A LATEST that cannot be loaded (missing or corrupt directory) falls back to the newest
        intact version, with the reason logged; None when no version loads.
        """
        from ml_backend.core.checkpoint import CheckpointError, load_model_dir
        from ml_backend.core.model import resolve_device

        try:
            latest = self.registry.latest(project_id)
        except RuntimeError as err:  # LATEST names a version that is not there
            logger.warning("project %d: %s", project_id, err)
            latest = ""
        if latest is None:
            return None
        with self._lock:
            cached = self._models.get(project_id)
            if cached is not None and cached[1] == latest:
                return cached[0]
            older = [v for v in reversed(self.registry.versions(project_id)) if v != latest]
            for version in [latest, *older] if latest else older:
                try:
                    model, meta = load_model_dir(self.registry.version_dir(project_id, version),
                                                 device=resolve_device(self.cfg.train.device))
                except CheckpointError as err:
                    logger.warning("project %d: cannot serve model version %s: %s", project_id,
                                   version, err)
                    continue
                self._models[project_id] = ((version, model, meta), latest)
                logger.info("project %d: loaded model version %s", project_id, version)
                return self._models[project_id][0]
            return None

    def _score(self, project_id: int, tasks: list[dict[str, Any]], image_key: str,
               model: Any, meta: Any) -> list[float | None]:
        """P(anomaly) per task, None where its pixels are unavailable (nothing is downloaded:
        URL tasks use the project's cache store only if a job already filled it)."""
        ids = [task.get("id") if isinstance(task, dict) else None for task in tasks]
        with resolve_pixels(project_id, [t for t in tasks if isinstance(t, dict)], image_key,
                            self.registry, self.cfg.store_root_dirs) as pixels:
            scored = dict(score_tasks(pixels, list(pixels.rows), model, meta,
                                      self.cfg.train.score_batch_size,
                                      self.cfg.train.device))
        return [scored[t] if is_task_id(t) and t in scored and np.isfinite(scored[t]) else None
                for t in ids]


def _model_dir_state(root: Path) -> str:
    """"ok" when MODEL_DIR is a writable folder, or could be made in a writable one; else why.

    Only looks: a health check creates nothing."""
    import os

    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        return f"{root} cannot be a folder ({existing} is not one)"
    return "ok" if os.access(existing, os.W_OK | os.X_OK) else f"{existing} is not writable"


def _meta_summary(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta.get(k) for k in ("parent", "created", "label_counts", "iterations_total",
                                     "metrics")}
