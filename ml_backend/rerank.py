"""The instant re-ranking: a new order within seconds of a burst of annotations.

`run_rerank(project_id, settings)` reads the project's labels, fits the fast head
(`core.fast_head`) on the embeddings the latest training cycle cached (`core.embedding_cache`),
blends it with that cycle's own classifier (`Config.rerank_blend`; for sky cutouts with
terms on the ImageNet embeddings instead, the classifier only setting the scale:
`Config.model_term`; benchmarks/RESULTS.md),
scores every unlabelled task from the cache and publishes the result as a "fast" model
version: the cycle's backbone with the blend as its classifier, so /predict, rollback and
pruning treat it like any other version. The next FixMatch cycle trains on from the cycle the
fast version refit (`jobs._parent_to_continue`), and a re-ranking that finds a newer version
published while it ran (a cycle finished) discards its own.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

import numpy as np
from torch import nn

from ml_backend.config import Config
from ml_backend.core.checkpoint import (
    IMAGENET_KIND,
    IMAGENET_STAGE,
    ModelMeta,
    imagenet_model,
    load_model_dir,
    new_version,
    save_model_dir,
    utc_now_iso,
)
from ml_backend.core.config import TrainConfig
from ml_backend.core.embedding_cache import Embeddings, read_embeddings, write_embeddings
from ml_backend.core.fast_head import (
    DEFAULT_C,
    Blend,
    blend_with_model,
    fit_fast_head,
    fit_neighbour_term,
    install_blend,
    similar,
)
from ml_backend.core.model import SideBySide, anomaly_logit_weights
from ml_backend.dashboard_data import GALLERY, record_version
from ml_backend.imagenet_store import (
    extend_imagenet_embeddings,
    imagenet_signature,
    read_imagenet_embeddings,
)
from ml_backend.jobs import (
    forget_version,
    job_client,
    point_label_studio_at,
)
from ml_backend.label_schema import parse_label_config, similar_view, training_labels
from ml_backend.labelstudio import LabelStudioClient, ProjectNotFound
from ml_backend.registry import RERANK_STATUS, ModelRegistry
from ml_backend.task_pixels import ImageSource, resolve_pixels

logger = logging.getLogger(__name__)



def run_rerank(project_id: int, settings: Config,
               client: LabelStudioClient | None = None) -> dict[str, Any]:
    """Re-rank a project from cached embeddings and publish it; a JSON-able summary.

    `client` as in `jobs.run_training`. The outcome is recorded in
    MODEL_DIR/<project>/rerank.json; on an error the serving version stays and it propagates.
    """
    registry = ModelRegistry(settings.model_dir)
    started = time.time()
    try:
        summary = rerank_and_publish(project_id, settings, client or job_client(settings),
                                     registry)
    except ProjectNotFound as err:
        logger.warning("project %d: not re-ranking: %s", project_id, err)
        return {"project": project_id, "status": "skipped", "reason": str(err)}
    except Exception as err:
        registry.write_status(project_id, {"last_finished": time.time(),
                                           "last_duration_s": round(time.time() - started, 3),
                                           "last_error": f"{type(err).__name__}: {err}",
                                           "last_result": None}, RERANK_STATUS)
        logger.error("project %d: instant re-ranking failed: %s", project_id, err)
        raise
    duration = round(time.time() - started, 3)
    registry.write_status(project_id, {"last_finished": time.time(), "last_duration_s": duration,
                                       "last_error": None, "last_result": summary},
                          RERANK_STATUS)
    logger.info("project %d: instant re-ranking done in %.1f s: %s", project_id, duration,
                summary)
    return {**summary, "duration_s": duration}


def rerank_and_publish(project_id: int, settings: Config, client: LabelStudioClient,
                       registry: ModelRegistry, *, embed_missing: bool = False) -> dict[str, Any]:
    """The body of `run_rerank`.

    Before the first training cycle there are no cached embeddings: the first ranking embeds
    every task with the ImageNet backbone and publishes a version of kind "imagenet" that
    holds them (benchmarks/RESULTS.md: a head on ImageNet features ranks the top of the queue
    better than a first FixMatch cycle does). Training never continues from it.

    After a cycle, when `settings.imagenet_term` says so, the blend also has a head on the
    project's ImageNet embeddings (`ml_backend.imagenet_store`) and the version reads both
    backbones (`model.SideBySide`). `embed_missing` (the training job's blend, not a burst):
    first embed the tasks those embeddings lack; a burst without them blends two terms.
    """
    def skipped(reason: str) -> dict[str, Any]:
        logger.info("project %d: not re-ranking: %s", project_id, reason)
        return {"project": project_id, "status": "skipped", "reason": reason}

    stages = Stages()
    latest = registry.latest(project_id)
    schema = parse_label_config(client.label_config(project_id), settings.anomaly_label,
                                prelabel=settings.prelabel)
    # Only labelled tasks carry labels: reading just those keeps this step small in a big
    # project; the unlabelled tasks are the cached embeddings' other rows.
    tasks = list(client.iter_tasks(project_id, annotated_only=True))
    labels, held_out = training_labels(tasks, schema)
    stages.done("read_tasks")
    if latest is None:
        if not 0 < sum(labels.values()) < len(labels):
            return skipped(f"no model yet, and a first ranking needs one "
                           f"{settings.anomaly_label!r} and one other label")
        cache, model, base_meta = imagenet_embeddings(project_id, settings, client, registry,
                                                      list(client.iter_tasks(project_id)),
                                                      schema.image_key)
        base = None
    else:
        base, cache = cycle_embeddings(registry, project_id, latest)
        if cache is None:
            return skipped(f"version {base} has no cached embeddings; its successor will")
        model, base_meta = load_model_dir(registry.version_dir(project_id, base))
    stages.done("load_embeddings_and_model")
    labelled_ids, labelled_rows = cache.rows_of(sorted(labels))
    y = np.array([labels[t] for t in labelled_ids.tolist()], dtype=np.int64)
    if y.sum() == 0 or (y == 0).sum() == 0:
        return skipped(f"needs one {settings.anomaly_label!r} and one other label among the "
                       f"{len(labelled_ids)} labelled tasks with cached embeddings")
    blend = Blend(fit_fast_head(cache.features, labelled_rows, y))
    # The cycle's classifier still knows what the head cannot (an ImageNet base has none).
    blended = settings.rerank_blend and base_meta.kind == "fixmatch"
    parts = [cache.features]
    model_term = False
    if blended:
        imagenet, base_cfg = None, TrainConfig.from_dict(base_meta.config)
        model_term = settings.model_term(base_cfg.invariance)
        if settings.imagenet_term(base_cfg.invariance):
            imagenet = imagenet_rows(project_id, settings, client, registry, base_meta,
                                     base_cfg, cache, schema.image_key, embed_missing)
            stages.done("imagenet_embeddings")
        if imagenet is not None:
            neighbours = None
            if settings.neighbour_term(base_cfg.invariance):
                neighbours = (fit_neighbour_term(imagenet, labelled_rows, y), labelled_rows)
            blend = blend_with_model(blend.head, *anomaly_logit_weights(model), cache.features,
                                     imagenet=(fit_fast_head(imagenet, labelled_rows, y),
                                               imagenet), neighbours=neighbours,
                                     model_term=model_term)
            model = SideBySide(model, imagenet_model(base_cfg, base_meta.channels,
                                                     base_meta.stretch)[0]).eval()
            parts.append(imagenet)
        else:
            blend = blend_with_model(blend.head, *anomaly_logit_weights(model), cache.features,
                                     model_term=model_term)
    unlabelled = [t for t in cache.task_ids.tolist() if t not in labels and t not in held_out]
    unlabelled_ids, unlabelled_rows = cache.rows_of(unlabelled)
    all_scores = blend.scores(parts)
    scores = all_scores[unlabelled_rows]
    install_blend(model, blend)
    stages.done("fit_and_score")
    counts = {settings.anomaly_label: int(y.sum()), schema.normal_choice: int((y == 0).sum())}
    meta = ModelMeta(version=new_version(), parent=base, created=utc_now_iso(),
                     config=base_meta.config, image_size=base_meta.image_size,
                     channels=base_meta.channels, stretch=base_meta.stretch,
                     label_counts=counts, center_crop=base_meta.center_crop,
                     iterations_total=base_meta.iterations_total,
                     kind="fast" if base is not None else IMAGENET_KIND,
                     imagenet_branch=len(parts) == 2,
                     imagenet_stage=IMAGENET_STAGE if len(parts) == 2 else base_meta.imagenet_stage,
                     neighbour_term=blend.neighbours is not None,
                     metrics={"fast_head_c": DEFAULT_C, "embedded_tasks": len(cache.task_ids),
                              "blended_with_cycle": blended,
                              "model_term": model_term,
                              "blend_terms": len(parts) + model_term
                              + (blend.neighbours is not None)})
    staging = registry.staging_dir(project_id)
    try:
        save_model_dir(staging, ema=model, student=None, meta=meta)  # scores only
        if base is None:  # the first ranking keeps its embeddings for the bursts that follow
            write_embeddings(staging, cache.task_ids, cache.features)
        stages.done("save_version")
        written = client.write_predictions(
            project_id, schema, list(zip(unlabelled_ids.tolist(), scores.tolist(), strict=True)),
            meta.version, settings.prediction_write_batch)
        stages.done("write_predictions")
        with registry.publish_lock(project_id):
            now = registry.latest(project_id)
            if now != latest:  # a cycle (fresher embeddings) finished meanwhile: it wins
                registry.discard(staging)
                forget_version(client, project_id, meta.version)
                return skipped(f"version {now} was published while re-ranking")
            registry.publish(project_id, staging, meta.version)
            switched = point_label_studio_at(client, project_id, meta.version)
        stages.done("publish")  # the new order is visible in Label Studio from here
    except BaseException:
        registry.discard(staging)
        forget_version(client, project_id, meta.version)
        raise
    by_task = dict(zip(cache.task_ids.tolist(), all_scores.tolist(), strict=True))
    top = unlabelled_ids[np.argsort(-scores, kind="stable")[:GALLERY]].tolist()
    record_version(registry.version_dir(project_id, meta.version),
                   registry.version_dir(project_id, latest) if latest else None, by_task,
                   labels, held_out, itertools.chain(tasks, client.iter_tasks(project_id, ids=top)),
                   schema.image_key)
    stages.done("dashboard")
    # Label Studio deletes predictions one by one (about 10 ms each, benchmarks/RESULTS.md),
    # too slow for every burst: the next training job deletes those of pruned versions.
    registry.prune(project_id, settings.versions_kept)
    stages.done("prune")
    return {"project": project_id, "status": "reranked", "model_version": meta.version,
            "embeddings_of": base or meta.version, "labels": counts, "predictions": written,
            "imagenet_term": meta.imagenet_branch,
            "neighbour_term": meta.neighbour_term, "model_term": model_term,
            "label_studio_updated": switched,
            "labels_without_embeddings": len(labels) - len(labelled_ids),
            "stage_seconds": stages.seconds}


class Stages:
    """Seconds spent in each named stage of a job, in order (for /metrics and benchmarks)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._last, 3)
        self._last = now


