"""The instant re-ranking job against an in-memory Label Studio, on a real training job's
cached embeddings."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ml_backend import jobs, rerank
from ml_backend.core.augment import symmetry_views
from ml_backend.core.checkpoint import load_model_dir, read_meta
from ml_backend.core.config import TrainConfig, kind_defaults
from ml_backend.core.embedding_cache import read_embeddings
from ml_backend.core.fast_head import blend_with_model, fit_fast_head
from ml_backend.core.model import anomaly_logit_weights
from ml_backend.core.scoring import score_store
from ml_backend.core.store import CutoutStore
from ml_backend.registry import RERANK_STATUS, ModelRegistry
from tests.support.job_project import ANOMALIES, N_TASKS, NORMALS, FakeLabelStudio, job_settings
from tests.support.store_tasks import random_store_tasks

pytestmark = pytest.mark.slow


@pytest.fixture
def trained(tmp_path: Path):
    """A project after one training job: (fake client, registry, settings, store, version)."""
    store = tmp_path / "stores" / "s.h5"
    store.parent.mkdir()
    fake = FakeLabelStudio(random_store_tasks(store, N_TASKS, ANOMALIES, NORMALS))
    settings = job_settings(tmp_path).replace(store_roots=(store.parent,), versions_kept=5)
    registry = ModelRegistry(tmp_path / "models")
    version = jobs.run_training(7, settings, fake)["model_version"]
    return fake, registry, settings, store, version


def test_a_training_job_caches_every_tasks_embedding_in_its_version(trained):
    _, registry, _, _, version = trained
    cache = read_embeddings(registry.version_dir(7, version))
    assert sorted(cache.task_ids.tolist()) == list(range(N_TASKS))  # labelled ones too
    # A sky store's model: the backbone cut after stage 4 (112 channels; `kind_defaults`).
    assert cache.features.shape == (N_TASKS, 112) and cache.features.dtype == np.float16
    assert cache.features.nbytes / N_TASKS <= 3 * 1024
    assert np.isfinite(cache.features).all() and cache.features.astype(np.float32).std() > 0


@pytest.mark.parametrize("blend", [True, False])
def test_rerank_publishes_a_fast_version_whose_model_scores_like_the_head(trained, blend):
    fake, registry, settings, store, base = trained
    settings = settings.replace(rerank_blend=blend, rerank_imagenet=False, rerank_model_term=True)
    summary = rerank.run_rerank(7, settings, fake)
    assert summary["status"] == "reranked" and summary["embeddings_of"] == base
    fast = summary["model_version"]
    assert registry.latest(7) == fake.model_version == fast
    meta = read_meta(registry.version_dir(7, fast))
    assert meta.kind == "fast" and meta.parent == base
    assert meta.label_counts == {"anomaly": len(ANOMALIES), "normal": len(NORMALS)}
    assert meta.metrics["blended_with_cycle"] is blend
    labelled = set(ANOMALIES) | set(NORMALS)
    assert set(fake.scores[fast]) == set(range(N_TASKS)) - labelled
    # The published model reproduces the head's scores (blended with the cycle's own
    # classifier, or alone) from pixels: what /predict serves.
    cache = read_embeddings(registry.version_dir(7, base))
    rows = cache.rows_of(sorted(labelled))[1]
    head = fit_fast_head(cache.features, rows, np.isin(sorted(labelled), ANOMALIES).astype(int))
    if blend:
        cycle_model, _ = load_model_dir(registry.version_dir(7, base))
        head = blend_with_model(head, *anomaly_logit_weights(cycle_model), cache.features).head
    model, model_meta = load_model_dir(registry.version_dir(7, fast))
    with CutoutStore.open(store) as s:
        from_pixels = score_store(s, model, model_meta, device="cpu")
    expected = head.scores(cache.features)[cache.rows_of(list(range(N_TASKS)))[1]]
    np.testing.assert_allclose(from_pixels, expected, atol=2e-3)
    np.testing.assert_allclose([fake.scores[fast][t] for t in sorted(fake.scores[fast])],
                               expected[sorted(fake.scores[fast])], atol=1e-6)
    assert registry.read_status(7, RERANK_STATUS)["last_error"] is None


def test_a_training_job_publishes_its_cycle_then_the_cycle_blended_with_a_head(tmp_path):
    store = tmp_path / "stores" / "s.h5"
    store.parent.mkdir()
    fake = FakeLabelStudio(random_store_tasks(store, N_TASKS, ANOMALIES, NORMALS))
    settings = job_settings(tmp_path).replace(store_roots=(store.parent,), rerank_blend=True)
    registry = ModelRegistry(tmp_path / "models")
    summary = jobs.run_training(7, settings, fake)
    cycle, ranking = summary["model_version"], summary["ranking"]
    assert ranking["status"] == "reranked" and ranking["embeddings_of"] == cycle
    assert registry.latest(7) == fake.model_version == ranking["model_version"]
    meta = read_meta(registry.version_dir(7, ranking["model_version"]))
    assert (meta.kind, meta.parent, meta.metrics["blended_with_cycle"]) == ("fast", cycle, True)
    unlabelled = set(range(N_TASKS)) - set(ANOMALIES) - set(NORMALS)
    assert set(fake.scores[cycle]) == set(fake.scores[ranking["model_version"]]) == unlabelled
    # The next cycle still trains on from the cycle itself.
    again = jobs.run_training(7, settings, fake)
    assert read_meta(registry.version_dir(7, again["model_version"])).parent == cycle
    # Without the fast re-ranking there is no blend either.
    plain = jobs.run_training(7, settings.replace(fast_rerank=False), fake)
    assert "ranking" not in plain and registry.latest(7) == plain["model_version"]


def test_a_cycles_blend_adds_imagenet_terms_and_its_version_serves_it(tmp_path, monkeypatch):
    """Sky cutouts: the blend published after a cycle averages the refit head, a head on
    the project's ImageNet embeddings (embedded once, kept beside the versions) and the
    nearest labelled neighbours on them, without the cycle's own logit; its version reads
    both backbones and keeps the labelled embeddings, so what /predict scores from pixels is
    what was published."""
    from ml_backend import imagenet_store
    from ml_backend.core.fast_head import NeighbourClassifier, fit_neighbour_term

    store = tmp_path / "stores" / "s.h5"
    store.parent.mkdir()
    fake = FakeLabelStudio(random_store_tasks(store, N_TASKS, ANOMALIES, NORMALS))
    settings = job_settings(tmp_path).replace(store_roots=(store.parent,), rerank_blend=True)
    assert settings.imagenet_term("dihedral") and not settings.imagenet_term("flip")
    assert settings.neighbour_term("dihedral") and not settings.neighbour_term("flip")
    assert not settings.model_term("dihedral") and settings.model_term("flip")
    registry = ModelRegistry(tmp_path / "models")
    summary = jobs.run_training(7, settings, fake)
    cycle, ranking = summary["model_version"], summary["ranking"]
    assert ranking["status"] == "reranked" and ranking["imagenet_term"] is True
    assert ranking["neighbour_term"] is True and ranking["model_term"] is False
    meta = read_meta(registry.version_dir(7, ranking["model_version"]))
    assert meta.imagenet_branch and meta.neighbour_term and meta.metrics["blend_terms"] == 3
    # The ImageNet embeddings of every task, as the first ranking embeds them.
    cfg = TrainConfig.from_dict(read_meta(registry.version_dir(7, cycle)).config)
    held = imagenet_store.read_imagenet_embeddings(
        registry, 7, imagenet_store.imagenet_signature(cfg, 1, meta.stretch))
    assert sorted(held.task_ids.tolist()) == list(range(N_TASKS))
    # Refit by hand: the three-term blend's scores, from the published model and in LS.
    cache = read_embeddings(registry.version_dir(7, cycle))
    imagenet = np.asarray(held.features[held.rows_of(cache.task_ids)[1]])
    labelled = sorted(set(ANOMALIES) | set(NORMALS))
    rows, y = cache.rows_of(labelled)[1], np.isin(labelled, ANOMALIES).astype(int)
    cycle_model, _ = load_model_dir(registry.version_dir(7, cycle))
    blend = blend_with_model(fit_fast_head(cache.features, rows, y),
                             *anomaly_logit_weights(cycle_model), cache.features,
                             imagenet=(fit_fast_head(imagenet, rows, y), imagenet),
                             neighbours=(fit_neighbour_term(imagenet, rows, y), rows),
                             model_term=False)
    expected = blend.scores([cache.features, imagenet])
    expected = expected[cache.rows_of(list(range(N_TASKS)))[1]]
    model, model_meta = load_model_dir(registry.version_dir(7, ranking["model_version"]))
    # The saved version holds the labelled embeddings (unit rows of the ImageNet features).
    assert isinstance(model.get_classifier(), NeighbourClassifier)
    assert model.get_classifier().term_anomalies.shape == (len(ANOMALIES), imagenet.shape[1])
    with CutoutStore.open(store) as s:
        from_pixels = score_store(s, model, model_meta, device="cpu")
    np.testing.assert_allclose(from_pixels, expected, atol=2e-3)
    published = fake.scores[ranking["model_version"]]
    np.testing.assert_allclose([published[t] for t in sorted(published)],
                               expected[sorted(published)], atol=1e-6)
    # A burst reuses the embeddings (nothing is embedded again) and blends three terms too.
    monkeypatch.setattr(imagenet_store, "embed_with_imagenet", None)
    burst = rerank.run_rerank(7, settings, fake)
    assert burst["imagenet_term"] is True and burst["neighbour_term"] is True
    # AMLS_RERANK_MODEL_TERM=true: the cycle's logit averaged in too, four terms.
    burst = rerank.run_rerank(7, settings.replace(rerank_model_term=True), fake)
    meta = read_meta(registry.version_dir(7, burst["model_version"]))
    assert burst["model_term"] is True and meta.metrics["blend_terms"] == 4
    # AMLS_RERANK_NEIGHBOURS=false: two terms, one linear classifier.
    burst = rerank.run_rerank(7, settings.replace(rerank_neighbours=False), fake)
    meta = read_meta(registry.version_dir(7, burst["model_version"]))
    assert burst["neighbour_term"] is False and meta.metrics["blend_terms"] == 2
    model, _ = load_model_dir(registry.version_dir(7, burst["model_version"]))
    assert type(model.get_classifier()) is torch.nn.Linear
    # A burst never embeds: without ImageNet embeddings it ranks by the refit head alone.
    shutil.rmtree(imagenet_store.store_dir(registry, 7))
    burst = rerank.run_rerank(7, settings, fake)
    assert burst["status"] == "reranked" and burst["imagenet_term"] is False
    assert read_meta(registry.version_dir(7, burst["model_version"])).metrics["blend_terms"] == 1


def test_a_failed_blend_leaves_the_cycle_serving(tmp_path, monkeypatch):
    store = tmp_path / "stores" / "s.h5"
    store.parent.mkdir()
    fake = FakeLabelStudio(random_store_tasks(store, N_TASKS, ANOMALIES, NORMALS))
    settings = job_settings(tmp_path).replace(store_roots=(store.parent,), rerank_blend=True)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(rerank, "blend_with_model", broken)
    summary = jobs.run_training(7, settings, fake)
    assert summary["status"] == "trained" and summary["ranking"]["status"] == "failed"
    assert "disk full" in summary["ranking"]["reason"]
    assert ModelRegistry(tmp_path / "models").latest(7) == fake.model_version \
        == summary["model_version"]


def test_the_first_ranking_embeds_with_imagenet_and_the_first_cycle_starts_afresh(tmp_path,
                                                                                   monkeypatch):
    from ml_backend.core.checkpoint import IMAGENET_STAGE
    from ml_backend.core.model import (
        WithZoom,
        build_model,
        pooled_features,
        truncate_after_block,
    )
    from ml_backend.core.preprocess import to_model_input

    store = tmp_path / "stores" / "s.h5"
    store.parent.mkdir()
    fake = FakeLabelStudio(random_store_tasks(store, N_TASKS, ANOMALIES, NORMALS))
    settings = job_settings(tmp_path).replace(store_roots=(store.parent,))
    registry = ModelRegistry(tmp_path / "models")
    first = rerank.run_rerank(7, settings, fake)
    assert first["status"] == "reranked" and first["embeddings_of"] == first["model_version"]
    version = first["model_version"]
    assert registry.latest(7) == fake.model_version == version
    meta = read_meta(registry.version_dir(7, version))
    assert (meta.kind, meta.parent, meta.metrics["blended_with_cycle"]) == ("imagenet", None,
                                                                           False)
    # Its embeddings are the ImageNet backbone's, for every task, under the job's settings
    # (sky cutouts: the mean over the eight flips and rotations, as the model is served).
    cache = read_embeddings(registry.version_dir(7, version))
    assert sorted(cache.task_ids.tolist()) == list(range(N_TASKS))
    with CutoutStore.open(store) as s:
        pixels = s.read(np.arange(N_TASKS))
        model, model_meta = load_model_dir(registry.version_dir(7, version))
        served = score_store(s, model, model_meta, device="cpu")
    backbone = truncate_after_block(build_model(settings.train.replace(invariance="dihedral"), 1),
                                    IMAGENET_STAGE).eval()  # pooled after stage 4
    zoom = kind_defaults("dihedral")["imagenet_zoom"]
    if zoom:  # each view read again on its centre, enlarged back, beside its own reading
        backbone = WithZoom(backbone, zoom).eval()
    assert TrainConfig.from_dict(model_meta.config).test_time_augmentation
    assert TrainConfig.from_dict(model_meta.config).imagenet_zoom == zoom
    assert model_meta.imagenet_stage == IMAGENET_STAGE
    assert cache.features.shape[1] == (224 if zoom else 112)
    with torch.inference_mode():
        expected = torch.stack([pooled_features(backbone, view) for view in symmetry_views(
            to_model_input(pixels, 32), "dihedral")]).mean(0).numpy()
    rows = cache.rows_of(list(range(N_TASKS)))[1]
    np.testing.assert_allclose(cache.features[rows], expected, rtol=1e-2, atol=1e-2)
    # They are also kept beside the versions, for the blends after each cycle.
    from ml_backend import imagenet_store

    held = imagenet_store.read_imagenet_embeddings(registry, 7, imagenet_store.imagenet_signature(
        TrainConfig.from_dict(model_meta.config), 1, model_meta.stretch))
    np.testing.assert_array_equal(held.features[held.rows_of(list(range(N_TASKS)))[1]],
                                  cache.features[rows])
    # It serves the head fitted on them, and wrote it for the unlabelled tasks.
    unlabelled = sorted(fake.scores[version])
    assert set(unlabelled) == set(range(N_TASKS)) - set(ANOMALIES) - set(NORMALS)
    np.testing.assert_allclose([fake.scores[version][t] for t in unlabelled], served[unlabelled],
                               atol=2e-3)
    # The next burst refits on the same embeddings; the first cycle trains from ImageNet.
    again = rerank.run_rerank(7, settings, fake)
    fast = read_meta(registry.version_dir(7, again["model_version"]))
    assert (fast.kind, fast.parent, again["embeddings_of"]) == ("fast", version, version)
    # ... and its blend reuses the first ranking's ImageNet embeddings, embedding nothing.
    monkeypatch.setattr(imagenet_store, "embed_with_imagenet", None)
    summary = jobs.run_training(7, settings.replace(rerank_blend=True), fake)
    cycle_meta = read_meta(registry.version_dir(7, summary["model_version"]))
    assert (cycle_meta.kind, cycle_meta.parent) == ("fixmatch", None)
    assert summary["ranking"]["imagenet_term"] is True


def test_no_first_ranking_without_both_classes(tmp_path):
    store = tmp_path / "stores" / "s.h5"
    store.parent.mkdir()
    tasks = random_store_tasks(store, N_TASKS, ANOMALIES, NORMALS)
    for task in tasks:
        if task["id"] in ANOMALIES:
            task["annotations"] = []
    settings = job_settings(tmp_path).replace(store_roots=(store.parent,))
    summary = rerank.run_rerank(7, settings, FakeLabelStudio(tasks))
    assert summary["status"] == "skipped" and "no model yet" in summary["reason"]
    assert ModelRegistry(tmp_path / "models").latest(7) is None


def test_the_next_cycle_trains_on_from_the_cycle_not_the_fast_head(trained):
    fake, registry, settings, _, base = trained
    rerank.run_rerank(7, settings, fake)
    summary = jobs.run_training(7, settings, fake)
    assert read_meta(registry.version_dir(7, summary["model_version"])).parent == base


def test_pruning_keeps_the_cycle_a_fast_version_stands_on(trained):
    fake, registry, settings, _, base = trained
    fast = rerank.run_rerank(7, settings.replace(versions_kept=1), fake)["model_version"]
    assert registry.versions(7) == [base, fast]
    assert set(fake.predictions) == {base, fast}


def test_a_rerank_reads_only_labelled_tasks_and_the_gallerys(trained):
    """A re-ranking's reads do not grow with the project: the labelled tasks, then the
    shown top candidates by id; the unlabelled tasks are the cached embeddings' rows."""
    fake, registry, settings, _, _ = trained
    fake.task_reads.clear()
    summary = rerank.run_rerank(7, settings, fake)
    labelled = set(ANOMALIES) | set(NORMALS)
    (first, *rest) = fake.task_reads
    assert first == (True, None) and (False, None) not in fake.task_reads
    (gallery,) = [ids for annotated, ids in rest if ids is not None]
    assert len(gallery) == N_TASKS - len(labelled) and not set(gallery) & labelled
    assert set(summary["stage_seconds"]) == {"read_tasks", "load_embeddings_and_model",
                                             "fit_and_score", "save_version",
                                             "write_predictions", "publish", "dashboard",
                                             "prune"}


