"""Training jobs: `run_training`, one cycle for one Label Studio project.

`run_training(project_id, settings)` reads the project's labels from Label Studio, runs one
FixMatch cycle continuing from the project's LATEST model, scores every unlabelled task, writes
the scores back as predictions of a new model version and only then publishes that version.
Its settings are one picklable `Config` (`Config.for_jobs()`: no secrets), so an RQ worker or a
thread can run it (`ml_backend.submitters` queues it).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.config import Config
from ml_backend.core.checkpoint import VERSION_PREFIX
from ml_backend.core.config import TrainConfig
from ml_backend.core.embedding_cache import write_embeddings
from ml_backend.dashboard_data import record_version
from ml_backend.label_schema import parse_label_config, training_labels
from ml_backend.labelstudio import LabelStudioClient, ProjectNotFound
from ml_backend.registry import ModelRegistry
from ml_backend.task_pixels import (
    ImageSource,
    read_tasks,
    resolve_pixels,
    score_and_embed,
    unlabeled_pool,
)

logger = logging.getLogger(__name__)

# A running job records its progress at most this often (and at every change of stage).
PROGRESS_EVERY_S = 2.0
# ... and shows it in the queue tab's title in Label Studio at most this often.
TITLE_EVERY_S = 10.0


def run_training(project_id: int, settings: Config,
                 client: LabelStudioClient | None = None) -> dict[str, Any]:
    """Train one cycle for a project and publish it; returns a JSON-able summary.

    `client` None connects to `settings.label_studio_url` with `settings`' API key or, when it
    has none (`Config.for_jobs()`: RQ workers), the worker's LABEL_STUDIO_API_KEY. A project
    Label Studio answers 404 for is skipped before anything is written (no folder appears in
    MODEL_DIR, whatever project ids webhooks name). Otherwise the outcome (duration, error)
    is recorded in MODEL_DIR/<project>/status.json; on any error the previous version keeps
    serving and the exception propagates.
    """
    registry = ModelRegistry(settings.model_dir)
    started = time.time()
    try:
        client = client or job_client(settings)
        label_config = client.label_config(project_id)
    except ProjectNotFound as err:
        logger.warning("project %d: not training: %s", project_id, err)
        return {"project": project_id, "status": "skipped", "reason": str(err)}
    except Exception as err:  # Label Studio unreachable or refusing: shown in /metrics
        _record_failure(registry, project_id, started,
                        int(registry.read_status(project_id).get("jobs_total", 0)) + 1, err)
        logger.error("project %d: cannot read the project from Label Studio: %s", project_id,
                     err)
        raise
    previous = registry.read_status(project_id)
    jobs_total = int(previous.get("jobs_total", 0)) + 1
    registry.write_status(project_id, {**previous, "running_since": started,
                                       "jobs_total": jobs_total})
    title = QueueTitle(client, project_id)
    progress = JobProgress(registry, project_id, started, title)
    waiting = None
    try:
        summary = train_and_publish(project_id, settings, client, registry, label_config,
                                    on_progress=progress)
        if summary["status"] == "trained" and settings.fast_rerank and settings.rerank_blend:
            summary["ranking"] = _publish_blend(project_id, settings, client, registry)
        waiting = summary.get("waiting_for")
    except Exception as err:
        _record_failure(registry, project_id, started, jobs_total, err)
        logger.error("project %d: training job failed after %.1f s: %s", project_id,
                     time.time() - started, err)
        raise
    finally:
        registry.write_progress(project_id, None)
        title.show(waiting)
    duration = time.time() - started
    registry.write_status(project_id, {"jobs_total": jobs_total, "last_finished": time.time(),
                                       "last_duration_s": round(duration, 3),
                                       "last_error": None, "last_result": summary})
    logger.info("project %d: training job done in %.1f s: %s", project_id, duration, summary)
    return {**summary, "duration_s": round(duration, 3)}


def _publish_blend(project_id: int, settings: Config, client: LabelStudioClient,
                   registry: ModelRegistry) -> dict[str, Any]:
    """Right after a cycle, publish it blended with a head refit on its own embeddings
    (`ml_backend.rerank`): the ranking benchmarks/RESULTS.md measures best after a cycle.
    The cycle is already published, so a failure here only leaves its own scores serving."""
    from ml_backend.rerank import rerank_and_publish

    try:
        return rerank_and_publish(project_id, settings, client, registry, embed_missing=True)
    except Exception as err:  # the cycle's own version serves; the next burst tries again
        logger.warning("project %d: blending the new cycle failed, its own scores serve: %s",
                       project_id, err, exc_info=True)
        return {"status": "failed", "reason": f"{type(err).__name__}: {err}"}


def job_client(settings: Config) -> LabelStudioClient:
    """The Label Studio client of a job: `settings`' URL and API key or, when it has none
    (`Config.for_jobs()`: RQ workers), the worker's LABEL_STUDIO_API_KEY."""
    key = settings.label_studio_api_key or Config.from_env().label_studio_api_key
    return LabelStudioClient(settings.label_studio_url, key)


