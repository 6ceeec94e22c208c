"""The benchmark suite: paired statistics against hand-computed values, grid planning, resume,
and the report's tables."""

from __future__ import annotations

import argparse
import json
import subprocess

import pytest

from benchmarks import suite
from benchmarks.detection_quality import table_row
from benchmarks.paired import BAD_LOSS, clear_majority_size, decide, paired_comparison
from benchmarks.suite import (
    PROTOCOLS,
    SETTINGS,
    SUITES,
    Job,
    _commit,
    _commits_since,
    done_keys,
    job_config,
    parse_setting,
    plan_jobs,
    run_job,
)
from benchmarks.suite_report import (
    calibration_report,
    fast_head_report,
    load_rows,
    report,
    top1_ceiling,
)
from ml_backend.core.config import kind_defaults


def test_paired_comparison_counts_and_mean_by_hand():
    pc = paired_comparison([0.80, 0.90, 0.70, 0.60], [0.85, 0.88, 0.70, 0.75])
    # differences: +0.05, -0.02, 0, +0.15 -> mean 0.045; one tie
    assert (pc.n, pc.wins, pc.losses) == (4, 2, 1)
    assert pc.mean_diff == pytest.approx(0.045)
    assert -0.02 <= pc.ci_low <= pc.mean_diff <= pc.ci_high <= 0.15


def test_bootstrap_interval_of_two_pairs_spans_their_differences():
    # Resamples of two differences a, b have means a, (a + b) / 2 or b, with probabilities
    # 1/4, 1/2, 1/4: the 2.5 and 97.5 percentiles are a and b.
    pc = paired_comparison([0.5, 0.5], [0.6, 0.9])
    assert pc.ci_low == pytest.approx(0.1) and pc.ci_high == pytest.approx(0.4)


def test_identical_differences_give_a_point_interval():
    pc = paired_comparison([0.1, 0.2, 0.3], [0.2, 0.3, 0.4])
    assert pc.ci_low == pytest.approx(0.1) and pc.ci_high == pytest.approx(0.1)


def test_paired_comparison_refuses_unpaired_input():
    with pytest.raises(ValueError, match="equal-length"):
        paired_comparison([0.1, 0.2], [0.3])
    with pytest.raises(ValueError, match="no pairs"):
        paired_comparison([], [])


def test_decide_needs_an_interval_off_zero_or_a_clean_majority():
    up = paired_comparison([0.5] * 4, [0.6, 0.55, 0.7, 0.52])
    assert decide(up, [0.1, 0.05, 0.2, 0.02]) == "better"
    assert decide(up, [0.1, 0.05, 0.2, 0.02], min_seeds=1) == "undecided"  # never one seed
    mixed = paired_comparison([0.5] * 4, [0.6, 0.4, 0.55, 0.45])
    assert decide(mixed, [0.1, -0.1, 0.05, -0.05]) == "undecided"
    # Four classes can never give a clear majority: a coin per class gives 4 of 4 in 1/16.
    assert decide(mixed, [0.1, 0.1, 0.1, 0.1]) == "undecided"
    # Nine of ten ahead is clear (11/1024 by chance), unless the tenth is behind badly.
    assert decide(mixed, [0.1] * 9 + [-BAD_LOSS / 2]) == "better"
    assert decide(mixed, [0.1] * 9 + [-2 * BAD_LOSS]) == "undecided"
    assert decide(mixed, [0.1] * 8 + [-0.001] * 2) == "undecided"  # 8 of 10: 56/1024
    assert decide(mixed, [-0.1] * 9 + [BAD_LOSS / 2]) == "worse"
    down = paired_comparison([0.6, 0.55, 0.7, 0.52], [0.5] * 4)
    assert decide(down, [-0.1, -0.05, -0.2, -0.02]) == "worse"


def test_a_clear_majority_is_a_one_sided_sign_test_at_five_percent():
    # P(at least k of n ahead by chance) = sum C(n, j) / 2^n over j >= k, by hand:
    # n = 4: 4 of 4 is 1/16 = 0.0625, never clear; n = 5: 5 of 5 is 1/32; n = 10: 9 or more
    # is 11/1024 = 0.011, 8 or more 56/1024 = 0.055.
    assert [clear_majority_size(n) for n in (1, 4, 5, 6, 7, 8, 10)] == [
        None, None, 5, 6, 7, 7, 9]


def test_parse_setting_reads_json_values_and_words():
    setting = parse_setting("mine:bn_momentum=0.01,invariance=flip,ema_warmup=false")
    assert setting.name == "mine" and setting.method == "fixmatch"
    assert setting.overrides == {"bn_momentum": 0.01, "invariance": "flip", "ema_warmup": False}
    assert parse_setting("sup:method=supervised,lr=0.001").method == "supervised"