def imagenet_embeddings(project_id: int, settings: Config, client: LabelStudioClient,
                        registry: ModelRegistry, tasks: list[dict[str, Any]],
                        image_key: str) -> tuple[Embeddings, nn.Module, ModelMeta]:
    """Every task's pooled features from the ImageNet backbone, under the settings a first
    training cycle would use (the store's invariance and stretch, size, crop): (embeddings,
    the backbone with its fresh head, a meta describing it). They are kept in the project's
    ImageNet embeddings (`ml_backend.imagenet_store`), which later blends read."""
    pixels = resolve_pixels(project_id, tasks, image_key, registry, settings.store_root_dirs,
                            ImageSource(client, settings.image_hosts))
    try:
        pixels.check_same_pixels()
        if not pixels.rows:
            raise ValueError(f"project {project_id}: no task has pixels to embed")
        store = next(iter(pixels.stores.values()))
        cfg = settings.train_config(store.invariance)
        channels, stretch = int(store.shape[-1]), store.stretch
        held = extend_imagenet_embeddings(registry, project_id, pixels, cfg, channels, stretch)
        model, meta = imagenet_model(cfg, channels, stretch)
        ids, rows = held.rows_of(sorted(pixels.rows))  # not tasks deleted since
    finally:
        pixels.close()
    return Embeddings(ids, np.asarray(held.features[rows])), model, meta


