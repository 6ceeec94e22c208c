import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import blend_weights
from benchmarks.paired import paired_comparison
from ml_backend.core import metrics


def _save_run(folder, rng, cycles=2):
    truth = np.r_[np.ones(5), np.zeros(45)].astype(np.int64)
    for cycle in range(1, cycles + 1):
        folder.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(folder / f"cycle{cycle}.npz", rows=np.arange(50), truth=truth,
                            **{t: rng.normal(size=50) + truth * rng.uniform(0, 2)
                               for t in ("model", "head", "probe")})


def _log(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_blends_are_weighted_means_of_standardised_logits_paired_with_the_first(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(3):
        _save_run(tmp_path / f"r{seed}", rng)
        rows.append({"key": f"k{seed}", "setting": "s", "dataset": "first:Bent", "seed": seed,
                     "protocol": "full", "scores_dir": str(tmp_path / f"r{seed}")})
    # An earlier row of the same run, one of another setting or protocol, one without
    # logits: not read.
    _log(tmp_path / "log.jsonl", [{**rows[0], "scores_dir": "/nowhere"}, *rows,
                                  {**rows[1], "key": "other", "setting": "t"},
                                  {**rows[1], "key": "c1", "protocol": "cycle1"},
                                  {"key": "k9", "setting": "s", "dataset": "x", "seed": 9,
                                   "protocol": "full"}])
    runs = blend_weights.saved_runs([tmp_path / "log.jsonl"], "s")
    assert [r["key"] for r in runs] == ["k0", "k1", "k2"]
    assert runs[0]["scores_dir"] == str(tmp_path / "r0")

    with np.load(tmp_path / "r1" / "cycle2.npz") as npz:
        saved = {k: npz[k] for k in npz.files}
    z = {t: (saved[t] - saved[t].mean()) / saved[t].std() for t in ("model", "head", "probe")}
    np.testing.assert_allclose(blend_weights.blend(saved, {"model": 1, "probe": 3}),
                               (z["model"] + 3 * z["probe"]) / 4)
    with pytest.raises(KeyError, match="fprobe"):
        blend_weights.blend(saved, {"fprobe": 1})

    base, cand = {"model": 1, "head": 1}, {"model": 1, "head": 1, "probe": 2}
    lines = blend_weights.report(runs, [base, cand])
    by_hand = []
    for r in runs:
        with np.load(f"{r['scores_dir']}/cycle2.npz") as npz:
            s = {k: npz[k] for k in npz.files}
        by_hand.append([metrics.evaluate(s["truth"], blend_weights.blend(s, w))["auroc"]
                        for w in (base, cand)])
    c = paired_comparison(*zip(*by_hand, strict=True))
    row = next(line for line in lines if line.startswith("| 2 | auroc | model=1,head=1,probe=2"))
    assert f"{c.mean_diff:+.3f} [{c.ci_low:+.3f}, {c.ci_high:+.3f}] | {c.wins} / {c.losses}" in row
    assert sum(line.startswith("| 1 | ") for line in lines) == 6  # 3 metrics x 2 blends


def test_blend_specs_are_checked():
    assert blend_weights.parse_blend("model=1,probe=2.5") == {"model": 1.0, "probe": 2.5}
    for bad in ("modl=1", "model", "model=0,head=0"):
        with pytest.raises(argparse.ArgumentTypeError):
            blend_weights.parse_blend(bad)


def test_a_setting_without_saved_logits_is_a_clear_error(tmp_path):
    _log(tmp_path / "log.jsonl", [{"key": "k", "setting": "s", "dataset": "d", "seed": 0,
                                   "protocol": "full"}])
    with pytest.raises(SystemExit, match="saved its logits"):
        blend_weights.main(["model=1", "--setting", "s", "--log", str(tmp_path / "log.jsonl")])


def test_prev_terms_are_the_previous_cycles_logits_of_the_same_images(tmp_path):
    rng = np.random.default_rng(1)
    _save_run(tmp_path / "r", rng, cycles=2)
    subset = np.r_[0:5, 15:50]  # cycle 2 scores 40 of cycle 1's 50 images (5 anomalies kept)
    with np.load(tmp_path / "r" / "cycle2.npz") as npz:
        kept = {k: npz[k][subset] for k in npz.files}
    np.savez_compressed(tmp_path / "r" / "cycle2.npz", **kept)
    assert blend_weights.load_cycle(tmp_path / "r", 1, previous=True) is None
    saved = blend_weights.load_cycle(tmp_path / "r", 2, previous=True)
    with np.load(tmp_path / "r" / "cycle1.npz") as npz:
        np.testing.assert_array_equal(saved["prev_model"], npz["model"][subset])
    np.testing.assert_array_equal(saved["model"], kept["model"])

    _save_run(tmp_path / "r2", rng, cycles=2)
    runs = [{"key": f"k{i}", "setting": "s", "dataset": "d", "seed": i, "protocol": "full",
             "scores_dir": str(tmp_path / name)} for i, name in enumerate(("r", "r2"))]
    lines = blend_weights.report(runs, [{"model": 1}, {"model": 2, "prev_model": 1}])
    assert not any(line.startswith("| 1 | ") for line in lines)
    assert sum(line.startswith("| 2 | ") for line in lines) == 6

    kept["rows"] = kept["rows"] + 100  # images the previous cycle never scored
    np.savez_compressed(tmp_path / "r" / "cycle2.npz", **kept)
    with pytest.raises(ValueError, match="did not"):
        blend_weights.load_cycle(tmp_path / "r", 2, previous=True)


def test_same_images_measures_every_cycle_on_the_last_cycles_images(tmp_path):
    rng = np.random.default_rng(2)
    runs = []
    subset = np.r_[0:3, 20:50]  # the last cycle scores 33 of the first's 50 images
    for seed in range(2):
        folder = tmp_path / f"r{seed}"
        _save_run(folder, rng, cycles=2)
        with np.load(folder / "cycle2.npz") as npz:
            np.savez_compressed(folder / "cycle2.npz", **{k: npz[k][subset] for k in npz.files})
        runs.append({"key": f"k{seed}", "setting": "s", "dataset": "d", "seed": seed,
                     "protocol": "full", "scores_dir": str(folder)})
    weights = {"model": 1, "head": 1}
    by_hand = []
    for r in runs:
        with np.load(f"{r['scores_dir']}/cycle1.npz") as npz:
            s = {k: npz[k][subset] for k in npz.files}
        by_hand.append(metrics.evaluate(s["truth"], blend_weights.blend(s, weights)))
    same = blend_weights.measure(runs, [weights], same_images=True)
    assert [m["auroc"] for m in same[1][0]] == pytest.approx([m["auroc"] for m in by_hand])
    own = blend_weights.measure(runs, [weights])
    assert own[1][0][0]["n"] == 50 and same[1][0][0]["n"] == 33
    assert same[2][0] == own[2][0]  # the last cycle is measured on its own images either way


def test_a_baseline_setting_pairs_the_same_blend_of_two_settings_runs(tmp_path, capsys):
    rng = np.random.default_rng(3)
    rows = []
    for setting in ("base", "cand"):
        for seed in range(3):
            _save_run(tmp_path / f"{setting}{seed}", rng)
            rows.append({"key": f"{setting}{seed}", "setting": setting, "dataset": "first:Bent",
                         "seed": seed, "protocol": "full",
                         "scores_dir": str(tmp_path / f"{setting}{seed}")})
    # A candidate run with no baseline run of its (dataset, seed) is left out.
    _save_run(tmp_path / "cand9", rng)
    rows.append({**rows[-1], "key": "cand9", "seed": 9, "scores_dir": str(tmp_path / "cand9")})
    _log(tmp_path / "log.jsonl", rows)
    blend_weights.main(["head=1,probe=1", "--setting", "cand", "--baseline-setting", "base",
                        "--seeds", "0", "1", "2", "9", "--log", str(tmp_path / "log.jsonl")])
    out = capsys.readouterr().out
    assert out.startswith("3 runs: first:Bent s0, first:Bent s1, first:Bent s2")

    def ap(setting, seed):
        with np.load(tmp_path / f"{setting}{seed}" / "cycle2.npz") as npz:
            s = {k: npz[k] for k in npz.files}
        return metrics.evaluate(s["truth"], blend_weights.blend(s, {"head": 1, "probe": 1}))["ap"]

    c = paired_comparison([ap("base", s) for s in range(3)], [ap("cand", s) for s in range(3)])
    line = next(x for x in out.splitlines() if x.startswith("| 2 | ap | head=1,probe=1 |"))
    assert f"{c.mean_diff:+.3f} [{c.ci_low:+.3f}, {c.ci_high:+.3f}] | {c.wins} / {c.losses}" in line
    assert "| 2 | ap | baseline setting: head=1,probe=1 |" in out
    # Only seed 1 asked for: one pair.
    blend_weights.main(["head=1,probe=1", "--setting", "cand", "--baseline-setting", "base",
                        "--seeds", "1", "--log", str(tmp_path / "log.jsonl")])
    assert capsys.readouterr().out.startswith("1 runs: first:Bent s1\n")


def test_refitted_imagenet_terms_repeat_a_real_runs_saved_ones_and_read_other_embeddings(
        tmp_path, monkeypatch):
    from benchmarks import suite
    from tests.test_simulate import make_toy_store

    store = tmp_path / "store.h5"
    ids, truth = make_toy_store(store, n=80, n_anomalies=10)
    truth_csv = tmp_path / "truth.csv"
    truth_csv.write_text("id,label\n" + "".join(
        f"{i},{'anomaly' if t else 'normal'}\n" for i, t in zip(ids, truth, strict=True)))
    job = suite.Job(suite.dataset_spec("first:Bent"), 0, suite.SETTINGS["dist-align+tta+stage-4"],
                    "smoke", fast_head=True)
    row = suite.run_job(job, store, truth_csv, threads=1, scores_root=tmp_path / "scores")
    monkeypatch.setattr(blend_weights, "dataset_paths", lambda *a: (store, truth_csv))
    same = blend_weights.ImagenetRefit({}, tmp_path)
    zoomed = blend_weights.ImagenetRefit({"imagenet_zoom": 0.6}, tmp_path)
    folder = Path(row["scores_dir"])
    for cycle in (1, 2):  # the second cycle holds the oracle's picks among its labels
        again = blend_weights.load_cycle(folder, cycle, False, refit=(same, row))
        np.testing.assert_allclose(again["probe2"], again["probe"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(again["knn2"], again["knn"], rtol=1e-4, atol=1e-4)
        other = blend_weights.load_cycle(folder, cycle, False, refit=(zoomed, row))
        assert other["probe2"].shape == other["probe"].shape
        assert not np.allclose(other["probe2"], other["probe"])


def test_refitted_terms_need_imagenet_overrides_and_good_ones(tmp_path):
    with pytest.raises(SystemExit):
        blend_weights.main(["--setting", "s", "--log", str(tmp_path / "x"), "head=1,probe2=1"])
    for bad in ("imagenet_zoom=2", "zoom=0.7", "imagenet_zoom"):
        with pytest.raises(SystemExit):
            blend_weights.main(["--setting", "s", "--imagenet", bad, "head=1,probe2=1"])
