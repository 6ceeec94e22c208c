"""Pair two suite settings' runs, cycle by cycle, each side read from the ranking it publishes.

`suite report` pairs the last cycle's columns of one name; a change of default often needs
more: the candidate's published blend against the baseline's (`lblend` against `zblend`),
every cycle, or a screen's cycle 1 against the full runs' cycle 1 (`--base-protocol full
--protocol cycle1`: the oracle picks after cycle 1, so the two agree up to there). Runs pair
over the same (dataset, seed); the latest logged row of each is read.

    python -m benchmarks.pair_settings flip+tta@imagenet-last:zblend flip+tta+stage-4:lblend
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from benchmarks.paired import paired_comparison
from benchmarks.suite import DEFAULT_LOG
from benchmarks.suite_report import mean_std, setting_runs

# A ranking's column prefix in the log's per-cycle rows ("model": the unprefixed metrics).
RANKINGS = ("model", "head", "zblend", "blend", "lblend", "probe", "fprobe", "fblend", "knn",
            "kblend", "blend4", "blend3", "mknn", "mkblend", "shift", "shift_zblend")
METRICS = ("auroc", "ap", "precision_top_1pct")


def parse_side(text: str) -> tuple[str, str]:
    """"SETTING[:RANKING]" -> (setting, ranking); the ranking defaults to the model's."""
    setting, _, ranking = text.rpartition(":") if ":" in text else (text, "", "model")
    if ranking not in RANKINGS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: the ranking after ':' must be one of {', '.join(RANKINGS)}")
    return setting, ranking


def column(ranking: str, metric: str) -> str:
    """The log's name of `metric` for `ranking`."""
    return metric if ranking == "model" else f"{ranking}_{metric}"


def latest_runs(log_paths: Sequence[Path], setting: str, protocol: str,
                device: str = "cpu") -> dict[tuple[str, int], dict]:
    """(dataset, seed) -> the latest logged row of `setting` under `protocol` on `device`
    that holds its cycles (under "cycle1", full runs stand in with their first cycle)."""
    return {k: row for k, row in setting_runs(log_paths, setting, protocol, device).items()
            if row.get("cycles")}


def report(base: dict[tuple[str, int], dict], cand: dict[tuple[str, int], dict],
           base_ranking: str, cand_ranking: str) -> list[str]:
    """Markdown: per cycle both sides reached and per metric, mean ± std of each side and
    their pairing; then each run's values after the last such cycle."""
    keys = sorted(set(base) & set(cand))
    if not keys:
        return ["no (dataset, seed) has runs of both settings"]
    cycles = min(len(r["cycles"]) for k in keys for r in (base[k], cand[k]))
    lines = [f"{len(keys)} pairs: " + ", ".join(f"{d} s{s}" for d, s in keys), "",
             "| cycle | metric | baseline (mean ± std) | candidate | diff [95 %] | wins / losses |",
             "|---|---|---|---|---|---|"]
    for cycle in range(cycles):
        for metric in METRICS:
            b = [base[k]["cycles"][cycle][column(base_ranking, metric)] for k in keys]
            c = [cand[k]["cycles"][cycle][column(cand_ranking, metric)] for k in keys]
            pair = paired_comparison(b, c)
            lines.append(f"| {cycle + 1} | {metric} | {mean_std(b)} | {mean_std(c)} | "
                         f"{pair.mean_diff:+.3f} [{pair.ci_low:+.3f}, {pair.ci_high:+.3f}] | "
                         f"{pair.wins} / {pair.losses} |")
    lines += ["", f"Per run after cycle {cycles} (AUROC, AP, top-1 %: baseline -> candidate):"]
    for k in keys:
        b, c = base[k]["cycles"][cycles - 1], cand[k]["cycles"][cycles - 1]
        lines.append(f"- {k[0]} s{k[1]}: " + ", ".join(
            f"{b[column(base_ranking, m)]:.3f} -> {c[column(cand_ranking, m)]:.3f}"
            for m in METRICS))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", type=parse_side, help="SETTING[:RANKING]")
    parser.add_argument("candidate", type=parse_side, help="SETTING[:RANKING]")
    parser.add_argument("--protocol", default="full", help="the candidate's runs' protocol")
    parser.add_argument("--base-protocol", help="the baseline's (default: the candidate's)")
    parser.add_argument("--device", default="cpu", help="the runs' device (default cpu)")
    parser.add_argument("--log", type=Path, action="append",
                        help=f"a suite log (repeatable; default {DEFAULT_LOG})")
    args = parser.parse_args(argv)
    logs = args.log or [DEFAULT_LOG]
    (base_setting, base_ranking), (cand_setting, cand_ranking) = args.baseline, args.candidate
    base = latest_runs(logs, base_setting, args.base_protocol or args.protocol, args.device)
    cand = latest_runs(logs, cand_setting, args.protocol, args.device)
    print("\n".join(report(base, cand, base_ranking, cand_ranking)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
