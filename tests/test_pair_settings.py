import argparse
import json

import pytest

from benchmarks import pair_settings
from benchmarks.paired import paired_comparison


def _row(setting, dataset, seed, values, *, protocol="full", device="cpu"):
    """A logged run whose cycle i has model AUROC values[i][0] and lblend AUROC values[i][1]."""
    cycles = [{"auroc": m, "ap": m / 2, "precision_top_1pct": m / 4,
               "lblend_auroc": b, "lblend_ap": b / 2, "lblend_precision_top_1pct": b / 4}
              for m, b in values]
    return {"setting": setting, "dataset": dataset, "seed": seed, "protocol": protocol,
            "device": device, "cycles": cycles}


def test_sides_pair_over_shared_runs_each_read_from_its_own_ranking(tmp_path):
    log = tmp_path / "log.jsonl"
    rows = [
        _row("base", "a", 0, [(0.50, 0.0), (0.60, 0.0)]),  # replaced by the next row
        _row("base", "a", 0, [(0.70, 0.0), (0.80, 0.0)]),
        _row("base", "b", 0, [(0.60, 0.0), (0.65, 0.0)]),
        _row("base", "c", 0, [(0.90, 0.0), (0.90, 0.0)]),  # no candidate run: not paired
        _row("cand", "a", 0, [(0.0, 0.75), (0.0, 0.85)]),
        _row("cand", "b", 0, [(0.0, 0.55)], protocol="cycle1"),
        _row("cand", "b", 0, [(0.0, 0.99)], device="cuda"),  # another device: not read
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = pair_settings.latest_runs([log], "base", "full")
    cand = pair_settings.latest_runs([log], "cand", "cycle1")
    assert base[("a", 0)]["cycles"][0]["auroc"] == 0.70
    # Under cycle1, a's full run stands in with its first cycle (the same model up to there).
    assert set(cand) == {("a", 0), ("b", 0)} and len(cand[("a", 0)]["cycles"]) == 1
    lines = pair_settings.report(base, cand, "model", "lblend")
    assert lines[0] == "2 pairs: a s0, b s0"
    # Only cycle 1 is in both sides of every pair (b's candidate ran one cycle).
    table = [line for line in lines if line.startswith("| 1 |")]
    assert len(table) == 3 and not any(line.startswith("| 2 |") for line in lines)
    expected = paired_comparison([0.70, 0.60], [0.75, 0.55])
    assert table[0] == (f"| 1 | auroc | 0.650 ± 0.071 | 0.650 ± 0.141 | "
                        f"{expected.mean_diff:+.3f} [{expected.ci_low:+.3f}, "
                        f"{expected.ci_high:+.3f}] | 1 / 1 |")
    assert "- a s0: 0.700 -> 0.750, 0.350 -> 0.375, 0.175 -> 0.188" in lines


def test_sides_are_parsed_and_bad_rankings_refused():
    assert pair_settings.parse_side("flip+tta@imagenet-last") == ("flip+tta@imagenet-last",
                                                                  "model")
    assert pair_settings.parse_side("dist-align+tta:lblend") == ("dist-align+tta", "lblend")
    with pytest.raises(argparse.ArgumentTypeError, match="must be one of"):
        pair_settings.parse_side("flip+tta:best")


def test_no_shared_run_says_so(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps(_row("base", "a", 0, [(0.7, 0.0)])) + "\n")
    assert pair_settings.main(["base", "cand:lblend", "--log", str(log)]) == 0
    assert "no (dataset, seed) has runs of both settings" in capsys.readouterr().out