def imagenet_rows(project_id: int, settings: Config, client: LabelStudioClient,
                  registry: ModelRegistry, meta: ModelMeta, cfg: TrainConfig, cache: Embeddings,
                  image_key: str, embed_missing: bool) -> np.ndarray | None:
    """The project's ImageNet embeddings of `cache`'s tasks, row for row, under the settings
    `cfg` of the cycle `meta` describes; with `embed_missing` the tasks they lack are
    embedded first. None (logged) when some task still lacks one."""
    held = read_imagenet_embeddings(registry, project_id,
                                    imagenet_signature(cfg, meta.channels, meta.stretch))
    found, rows = (np.zeros(0), None) if held is None else held.rows_of(cache.task_ids)
    if len(found) < len(cache.task_ids) and embed_missing:
        pixels = resolve_pixels(project_id, list(client.iter_tasks(project_id)), image_key,
                                registry, settings.store_root_dirs,
                                ImageSource(client, settings.image_hosts))
        try:
            held = extend_imagenet_embeddings(registry, project_id, pixels, cfg, meta.channels,
                                              meta.stretch)
        finally:
            pixels.close()
        found, rows = held.rows_of(cache.task_ids)
    if len(found) < len(cache.task_ids):
        logger.info("project %d: %d of %d tasks lack ImageNet embeddings; blending two terms "
                    "until the next training job embeds them", project_id,
                    len(cache.task_ids) - len(found), len(cache.task_ids))
        return None
    return np.asarray(held.features[rows])