def _record_failure(registry: ModelRegistry, project_id: int, started: float,
                    jobs_total: int, err: BaseException) -> None:
    """`err` as the project's last job outcome."""
    trace = traceback.format_exception(type(err), err, err.__traceback__, limit=8)
    registry.write_status(project_id, {
        "jobs_total": jobs_total, "last_finished": time.time(),
        "last_duration_s": round(time.time() - started, 3),
        "last_error": f"{type(err).__name__}: {err}",
        "last_traceback": "".join(trace), "last_result": None})


class QueueTitle:
    """What a job is doing, in the title of the queue tab annotators look at ("training
    40/100 · Most anomalous first"); best effort: Label Studio refusing costs a log line."""

    STAGES = {"train": "training {done}/{total}", "score": "scoring {total:,}",
              "write": "writing {total:,}"}

    def __init__(self, client: LabelStudioClient, project_id: int) -> None:
        self.client, self.project_id = client, project_id
        self._shown: str | None = None
        self._stage, self._at = "", 0.0

    def progress(self, stage: str, done: int, total: int) -> None:
        if stage == self._stage and time.time() - self._at < TITLE_EVERY_S:
            return
        self._stage = stage
        self.show(self.STAGES.get(stage, stage).format(done=done, total=total))

    def show(self, text: str | None) -> None:
        if text == self._shown:
            return
        self._shown, self._at = text, time.time()
        try:
            self.client.set_queue_status(self.project_id, text)
        except Exception as err:  # noqa: BLE001 - cosmetic; the job must not fail for it
            logger.info("project %d: queue title not updated: %s", self.project_id, err)


class JobProgress:
    """How far a job is, in MODEL_DIR/<project>/progress.json (what /metrics shows, for
    in-process and RQ jobs alike), in the RQ job's meta and, when given, in the queue tab's
    title; written at most every PROGRESS_EVERY_S seconds, and at every change of stage."""

    def __init__(self, registry: ModelRegistry, project_id: int, started: float,
                 title: QueueTitle | None = None) -> None:
        self.registry, self.project_id, self.started = registry, project_id, started
        self.title = title
        self._last: tuple[str, float] = ("", 0.0)

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.time()
        if stage == self._last[0] and now - self._last[1] < PROGRESS_EVERY_S and done < total:
            return
        self._last = (stage, now)
        if self.title is not None:
            self.title.progress(stage, done, total)
        progress = {"stage": stage, "done": done, "total": total, "started": self.started,
                    "updated": now}
        self.registry.write_progress(self.project_id, progress)
        from rq import get_current_job

        job = get_current_job()
        if job is not None:
            job.meta["progress"] = progress
            job.save_meta()


# ---- one training cycle ----------------------------------------------------------------------

