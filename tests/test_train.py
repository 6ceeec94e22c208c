"""train_cycle and its parts: optimiser groups, EMA, sampler, learning, resuming, seeding."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from amls_cli import main
from ml_backend.core import train as train_mod
from ml_backend.core.checkpoint import load_model_dir, load_training_state, read_meta
from ml_backend.core.config import TrainConfig
from ml_backend.core.csvio import write_labels_csv
from ml_backend.core.fixmatch import ModelEMA, WeightedLabeledSampler, make_optimizer
from ml_backend.core.model import anomaly_probability
from ml_backend.core.preprocess import to_model_input
from ml_backend.core.scoring import score_images
from ml_backend.core.sources import ArraySource
from ml_backend.core.store import CutoutStore
from ml_backend.core.train import save_cycle, train_cycle

SIZE = 32
# Small and fast: random init, tiny batches; only the learning test trains for real.
FAST = TrainConfig(image_size=SIZE, pretrained=False, batch_size=4, uratio=1, iterations=2,
                   device="cpu")


def toy_images(n_normal: int, n_anomaly: int, seed: int,
               channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Noisy dark sky; anomalies carry a bright Gaussian blob somewhere near the centre."""
    rng = np.random.default_rng(seed)
    images = rng.normal(40, 12, (n_normal + n_anomaly, SIZE, SIZE, channels))
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i in range(n_normal, n_normal + n_anomaly):
        cy, cx = rng.uniform(10, SIZE - 10, 2)
        blob = 180 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 3.0**2))
        images[i] += blob[..., None]
    labels = np.r_[np.zeros(n_normal), np.ones(n_anomaly)].astype(np.int64)
    return np.clip(images, 0, 255).astype(np.uint8), labels


@pytest.fixture(scope="module")
def toy():
    labeled, labels = toy_images(20, 5, seed=0)
    pool, _ = toy_images(200, 10, seed=1)
    return labeled, labels, ArraySource(pool)


def _states_equal(a: nn.Module | dict, b: nn.Module | dict) -> bool:
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


class _TinyNet(nn.Sequential):
    """conv -> BN -> linear head, with timm's `get_classifier`."""

    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 2))

    def get_classifier(self) -> nn.Module:
        return self[3]


def test_weight_decay_skips_batchnorm_and_biases():
    model = _TinyNet()
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed == {id(model[0].weight), id(model[3].weight)}
    assert no_decay == {id(model[0].bias), id(model[1].weight), id(model[1].bias),
                        id(model[3].bias)}
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in opt.param_groups)


def test_the_backbone_learns_at_a_fraction_of_the_heads_rate():
    model = _TinyNet()
    opt = make_optimizer(model, TrainConfig(lr=0.01, backbone_lr_scale=0.1))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert len(lr_of) == len(list(model.parameters()))
    assert {lr_of[id(p)] for p in model[3].parameters()} == {0.01}
    assert {lr_of[id(p)] for i in (0, 1) for p in model[i].parameters()} == {0.01 * 0.1}
    assert opt.param_groups[0]["lr"] == 0.01  # StepStats reports the head's rate


def test_backbone_lr_scale_is_checked_and_old_checkpoints_ran_at_full_rate():
    with pytest.raises(ValueError, match="backbone_lr_scale"):
        TrainConfig(backbone_lr_scale=1.5)
    saved = TrainConfig().to_dict()
    del saved["backbone_lr_scale"]
    assert TrainConfig.from_dict(saved).backbone_lr_scale == 1.0


