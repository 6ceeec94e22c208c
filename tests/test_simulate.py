import json
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from amls_cli import main
from ml_backend.core.config import TrainConfig
from ml_backend.core.csvio import write_labels_csv
from ml_backend.core.simulate import (
    SimulationPlan,
    choose_pool,
    mean_top_score,
    oracle_picks,
    run_simulation,
)
from ml_backend.core.store import CutoutStore


def make_toy_store(path, n=120, n_anomalies=12, size=24, seed=0, invariance="dihedral"):
    """Dark noise images; anomalies carry a bright square. Returns (store path, truth)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(n, size, size, 1), dtype=np.uint8)
    truth = np.zeros(n, dtype=np.int64)
    truth[rng.choice(n, n_anomalies, replace=False)] = 1
    images[truth == 1, 6:18, 6:18, :] = 250
    ids = [f"obj{i:04d}" for i in range(n)]
    with CutoutStore.create(path, height=size, width=size, channels=1,
                            stretch={"name": "none"}, invariance=invariance) as store:
        store.append(ids, images)
    return ids, truth


def test_choose_pool_draws_the_planned_labels_reproducibly():
    truth = np.array([1] * 10 + [0] * 90 + [-1] * 20)
    plan = SimulationPlan(initial_anomalies=3, initial_normals=7, pool=50, seed=1)
    pool, labelled = choose_pool(truth, plan)
    assert len(pool) == 50 and set(pool) <= set(range(100))  # rows without truth never drawn
    assert set(labelled) <= set(pool)
    assert (truth[labelled] == 1).sum() == 3 and (truth[labelled] == 0).sum() == 7
    again = choose_pool(truth, plan)
    assert np.array_equal(pool, again[0]) and np.array_equal(labelled, again[1])


def test_choose_pool_refuses_a_plan_the_pool_cannot_start():
    truth = np.array([1, 0, 0, 0])
    with pytest.raises(ValueError, match="needs 2 and 1"):
        choose_pool(truth, SimulationPlan(initial_anomalies=2, initial_normals=1))


def test_oracle_picks_top_anomalies_and_top_false_positives():
    candidates = np.array([10, 11, 12, 13, 14, 15])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    truth = np.zeros(20, dtype=np.int64)
    truth[[11, 14, 15]] = 1
    picks = oracle_picks(candidates, scores, truth, per_cycle=2)
    assert list(picks) == [11, 14, 10, 12]


def test_mean_top_score_averages_the_same_top_as_the_precision():
    scores = np.array([0.1, 0.9, 0.5, 0.7] + [0.0] * 196)  # 200 scores: the top 1 % is 2
    assert mean_top_score(scores) == pytest.approx(0.8)
    assert mean_top_score(scores, fraction=0.02) == pytest.approx((0.9 + 0.7 + 0.5 + 0.1) / 4)


def test_plan_rejects_unknown_method():
    with pytest.raises(ValueError, match="isolation-forest"):
        SimulationPlan(method="svm")


@pytest.mark.slow
def test_fixmatch_simulation_finds_bright_anomalies_and_labels_grow(tmp_path):
    _, truth = make_toy_store(tmp_path / "toy.h5")
    plan = SimulationPlan(initial_anomalies=3, initial_normals=20, cycles=2, per_cycle=2)
    cfg = TrainConfig(image_size=32, iterations=8, batch_size=8, uratio=2, pretrained=False,
                      bn_momentum=0.1, ema_decay=0.5, device="cpu")
    with CutoutStore.open(tmp_path / "toy.h5") as store:
        rows = list(run_simulation(store, truth, plan, cfg))
    assert [r["cycle"] for r in rows] == [1, 2]
    assert rows[1]["labelled_anomalies"] == 5 and rows[1]["labelled_normals"] == 22
    assert rows[1]["n"] == len(truth) - 27
    assert rows[-1]["auroc"] > 0.8


def test_isolation_forest_method_uses_the_baseline_scores(tmp_path):
    _, truth = make_toy_store(tmp_path / "toy.h5")
    calls = []

    def brightness(cfg, store, indices):
        calls.append(len(indices))
        return store.read(indices).reshape(len(indices), -1).mean(axis=1).astype(np.float32)

    plan = SimulationPlan(method="isolation-forest", initial_anomalies=3, initial_normals=20,
                          cycles=2, per_cycle=2)
    with CutoutStore.open(tmp_path / "toy.h5") as store:
        rows = list(run_simulation(store, truth, plan, TrainConfig(), score_fn=brightness))
    assert calls == [len(truth) - 23, len(truth) - 27]
    assert rows[-1]["auroc"] == pytest.approx(1.0)


def test_linear_probe_method_ranks_with_the_head_and_never_trains(tmp_path, monkeypatch):
    from ml_backend.core import simulate

    _, truth = make_toy_store(tmp_path / "toy.h5")

    def brightness_features(store, pool, cfg):  # a feature map in which anomalies stand out
        flat = store.read(pool).reshape(len(pool), -1).astype(np.float32)
        return np.stack([flat.mean(axis=1), flat.std(axis=1)], axis=1).astype(np.float16)

    def no_training(*args, **kwargs):
        raise AssertionError("the linear probe must not train the network")

    monkeypatch.setattr(simulate, "_imagenet_features", brightness_features)
    monkeypatch.setattr(simulate, "train_cycle", no_training)
    plan = SimulationPlan(method="linear-probe", initial_anomalies=3, initial_normals=20,
                          cycles=2, per_cycle=2, fast_head=True)
    with CutoutStore.open(tmp_path / "toy.h5") as store:
        rows = list(run_simulation(store, truth, plan, TrainConfig()))
    assert [r["labelled_anomalies"] for r in rows] == [3, 5]  # its own top picks were anomalies
    assert rows[-1]["auroc"] == pytest.approx(1.0)
    assert 0.0 < rows[-1]["mean_score_top_1pct"] <= 1.0
    assert not any(k.startswith(("interim_", "head_", "zblend_")) for k in rows[-1])
    assert "mean_mask_rate" not in rows[-1]  # no FixMatch steps to summarise


@pytest.mark.slow
def test_simulate_command_prints_cycles_then_final_summary(tmp_path, capsys):
    ids, truth = make_toy_store(tmp_path / "toy.h5")
    write_labels_csv(tmp_path / "truth.csv", dict(zip(ids, truth.tolist(), strict=True)))
    code = main(["simulate", str(tmp_path / "toy.h5"), "--truth", str(tmp_path / "truth.csv"),
                 "--initial-anomalies", "3", "--initial-normals", "20", "--cycles", "2",
                 "--per-cycle", "2", "--iterations", "2", "--size", "32", "--device", "cpu"])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line.get("cycle") for line in lines[:2]] == [1, 2]
    final = lines[-1]
    assert set(final) >= {"auroc", "ap", "precision_top_0_1pct", "precision_top_1pct",
                          "seconds_per_cycle", "score_images_per_second"}
    assert 0.0 <= final["auroc"] <= 1.0 and final["score_images_per_second"] > 0


def _recorded_simulate(tmp_path, monkeypatch, invariance: str = "dihedral"):
    """(the `amls simulate` arguments for a toy store, the (plan, cfg) of each run): the
    command runs with `run_simulation` recording what it was given instead of training."""
    from ml_backend.core import simulate

    ids, truth = make_toy_store(tmp_path / "toy.h5", invariance=invariance)
    write_labels_csv(tmp_path / "truth.csv", dict(zip(ids, truth.tolist(), strict=True)))
    runs = []

    def fake_run(store, truth, plan, cfg):
        runs.append((plan, cfg))
        yield dict.fromkeys(("auroc", "ap", "precision_top_0_1pct", "precision_top_1pct",
                             "seconds_per_cycle", "score_images_per_second", "lblend_auroc",
                             "lblend_ap", "lblend_precision_top_1pct"), 0.5)

    monkeypatch.setattr(simulate, "run_simulation", fake_run)
    return ["simulate", str(tmp_path / "toy.h5"), "--truth", str(tmp_path / "truth.csv")], runs


def test_simulate_command_lets_the_oracle_pick_from_a_blend(tmp_path, monkeypatch, capsys):
    args, runs = _recorded_simulate(tmp_path, monkeypatch)
    assert main(args) == 0 and main([*args, "--picks-from", "lblend"]) == 0
    assert [(p.picks_from, p.fast_head) for p, _ in runs] == [("model", False), ("lblend", True)]
    final = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert final["lblend_auroc"] == 0.5 and final["method"] == "fixmatch"


def test_simulate_command_reports_truth_ids_missing_from_the_store(tmp_path, capsys):
    make_toy_store(tmp_path / "toy.h5")
    write_labels_csv(tmp_path / "truth.csv", {"nope": 1})
    code = main(["simulate", str(tmp_path / "toy.h5"), "--truth", str(tmp_path / "truth.csv")])
    assert code == 2
    err = capsys.readouterr().err
    assert "amls simulate: error:" in err and "not in" in err and "nope" in err


def test_simulate_command_passes_size_and_center_crop_to_training(tmp_path, monkeypatch):
    args, runs = _recorded_simulate(tmp_path, monkeypatch)
    assert main([*args, "--size", "48", "--center-crop", "0.5", "--invariance", "flip",
                 "--bn-momentum", "0.01", "--drop-path-rate", "0.2", "--drop-rate", "0.2",
                 "--test-time-augmentation", "yes", "--distribution-alignment", "no",
                 "--test-time-shift", "0.0625"]) == 0
    cfg = runs[0][1]
    assert (cfg.image_size, cfg.center_crop, cfg.invariance) == (48, 0.5, "flip")
    assert cfg.test_time_shift == 0.0625
    assert (cfg.bn_momentum, cfg.drop_path_rate, cfg.drop_rate) == (0.01, 0.2, 0.2)
    assert cfg.test_time_augmentation and not cfg.distribution_alignment
    with pytest.raises(SystemExit):
        main([*args, "--test-time-augmentation", "maybe"])


def test_simulate_takes_the_invariance_the_store_records_unless_told(tmp_path, monkeypatch):
    args, runs = _recorded_simulate(tmp_path, monkeypatch, invariance="flip")
    assert main(args) == 0 and main([*args, "--invariance", "dihedral"]) == 0
    assert main([*args, "--test-time-augmentation", "no"]) == 0
    assert [cfg.invariance for _, cfg in runs] == ["flip", "dihedral", "flip"]
    # the kind's, unless told
    assert [(cfg.test_time_augmentation, cfg.distribution_alignment) for _, cfg in runs] == [
        (True, False), (True, True), (False, False)]
    # photographs train 200 iterations at uratio 2, sky cutouts 100 at 5; --iterations wins
    assert [(cfg.iterations, cfg.uratio) for _, cfg in runs] == [(200, 2), (100, 5), (200, 2)]
    assert main([*args, "--iterations", "30"]) == 0 and runs[-1][1].iterations == 30
    # photographs score each view also shifted by 4 of 64 pixels, sky cutouts do not
    assert [cfg.test_time_shift for _, cfg in runs] == [0.0625, 0.0, 0.0625, 0.0625]
    assert main([*args, "--test-time-shift", "0"]) == 0 and runs[-1][1].test_time_shift == 0


# Two short cycles on the toy store: the within-run measurements' tests.
TOY_CFG = TrainConfig(image_size=32, iterations=3, batch_size=8, uratio=2, pretrained=False,
                      ema_decay=0.5, device="cpu")


def toy_plan(**measure: Any) -> SimulationPlan:
    return SimulationPlan(initial_anomalies=3, initial_normals=20, cycles=2, per_cycle=2,
                          **measure)


@pytest.mark.slow
def test_fast_head_metrics_sit_beside_the_fixmatch_ones_without_changing_them(tmp_path):
    _, truth = make_toy_store(tmp_path / "toy.h5")
    with CutoutStore.open(tmp_path / "toy.h5") as store:
        without = list(run_simulation(store, truth, toy_plan(), TOY_CFG))
        rows = list(run_simulation(store, truth, toy_plan(fast_head=True), TOY_CFG))
    for a, b in zip(without, rows, strict=True):
        assert b["auroc"] == pytest.approx(a["auroc"]) and b["n"] == a["n"]
    prefixes = ("head", "blend", "zblend", "interim")
    for prefix in prefixes:
        assert all(0.0 <= r[f"{prefix}_auroc"] <= 1.0 for r in rows)
    # Before cycle 1 no model is behind the (ImageNet) embeddings: nothing to blend with.
    # Nor is there a previous model to ensemble with.
    for later_only in ("stale", "interim_zblend", "ens"):
        assert f"{later_only}_auroc" not in rows[0] and 0.0 <= rows[1][f"{later_only}_auroc"] <= 1
    for r in rows:  # what the top 1 % reads, beside what is true there
        assert 0.0 <= r["mean_score_top_1pct"] <= 1.0
        assert 0.0 <= r["zblend_mean_score_top_1pct"] <= 1.0
    assert rows[-1]["head_auroc"] > 0.8  # bright squares separate in any embedding
    for prefix in ("probe", "pblend", "pzblend", "lblend", "mknn", "mkblend"):
        assert all(0.0 <= r[f"{prefix}_auroc"] <= 1.0 for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("picks_from", ["lblend", "zblend", "blend4", "blend3"])
def test_the_oracle_picks_from_the_blend_it_is_told_to(tmp_path, monkeypatch, picks_from):
    from ml_backend.core import simulate

    _, truth = make_toy_store(tmp_path / "toy.h5")
    blends, ranked_by = [], []
    real_mean_z, real_rankings, real_picks, real_published = (
        simulate.mean_z, simulate._head_rankings, simulate.oracle_picks,
        simulate._published_blend)

    def recording_mean_z(*logits):
        blends.append(("lblend", real_mean_z(*logits)))
        return blends[-1][1]

    def recording_rankings(*args):
        ranked = real_rankings(*args)
        if "zblend" in ranked:
            blends.append(("zblend", ranked["zblend"]))
        return ranked

    def recording_picks(candidates, scores, *args):
        ranked_by.append(scores)
        return real_picks(candidates, scores, *args)

    def recording_published(*args, model_term):
        blends.append(("blend4" if model_term else "blend3",
                       real_published(*args, model_term=model_term)))
        return blends[-1][1]

    monkeypatch.setattr(simulate, "mean_z", recording_mean_z)
    monkeypatch.setattr(simulate, "_head_rankings", recording_rankings)
    monkeypatch.setattr(simulate, "oracle_picks", recording_picks)
    monkeypatch.setattr(simulate, "_published_blend", recording_published)
    with CutoutStore.open(tmp_path / "toy.h5") as store:
        list(run_simulation(store, truth, toy_plan(fast_head=True, picks_from=picks_from),
                            TOY_CFG))
    # One pick (after cycle 1), from that cycle's blend of the kind asked for (its first:
    # cycle 2 blends too, the picks made).
    (scores,) = ranked_by
    assert scores is [b for kind, b in blends if kind == picks_from][0]
    with pytest.raises(ValueError, match="needs fast_head"):
        toy_plan(picks_from=picks_from)
    with pytest.raises(ValueError, match="unknown picks_from"):
        toy_plan(fast_head=True, picks_from="head")


def _write_store(path, images):
    with CutoutStore.create(path, height=images.shape[1], width=images.shape[2], channels=1,
                            stretch={"name": "none"}, invariance="dihedral") as store:
        store.append([f"obj{i:04d}" for i in range(len(images))], images)
    return CutoutStore.open(path)


@pytest.mark.parametrize("tta", [True, False])
def test_imagenet_embeddings_follow_test_time_augmentation_as_the_backend_does(tmp_path, tta):
    """With the sky's eight views the first ranking's embeddings cannot tell a cutout from
    its rotation (the backend embeds so: `checkpoint.imagenet_model`); with one view they can."""
    import torch

    from ml_backend.core import simulate

    images = np.random.default_rng(0).integers(0, 255, size=(6, 24, 24, 1), dtype=np.uint8)
    images[:, 3:9, 2:20] = 255  # an asymmetric bar
    cfg = TOY_CFG.replace(test_time_augmentation=tta)
    embedded = []
    for name, pixels in (("up", images), ("turned", np.rot90(images, 1, axes=(1, 2)))):
        torch.manual_seed(0)  # the same (random, pretrained=False) backbone for both
        with _write_store(tmp_path / f"{name}.h5", np.ascontiguousarray(pixels)) as store:
            embedded.append(simulate._imagenet_features(store, np.arange(6), cfg)
                            .astype(np.float32))
    gap = np.abs(embedded[0] - embedded[1]).max() / np.abs(embedded[0]).max()
    assert (gap < 1e-2) if tta else (gap > 0.05)


def test_mean_z_averages_logits_each_standardised():
    from ml_backend.core.simulate import mean_z

    # [1, 2, 3] -> [-1.2247, 0, 1.2247]; [10, 0, 20] -> [0, -1.2247, 1.2247]
    assert mean_z(np.array([1.0, 2, 3]), np.array([10.0, 0, 20])) == pytest.approx(
        [-0.61237, -0.61237, 1.22474], abs=1e-4)
    # Weighted 1 : 3: (-1.2247 + 0) / 4, (0 - 3 * 1.2247) / 4, (1.2247 + 3 * 1.2247) / 4
    assert mean_z(np.array([1.0, 2, 3]), np.array([10.0, 0, 20]), weights=[1, 3]) == (
        pytest.approx([-0.30619, -0.91856, 1.22474], abs=1e-4))


@pytest.mark.slow
def test_probe_head_reads_the_imagenet_embeddings_after_the_cache_holds_the_models(
        tmp_path, monkeypatch):
    from ml_backend.core import simulate

    _, truth = make_toy_store(tmp_path / "toy.h5")
    imagenet, seen = [], []
    original_features, original_rankings = simulate._imagenet_features, simulate._head_rankings

    def recording_features(*args):
        features = original_features(*args)
        imagenet.append(features.copy())  # the cache itself is overwritten later
        return features

    def recording_rankings(features, *args):
        seen.append((features.copy(), args[-1] is None))  # args[-1]: the model's logit or None
        return original_rankings(features, *args)

    monkeypatch.setattr(simulate, "_imagenet_features", recording_features)
    monkeypatch.setattr(simulate, "_head_rankings", recording_rankings)
    with CutoutStore.open(tmp_path / "toy.h5") as store:
        rows = list(run_simulation(store, truth, toy_plan(fast_head=True), TOY_CFG))
    first = imagenet[0]
    unblended = [f for f, alone in seen if alone]  # the interim head of cycle 1, the probes
    blended = [f for f, alone in seen if not alone]  # heads on a model's embeddings
    assert len(unblended) == 1 + len(rows) and len(blended) == 2 * len(rows) - 1
    assert all(np.array_equal(f, first) for f in unblended)
    assert not any(np.array_equal(f, first) for f in blended)
    assert rows[0]["probe_auroc"] == pytest.approx(rows[0]["interim_auroc"])


@pytest.mark.slow
def test_compare_tta_scores_the_same_model_the_other_way_without_changing_the_run(tmp_path):
    _, truth = make_toy_store(tmp_path / "toy.h5")
    compared = toy_plan(compare_tta=True)
    with CutoutStore.open(tmp_path / "toy.h5") as store:
        without = list(run_simulation(store, truth, toy_plan(), TOY_CFG))
        rows = list(run_simulation(store, truth, compared, TOY_CFG))
        on = list(run_simulation(store, truth, compared,
                                 TOY_CFG.replace(test_time_augmentation=True)))
    for a, b in zip(without, rows, strict=True):
        assert b["auroc"] == pytest.approx(a["auroc"])
        assert 0.0 <= b["tta_auroc"] <= 1.0
    # With TTA in the config the roles swap: the first cycle (same model, same labels) has
    # the plain scores as its tta_* and the TTA scores as its own.
    assert on[0]["tta_auroc"] == pytest.approx(rows[0]["auroc"])
    assert on[0]["auroc"] == pytest.approx(rows[0]["tta_auroc"])


@pytest.mark.slow
def test_compare_shift_scores_each_cycle_shifted_on_the_same_picks(tmp_path):
    _, truth = make_toy_store(tmp_path / "toy.h5")
    compared = toy_plan(fast_head=True, compare_shift=0.125)
    with CutoutStore.open(tmp_path / "toy.h5") as store:
        plain = list(run_simulation(store, truth, toy_plan(fast_head=True), TOY_CFG))
        rows = list(run_simulation(store, truth, compared, TOY_CFG))
        shifted = list(run_simulation(store, truth, toy_plan(fast_head=True),
                                      TOY_CFG.replace(test_time_shift=0.125)))
    for a, b in zip(plain, rows, strict=True):  # the run itself, picks included, unchanged
        assert (b["auroc"], b["zblend_ap"]) == pytest.approx((a["auroc"], a["zblend_ap"]))
    # Cycle 1 trains the same model either way: its shifted scoring is the shifted run's own.
    assert rows[0]["shift_auroc"] == pytest.approx(shifted[0]["auroc"])
    assert rows[0]["shift_ap"] == pytest.approx(shifted[0]["ap"])
    assert rows[0]["shift_zblend_ap"] == pytest.approx(shifted[0]["zblend_ap"])
    top = [r[0]["mean_score_top_1pct"] for r in (plain, shifted)]
    assert rows[0]["shift_mean_score_top_1pct"] == pytest.approx(top[1])
    assert top[1] != pytest.approx(top[0])  # the toy's ranking is perfect either way
    assert "shift_zblend_auroc" in rows[1]
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        toy_plan(compare_shift=0.5)
    with pytest.raises(ValueError, match="compare_shift needs a trained method"):
        toy_plan(method="linear-probe", compare_shift=0.1)


@pytest.mark.slow
def test_a_second_imagenet_term_is_measured_beside_the_model_framed_one(tmp_path, monkeypatch):
    from ml_backend.core import simulate

    _, truth = make_toy_store(tmp_path / "toy.h5")
    framings = []
    real_features = simulate._imagenet_features

    def recording_features(store, pool, cfg, *, stage=simulate.IMAGENET_STAGE):
        features = real_features(store, pool, cfg, stage=stage)
        framings.append((cfg.center_crop, cfg.image_size, stage, features.shape[1]))
        return features

    monkeypatch.setattr(simulate, "_imagenet_features", recording_features)
    with CutoutStore.open(tmp_path / "toy.h5") as store:
        plain = list(run_simulation(store, truth, toy_plan(fast_head=True), TOY_CFG))
        framed = list(run_simulation(store, truth, toy_plan(
            fast_head=True, imagenet_framing=(0.5, 48)), TOY_CFG))
        mid = list(run_simulation(store, truth, toy_plan(fast_head=True, imagenet_block=3),
                                  TOY_CFG))
        uncut = list(run_simulation(store, truth, toy_plan(
            fast_head=True, imagenet_block=simulate.IMAGENET_UNCUT,
            scores_dir=tmp_path / "scores"), TOY_CFG))
    # The backend's stage 4 (EfficientNet-Lite0: 112 channels) at the model's framing for the
    # model's run; then both, the second as asked: framed, pooled after stage 3 (80
    # channels), or uncut (the head convolution's 1,280).
    assert framings == [(1.0, 32, 4, 112), (1.0, 32, 4, 112), (0.5, 48, 4, 112),
                        (1.0, 32, 4, 112), (1.0, 32, 3, 80), (1.0, 32, 4, 112),
                        (1.0, 32, None, 1280)]
    for a, b in [*zip(plain, framed, strict=True), *zip(plain, mid, strict=True),
                 *zip(plain, uncut, strict=True)]:  # the rest
        for key in ("auroc", "zblend_auroc", "probe_auroc", "lblend_auroc", "lblend_ap"):
            assert b[key] == pytest.approx(a[key])
        assert "fblend_auroc" not in a
        for key in ("blend4_auroc", "blend3_auroc"):
            assert 0.0 <= b[key] <= 1.0 and b[key] == pytest.approx(a[key])
        assert all(0.0 <= b[f"{p}_{m}"] <= 1.0 for p in ("fprobe", "fblend")
                   for m in ("auroc", "ap", "precision_top_1pct"))
    # The saved logits give back every blend the run measured.
    for row in uncut:
        saved = np.load(tmp_path / "scores" / f"cycle{row['cycle']}.npz")
        assert sorted(saved.files) == ["fprobe", "head", "knn", "mknn", "model", "probe", "rows",
                                       "truth"]
        for name, terms in {"lblend": ("model", "head", "probe"),
                            "fblend": ("model", "head", "fprobe"), "probe": ("probe",),
                            "head": ("head",), "knn": ("knn",),
                            "kblend": ("model", "head", "probe", "knn"), "mknn": ("mknn",),
                            "mkblend": ("model", "head", "mknn")}.items():
            blend = simulate.mean_z(*(saved[t] for t in terms))
            assert roc_auc_score(saved["truth"], blend) == pytest.approx(row[f"{name}_auroc"])
    with pytest.raises(ValueError, match="need fast_head"):
        toy_plan(scores_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="need fast_head"):
        toy_plan(imagenet_framing=(0.5, 48))
    with pytest.raises(ValueError, match="need fast_head"):
        toy_plan(imagenet_block=4)
    with pytest.raises(ValueError, match="imagenet_block must be >= 0"):
        toy_plan(fast_head=True, imagenet_block=-2)
    with pytest.raises(ValueError, match="center_crop"):
        toy_plan(fast_head=True, imagenet_framing=(1.5, 48))


def test_a_teacher_config_trains_on_the_frozen_ranking_and_logs_how_right_it_is(tmp_path,
                                                                               monkeypatch):
    from ml_backend.core import simulate

    _, truth = make_toy_store(tmp_path / "toy.h5")
    taught = []
    real = simulate.train_cycle

    def recording(cfg, *args, teacher=None, **kwargs):
        taught.append(teacher)
        return real(cfg, *args, teacher=teacher, **kwargs)

    monkeypatch.setattr(simulate, "train_cycle", recording)
    cfg = TOY_CFG.replace(teacher_top_share=0.05, teacher_normal_share=0.5)
    with CutoutStore.open(tmp_path / "toy.h5") as store:
        rows = list(run_simulation(store, truth, toy_plan(), cfg))
    # One ranking per cycle over that cycle's unlabelled images (97, then 93).
    assert [len(t) for t in taught] == [len(truth) - 23, len(truth) - 27]
    for row in rows:  # bright squares: the ImageNet terms find them
        assert row["teacher_anomaly_anomaly_share"] >= 0.75
        assert row["teacher_normal_anomaly_share"] == 0.0
        assert row["mean_pseudo_anomaly_rate"] > 0.0
    # The labels alone: no unlabelled images, no teacher.
    with CutoutStore.open(tmp_path / "toy.h5") as store:
        supervised = list(run_simulation(store, truth, toy_plan(method="supervised"), cfg))
    assert taught[2:] == [None, None] and len(supervised) == 2


def test_frozen_ranking_is_the_mean_of_the_standardised_head_and_neighbour_logits():
    from ml_backend.core.fast_head import fit_fast_head, fit_neighbour_term
    from ml_backend.core.simulate import frozen_ranking
    from tests.test_fast_head import clustered

    features, truth = clustered()
    labelled = np.r_[np.flatnonzero(truth == 1)[:3], np.flatnonzero(truth == 0)[:40]]
    rows = np.setdiff1d(np.arange(len(truth)), labelled)
    ranking = frozen_ranking(features, labelled, truth[labelled], rows)
    head = fit_fast_head(features, labelled, truth[labelled]).logits(features[rows])
    term = fit_neighbour_term(features, labelled, truth[labelled]).logits(features[rows])
    by_hand = sum((v - v.mean()) / v.std() for v in (head.astype(np.float64),
                                                     term.astype(np.float64))) / 2
    np.testing.assert_allclose(ranking, by_hand, rtol=1e-6, atol=1e-9)
    # The five unlabelled anomalies are its top five.
    assert set(rows[np.argsort(-ranking)[:5]]) == set(np.flatnonzero(truth == 1)[3:])
