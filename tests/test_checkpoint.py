"""Model directories: round trips, atomic replacement, refusal of damaged directories."""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import torch

from ml_backend.core import checkpoint
from ml_backend.core.checkpoint import (
    CheckpointError,
    ModelMeta,
    load_model_dir,
    load_training_state,
    new_version,
    read_meta,
    save_model_dir,
)
from ml_backend.core.config import TrainConfig
from ml_backend.core.model import build_model, set_seed

CFG = TrainConfig(pretrained=False, image_size=32)


def make_meta(version: str | None = None, channels: int = 3) -> ModelMeta:
    return ModelMeta(version=version or new_version(), parent=None,
                     created=checkpoint.utc_now_iso(), config=CFG.to_dict(), image_size=32,
                     channels=channels, stretch={"name": "asinh", "a": 0.1},
                     label_counts={"anomaly": 2, "normal": 5}, metrics={"loss_x": 0.3},
                     iterations_total=100)


def trained_pair(seed: int, channels: int = 3) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A student and an EMA model with distinct, non-default weights and BN statistics."""
    set_seed(seed)
    student, ema = build_model(CFG, channels), build_model(CFG, channels)
    with torch.no_grad():
        student.train()(torch.randn(4, channels, 32, 32))
        ema.train()(torch.randn(4, channels, 32, 32) * 2)
    return student, ema


@pytest.fixture
def saved(tmp_path):
    student, ema = trained_pair(0)
    momentum = {"conv_stem.weight.momentum_buffer": torch.randn(32, 3, 3, 3)}
    meta = make_meta()
    path = save_model_dir(tmp_path / "model", ema=ema, student=student, meta=meta,
                          optimizer_state=momentum)
    return path, student, ema, meta, momentum


def test_version_is_sortable_and_unique():
    t0 = datetime(2026, 11, 25, 12, 3, 1, 42_000, tzinfo=UTC)
    v0, v1 = new_version(t0), new_version(t0 + timedelta(seconds=1))
    assert re.fullmatch(r"amls-20261125T120301042Z-[0-9a-f]{4}", v0)
    assert v0 < v1 < new_version(t0 + timedelta(seconds=1, milliseconds=1))
    assert len({new_version(t0) for _ in range(20)}) > 1


def test_round_trip_gives_identical_outputs(saved):
    path, _student, ema, meta, _ = saved
    model, loaded_meta = load_model_dir(path)
    assert loaded_meta == meta
    assert not model.training
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ema.eval()(x), rtol=0, atol=0)


def test_training_state_round_trip(saved):
    path, student, ema, meta, momentum = saved
    state = load_training_state(path)
    assert state.meta == meta
    for saved_state, module in ((state.student, student), (state.ema, ema)):
        expected = module.state_dict()
        assert saved_state.keys() == expected.keys()
        assert all(torch.equal(saved_state[k], expected[k]) for k in expected)
    assert torch.equal(state.optimizer["conv_stem.weight.momentum_buffer"],
                       momentum["conv_stem.weight.momentum_buffer"])


def test_optimizer_state_is_optional(tmp_path):
    student, ema = trained_pair(1, channels=1)
    path = save_model_dir(tmp_path / "m", ema=ema, student=student, meta=make_meta(channels=1))
    assert load_training_state(path).optimizer is None
    model, meta = load_model_dir(path)
    assert meta.channels == 1 and model.conv_stem.in_channels == 1


def test_a_scoring_only_directory_has_no_student_and_cannot_be_trained_on(tmp_path):
    student, ema = trained_pair(2, channels=1)
    path = save_model_dir(tmp_path / "m", ema=ema, student=None, meta=make_meta(channels=1))
    assert not (path / checkpoint.STUDENT_WEIGHTS).exists()
    model, _ = load_model_dir(path)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), ema.eval()(x), atol=1e-5)
    with pytest.raises(CheckpointError, match="does not list student"):
        load_training_state(path)


def test_loading_leaves_global_rng_alone(saved):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    load_model_dir(saved[0])
    assert torch.equal(torch.rand(3), expected)


def test_numpy_metrics_are_stored_as_numbers(tmp_path):
    student, ema = trained_pair(2)
    meta = make_meta()
    meta.metrics = {"auroc": np.float32(0.75), "n": np.int64(3)}
    path = save_model_dir(tmp_path / "m", ema=ema, student=student, meta=meta)
    assert read_meta(path).metrics == {"auroc": 0.75, "n": 3}


def test_replacing_a_directory(saved):
    path, *_ = saved
    student, ema = trained_pair(9)
    new_meta = make_meta()
    save_model_dir(path, ema=ema, student=student, meta=new_meta)
    assert read_meta(path) == new_meta
    assert sorted(p.name for p in path.parent.iterdir()) == ["model"]  # no temp leftovers


def test_failure_midway_leaves_old_directory_intact(saved, monkeypatch):
    path, _student, ema, meta, _ = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    real_save = checkpoint.save_file
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # the EMA file is written, then the disk "fills up"
            raise OSError(28, "No space left on device")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    student2, ema2 = trained_pair(3)
    with pytest.raises(OSError, match="No space"):
        save_model_dir(path, ema=ema2, student=student2, meta=make_meta())
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["model"]
    model, loaded = load_model_dir(path)
    assert loaded == meta


def test_corrupt_weights_are_refused(saved):
    path, *_ = saved
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt"):
        load_model_dir(path)


def test_truncated_student_is_refused(saved):
    path, *_ = saved
    student = path / "student.safetensors"
    student.write_bytes(student.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="student.safetensors"):
        load_training_state(path)


def test_missing_file_is_refused(saved):
    path, *_ = saved
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing file"):
        load_model_dir(path)


def test_half_written_directory_is_refused(saved):
    path, *_ = saved
    (path / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete model directory"):
        load_model_dir(path)


def test_damaged_meta_is_refused(saved):
    path, *_ = saved
    meta_path = path / "meta.json"
    meta_path.write_text(meta_path.read_text()[:50])
    with pytest.raises(CheckpointError, match="meta.json"):
        load_model_dir(path)
    meta_path.write_text(json.dumps({"format": 1, "files": {}}))
    with pytest.raises(CheckpointError, match="version"):
        read_meta(path)


def test_meta_written_before_center_crop_existed_reads_as_the_whole_cutout(saved):
    path, *_ = saved
    meta_path = path / "meta.json"
    data = json.loads(meta_path.read_text())
    del data["center_crop"]
    meta_path.write_text(json.dumps(data))
    assert read_meta(path).center_crop == 1.0


def test_absent_directory_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model_dir(tmp_path / "nope")



def test_an_imagenet_backbone_reloads_pooled_after_its_stage(tmp_path):
    from ml_backend.core.model import SideBySide, pooled_features

    set_seed(0)
    backbone, meta = checkpoint.imagenet_model(CFG, 1, {"name": "none"})
    assert meta.imagenet_stage == checkpoint.IMAGENET_STAGE and backbone.num_features == 112
    x = torch.randn(2, 1, 32, 32)
    # A first ranking: the ImageNet backbone is the model itself.
    save_model_dir(tmp_path / "first", ema=backbone.eval(), student=None, meta=meta)
    first, _ = load_model_dir(tmp_path / "first")
    # A blend: the ImageNet backbone is the branch beside a full-depth cycle's model.
    pair = SideBySide(build_model(CFG, 1), backbone).eval()
    blend = dataclasses.replace(meta, kind="fast", imagenet_branch=True)
    save_model_dir(tmp_path / "blend", ema=pair, student=None, meta=blend)
    loaded, _ = load_model_dir(tmp_path / "blend")
    with torch.no_grad():
        torch.testing.assert_close(pooled_features(first, x), pooled_features(backbone, x))
        torch.testing.assert_close(pooled_features(loaded, x), pooled_features(pair, x))
    assert pooled_features(loaded, x).shape == (2, 1280 + 112)
    # A model trained cut after stage 2 blends with the ImageNet branch at its own stage.
    cut = CFG.replace(backbone_stage=2)
    assert checkpoint.imagenet_model(cut, 1, {"name": "none"})[1].config["backbone_stage"] is None
    pair = SideBySide(build_model(cut, 1), backbone).eval()
    save_model_dir(tmp_path / "cut", ema=pair, student=None,
                   meta=dataclasses.replace(blend, config=cut.to_dict()))
    with torch.no_grad():
        torch.testing.assert_close(pooled_features(load_model_dir(tmp_path / "cut")[0], x),
                                   pooled_features(pair, x))
    assert pooled_features(pair, x).shape == (2, 40 + 112)
    # Versions from before stages were recorded hold a full-depth ImageNet backbone.
    old = dataclasses.replace(meta, imagenet_stage=None)
    save_model_dir(tmp_path / "old", ema=build_model(CFG, 1).eval(), student=None, meta=old)
    assert load_model_dir(tmp_path / "old")[0].num_features == 1280


def test_a_zoomed_imagenet_backbone_reads_the_centre_again_and_reloads(tmp_path):
    from ml_backend.core.model import SideBySide, WithZoom, pooled_features

    set_seed(0)
    zoomed = CFG.replace(imagenet_zoom=0.5)
    model, meta = checkpoint.imagenet_model(zoomed, 1, {"name": "none"})
    assert isinstance(model, WithZoom) and model.num_features == 2 * 112
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        features = pooled_features(model.eval(), x)
        # The first half is the view itself, the second its central half enlarged back.
        torch.testing.assert_close(features[:, :112], pooled_features(model.backbone, x))
        centre = torch.nn.functional.interpolate(x[..., 8:24, 8:24], size=(32, 32),
                                                 mode="bilinear", align_corners=False)
        torch.testing.assert_close(features[:, 112:], pooled_features(model.backbone, centre))
        assert not torch.allclose(features[:, :112], features[:, 112:])
    # A first ranking and a blend with the zoomed branch both reload as saved.
    save_model_dir(tmp_path / "first", ema=model, student=None, meta=meta)
    pair = SideBySide(build_model(zoomed, 1), model).eval()
    blend = dataclasses.replace(meta, kind="fast", imagenet_branch=True)
    save_model_dir(tmp_path / "blend", ema=pair, student=None, meta=blend)
    with torch.no_grad():
        torch.testing.assert_close(pooled_features(load_model_dir(tmp_path / "first")[0], x),
                                   features)
        torch.testing.assert_close(pooled_features(load_model_dir(tmp_path / "blend")[0], x),
                                   pooled_features(pair, x))
    # Versions saved before the setting existed read as unzoomed.
    legacy = {k: v for k, v in zoomed.to_dict().items() if k != "imagenet_zoom"}
    assert TrainConfig.from_dict(legacy).imagenet_zoom == 0.0


@pytest.mark.parametrize("zoom", [-0.1, 1.0, 1.5])
def test_imagenet_zoom_out_of_range_is_refused(zoom):
    with pytest.raises(ValueError, match="imagenet_zoom"):
        TrainConfig(imagenet_zoom=zoom)