def test_label_studio_keeps_pruned_fast_versions_until_the_next_cycle_deletes_them(trained):
    """Label Studio deletes predictions one at a time (slow): a re-ranking prunes only its
    disk, and the next training job deletes the predictions of every version not kept."""
    fake, registry, settings, _, base = trained
    settings = settings.replace(versions_kept=1)
    first = rerank.run_rerank(7, settings, fake)["model_version"]
    second = rerank.run_rerank(7, settings, fake)["model_version"]
    assert registry.versions(7) == [base, second]  # first pruned from disk ...
    assert set(fake.predictions) == {base, first, second}  # ... not yet from Label Studio
    cycle = jobs.run_training(7, settings, fake)["model_version"]
    assert set(fake.predictions) == set(registry.versions(7)) == {cycle}


def test_a_cycle_published_meanwhile_wins_and_the_rerank_leaves_no_trace(trained, monkeypatch):
    fake, registry, settings, _, base = trained
    newer = {}
    write = fake.write_predictions

    def cycle_finishes_while_writing(project_id, schema, scores, version, batch):
        if not newer:  # the training job publishes its version during the re-ranking
            newer["version"] = None  # (its own write comes back here)
            newer["version"] = jobs.run_training(7, settings, fake)["model_version"]
        return write(project_id, schema, scores, version, batch)

    monkeypatch.setattr(fake, "write_predictions", cycle_finishes_while_writing)
    summary = rerank.run_rerank(7, settings, fake)
    assert summary["status"] == "skipped" and newer["version"] in summary["reason"]
    assert registry.latest(7) == fake.model_version == newer["version"]
    assert set(fake.predictions) == {base, newer["version"]}
    assert not [p for p in registry.project_dir(7).iterdir() if p.name.startswith(".staging")]


