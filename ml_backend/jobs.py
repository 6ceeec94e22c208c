"""Training jobs: `run_training`, one cycle for one Label Studio project.

`run_training(project_id, ...)` reads the project's labels from Label Studio, runs one FixMatch
cycle continuing from the project's LATEST model, scores every unlabelled task, writes the
scores back as predictions of a new model version and only then publishes that version.
It takes plain, picklable arguments, so an RQ worker or a thread can run it
(`ml_backend.submitters` queues it).
"""

from __future__ import annotations

import io
import json
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.config import Config
from ml_backend.labelstudio import (
    ChoiceSchema,
    LabelStudioClient,
    ground_truth_labels,
    latest_labels,
    parse_label_config,
)
from ml_backend.registry import ModelRegistry

logger = logging.getLogger(__name__)

# Side in pixels of images cached from Label Studio (plain projects); the model resizes them.
CACHE_SIDE = 128
# Prefix of model versions written by this backend (core.checkpoint.new_version); only these
# prediction versions are ever deleted from Label Studio.
OUR_VERSION_PREFIX = "amls-"
def job_kwargs(cfg: Config) -> dict[str, Any]:
    """The settings `run_training` needs, as plain values (the API key is NOT included)."""
    return {
        "label_studio_url": cfg.label_studio_url, "model_dir": str(cfg.model_dir),
        "anomaly_label": cfg.anomaly_label, "iterations": cfg.iterations,
        "image_size": cfg.image_size, "center_crop": cfg.center_crop,
        "batch_size": cfg.batch_size,
        "score_batch_size": cfg.score_batch_size, "versions_kept": cfg.versions_kept,
        "write_batch": cfg.prediction_write_batch,
        "image_hosts": sorted(cfg.image_hosts), "device": cfg.device,
        "store_roots": [str(root) for root in cfg.store_root_dirs],
    }


class StoreRefused(ValueError):
    """A task's `data.store` is not a path we may open (type, location or file kind)."""


def allowed_store_path(raw: object, roots: Sequence[Path]) -> Path:
    """The resolved path of a task's `data.store`, if it is a file inside one of `roots`.

    Symlinks and `..` are resolved first, so neither can lead outside the roots. Raises
    StoreRefused naming the reason; whether the file really is a cutout store is left to
    `CutoutStore.open`.
    """
    if not isinstance(raw, str) or not raw.strip():
        raise StoreRefused(f"store must be a path string, got {type(raw).__name__}")
    try:
        path = Path(raw).resolve()
    except (OSError, ValueError) as err:  # NUL bytes, symlink loops, over-long names
        raise StoreRefused(f"store path cannot be resolved: {err}") from None
    if not any(path.is_relative_to(root) for root in roots):
        raise StoreRefused(f"store {path} is outside the allowed store roots "
                           f"({', '.join(map(str, roots))}; set AMLS_STORE_ROOTS)")
    if not path.is_file():
        raise StoreRefused(f"store {path} is not an existing regular file")
    return path


def run_training(project_id: int, *, label_studio_url: str, model_dir: str,
                 anomaly_label: str = "anomaly", iterations: int = 100, image_size: int = 64,
                 center_crop: float = 1.0, batch_size: int = 16, score_batch_size: int = 256,
                 versions_kept: int = 3, write_batch: int = 500,
                 image_hosts: list[str] | None = None, device: str = "auto",
                 store_roots: list[str] | None = None,
                 api_key: str | None = None) -> dict[str, Any]:
    """Train one cycle for a project and publish it; returns a JSON-able summary.

    Task stores must lie under `store_roots` (default: MODEL_DIR and the working directory,
    as `Config.store_root_dirs`); tasks with other stores are skipped with a warning.
    `api_key` None reads LABEL_STUDIO_API_KEY via `Config.from_env()` (RQ workers: keeps the key
    out of Redis). The outcome (duration, error) is recorded in MODEL_DIR/<project>/status.json;
    on any error the previous version keeps serving and the exception propagates.
    """
    registry = ModelRegistry(Path(model_dir))
    key = api_key if api_key is not None else Config.from_env().label_studio_api_key
    roots = (tuple(Path(r) for r in store_roots) if store_roots is not None
             else Config(model_dir=Path(model_dir)).store_root_dirs)
    started = time.time()
    previous = registry.read_status(project_id)
    jobs_total = int(previous.get("jobs_total", 0)) + 1
    registry.write_status(project_id, {**previous, "running_since": started,
                                       "jobs_total": jobs_total})
    try:
        summary = train_and_publish(
            project_id, registry=registry, label_studio_url=label_studio_url, api_key=key,
            anomaly_label=anomaly_label, iterations=iterations, image_size=image_size,
            center_crop=center_crop, batch_size=batch_size, score_batch_size=score_batch_size,
            versions_kept=versions_kept, write_batch=write_batch,
            image_hosts=frozenset(image_hosts or []), device=device, store_roots=roots,
            on_progress=_report_progress)
    except Exception as err:
        duration = time.time() - started
        logger.error("project %d: training job failed after %.1f s: %s", project_id, duration, err)
        registry.write_status(project_id, {
            "jobs_total": jobs_total, "last_finished": time.time(),
            "last_duration_s": round(duration, 3),
            "last_error": f"{type(err).__name__}: {err}",
            "last_traceback": traceback.format_exc(limit=8), "last_result": None})
        raise
    duration = time.time() - started
    registry.write_status(project_id, {"jobs_total": jobs_total, "last_finished": time.time(),
                                       "last_duration_s": round(duration, 3),
                                       "last_error": None, "last_result": summary})
    logger.info("project %d: training job done in %.1f s: %s", project_id, duration, summary)
    return {**summary, "duration_s": round(duration, 3)}