def cycle_embeddings(registry: ModelRegistry, project_id: int,
                     version: str) -> tuple[str, Embeddings | None]:
    """(the version whose embeddings `version` ranks by: itself (a training cycle or a first,
    ImageNet ranking) or a fast version's parent, its cached embeddings or None)."""
    meta = registry.read_meta(project_id, version)
    base = str(meta["parent"]) if meta.get("kind") == "fast" else version
    return base, read_embeddings(registry.version_dir(project_id, base))


def similar_tasks(registry: ModelRegistry, project_id: int, task_ids: list[int],
                  top: int) -> list[tuple[int, float]]:
    """"More like this": the `top` tasks whose serving embeddings point most nearly the way
    the given tasks' do, (task id, cosine similarity) best first, the given tasks left out.

    Raises ValueError when the project has no model or cached embeddings, or when a given
    task has no embedding (not in the project, or imported after the last cycle)."""
    latest = registry.latest(project_id)
    if latest is None:
        raise ValueError(f"project {project_id} has no model yet under {registry.root}")
    base, cache = cycle_embeddings(registry, project_id, latest)
    if cache is None:
        raise ValueError(f"project {project_id}: version {base} has no cached embeddings "
                         "(it predates them); the next training cycle writes them")
    found, rows = cache.rows_of(task_ids)
    missing = sorted(set(task_ids) - set(found.tolist()))
    if missing:
        raise ValueError(f"project {project_id}: no embedding for task(s) "
                         f"{', '.join(map(str, missing))} in version {base}")
    order, sims = similar(cache.features, rows, top + len(rows))
    keep = ~np.isin(order, rows)
    return list(zip(cache.task_ids[order[keep]][:top].tolist(),
                    sims[keep][:top].tolist(), strict=True))


def similar_tab(registry: ModelRegistry, client: LabelStudioClient, project_id: int,
                task_ids: list[int], top: int) -> tuple[int, list[tuple[int, float]]]:
    """"More like this" as a Data Manager tab: (its view id, the ranked similar tasks)."""
    ranked = similar_tasks(registry, project_id, task_ids, top)
    view = client.put_view(project_id, similar_view(task_ids, [t for t, _ in ranked]))
    return view, ranked
