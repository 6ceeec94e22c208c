"""The real training-job path against an in-memory Label Studio, with faults at each step.

Whatever step fails, LATEST and Label Studio's model version name the same, existing version,
except after a failed switch in Label Studio itself: then the version is published, the job
says so, and the next job re-points Label Studio.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ml_backend import jobs
from ml_backend.config import Config, ConfigError
from ml_backend.core import train
from ml_backend.core.config import TrainConfig
from ml_backend.registry import ModelRegistry
from tests.support.job_project import (
    ANOMALIES,
    N_TASKS,
    NORMALS,
    FakeLabelStudio,
    job_settings,
)
from tests.support.shipped import FROM_NAME, TO_NAME
from tests.support.store_tasks import random_store_tasks


@pytest.fixture
def project(tmp_path: Path) -> tuple[FakeLabelStudio, ModelRegistry, Config]:
    store = tmp_path / "stores" / "s.h5"
    store.parent.mkdir()
    tasks = random_store_tasks(store, N_TASKS, ANOMALIES, NORMALS, invariance="flip")
    settings = job_settings(tmp_path).replace(store_roots=(store.parent,), versions_kept=5)
    return FakeLabelStudio(tasks), ModelRegistry(tmp_path / "models"), settings


@pytest.mark.slow
def test_a_job_publishes_then_points_label_studio(project):
    fake, registry, settings = project
    summary = jobs.run_training(7, settings, fake)
    assert summary["status"] == "trained" and summary["label_studio_updated"] is True
    assert registry.latest(7) == fake.model_version == summary["model_version"]
    assert fake.predictions == {summary["model_version"]: N_TASKS - 8}


@pytest.mark.slow
def test_the_job_takes_the_stores_invariance_unless_configured(project):
    from ml_backend.core.checkpoint import load_model_dir, read_meta

    fake, registry, settings = project
    jobs.run_training(7, settings, fake)  # invariance "auto", the default
    auto = TrainConfig.from_dict(read_meta(registry.latest_dir(7)).config)
    jobs.run_training(7, settings.replace(invariance="dihedral"), fake)  # new lineage
    forced = read_meta(registry.latest_dir(7))
    # each kind's defaults (core.config.kind_defaults)
    assert (auto.invariance, auto.test_time_augmentation, auto.distribution_alignment,
            auto.backbone_stage) == ("flip", True, False, 4)
    forced_cfg = TrainConfig.from_dict(forced.config)
    assert (forced_cfg.invariance, forced_cfg.test_time_augmentation,
            forced_cfg.distribution_alignment, forced_cfg.backbone_stage) == (
        "dihedral", True, True, 4)
    assert forced.parent is None
    # Photographs train on 2 unlabelled images per labelled one, sky cutouts on 5; both train
    # the iterations configured (AMLS_ITERATIONS) over their kind's 200 / 100.
    assert (auto.uratio, forced_cfg.uratio) == (2, 5)
    # Photographs score each view also shifted by 4 of 64 pixels; sky cutouts do not.
    assert (auto.test_time_shift, forced_cfg.test_time_shift) == (0.0625, 0.0)
    assert auto.iterations == forced_cfg.iterations == forced.iterations_total == 2
    # The new lineage's cycle trained and serves the backbone cut after stage 4.
    assert load_model_dir(registry.latest_dir(7))[0].num_features == 112


@pytest.mark.slow
@pytest.mark.parametrize("step", ["label_config", "iter_tasks", "train", "save",
                                  "write_predictions", "publish"])
def test_a_failure_before_label_studio_switches_leaves_both_on_the_old_version(project,
                                                                             step,
                                                                             monkeypatch):
    fake, registry, settings = project
    first = jobs.run_training(7, settings, fake)["model_version"]
    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    if step == "publish":
        monkeypatch.setattr(ModelRegistry, "publish", full_disk)
    elif step in ("train", "save"):  # the real functions the job imports when it runs
        monkeypatch.setattr(train, f"{step}_cycle", full_disk)
    else:
        fake.fail = step
    with pytest.raises((ConnectionError, OSError)):
        jobs.run_training(7, settings, fake)
    assert registry.latest(7) == fake.model_version == first
    assert (registry.version_dir(7, first) / "meta.json").is_file()
    assert list(fake.predictions) == [first]  # the failed version's predictions are gone
    assert registry.read_status(7)["last_error"]
    assert registry.versions(7) == [first]
    assert not [p for p in registry.project_dir(7).iterdir() if p.name.startswith(".staging")]


@pytest.mark.slow
def test_a_failed_switch_is_reported_and_repaired_by_the_next_job(project):
    fake, registry, settings = project
    first = jobs.run_training(7, settings, fake)["model_version"]
    fake.fail = "set_model_version"
    summary = jobs.run_training(7, settings, fake)
    second = summary["model_version"]
    assert summary["label_studio_updated"] is False
    assert registry.latest(7) == second and fake.model_version == first
    assert registry.read_status(7)["last_error"] is None
    # The next job re-points Label Studio first, even though it then fails itself.
    fake.fail = "write_predictions"
    with pytest.raises(ConnectionError):
        jobs.run_training(7, settings, fake)
    assert registry.latest(7) == fake.model_version == second


@pytest.mark.slow
def test_a_model_version_the_user_chose_is_left_alone(project):
    fake, registry, settings = project
    jobs.run_training(7, settings, fake)
    fake.model_version = "my-own-model"
    fake.fail = "write_predictions"
    with pytest.raises(ConnectionError):
        jobs.run_training(7, settings, fake)
    assert fake.model_version == "my-own-model"


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_hostile_task_images_are_skipped_and_the_job_goes_on(tmp_path, caplog):
    from PIL import Image

    rng = np.random.default_rng(1)
    good = {f"/img/{i}.png": _png(Image.fromarray(rng.integers(0, 255, (40, 40, 3),
                                                              dtype=np.uint8)))
            for i in range(12)}
    bomb = _png(Image.new("L", (7000, 7000)))  # 49 M pixels, a few kB of PNG
    hostile = {"/img/bomb.png": bomb, "/img/cut.png": good["/img/0.png"][:60],
               "/img/text.png": b"not an image at all", "/img/cmyk.png": b"\x89PNG\r\n"}
    images = good | hostile
    tasks = []
    for i, url in enumerate(images):
        label = "anomaly" if i in (1, 2) else "normal" if i in (3, 4, 5, 6) else None
        tasks.append({"id": i, "data": {"image": url}, "annotations": [] if label is None else [
            {"id": i, "result": [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
                                  "value": {"choices": [label]}}]}]})
    fake = FakeLabelStudio(tasks)
    fake.fetch_image = lambda url, hosts: images[url]  # type: ignore[attr-defined]
    with caplog.at_level("WARNING"):
        summary = jobs.run_training(3, job_settings(tmp_path), fake)
    assert summary["status"] == "trained"
    assert summary["skipped_tasks"] == len(hostile)
    assert summary["predictions"] == len(good) - 6
    assert "larger than 40000000 pixels" in caplog.text
    for url in hostile:
        assert f"cannot use image {url!r}" in caplog.text


def test_a_decompression_bomb_is_a_value_error(monkeypatch):
    from PIL import Image

    from ml_backend import task_pixels

    data = _png(Image.new("L", (300, 300)))
    monkeypatch.setattr(task_pixels, "MAX_DECODE_PIXELS", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow raises above 2x this
    with pytest.raises(ValueError, match="decompression bomb"):
        task_pixels.decode_image(data)


def test_a_job_waits_for_the_minimal_label_set(project):
    fake, registry, settings = project
    # The project has 3 anomalies and 5 normals: asking for 6 normals skips the job.
    summary = jobs.run_training(7, settings.replace(min_normals=6), fake)
    assert summary["status"] == "skipped"
    assert "needs at least 1 'anomaly' and 6 other labels" in summary["reason"]
    assert "has 3 and 5" in summary["reason"]
    assert registry.latest(7) is None and fake.predictions == {}
    summary = jobs.run_training(7, settings.replace(min_anomalies=4), fake)
    assert summary["status"] == "skipped" and "has 3 and 5" in summary["reason"]
    # what annotators see in the queue tab's title meanwhile
    assert fake.queue_statuses == ["labels 3/1 anomaly, 5/6 other",
                                   "labels 3/4 anomaly, 5/3 other"]


def test_a_job_shows_its_stages_in_the_queue_title_and_clears_them(project):
    fake, registry, settings = project
    summary = jobs.run_training(7, settings, fake)
    assert summary["status"] == "trained"
    unlabeled = summary["unlabeled"]
    stages = [s.split()[0] if s else s for s in fake.queue_statuses]
    assert stages == ["training", "scoring", "writing", None], fake.queue_statuses
    assert fake.queue_statuses[1:3] == ["scoring 16", f"writing {unlabeled}"]


def test_a_queue_title_that_cannot_be_set_does_not_fail_the_job(project):
    fake, registry, settings = project
    fake.fail = "set_queue_status"
    assert jobs.run_training(7, settings, fake)["status"] == "trained"
    assert registry.latest(7) is not None


def test_the_minimal_label_set_comes_from_the_environment():
    cfg = Config.from_env({"AMLS_MIN_ANOMALIES": "2", "AMLS_MIN_NORMALS": "10"})
    assert (cfg.min_anomalies, cfg.min_normals) == (2, 10)
    assert (Config.from_env({}).min_anomalies, Config.from_env({}).min_normals) == (1, 3)
    with pytest.raises(ConfigError, match="min_normals must be >= 1"):
        Config.from_env({"AMLS_MIN_NORMALS": "0"})


@pytest.mark.parametrize("raw,value", [("", False), ("true", True), ("1", True), ("off", False)])
def test_prelabel_comes_from_the_environment(raw, value):
    assert Config.from_env({"AMLS_PRELABEL": raw}).prelabel is value


def test_a_prelabel_that_is_not_a_boolean_is_refused():
    with pytest.raises(ConfigError, match="AMLS_PRELABEL must be true or false"):
        Config.from_env({"AMLS_PRELABEL": "maybe"})


@pytest.mark.slow
def test_a_running_job_reports_its_progress_and_clears_it_when_done(project):
    fake, registry, settings = project
    seen: list[dict | None] = []
    write = fake.write_predictions

    def write_and_look(*args, **kwargs):
        seen.append(registry.read_progress(7))  # what /metrics would show right now
        return write(*args, **kwargs)

    fake.write_predictions = write_and_look
    jobs.run_training(7, settings, fake)
    (progress,) = seen
    assert progress["stage"] == "write" and progress["total"] == N_TASKS - 8
    assert progress["started"] <= progress["updated"]
    assert registry.read_progress(7) is None  # cleared when the job ended


@pytest.mark.slow
def test_a_failed_prune_in_label_studio_keeps_the_job_and_the_next_one_retries(project):
    """Deleting an old version's predictions can outlast a timeout in a big project (Label
    Studio deletes them one at a time): the new version still serves, and the next job
    deletes what is left."""
    fake, registry, settings = project
    settings = settings.replace(versions_kept=1)
    first = jobs.run_training(7, settings, fake)["model_version"]
    fake.fail = "delete_predictions"
    second = jobs.run_training(7, settings, fake)
    assert second["status"] == "trained" and registry.latest(7) == second["model_version"]
    assert set(fake.predictions) == {first, second["model_version"]}  # not yet deleted
    fake.fail = None
    third = jobs.run_training(7, settings, fake)["model_version"]
    assert set(fake.predictions) == {third} == set(registry.versions(7))