def train_and_publish(project_id: int, settings: Config, client: LabelStudioClient,
                      registry: ModelRegistry, label_config: str, *,
                      on_progress: Callable[[str, int, int], None]) -> dict[str, Any]:
    """The body of `run_training`: labels in, new version published, predictions out."""
    from ml_backend.core.checkpoint import load_model_dir
    from ml_backend.core.train import save_cycle, train_cycle

    _repoint_label_studio(client, registry, project_id)
    anomaly_label = settings.anomaly_label
    schema = parse_label_config(label_config, anomaly_label, prelabel=settings.prelabel)
    tasks = list(client.iter_tasks(project_id))
    labels, held_out = training_labels(tasks, schema)
    n_anomaly = sum(labels.values())
    n_other = len(labels) - n_anomaly
    if n_anomaly < settings.min_anomalies or n_other < settings.min_normals:
        reason = (f"needs at least {settings.min_anomalies} {anomaly_label!r} and "
                  f"{settings.min_normals} other labels (AMLS_MIN_ANOMALIES, "
                  f"AMLS_MIN_NORMALS); has {n_anomaly} and {n_other}")
        logger.info("project %d: not training yet: %s", project_id, reason)
        waiting = (f"labels {n_anomaly}/{settings.min_anomalies} {anomaly_label}, "
                   f"{n_other}/{settings.min_normals} other")
        return {"project": project_id, "status": "skipped", "reason": reason,
                "waiting_for": waiting}
    pixels = resolve_pixels(project_id, tasks, schema.image_key, registry,
                            settings.store_root_dirs,
                            ImageSource(client, settings.image_hosts))
    staging = registry.staging_dir(project_id)
    new_version = None
    try:
        pixels.check_same_pixels()
        labeled_ids = sorted(t for t in labels if t in pixels.rows)
        labeled = read_tasks(pixels, labeled_ids)
        y = np.array([labels[t] for t in labeled_ids], dtype=np.int64)
        unlabeled = sorted(t for t in pixels.rows if t not in labels and t not in held_out)
        pool = unlabeled_pool(pixels, unlabeled, default=pixels.rows[labeled_ids[0]][0])
        store = pixels.stores[pixels.rows[labeled_ids[0]][0]]
        cfg = settings.train_config(store.invariance)
        stretch = store.stretch
        parent_dir = _parent_to_continue(project_id, registry, cfg, labeled.shape[-1], stretch)
        result = train_cycle(cfg, labeled, y, pool, init_dir=parent_dir,
                             on_progress=lambda i, n, _stats: on_progress("train", i, n))
        counts = {anomaly_label: int(y.sum()), schema.normal_choice: int((y == 0).sum())}
        meta = save_cycle(result, staging, cfg=cfg, stretch=stretch, parent=result.init_meta,
                          label_counts=counts)
        new_version = meta.version
        model, meta = load_model_dir(staging)
        # One pass over every task with pixels: scores, and the embeddings the instant
        # re-ranking (`ml_backend.rerank`) fits its head on, labelled tasks included.
        on_progress("score", 0, len(pixels.rows))
        scored, probabilities, features = score_and_embed(
            pixels, sorted(pixels.rows), model, meta, cfg.score_batch_size, cfg.device)
        write_embeddings(staging, scored, features)
        by_task = dict(zip(scored, probabilities.tolist(), strict=True))
        record_version(staging, registry.latest_dir(project_id), by_task, labels, held_out,
                       tasks, schema.image_key, result.steps)
        evaluation = _evaluate_held_out(project_id, held_out, by_task)
        scores = [(t, by_task[t]) for t in unlabeled if t in by_task]
        on_progress("write", 0, len(scores))
        written = client.write_predictions(project_id, schema, scores, meta.version,
                                           settings.prediction_write_batch)
        # Local first: Label Studio is only ever pointed at a version that exists here.
        with registry.publish_lock(project_id):  # an instant re-ranking may publish too
            registry.publish(project_id, staging, meta.version)
            switched = point_label_studio_at(client, project_id, meta.version)
    except BaseException:
        registry.discard(staging)
        if new_version is not None:
            forget_version(client, project_id, new_version)
        raise
    finally:
        pixels.close()
    pruned = registry.prune(project_id, settings.versions_kept)
    kept = set(registry.versions(project_id)) - set(pruned)
    delete_old_predictions(client, project_id, kept)
    client.ensure_views(project_id)
    return {"project": project_id, "status": "trained", "model_version": meta.version,
            "labels": counts, "label_studio_updated": switched,
            "predictions": written, "unlabeled": len(unlabeled), "evaluation": evaluation,
            "skipped_tasks": len(tasks) - len(pixels.rows)}


def point_label_studio_at(client: LabelStudioClient, project_id: int, version: str) -> bool:
    """Make `version` (already published) the project's model version in Label Studio.

    A failure is logged, not raised: the version is published and serves /predict; the next
    job re-points Label Studio (`_repoint_label_studio`). Returns whether it worked.
    """
    try:
        client.set_model_version(project_id, version)
    except Exception as err:  # noqa: BLE001 - any failure leaves the same, retried state
        logger.warning("project %d: published %s, but Label Studio was not updated (%s); the "
                       "next job retries", project_id, version, err)
        return False
    return True