def _report_progress(stage: str, done: int, total: int) -> None:
    """Progress into the RQ job's meta (a no-op outside an RQ worker)."""
    from rq import get_current_job

    job = get_current_job()
    if job is None:
        return
    job.meta["progress"] = {"stage": stage, "done": done, "total": total}
    job.save_meta()


# ---- one training cycle ----------------------------------------------------------------------

@dataclass
class _ProjectPixels:
    """A project's tasks resolved to store rows; stores stay open until `close()`."""

    stores: dict[str, Any]                         # store path -> open CutoutStore
    rows: dict[int, tuple[str, int]]               # task id -> (store path, row)

    def close(self) -> None:
        for store in self.stores.values():
            store.close()


def train_and_publish(project_id: int, *, registry: ModelRegistry, label_studio_url: str,
                      api_key: str, anomaly_label: str, iterations: int, image_size: int,
                      center_crop: float, batch_size: int, score_batch_size: int,
                      versions_kept: int, write_batch: int, image_hosts: frozenset[str],
                      device: str, store_roots: Sequence[Path],
                      on_progress: Callable[[str, int, int], None]) -> dict[str, Any]:
    """The body of `run_training`: labels in, new version published, predictions out."""
    from ml_backend.core.checkpoint import load_model_dir
    from ml_backend.core.config import TrainConfig
    from ml_backend.core.train import save_cycle, train_cycle

    client = LabelStudioClient(label_studio_url, api_key)
    schema = parse_label_config(client.label_config(project_id), anomaly_label)
    tasks = list(client.iter_tasks(project_id))
    held_out = ground_truth_labels(tasks, schema)
    labels = {t: y for t, y in latest_labels(tasks, schema).items() if t not in held_out}
    n_anomaly = sum(labels.values())
    if n_anomaly == 0 or n_anomaly == len(labels):
        reason = (f"needs at least one {anomaly_label!r} and one other label; has {n_anomaly} "
                  f"{anomaly_label!r} of {len(labels)}")
        logger.info("project %d: not training yet: %s", project_id, reason)
        return {"project": project_id, "status": "skipped", "reason": reason}
    pixels = _resolve_pixels(project_id, tasks, schema, registry, client, image_hosts,
                             store_roots)
    staging = registry.staging_dir(project_id)
    new_version = None
    try:
        labeled_ids = sorted(t for t in labels if t in pixels.rows)
        labeled = _read_tasks(pixels, labeled_ids)
        y = np.array([labels[t] for t in labeled_ids], dtype=np.int64)
        unlabeled = sorted(t for t in pixels.rows if t not in labels and t not in held_out)
        pool = _unlabeled_pool(pixels, unlabeled, default=pixels.rows[labeled_ids[0]][0])
        cfg = TrainConfig(iterations=iterations, image_size=image_size,
                          center_crop=center_crop, batch_size=batch_size,
                          score_batch_size=score_batch_size, device=device)
        parent_dir = registry.latest_dir(project_id)
        result = train_cycle(cfg, labeled, y, pool, init_dir=parent_dir,
                             on_progress=lambda i, n, _stats: on_progress("train", i, n))
        stretch = pixels.stores[pixels.rows[labeled_ids[0]][0]].stretch
        counts = {anomaly_label: int(y.sum()), schema.normal_choice: int((y == 0).sum())}
        meta = save_cycle(result, staging, cfg=cfg, stretch=stretch, parent=result.init_meta,
                          label_counts=counts)
        new_version = meta.version
        model, meta = load_model_dir(staging)
        evaluation = _evaluate_held_out(project_id, pixels, held_out, model, meta,
                                        score_batch_size, device)
        scores = _score_tasks(pixels, unlabeled, model, meta, score_batch_size, device)
        on_progress("write", 0, len(scores))
        written = client.write_predictions(project_id, schema, scores, meta.version,
                                           write_batch)
        client.set_model_version(project_id, meta.version)
        registry.publish(project_id, staging, meta.version)
    except BaseException:
        registry.discard(staging)
        if new_version is not None:
            _forget_version(client, project_id, new_version)
        raise
    finally:
        pixels.close()
    kept = set(registry.versions(project_id)) - set(registry.prune(project_id, versions_kept))
    _delete_old_predictions(client, project_id, kept)
    client.ensure_view(project_id)
    return {"project": project_id, "status": "trained", "model_version": meta.version,
            "labels": counts,
            "predictions": written, "unlabeled": len(unlabeled), "evaluation": evaluation,
            "skipped_tasks": len(tasks) - len(pixels.rows)}