def test_labels_of_one_class_only_do_not_rerank(tmp_path):
    store = tmp_path / "stores" / "s.h5"
    store.parent.mkdir()
    fake = FakeLabelStudio(random_store_tasks(store, N_TASKS, ANOMALIES, NORMALS))
    settings = job_settings(tmp_path).replace(store_roots=(store.parent,))
    jobs.run_training(7, settings, fake)
    for task in fake.tasks:
        if task["id"] in ANOMALIES:
            task["annotations"] = []
    summary = rerank.run_rerank(7, settings, fake)
    assert summary["status"] == "skipped" and "needs one 'anomaly'" in summary["reason"]


def test_more_like_this_ranks_by_the_cached_embeddings_and_explains_refusals(trained, capsys,
                                                                             monkeypatch):
    from amls_cli import main
    from ml_backend.core.fast_head import similar
    from ml_backend.rerank import similar_tasks

    fake, registry, settings, _, base = trained
    rerank.run_rerank(7, settings, fake)  # LATEST is now fast: its parent's embeddings serve
    cache = read_embeddings(registry.version_dir(7, base))
    rows, _ = similar(cache.features, cache.rows_of([1, 2])[1], N_TASKS)
    expected = [t for t in cache.task_ids[rows].tolist() if t not in (1, 2)][:4]
    answer = similar_tasks(registry, 7, [1, 2], top=4)
    assert [t for t, _ in answer] == expected
    assert all(-1.0 <= s <= 1.0 for _, s in answer)
    monkeypatch.setenv("MODEL_DIR", str(registry.root))
    assert main(["similar", "--project", "7", "1", "2", "--top", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [int(line.split("\t")[0]) for line in lines] == expected
    assert main(["similar", "--project", "7", "999"]) == 2
    assert "no embedding for task(s) 999" in capsys.readouterr().err
    assert main(["similar", "--project", "8", "1"]) == 2
    assert "project 8 has no model yet" in capsys.readouterr().err


def test_the_similar_route_answers_json_and_refuses_clearly(trained):
    from ml_backend.app import create_app
    from ml_backend.rerank import similar_tasks
    from ml_backend.service import AnomalyService
    from ml_backend.submitters import InProcessSubmitter

    _, registry, settings, _, _ = trained
    service = AnomalyService(settings, registry, InProcessSubmitter(lambda p: None))
    http = create_app(service, settings).test_client()
    answer = http.get("/similar?project=7&tasks=1,2&top=3")
    assert answer.status_code == 200
    assert [r["task"] for r in answer.json["similar"]] == \
        [t for t, _ in similar_tasks(registry, 7, [1, 2], 3)]
    assert http.get("/similar?project=7&tasks=1;2").status_code == 400
    assert http.get("/similar?project=7&tasks=1&top=0").status_code == 400
    assert http.get("/similar?tasks=1").status_code == 400
    missing = http.get("/similar?project=7&tasks=999")
    assert missing.status_code == 404 and "no embedding for task(s) 999" in missing.json["error"]
    service.close()


def test_the_similar_tab_route_refuses_clearly_before_and_at_label_studio(trained):
    from ml_backend.app import create_app
    from ml_backend.service import AnomalyService
    from ml_backend.submitters import InProcessSubmitter

    _, registry, settings, _, _ = trained

    def post(cfg, body):
        service = AnomalyService(cfg, registry, InProcessSubmitter(lambda p: None))
        try:
            return create_app(service, cfg).test_client().post("/similar/view", json=body)
        finally:
            service.close()

    closed = settings.replace(label_studio_url="http://127.0.0.1:9", label_studio_api_key="k")
    assert post(closed, {"project": 7, "tasks": []}).status_code == 400
    assert post(closed, {"project": 7, "tasks": [1], "top": 0}).status_code == 400
    assert post(closed, {"project": 7, "tasks": [True]}).status_code == 400
    no_key = post(settings.replace(label_studio_api_key=""), {"project": 7, "tasks": [1]})
    assert no_key.status_code == 503 and "LABEL_STUDIO_API_KEY" in no_key.json["error"]
    unknown = post(closed, {"project": 7, "tasks": [999]})
    assert unknown.status_code == 404 and "no embedding" in unknown.json["error"]
    down = post(closed, {"project": 7, "tasks": [1], "top": 3})  # nothing listens on port 9
    assert down.status_code == 502 and down.json["error"].startswith("Label Studio:")