def test_ema_averages_weights_and_batchnorm_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.75)
    with torch.no_grad():
        model[0].weight.add_(4.0)
    model(torch.randn(8, 2) * 5 + 3)  # train mode: updates running statistics
    ema.update(model)
    start = ema.module  # started as a copy, so the expected value is start*0.75 + new*0.25
    expected = (model[0].weight - 4.0) * 0.75 + model[0].weight * 0.25
    assert torch.allclose(start[0].weight, expected)
    assert torch.allclose(ema.module[1].running_mean, model[1].running_mean * 0.25)
    assert ema.module[1].num_batches_tracked == 1
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_sampler_oversamples_anomalies_reproducibly():
    labels = np.r_[np.zeros(98), np.ones(2)].astype(int)

    def draws(seed: int) -> torch.Tensor:
        sampler = WeightedLabeledSampler(labels, 16, 0.5, torch.Generator().manual_seed(seed))
        return torch.cat([sampler.sample() for _ in range(200)])

    idx = draws(0)
    assert idx.shape == (3200,)
    assert 0.45 < (torch.as_tensor(labels)[idx] == 1).float().mean() < 0.55
    assert torch.equal(idx, draws(0)) and not torch.equal(idx, draws(1))


def test_hard_share_spreads_part_of_the_normals_weight_by_hardness():
    labels = np.array([1, 0, 0, 0, 0])
    hardness = np.array([0.9, 0.0, 0.1, 0.3, 0.0])  # the anomaly's own value is ignored
    gen = torch.Generator().manual_seed(0)
    sampler = WeightedLabeledSampler(labels, 4, 0.5, gen, hardness=hardness, hard_share=0.5)
    # normals: 0.5 * (0.5 * 1/4 + 0.5 * h / 0.4); the anomaly keeps 0.5
    expected = [0.5, 0.0625, 0.0625 + 0.0625, 0.0625 + 0.1875, 0.0625]
    assert np.allclose(sampler.weights.numpy(), expected)
    even = WeightedLabeledSampler(labels, 4, 0.5, gen, hardness=np.zeros(5), hard_share=0.5)
    plain = WeightedLabeledSampler(labels, 4, 0.5, gen)
    assert torch.equal(even.weights, plain.weights)
    assert torch.equal(WeightedLabeledSampler(labels, 4, 0.5, gen, hardness=hardness).weights,
                       plain.weights)  # share 0: hardness has no say
    with pytest.raises(ValueError, match="hard_share"):
        WeightedLabeledSampler(labels, 4, 0.5, gen, hardness=hardness, hard_share=1.0)
    with pytest.raises(ValueError, match="hardness must be"):
        WeightedLabeledSampler(labels, 4, 0.5, gen, hardness=np.array([0, 0, -1, 0, 0.0]),
                               hard_share=0.5)


def test_a_continued_cycle_draws_the_normals_its_model_scores_highest_more(
        toy, tmp_path, monkeypatch):
    labeled, labels, pool = toy
    cfg = FAST.replace(hard_normal_share=0.5)
    first = train_cycle(cfg, labeled, labels, pool)  # from scratch: no scores, even weights
    save_cycle(first, tmp_path / "m1", cfg=cfg, stretch={"name": "none"}, parent=None,
               label_counts={"anomaly": 5, "normal": 20})
    samplers: list[WeightedLabeledSampler] = []
    real = train_mod.WeightedLabeledSampler

    def spy(*args, **kwargs):
        samplers.append(real(*args, **kwargs))
        return samplers[-1]

    monkeypatch.setattr(train_mod, "WeightedLabeledSampler", spy)
    train_cycle(cfg, labeled, labels, pool, init_dir=tmp_path / "m1")
    weights = samplers[0].weights.numpy()[labels == 0]
    scores = score_images(first.ema, labeled, SIZE)[labels == 0]
    assert np.corrcoef(weights, scores)[0, 1] > 0.99  # weight = a + b * score
    assert weights.max() > weights.min() > 0
    saved = TrainConfig().to_dict()
    del saved["hard_normal_share"]
    assert TrainConfig.from_dict(saved).hard_normal_share == 0.0  # older checkpoints
    with pytest.raises(ValueError, match="hard_normal_share"):
        FAST.replace(hard_normal_share=-0.1)