def _resolve_pixels(project_id: int, tasks: list[dict[str, Any]], schema: ChoiceSchema,
                    registry: ModelRegistry, client: LabelStudioClient,
                    image_hosts: frozenset[str], store_roots: Sequence[Path]) -> _ProjectPixels:
    """Map every task to a store row: its own cutout store, or the project's image cache.

    Tasks whose store is refused (outside `store_roots`, missing, not a cutout store) are
    skipped, with one warning per store.
    """
    from ml_backend.core.store import CutoutStore

    stores: dict[str, Any] = {}
    refused: set[str] = set()  # repr of refused `data.store` values, warned about once
    rows: dict[int, tuple[str, int]] = {}
    to_fetch: list[dict[str, Any]] = []
    try:
        for task in tasks:
            data = task.get("data")
            if not isinstance(data, dict):
                logger.warning("project %d: task %s: data is not an object; skipped",
                               project_id, task.get("id"))
                continue
            if data.get("store") and data.get("cutout_id") is not None:
                key = repr(data["store"])
                if key in refused:
                    continue
                try:
                    path = str(allowed_store_path(data["store"], store_roots))
                    if path not in stores:
                        stores[path] = CutoutStore.open(path)
                except (OSError, ValueError) as err:  # StoreRefused is a ValueError
                    refused.add(key)
                    logger.warning("project %d: task %s: skipping tasks of store %s: %s",
                                   project_id, task.get("id"), key, err)
                    continue
                cid = str(data["cutout_id"])
                if cid not in stores[path]:
                    logger.warning("task %s: cutout %r is not in %s; skipped", task["id"], cid,
                                   path)
                    continue
                rows[int(task["id"])] = (path, stores[path].index_of(cid))
            elif isinstance(data.get(schema.image_key), str):
                to_fetch.append(task)
            else:
                logger.warning("task %s has neither store/cutout_id nor an image URL in %r; "
                               "skipped", task["id"], schema.image_key)
        if to_fetch:
            path = str(registry.cache_path(project_id))
            cache = _fill_cache(path, to_fetch, schema, client, image_hosts)
            stores[path] = cache
            rows.update({int(t["id"]): (path, cache.index_of(f"task-{t['id']}"))
                         for t in to_fetch if f"task-{t['id']}" in cache})
    except BaseException:
        for store in stores.values():
            store.close()
        raise
    _check_same_pixels(stores)
    return _ProjectPixels(stores=stores, rows=rows)


def _fill_cache(path: str, tasks: list[dict[str, Any]], schema: ChoiceSchema,
                client: LabelStudioClient, image_hosts: frozenset[str]) -> Any:
    """Download task images missing from the project's cache store; return it open."""
    from ml_backend.core.store import CutoutStore

    if Path(path).exists():
        cache = CutoutStore.open(path, mode="a")
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        cache = CutoutStore.create(path, height=CACHE_SIDE, width=CACHE_SIDE, channels=3,
                                   stretch={"name": "none"})
    missing = [t for t in tasks if f"task-{t['id']}" not in cache]
    for start in range(0, len(missing), 64):
        ids, images = [], []
        for task in missing[start:start + 64]:
            url = task["data"][schema.image_key]
            try:
                images.append(_decode(client.fetch_image(url, image_hosts)))
            except (OSError, PermissionError, ValueError) as err:
                logger.warning("task %s: cannot use image %r: %s", task["id"], url, err)
                continue
            ids.append(f"task-{task['id']}")
        if ids:
            cache.append(ids, np.stack(images))
    return cache