def _repoint_label_studio(client: LabelStudioClient, registry: ModelRegistry,
                          project_id: int) -> None:
    """Point Label Studio at LATEST when a previous job could not (it names another of our
    versions, or none). A version the user chose that is not ours is left alone."""
    latest = registry.latest(project_id)
    if latest is None:
        return
    current = client.current_model_version(project_id)
    if current != latest and (not current or current.startswith(VERSION_PREFIX)):
        logger.info("project %d: Label Studio names model version %r, LATEST is %s: "
                    "re-pointing it", project_id, current, latest)
        point_label_studio_at(client, project_id, latest)


def _parent_to_continue(project_id: int, registry: ModelRegistry, cfg: TrainConfig,
                        channels: int,
                        stretch: dict[str, Any]) -> Path | None:
    """The latest model to continue from, or None to start afresh from ImageNet weights.

    A fast version (`ml_backend.rerank`) is skipped for the training cycle it refit, and a
    first ranking on ImageNet embeddings (kind "imagenet") starts a new model.

    A model trained on another input or invariance (`lineage_mismatch`) cannot continue; the
    settings were changed on purpose, and every label is still in Label Studio, so the job
    starts a new lineage instead of failing.
    """
    from ml_backend.core.checkpoint import IMAGENET_KIND, lineage_mismatch, read_meta

    parent_dir = registry.latest_dir(project_id)
    if parent_dir is None:
        return None
    meta = read_meta(parent_dir)
    if meta.kind == "fast":  # a re-ranking's refit head: train on from the cycle it came from
        parent_dir = registry.version_dir(project_id, str(meta.parent))
        if not parent_dir.is_dir():
            logger.warning("project %d: %s's parent %s is gone: starting a new model from "
                           "ImageNet weights", project_id, meta.version, meta.parent)
            return None
        meta = read_meta(parent_dir)
    if meta.kind == IMAGENET_KIND:  # a first ranking before any cycle: nothing trained yet
        return None
    changes = lineage_mismatch(meta, cfg, channels, stretch)
    if not changes:
        return parent_dir
    logger.warning("project %d: model %s cannot continue (%s): starting a new model from "
                   "ImageNet weights", project_id, meta.version, "; ".join(changes))
    return None


def _evaluate_held_out(project_id: int, held_out: dict[int, int],
                       scores: dict[int, float]) -> dict[str, Any] | None:
    """AUROC, AP and top-k precision of the new model on the ground-truth tasks, or None."""
    from ml_backend.core.metrics import evaluate

    task_ids = sorted(t for t in held_out if t in scores)
    if not task_ids:
        return None
    result = evaluate(np.array([held_out[t] for t in task_ids]),
                      np.array([scores[t] for t in task_ids], dtype=np.float32))
    logger.info("project %d: held-out evaluation on %d ground-truth tasks: %s", project_id,
                len(task_ids), result)
    return result


def forget_version(client: LabelStudioClient, project_id: int, version: str) -> None:
    """Best-effort removal of a failed version's predictions (the error is re-raised anyway)."""
    try:
        client.delete_predictions(project_id, version)
    except Exception as err:  # noqa: BLE001 - we are already handling the original failure
        logger.warning("project %d: could not delete predictions of failed version %s: %s",
                       project_id, version, err)


def delete_old_predictions(client: LabelStudioClient, project_id: int, kept: set[str]) -> None:
    """Delete this backend's predictions whose version is no longer kept on disk.

    Housekeeping after a published version: a failure (Label Studio busy, a timeout while it
    deletes a big version one prediction at a time) is logged, and the next job tries again.
    """
    try:
        held = client.prediction_versions(project_id)
    except Exception as err:  # noqa: BLE001 - see the docstring
        logger.warning("project %d: cannot list prediction versions to prune (%s); the next "
                       "job tries again", project_id, err)
        return
    for version, count in held.items():
        if not version.startswith(VERSION_PREFIX) or version in kept:
            continue
        try:
            client.delete_predictions(project_id, version, count)
        except Exception as err:  # noqa: BLE001 - see the docstring
            logger.warning("project %d: deleting the %d predictions of old version %s failed "
                           "(%s); the next job tries again", project_id, count, version, err)
            continue
        logger.info("project %d: deleted %d predictions of old version %s", project_id, count,
                    version)