@pytest.mark.parametrize("labels", [np.zeros(6, int), np.ones(6, int)])
def test_missing_class_is_a_value_error(toy, labels):
    labeled, _, pool = toy
    with pytest.raises(ValueError, match="at least one anomaly and one normal"):
        train_cycle(FAST, labeled[:6], labels, pool)


def test_mismatched_inputs_are_value_errors(toy):
    labeled, labels, pool = toy
    with pytest.raises(ValueError, match="unlabelled images have shape"):
        train_cycle(FAST, labeled, labels, ArraySource(np.zeros((3, SIZE, SIZE, 1), np.uint8)))
    with pytest.raises(ValueError, match="labels have shape"):
        train_cycle(FAST, labeled, labels[:-1], pool)
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        train_cycle(FAST, labeled, labels * 2, pool)
    with pytest.raises(ValueError, match="uint8"):
        train_cycle(FAST, labeled.astype(np.float32), labels, pool)


def test_same_seed_gives_identical_cycles(toy):
    a = train_cycle(FAST, *toy)
    b = train_cycle(FAST, *toy)
    c = train_cycle(FAST.replace(seed=7), *toy)
    assert a.steps == b.steps and len(a.steps) == FAST.iterations
    assert _states_equal(a.ema, b.ema) and _states_equal(a.student, b.student)
    assert not _states_equal(a.student, c.student)