@pytest.mark.parametrize("text", ["noname", "x:lr", "x:invariance=rotate", "x:nope=1",
                                  "x:method=svm"])
def test_parse_setting_refuses_bad_text(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_setting(text)


def test_plan_is_seed_major_and_keys_tell_runs_apart():
    datasets = SUITES["first"][:2]
    settings = [SETTINGS["default"], SETTINGS["flip"]]
    jobs = plan_jobs(datasets, settings, range(2), "full")
    assert [j.seed for j in jobs] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert len({j.key() for j in jobs}) == 8
    screen = Job(datasets[0], 0, settings[0], "screen")
    assert screen.key() != jobs[0].key()
    assert Job(datasets[0], 0, SETTINGS["default"], "full").key() == jobs[0].key()


def test_device_and_within_run_measurements_keep_old_keys_and_tell_runs_apart():
    dataset, setting = SUITES["first"][0], SETTINGS["default"]
    cpu = Job(dataset, 0, setting, "full")
    cuda = Job(dataset, 0, setting, "full", device="cuda")
    tta = Job(dataset, 0, setting, "full", compare_tta=True)
    fast = Job(dataset, 0, setting, "full", fast_head=True)
    assert json.loads(cpu.key())[-1] == PROTOCOLS["full"]  # nothing appended on the CPU
    assert json.loads(cuda.key())[-1] == "cuda" and json.loads(tta.key())[-1] == "compare_tta"
    assert fast.key() == Job(dataset, 0, setting, "full", fast_head=True).key() != cpu.key()
    assert len({cpu.key(), cuda.key(), tta.key(), fast.key()}) == 4
    compared = Job(dataset, 0, SETTINGS["flip+tta+stage-4+iter-200+u2@compare-shift-4"], "full")
    assert json.loads(compared.key())[-1] == "compare_shift:0.0625"
    assert job_config(compared) == job_config(
        Job(dataset, 0, SETTINGS["flip+tta+stage-4+iter-200+u2"], "full"))  # trains the same


def test_settings_keep_their_logged_meaning_when_defaults_change():
    first = SUITES["first"][0]
    default = job_config(Job(first, 0, SETTINGS["default"], "full"))
    assert not default.distribution_alignment and not default.test_time_augmentation
    assert (default.center_crop, default.iterations) == (0.5, 100)
    product = job_config(Job(SUITES["animal"][0], 0, SETTINGS["flip+dist-align+tta"], "smoke"))
    assert (product.invariance, product.distribution_alignment,
            product.test_time_augmentation, product.iterations) == ("flip", True, True, 5)


def test_a_run_past_its_start_deadline_is_skipped_without_running(tmp_path):
    job = Job(SUITES["first"][0], 0, SETTINGS["default"], "smoke")
    assert run_job(job, tmp_path / "missing.h5", tmp_path / "missing.csv", 1,
                   start_before=0.0) is None


def test_the_report_keeps_devices_apart(tmp_path):
    rows = [_row("animal:Cat", "default", 0, 0.80), _row("animal:Cat", "flip", 0, 0.85),
            {**_row("animal:Cat", "default", 0, 0.10), "device": "cuda"},
            {**_row("animal:Cat", "flip", 0, 0.95), "device": "cuda"}]
    log = tmp_path / "runs.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in rows))
    cpu = "\n".join(report([log], "default", "full", ["auroc"]))
    cuda = "\n".join(report([log], "default", "full", ["auroc"], device="cuda"))
    assert "| animal:Cat | 0.800 (1) | 0.850 (1) |" in cpu
    assert "| animal:Cat | 0.100 (1) | 0.950 (1) |" in cuda


def test_done_keys_lets_a_grid_resume_past_a_torn_line(tmp_path):
    log = tmp_path / "runs.jsonl"
    jobs = plan_jobs(SUITES["animal"][:1], [SETTINGS["default"]], range(2), "screen")
    log.write_text(json.dumps({"key": jobs[0].key()}) + "\n" + '{"key": "torn')
    assert done_keys(log) == {jobs[0].key()}
    assert [j for j in jobs if j.key() not in done_keys(log)] == jobs[1:]


def test_done_keys_at_a_commit_redo_older_runs_and_resume_this_commits(tmp_path):
    log = tmp_path / "runs.jsonl"
    jobs = plan_jobs(SUITES["animal"][:1], [SETTINGS["default"]], range(2), "screen")
    log.write_text(json.dumps({"key": jobs[0].key(), "commit": "old"}) + "\n"
                   + json.dumps({"key": jobs[1].key(), "commit": "new"}) + "\n")
    assert done_keys(log) == {jobs[0].key(), jobs[1].key()}
    assert done_keys(log, {"new"}) == {jobs[1].key()}  # job 0 runs again, job 1 is done


def test_blend_pick_settings_are_the_kind_defaults_with_a_fast_head_and_their_own_keys():
    for kind in ("dist-align+tta", "flip+tta"):
        for blend in ("zblend", "lblend"):
            picks = SETTINGS[f"{kind}@{blend}-picks"]
            assert picks.overrides == SETTINGS[kind].overrides and picks.picks_from == blend
            job = Job(SUITES["first"][0], 0, picks, "full")
            plain = Job(SUITES["first"][0], 0, SETTINGS[kind], "full", fast_head=True)
            assert job.measures_fast_head and job.key() != plain.key()
            assert f"picks:{blend}" in job.key()


def test_supervised_settings_are_the_cut_defaults_trained_on_labels_alone(tmp_path, monkeypatch):
    for kind in ("dist-align+tta", "flip+tta"):
        product, alone = SETTINGS[f"{kind}+stage-4"], SETTINGS[f"supervised+{kind}+stage-4"]
        assert alone.overrides == product.overrides and alone.method == "supervised"
        job = Job(SUITES["first"][0], 0, alone, "full")
        assert job.measures_fast_head
        assert job.key() != Job(SUITES["first"][0], 0, product, "full").key()
    plans = []
    monkeypatch.setattr(suite, "run_one", lambda store, truth, plan, cfg: plans.append(plan)
                        or [{"auroc": 0.5}])
    run_job(job, tmp_path / "s.h5", tmp_path / "t.csv", 1)
    assert plans[0].method == "supervised" and plans[0].fast_head


@pytest.mark.parametrize("size", [96, 64])
def test_a_framed_imagenet_setting_measures_the_fast_head_under_its_own_key(tmp_path,
                                                                           monkeypatch, size):
    framed = SETTINGS[f"dist-align+tta@imagenet-0.35x{size}"]
    assert framed.overrides == SETTINGS["dist-align+tta"].overrides
    job = Job(SUITES["first"][0], 0, framed, "full")
    plain = Job(SUITES["first"][0], 0, SETTINGS["dist-align+tta"], "full", fast_head=True)
    assert job.measures_fast_head and f"imagenet:0.35x{size}" in job.key()
    assert job.key() != plain.key()
    plans = []
    monkeypatch.setattr(suite, "run_one", lambda store, truth, plan, cfg: plans.append(plan)
                        or [{"auroc": 0.5}])
    run_job(job, tmp_path / "s.h5", tmp_path / "t.csv", 1)
    assert plans[0].imagenet_framing == (0.35, size) and plans[0].fast_head


def test_a_mid_level_imagenet_setting_measures_the_fast_head_under_its_own_key(tmp_path,
                                                                              monkeypatch):
    setting = SETTINGS["dist-align+tta@imagenet-last"]
    assert setting.overrides == SETTINGS["dist-align+tta"].overrides
    job = Job(SUITES["first"][0], 0, setting, "full")
    framed = Job(SUITES["first"][0], 0, SETTINGS["dist-align+tta@imagenet-0.35x64"], "full")
    assert job.measures_fast_head and "imagenet:b-1" in job.key()
    assert job.key() != framed.key()
    plans = []
    monkeypatch.setattr(suite, "run_one", lambda store, truth, plan, cfg: plans.append(plan)
                        or [{"auroc": 0.5}])
    row = run_job(job, tmp_path / "s.h5", tmp_path / "t.csv", 1)
    assert plans[0].imagenet_block == -1 and plans[0].imagenet_framing is None
    assert plans[0].scores_dir is None and "scores_dir" not in row
    # Saving logits: a folder per run, named by its key and recorded in its row.
    rows = [run_job(j, tmp_path / "s.h5", tmp_path / "t.csv", 1, scores_root=tmp_path / "l")
            for j in (job, framed, Job(SUITES["first"][0], 0, SETTINGS["default"], "full"))]
    assert [str(p.scores_dir) for p in plans[1:3]] == [r["scores_dir"] for r in rows[:2]]
    assert plans[1].scores_dir.parent == tmp_path / "l"
    assert plans[1].scores_dir != plans[2].scores_dir
    assert plans[3].scores_dir is None
    assert "scores_dir" not in rows[2]  # no fast head measured, no logits to save
    assert SETTINGS["flip+tta@imagenet-last"].overrides == SETTINGS["flip+tta"].overrides


def test_redo_since_counts_that_commit_and_later_ones_as_done(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty"]
    subprocess.run(["git", "init", "-q"], check=True)
    hashes = []
    for message in ("first", "second", "third"):
        subprocess.run([*git, "-m", message], check=True)
        hashes.append(_commit())
    assert _commits_since(hashes[1]) == set(hashes[1:])
    assert _commits_since("HEAD") == {hashes[2]}
    with pytest.raises(SystemExit, match="--redo-since"):
        _commits_since("no-such-commit")


def _row(dataset: str, setting: str, seed: int, auroc: float) -> dict:
    return {"dataset": dataset, "setting": setting, "seed": seed, "protocol": "full",
            "auroc": auroc, "n": 1000, "n_anomalies": 5}


def test_report_tables_means_and_pairs(tmp_path):
    rows = [_row("animal:Cat", "default", 0, 0.80), _row("animal:Cat", "default", 1, 0.90),
            _row("animal:Cat", "flip", 0, 0.85), _row("animal:Cat", "flip", 1, 0.95),
            _row("animal:Dog", "default", 0, 0.70), _row("animal:Dog", "flip", 0, 0.75),
            {**_row("animal:Dog", "flip", 1, 0.1), "protocol": "screen"}]
    log = tmp_path / "runs.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    text = "\n".join(report([log], "default", "full", ["auroc"]))
    assert "| animal:Cat | 0.850 ± 0.071 (2) | 0.900 ± 0.071 (2) | 0.500 ± 0.000 |" in text
    assert "| animal:Dog | 0.700 (1) | 0.750 (1) |" in text
    assert "**animal mean** | **0.800 ± 0.100** (3) | **0.850 ± 0.100** (3)" in text
    # Dog has one seed, so no verdict yet.
    assert "| animal | flip | 3 | 3 / 0 | +0.050 | [+0.050, +0.050] | 2 / 0 | undecided |" in text
    two = [*rows[:4], _row("animal:Dog", "default", 0, 0.70), _row("animal:Dog", "flip", 0, 0.75),
           _row("animal:Dog", "default", 1, 0.72), _row("animal:Dog", "flip", 1, 0.77)]
    log.write_text("\n".join(json.dumps(r) for r in two) + "\n")
    text = "\n".join(report([log], "default", "full", ["auroc"]))
    assert "| animal | flip | 4 | 4 / 0 | +0.050 | [+0.050, +0.050] | 2 / 0 | better |" in text


def test_cycle1_reads_full_runs_first_cycle_where_it_has_no_row_of_its_own(tmp_path):
    full = {**_row("first:FRI", "default", 0, 0.70), "cycles": [{"auroc": 0.61}, {"auroc": 0.70}]}
    own = {**_row("first:FRI", "default", 1, 0.64), "protocol": "cycle1"}
    shadowed = {**_row("first:FRI", "default", 1, 0.90), "cycles": [{"auroc": 0.99}]}
    cand = [{**_row("first:FRI", "new", s, a), "protocol": "cycle1"}
            for s, a in ((0, 0.71), (1, 0.66))]
    log = tmp_path / "runs.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [full, own, shadowed, *cand]) + "\n")
    text = "\n".join(report([log], "default", "cycle1", ["auroc"]))
    # Baseline: seed 0 from the full run's first cycle (0.61), seed 1 its own cycle1 row.
    assert "| first:FRI | 0.625 ± 0.021 (2) | 0.685 ± 0.035 (2) |" in text
    assert "| first | new | 2 | 2 / 0 | +0.060 |" in text
    assert "0.625" not in "\n".join(report([log], "default", "full", ["auroc"]))
    assert load_rows([log], "cycle1")[("first:FRI", "default")][0]["cycles"] == [{"auroc": 0.61}]


def test_report_skips_runs_that_lack_the_metric(tmp_path):
    rows = [{**_row("first:FRI", "default", 0, 0.70), "blend_auroc": 0.72},
            _row("first:FRI", "default", 1, 0.60),  # logged before the blend existed
            {**_row("first:FRI", "thr", 0, 0.80), "blend_auroc": 0.82},
            {**_row("first:FRI", "thr", 1, 0.50), "blend_auroc": 0.55}]
    log = tmp_path / "runs.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    text = "\n".join(report([log], "default", "full", ["blend_auroc"]))
    assert "| first:FRI | 0.720 (1) | 0.685 ± 0.191 (2) |" in text
    assert "| first | thr | 1 | 1 / 0 | +0.100 |" in text  # seed 1 has no pair
    only = "\n".join(report([log], "default", "full", ["auroc"], only=["other"]))
    assert "| dataset | default | top-1 % ceiling |" in only and "thr" not in only


def test_fast_head_settings_keep_old_keys_and_report_pairs_within_runs(tmp_path):
    dataset = SUITES["first"][0]
    fast = Job(dataset, 0, SETTINGS["default+fast"], "full")
    assert "fast_head" in fast.key()
    assert "fast_head" not in Job(dataset, 0, SETTINGS["default"], "full").key()
    cycles = [{"auroc": 0.80, "head_auroc": 0.78, "blend_auroc": 0.81, "interim_auroc": 0.70},
              {"auroc": 0.90, "head_auroc": 0.91, "blend_auroc": 0.90, "interim_auroc": 0.85,
               "stale_auroc": 0.83}]
    rows = [{**_row(f"first:{c}", "default+fast", 0, 0.9), "cycles": cycles}
            for c in ("Bent", "FRI")]
    log = tmp_path / "runs.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [*rows, _row("first:Bent", "x", 0, 0.5)]))
    text = "\n".join(fast_head_report([log], "full", ["auroc"]))
    assert "| first | 1 | head refit on the cycle's embeddings vs the FixMatch model | auroc | 2 " \
           "| 0.780 | 0.800 | -0.020 | [-0.020, -0.020] |" in text
    assert "| first | 2 | while a cycle trains" in text and "| 0.850 | 0.830 | +0.020 |" in text
    assert not any(line.startswith("| first | 1 | while") for line in text.splitlines())
    assert fast_head_report([log], "screen", ["auroc"]) == []


def test_calibration_report_sets_what_the_top_reads_beside_what_is_true(tmp_path):
    cycles = [{"auroc": 0.9, "precision_top_1pct": 0.5, "mean_score_top_1pct": 0.99,
               "zblend_precision_top_1pct": 0.6, "zblend_mean_score_top_1pct": 0.8}]
    older = [{"auroc": 0.9, "precision_top_1pct": 0.1}]  # logged before the readout existed
    rows = [{**_row("animal:Cat", "flip+tta", 0, 0.9), "cycles": cycles},
            {**_row("animal:Dog", "flip+tta", 0, 0.9),
             "cycles": [{**cycles[0], "precision_top_1pct": 0.7, "mean_score_top_1pct": 0.97}]},
            {**_row("animal:Cow", "flip+tta", 0, 0.9), "cycles": older}]
    log = tmp_path / "runs.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in rows))
    text = "\n".join(calibration_report([log], "full"))
    assert "| animal | flip+tta | 1 | 2 | 0.980 | 0.600 | 0.800 | 0.600 |" in text
    assert calibration_report([log], "screen") == []


def test_top1_ceiling_is_remaining_anomalies_over_slots():
    assert top1_ceiling({"n": 9000, "n_anomalies": 66}) == pytest.approx(66 / 90)
    assert top1_ceiling({"n": 1000, "n_anomalies": 50}) == 1.0


def test_protocols_and_suites_are_what_the_issue_asks():
    assert PROTOCOLS["full"]["cycles"] == 3 and PROTOCOLS["full"]["pool"] == 10_000
    assert PROTOCOLS["screen"]["cycles"] == 1
    sparse = {k: v for k, v in PROTOCOLS["sparse"].items() if PROTOCOLS["full"][k] != v}
    assert sparse == {"initial_normals": 20}  # a project's start; everything else as full
    assert len(SUITES["animal"]) == 10 and {d.rare_fraction for d in SUITES["animal"]} == {0.01}
    assert len(SUITES["first"]) == 4 and {d.center_crop for d in SUITES["first"]} == {0.5}


def test_detection_quality_table_row_means_by_hand():
    rows = [{"auroc": 0.5, "ap": None}, {"auroc": 0.7}]
    # mean 0.6, sample std sqrt(0.02) = 0.141; no row has an AP
    assert table_row(["x"], rows, ("auroc", "ap")) == "| x | 2 | 0.600 ± 0.141 | n/a |"
    assert table_row(["x"], rows[:1], ("auroc",)) == "| x | 1 | 0.500 |"


def test_cut_settings_are_today_product_defaults():
    for name, kind in (("flip+tta+stage-4+iter-200+u2+shift-4", "flip"),
                       ("dist-align+tta+stage-4+zoom-0.7", "dihedral")):
        config = job_config(Job(SUITES["first"][0], 0, SETTINGS[name], "full"))
        assert {k: getattr(config, k) for k in kind_defaults(kind)} == kind_defaults(kind)