def _decode(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 (CACHE_SIDE, CACHE_SIDE, 3)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB").resize((CACHE_SIDE, CACHE_SIDE), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)


def _check_same_pixels(stores: dict[str, Any]) -> None:
    kinds = {(json.dumps(s.stretch, sort_keys=True), tuple(s.shape)) for s in stores.values()}
    if len(kinds) > 1:
        raise ValueError(f"the project's tasks come from stores with different stretches or "
                         f"image shapes ({', '.join(stores)}); one model cannot serve them")


def _read_tasks(pixels: _ProjectPixels, task_ids: list[int]) -> np.ndarray:
    """uint8 images (n, H, W, C) of tasks, read store by store."""
    out: np.ndarray | None = None
    for path, store in pixels.stores.items():
        positions = [i for i, t in enumerate(task_ids) if pixels.rows[t][0] == path]
        if not positions:
            continue
        rows = np.array([pixels.rows[task_ids[i]][1] for i in positions], dtype=np.int64)
        order = np.argsort(rows, kind="stable")  # HDF5 reads want increasing rows
        images = store.read(rows[order])
        if out is None:
            out = np.empty((len(task_ids), *images.shape[1:]), dtype=np.uint8)
        out[np.array(positions)[order]] = images
    if out is None:
        raise ValueError("no labelled task has readable pixels")
    return out


def _unlabeled_pool(pixels: _ProjectPixels, task_ids: list[int], default: str) -> Any:
    """FixMatch's unlabelled images: the tasks' rows in the store holding most of them
    (`default`'s empty subset if there are none)."""
    from ml_backend.core.sources import StoreSubset

    counts: dict[str, int] = {}
    for t in task_ids:
        counts[pixels.rows[t][0]] = counts.get(pixels.rows[t][0], 0) + 1
    path = max(counts, key=counts.__getitem__) if counts else default
    rows = sorted(pixels.rows[t][1] for t in task_ids if pixels.rows[t][0] == path)
    return StoreSubset(pixels.stores[path], np.array(rows, dtype=np.int64))


def _score_tasks(pixels: _ProjectPixels, task_ids: list[int], model: Any, meta: Any,
                 batch_size: int, device: str) -> list[tuple[int, float]]:
    """(task id, P(anomaly)) for tasks, scored store by store in streaming batches."""
    from ml_backend.core.scoring import score_store

    scores: list[tuple[int, float]] = []
    for path, store in pixels.stores.items():
        tids = [t for t in task_ids if pixels.rows[t][0] == path]
        if not tids:
            continue
        rows = np.array([pixels.rows[t][1] for t in tids], dtype=np.int64)
        probs = score_store(store, model, meta, indices=rows, batch_size=batch_size,
                            device=device)
        scores.extend(zip(tids, (float(p) for p in probs), strict=True))
    return scores


def _evaluate_held_out(project_id: int, pixels: _ProjectPixels, held_out: dict[int, int],
                       model: Any, meta: Any, batch_size: int, device: str
                       ) -> dict[str, Any] | None:
    """AUROC, AP and top-k precision of the new model on the ground-truth tasks, or None."""
    from ml_backend.core.metrics import evaluate

    task_ids = sorted(t for t in held_out if t in pixels.rows)
    if not task_ids:
        return None
    scored = _score_tasks(pixels, task_ids, model, meta, batch_size, device)
    result = evaluate(np.array([held_out[t] for t, _ in scored]),
                      np.array([p for _, p in scored], dtype=np.float32))
    logger.info("project %d: held-out evaluation on %d ground-truth tasks: %s", project_id,
                len(scored), result)
    return result


def _forget_version(client: LabelStudioClient, project_id: int, version: str) -> None:
    """Best-effort removal of a failed version's predictions (the error is re-raised anyway)."""
    try:
        client.delete_predictions(project_id, version)
    except Exception as err:  # noqa: BLE001 - we are already handling the original failure
        logger.warning("project %d: could not delete predictions of failed version %s: %s",
                       project_id, version, err)


def _delete_old_predictions(client: LabelStudioClient, project_id: int, kept: set[str]) -> None:
    """Delete this backend's predictions whose version is no longer kept on disk."""
    for version in client.prediction_versions(project_id):
        if version.startswith(OUR_VERSION_PREFIX) and version not in kept:
            client.delete_predictions(project_id, version)
            logger.info("project %d: deleted predictions of old version %s", project_id, version)