def _framed(images: np.ndarray, seed: int) -> np.ndarray:
    """Each image in the centre of a frame twice its side, the border random noise."""
    n, side, _, channels = images.shape
    frame = np.random.default_rng(seed).integers(0, 256, (n, 2 * side, 2 * side, channels),
                                                 dtype=np.uint8)
    frame[:, side // 2:side // 2 + side, side // 2:side // 2 + side] = images
    return frame


def test_center_crop_trains_on_the_centre_of_labelled_and_unlabelled_images(toy):
    labeled, labels, pool = toy
    framed_pool = ArraySource(_framed(pool.read(np.arange(len(pool))), seed=9))
    cropped = train_cycle(FAST.replace(center_crop=0.5), _framed(labeled, seed=8), labels,
                          framed_pool)
    plain = train_cycle(FAST, labeled, labels, pool)
    assert _states_equal(cropped.ema, plain.ema) and _states_equal(cropped.student,
                                                                  plain.student)
    whole = train_cycle(FAST, _framed(labeled, seed=8), labels, framed_pool)
    assert not _states_equal(whole.student, plain.student)


def test_empty_pool_trains_supervised_only(toy):
    labeled, labels, _ = toy
    calls = []
    result = train_cycle(FAST, labeled, labels, ArraySource(np.zeros((0, SIZE, SIZE, 3), np.uint8)),
                         on_progress=lambda i, n, s: calls.append((i, n)))
    assert calls == [(1, 2), (2, 2)]
    assert all(s.mask_rate == 0.0 and s.loss_u == 0.0 for s in result.steps)


def test_diverging_loss_stops_the_cycle(toy):
    with pytest.raises(FloatingPointError, match="at iteration 2"):
        train_cycle(FAST.replace(lr=float("inf")), *toy)


def test_continuing_from_a_checkpoint_resumes(toy, tmp_path):
    labeled, labels, pool = toy
    first = train_cycle(FAST, labeled, labels, pool)
    meta1 = save_cycle(first, tmp_path / "m1", cfg=FAST, stretch={"name": "none"}, parent=None,
                       label_counts={"anomaly": 5, "normal": 20})
    assert meta1.iterations_total == 2 and meta1.parent is None and meta1.channels == 3
    saved = load_training_state(tmp_path / "m1")
    assert saved.optimizer  # SGD momentum was saved

    # Zero iterations: the continued cycle must hold exactly the saved weights and momentum.
    resumed = train_cycle(FAST.replace(iterations=0), labeled, labels, pool,
                          init_dir=tmp_path / "m1")
    assert _states_equal(resumed.student, saved.student)
    assert _states_equal(resumed.ema, saved.ema)
    assert _states_equal(resumed.optimizer_state, saved.optimizer)

    second = train_cycle(FAST.replace(iterations=3), labeled, labels, pool,
                         init_dir=tmp_path / "m1")
    meta2 = save_cycle(second, tmp_path / "m2", cfg=FAST.replace(iterations=3),
                       stretch={"name": "none"}, parent=read_meta(tmp_path / "m1"),
                       label_counts={"anomaly": 5, "normal": 20}, metrics={"note": "x"})
    assert meta2.iterations_total == 5 and meta2.parent == meta1.version
    assert meta2.metrics["note"] == "x" and "final_mask_rate" in meta2.metrics
    assert read_meta(tmp_path / "m2").iterations_total == 5


def test_continuing_with_other_channels_or_size_is_refused(toy, tmp_path):
    labeled, labels, pool = toy
    save_cycle(train_cycle(FAST, labeled, labels, pool), tmp_path / "m", cfg=FAST,
               stretch={"name": "none"}, parent=None, label_counts={})
    grey, grey_labels = toy_images(4, 2, seed=3, channels=1)
    with pytest.raises(ValueError, match="channels 3 in the model, 1 now"):
        train_cycle(FAST, grey, grey_labels, ArraySource(grey), init_dir=tmp_path / "m")
    with pytest.raises(ValueError, match="image size 32 in the model, 24 now"):
        train_cycle(FAST.replace(image_size=24), labeled, labels, pool, init_dir=tmp_path / "m")
    with pytest.raises(ValueError, match="invariance dihedral in the model, flip now"):
        train_cycle(FAST.replace(invariance="flip"), labeled, labels, pool,
                    init_dir=tmp_path / "m")


@pytest.mark.slow
def test_cycle_learns_a_separable_toy_problem(toy):
    # ImageNet weights as in real use; BN momentum and EMA decay faster than the paper's so
    # that 30 steps suffice for the EMA model (AUROC 1.0 for seeds 2, 5, 7 and 42).
    cfg = FAST.replace(batch_size=16, uratio=2, iterations=30, bn_momentum=0.2, ema_decay=0.9,
                       pretrained=True)
    result = train_cycle(cfg, *toy)
    test_images, test_labels = toy_images(40, 10, seed=2)
    with torch.no_grad():
        scores = anomaly_probability(result.ema(to_model_input(test_images, SIZE))).numpy()
    assert roc_auc_score(test_labels, scores) > 0.9


# ---------------------------------------------------------------- amls train


@pytest.fixture()
def store_and_labels(tmp_path):
    images, labels = toy_images(30, 6, seed=4)
    ids = [f"c{i:03d}" for i in range(len(images))]
    path = tmp_path / "store.h5"
    with CutoutStore.create(path, height=SIZE, width=SIZE, channels=3,
                            stretch={"name": "asinh", "a": 0.1}) as store:
        store.append(ids, images)
    labelled = {ids[i]: int(labels[i]) for i in [0, 1, 2, 3, 30, 31]}
    write_labels_csv(tmp_path / "labels.csv", labelled)
    return path, tmp_path / "labels.csv"


def _amls_train(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    """Run `amls train ...` and return its JSON summary line."""
    assert main(["train", *argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_trains_then_continues(store_and_labels, tmp_path, capsys):
    store, labels = store_and_labels
    common = ["--labels", str(labels), "--image-size", "32", "--device", "cpu"]
    first = _amls_train(capsys, str(store), *common, "--iterations", "1",
                        "-o", str(tmp_path / "m1"))
    assert first["label_counts"] == {"anomaly": 2, "normal": 4, "unlabeled": 30}
    assert first["iterations_total"] == 1 and 0.0 <= first["final_mask_rate"] <= 1.0
    meta = read_meta(tmp_path / "m1")
    assert meta.stretch == {"name": "asinh", "a": 0.1} and meta.image_size == 32
    assert meta.version == first["version"]

    second = _amls_train(capsys, str(store), "--labels", str(labels), "--device", "cpu",
                         "--iterations", "2", "--init", str(tmp_path / "m1"),
                         "-o", str(tmp_path / "m2"))
    assert second["iterations_total"] == 3
    assert read_meta(tmp_path / "m2").parent == first["version"]

    err = _train_error(capsys, str(store), "--labels", str(labels), "--image-size", "64",
                       "--init", str(tmp_path / "m1"), "-o", str(tmp_path / "m3"))
    assert re.search("image size 32 in the model, 64 now", err)
    err = _train_error(capsys, str(store), "--labels", str(labels), "--center-crop", "0.5",
                       "--init", str(tmp_path / "m1"), "-o", str(tmp_path / "m3"))
    assert re.search("centre crop 1.0 in the model, 0.5 now", err)


def test_cli_center_crop_is_recorded_and_kept_by_continuations(store_and_labels, tmp_path,
                                                               capsys):
    store, labels = store_and_labels
    common = ["--labels", str(labels), "--device", "cpu", "--iterations", "1"]
    _amls_train(capsys, str(store), *common, "--image-size", "32", "--center-crop", "0.5",
                "-o", str(tmp_path / "m1"))
    assert read_meta(tmp_path / "m1").center_crop == 0.5
    _amls_train(capsys, str(store), *common, "--init", str(tmp_path / "m1"),
                "-o", str(tmp_path / "m2"))
    assert read_meta(tmp_path / "m2").center_crop == 0.5
    # The core refuses to continue a lineage at another crop, whoever calls it.
    images, y = toy_images(4, 2, seed=1)
    with pytest.raises(ValueError, match="centre crop 0.5 in the model, 1.0 now"):
        train_cycle(TrainConfig(pretrained=False, image_size=32, iterations=1, device="cpu"),
                    images, y, ArraySource(images[:0], {"name": "none"}),
                    init_dir=tmp_path / "m1")


def test_cli_training_settings_are_recorded_inherited_and_kept(store_and_labels, tmp_path,
                                                              capsys):
    store, labels = store_and_labels
    common = ["--labels", str(labels), "--device", "cpu", "--iterations", "1"]
    _amls_train(capsys, str(store), *common, "--image-size", "32", "--invariance", "flip",
                "--bn-momentum", "0.01", "--drop-path-rate", "0.2", "--drop-rate", "0.1",
                "--hard-normal-share", "0.5", "--probe-head-init", "yes",
                "--protect-top-share", "0.2", "--alignment-share", "0.01",
                "--anomaly-threshold", "0.8", "--randaug-pool", "linear", "--backbone-stage", "4",
                "-o", str(tmp_path / "m1"))
    _amls_train(capsys, str(store), *common, "--init", str(tmp_path / "m1"),
                "--drop-rate", "0.3", "-o", str(tmp_path / "m2"))
    first = TrainConfig.from_dict(read_meta(tmp_path / "m1").config)
    second = TrainConfig.from_dict(read_meta(tmp_path / "m2").config)
    assert (first.invariance, first.bn_momentum, first.drop_path_rate, first.drop_rate) == (
        "flip", 0.01, 0.2, 0.1)
    # Inherited by the continuation; hyperparameters may change, the invariance may not.
    assert (second.invariance, second.bn_momentum, second.drop_path_rate, second.drop_rate) == (
        "flip", 0.01, 0.2, 0.3)
    assert first.hard_normal_share == second.hard_normal_share == 0.5
    assert first.probe_head_init is second.probe_head_init is True
    assert first.protect_top_share == second.protect_top_share == 0.2
    assert first.alignment_share == second.alignment_share == 0.01
    assert first.anomaly_threshold == second.anomaly_threshold == 0.8
    assert first.randaug_pool == second.randaug_pool == "linear"
    assert first.backbone_stage == second.backbone_stage == 4
    assert load_model_dir(tmp_path / "m2")[0].num_features == 112  # cut after stage 4
    err = _train_error(capsys, str(store), *common, "--backbone-stage", "5",
                       "--init", str(tmp_path / "m1"), "-o", str(tmp_path / "m5"))
    assert re.search("backbone stage 4 in the model, 5 now", err)
    err = _train_error(capsys, str(store), *common, "--backbone-stage", "-1", "-o",
                       str(tmp_path / "m6"))
    assert re.search("backbone_stage must be a stage number", err)
    err = _train_error(capsys, str(store), *common, "--invariance", "dihedral",
                       "--init", str(tmp_path / "m1"), "-o", str(tmp_path / "m3"))
    assert re.search("invariance flip in the model, dihedral now", err)
    err = _train_error(capsys, str(store), *common, "--drop-rate", "1", "-o",
                       str(tmp_path / "m4"))
    assert re.search("drop_rate must be in", err)


def test_cli_weak_rotation_is_recorded_inherited_and_refused_for_flip_data(store_and_labels,
                                                                          tmp_path, capsys):
    store, labels = store_and_labels
    common = ["--labels", str(labels), "--device", "cpu", "--iterations", "1",
              "--image-size", "32"]
    _amls_train(capsys, str(store), *common, "--weak-rotation", "yes", "-o", str(tmp_path / "m1"))
    _amls_train(capsys, str(store), *common, "--init", str(tmp_path / "m1"),
                "-o", str(tmp_path / "m2"))
    for name in ("m1", "m2"):
        assert TrainConfig.from_dict(read_meta(tmp_path / name).config).weak_rotation is True
    err = _train_error(capsys, str(store), *common, "--invariance", "flip", "--weak-rotation",
                       "yes", "-o", str(tmp_path / "m3"))
    assert re.search("weak_rotation turns images by any angle, which only suits", err)


def test_cli_new_model_takes_the_invariance_the_store_records(store_and_labels, tmp_path,
                                                               capsys):
    import h5py

    store, labels = store_and_labels
    with h5py.File(store, "a") as f:
        f.attrs["invariance"] = "flip"
    _amls_train(capsys, str(store), "--labels", str(labels), "--device", "cpu",
                "--iterations", "1", "--image-size", "32", "-o", str(tmp_path / "m1"))
    assert TrainConfig.from_dict(read_meta(tmp_path / "m1").config).invariance == "flip"


@pytest.mark.parametrize("value", ["0", "1.5", "half"])
def test_cli_refuses_a_center_crop_outside_0_1(value, capsys):
    with pytest.raises(SystemExit):
        main(["train", "s.h5", "--labels", "l.csv", "--center-crop", value, "-o", "m"])
    assert "--center-crop" in capsys.readouterr().err


def test_cli_names_ids_missing_from_the_store(store_and_labels, tmp_path, capsys):
    store, labels = store_and_labels
    labels.write_text("id,label\nc000,normal\nnope1,anomaly\nnope2,normal\n")
    err = _train_error(capsys, str(store), "--labels", str(labels), "-o", str(tmp_path / "m"))
    assert re.search(r"2 id\(s\) .* not in store .*'nope1', 'nope2'", err)


def _train_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """`amls train ARGV` fails with status 2 and one "amls train: error:" line; that line."""
    capsys.readouterr()
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("amls train: error: ") and err.count("\n") == 1
    return err


def test_ema_warmup_follows_lifetime_steps_and_caps_at_decay():
    model = nn.Linear(2, 2)
    fresh = ModelEMA(model, decay=0.99, warmup=True)
    assert fresh.current_decay() == pytest.approx(1 / 10)
    fresh.update(model)
    assert fresh.step == 1 and fresh.current_decay() == pytest.approx(2 / 11)
    # A continued model resumes the schedule where its parent stopped.
    continued = ModelEMA(model, decay=0.99, warmup=True, step=5000)
    assert continued.current_decay() == 0.99
    assert ModelEMA(model, decay=0.99).current_decay() == 0.99


def test_ema_warmup_tracks_the_student_early():
    model = nn.Linear(2, 2, bias=False)
    ema = ModelEMA(model, decay=0.99, warmup=True)
    with torch.no_grad():
        model.weight.fill_(1.0)
    start = ema.module.weight.clone()
    for _ in range(30):
        ema.update(model)
    # Without warm-up 0.99**30 = 74 % of the start would remain; with it, under 15 %.
    remaining = (ema.module.weight - 1.0) / (start - 1.0)
    assert remaining.abs().max() < 0.15


def test_a_cycle_with_distribution_alignment_trains_and_records_it(toy, tmp_path):
    labeled, labels, pool = toy
    cfg = FAST.replace(distribution_alignment=True, iterations=3)
    result = train_cycle(cfg, labeled, labels, pool)
    assert len(result.steps) == 3 and all(math.isfinite(s.loss) for s in result.steps)
    assert all(0.0 <= s.pseudo_anomaly_rate <= 1.0 for s in result.steps)
    meta = save_cycle(result, tmp_path / "m", cfg=cfg, stretch={"name": "none"}, parent=None,
                      label_counts={"anomaly": 5, "normal": 20})
    assert TrainConfig.from_dict(meta.config).distribution_alignment is True
    saved = TrainConfig().to_dict()
    del saved["distribution_alignment"]
    assert TrainConfig.from_dict(saved).distribution_alignment is False  # older checkpoints


@pytest.mark.parametrize(("share", "target"), [(0.0, 5 / 25), (0.01, 0.01)])
def test_alignment_aims_at_the_labelled_share_or_the_configured_one(toy, monkeypatch, share,
                                                                    target):
    import ml_backend.core.train as train_module

    targets = []
    real = train_module.DistributionAlignment

    def recording(shares, *args, **kwargs):
        targets.append(shares)
        return real(shares, *args, **kwargs)

    monkeypatch.setattr(train_module, "DistributionAlignment", recording)
    labeled, labels, pool = toy  # 5 anomalies among 25 labels
    cfg = FAST.replace(distribution_alignment=True, alignment_share=share, iterations=2)
    result = train_cycle(cfg, labeled, labels, pool)
    assert len(result.steps) == 2
    assert targets == [pytest.approx([1 - target, target])]
    with pytest.raises(ValueError, match="alignment_share"):
        TrainConfig(alignment_share=1.0)
    saved = TrainConfig().to_dict()
    del saved["alignment_share"]
    assert TrainConfig.from_dict(saved).alignment_share == 0.0  # older checkpoints


def test_a_fresh_cycle_with_probe_head_init_starts_from_the_linear_probe(toy):
    from ml_backend.core.fast_head import fit_fast_head, install_head
    from ml_backend.core.model import batch_statistics, build_model, pooled_features, set_seed

    labeled, labels, pool = toy
    # 25 labelled images, training batches of 4 + 2 * 3 * 4 = 28: one batch of statistics.
    cfg = FAST.replace(probe_head_init=True, iterations=0, uratio=3)
    result = train_cycle(cfg, labeled, labels, pool)

    # The same probe by hand: the fresh model's features with BatchNorm on batch statistics.
    set_seed(cfg.seed)
    fresh = build_model(cfg, 3)
    x = to_model_input(labeled, SIZE)
    with torch.no_grad(), batch_statistics(fresh):
        features = pooled_features(fresh, x).numpy()
    expected = build_model(cfg, 3)
    expected.load_state_dict(fresh.state_dict())
    install_head(expected, fit_fast_head(features, np.arange(len(labels)), labels))
    for model in (result.student, result.ema):
        torch.testing.assert_close(model.get_classifier().weight,
                                   expected.get_classifier().weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.get_classifier().bias,
                                   expected.get_classifier().bias, rtol=1e-4, atol=1e-4)
    # The backbone, running statistics included, is the fresh model's.
    backbone = {k: v for k, v in fresh.state_dict().items() if not k.startswith("classifier")}
    assert _states_equal(backbone, {k: v for k, v in result.student.state_dict().items()
                                    if not k.startswith("classifier")})
    # The default head is near zero instead.
    plain = train_cycle(FAST.replace(iterations=0), labeled, labels, pool)
    assert plain.student.get_classifier().weight.abs().max() < 0.01
    assert result.student.get_classifier().weight.abs().max() > 0.01


def test_a_continued_cycle_keeps_its_trained_head_under_probe_head_init(toy, tmp_path):
    labeled, labels, pool = toy
    first = train_cycle(FAST, labeled, labels, pool)
    save_cycle(first, tmp_path / "m1", cfg=FAST, stretch={"name": "none"}, parent=None,
               label_counts={"anomaly": 5, "normal": 20})
    resumed = train_cycle(FAST.replace(iterations=0, probe_head_init=True), labeled, labels,
                          pool, init_dir=tmp_path / "m1")
    assert _states_equal(resumed.student, load_training_state(tmp_path / "m1").student)
    saved = TrainConfig().to_dict()
    del saved["probe_head_init"]
    assert TrainConfig.from_dict(saved).probe_head_init is False  # older checkpoints


def test_a_cycle_takes_the_teachers_pseudo_labels_of_the_rows_it_draws(toy, tmp_path):
    labeled, labels, pool = toy
    drawn = []

    class Recording(ArraySource):
        def read(self, rows):
            drawn.append(np.array(rows))
            return super().read(rows)

    images = pool.read(np.arange(len(pool)))
    cfg = FAST.replace(iterations=3, threshold=1.0, teacher_top_share=0.3,
                       teacher_normal_share=0.7)
    # The teacher ranks the pool's rows in order: the first 63 of 210 are its "anomalies",
    # the rest "normal". Threshold 1 keeps the model's own pseudo-labels out.
    ranking = -np.arange(len(images), dtype=np.float64)
    result = train_cycle(cfg, labeled, labels, Recording(images), teacher=ranking)
    assert [s.mask_rate for s in result.steps] == [1.0] * 3
    steps_rows = [rows for rows in drawn if len(rows) == cfg.uratio * cfg.batch_size][:3]
    assert [s.pseudo_anomaly_rate for s in result.steps] == [
        pytest.approx(float(np.mean(rows < 63))) for rows in steps_rows]
    plain = train_cycle(cfg.replace(teacher_top_share=0.0, teacher_normal_share=0.0),
                        labeled, labels, pool)
    assert [s.mask_rate for s in plain.steps] == [0.0] * 3
    meta = save_cycle(result, tmp_path / "m", cfg=cfg, stretch={"name": "none"}, parent=None,
                      label_counts={"anomaly": 5, "normal": 20})
    assert TrainConfig.from_dict(meta.config).teacher_top_share == 0.3
    saved = TrainConfig().to_dict()
    del saved["teacher_top_share"], saved["teacher_normal_share"]
    assert not TrainConfig.from_dict(saved).uses_teacher  # older checkpoints


def test_a_teacher_config_without_a_fitting_ranking_is_refused(toy):
    labeled, labels, pool = toy
    cfg = FAST.replace(teacher_top_share=0.01)
    with pytest.raises(ValueError, match="frozen teacher's ranking"):
        train_cycle(cfg, labeled, labels, pool)
    with pytest.raises(ValueError, match=r"ranks \(3,\) images"):
        train_cycle(cfg, labeled, labels, pool, teacher=np.zeros(3))
    # Without unlabelled images there is nothing to teach: the labels alone train.
    empty = ArraySource(np.zeros((0, SIZE, SIZE, 3), np.uint8))
    assert len(train_cycle(cfg, labeled, labels, empty).steps) == 2
