"""Markdown report of suite logs: per-class table, suite means, paired comparisons.

    python -m benchmarks.suite report benchmarks/results/suite.jsonl --baseline default
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.paired import decide, paired_comparison
from ml_backend.core.metrics import top_count

Rows = dict[tuple[str, str], dict[int, dict[str, Any]]]  # (dataset, setting) -> seed -> row


def load_rows(paths: Sequence[Path], protocol: str, device: str = "cpu") -> Rows:
    """The latest row of every (dataset, setting, seed) run under `protocol` on `device`
    (rows from before devices were logged ran on the CPU).

    Under "cycle1", a full run whose (dataset, setting, seed) has no cycle1 row stands in
    with its first cycle: the same labels, pool and iterations train the same model.
    """
    rows: Rows = defaultdict(dict)
    first_cycles: Rows = defaultdict(dict)
    for path in paths:
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("device", "cpu") != device:
                continue
            key = (row["dataset"], row["setting"])
            if row.get("protocol") == protocol:
                rows[key][row["seed"]] = row
            elif protocol == "cycle1" and row.get("protocol") == "full" and row.get("cycles"):
                first_cycles[key][row["seed"]] = {**row, **row["cycles"][0],
                                                  "cycles": row["cycles"][:1]}
    for key, runs in first_cycles.items():
        for seed, row in runs.items():
            rows[key].setdefault(seed, row)
    return rows


def setting_runs(paths: Sequence[Path], setting: str, protocol: str,
                 device: str = "cpu") -> dict[tuple[str, int], dict[str, Any]]:
    """(dataset, seed) -> the latest row of each run of `setting` (`load_rows`' rules)."""
    return {(dataset, seed): row
            for (dataset, name), runs in load_rows(paths, protocol, device).items()
            if name == setting for seed, row in runs.items()}


def top1_ceiling(row: dict[str, Any]) -> float:
    """Best possible top-1 % precision: remaining anomalies / top-1 % slots, at most 1."""
    return min(1.0, row["n_anomalies"] / top_count(row["n"], 0.01))


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _suite(dataset: str) -> str:
    return dataset.partition(":")[0]


def report(paths: Sequence[Path], baseline: str, protocol: str,
           metrics: Sequence[str], device: str = "cpu",
           only: Sequence[str] = ()) -> list[str]:
    """The report's markdown lines; with `only`, of the baseline and those settings."""
    rows = load_rows(paths, protocol, device)
    if only:
        rows = {k: v for k, v in rows.items() if k[1] == baseline or k[1] in only}
    datasets = sorted({d for d, _ in rows}, key=lambda d: (_suite(d), d))
    settings = sorted({s for _, s in rows}, key=lambda s: (s != baseline, s))
    lines: list[str] = []
    for metric in metrics:
        lines += [f"### {metric} ({protocol} protocol; mean ± std over seeds, n = seeds)", "",
                  "| dataset | " + " | ".join(settings) + " | top-1 % ceiling |",
                  "|---" * (len(settings) + 2) + "|"]
        for dataset in datasets:
            cells = []
            for setting in settings:
                values = [r[metric] for r in rows.get((dataset, setting), {}).values()
                          if metric in r]
                cells.append(f"{mean_std(values)} ({len(values)})")
            base_runs = rows.get((dataset, baseline), {})
            ceiling = mean_std([top1_ceiling(r) for r in base_runs.values()])
            lines.append(f"| {dataset} | " + " | ".join(cells) + f" | {ceiling} |")
        for suite in sorted({_suite(d) for d in datasets}):
            cells = []
            for setting in settings:
                values = [r[metric] for (d, s), runs in rows.items()
                          if s == setting and _suite(d) == suite for r in runs.values()
                          if metric in r]
                cells.append(f"**{mean_std(values)}** ({len(values)})")
            lines.append(f"| **{suite} mean** | " + " | ".join(cells) + " | |")
        lines += ["", *_paired_lines(rows, datasets, settings, baseline, metric), ""]
    return lines


def _paired_lines(rows: Rows, datasets: list[str], settings: list[str], baseline: str,
                  metric: str) -> list[str]:
    lines = [f"Paired against `{baseline}` on {metric} (candidate − baseline over the same "
             "(class, seed) runs; 95 % bootstrap interval):", "",
             "| suite | setting | pairs | wins / losses | mean diff | 95 % interval "
             "| classes ahead / behind | verdict |", "|---" * 8 + "|"]
    for suite in sorted({_suite(d) for d in datasets}):
        for setting in settings:
            if setting == baseline:
                continue
            base, cand, class_diffs, seeds_per_class = [], [], [], []
            for dataset in (d for d in datasets if _suite(d) == suite):
                a, b = rows.get((dataset, baseline), {}), rows.get((dataset, setting), {})
                seeds = sorted(s for s in set(a) & set(b) if metric in a[s] and metric in b[s])
                if not seeds:
                    continue
                base += [a[s][metric] for s in seeds]
                cand += [b[s][metric] for s in seeds]
                class_diffs.append(statistics.mean(b[s][metric] - a[s][metric] for s in seeds))
                seeds_per_class.append(len(seeds))
            if not base:
                continue
            pc = paired_comparison(base, cand)
            ahead = sum(d > 0 for d in class_diffs)
            behind = sum(d < 0 for d in class_diffs)
            lines.append(f"| {suite} | {setting} | {pc.n} | {pc.wins} / {pc.losses} | "
                         f"{pc.mean_diff:+.3f} | [{pc.ci_low:+.3f}, {pc.ci_high:+.3f}] | "
                         f"{ahead} / {behind} | "
                         f"{decide(pc, class_diffs, min(seeds_per_class))} |")
    return lines


# (candidate prefix, baseline prefix, what the pair means); "" = the FixMatch model's metric.
FAST_PAIRS = (
    ("head", "", "head refit on the cycle's embeddings vs the FixMatch model"),
    ("blend", "", "mean rank of both vs the FixMatch model"),
    ("interim", "stale", "while a cycle trains: head on the last embeddings + new labels "
                         "vs the last FixMatch scores"),
    ("zblend", "", "blend of model and head as one linear head vs the FixMatch model"),
    ("zblend", "blend", "that linear blend vs the mean rank of both"),
    ("interim_zblend", "interim", "while a cycle trains: the head blended with the last "
                                  "model vs the head alone"),
    ("ens", "", "mean rank of this and the previous cycle's model vs this cycle's model"),
    ("probe", "", "head on the ImageNet embeddings, the cycle's labels vs the FixMatch model"),
    ("pblend", "zblend", "mean rank of the model and that ImageNet head vs the blend annotators "
                         "see"),
    ("pzblend", "zblend", "the blend annotators see, rank-averaged with the ImageNet head, vs "
                          "that blend alone"),
    ("lblend", "zblend", "model, head on its embeddings and head on the ImageNet ones, "
                         "standardised logits averaged, vs the blend annotators see"),
    ("fblend", "lblend", "that three-term blend with the ImageNet term framed its own way vs "
                         "framed as the model is"),
    ("blend4", "lblend", "the four-term blend as published (nearest labelled neighbours on the "
                         "ImageNet embeddings added) vs the three-term one"),
    ("blend3", "blend4", "that blend without the model's own logit (sky cutouts' since "
                         "session 31) vs with it"),
    ("fprobe", "probe", "the ImageNet head framed its own way vs framed as the model is"),
    ("tta", "", "the same model scored the other way round (test-time augmentation) vs "
                "its own scores"),
)


def fast_head_report(paths: Sequence[Path], protocol: str,
                     metrics: Sequence[str], device: str = "cpu") -> list[str]:
    """Per cycle, the instant re-ranking against FixMatch (rows run with `fast_head`) and
    the other scoring rule (rows run with `compare_tta`) within the same runs; empty when
    there are none."""
    rows = [r for runs in load_rows(paths, protocol, device).values() for r in runs.values()
            if r.get("cycles") and ({"head_auroc", "tta_auroc"} & set(r["cycles"][0]))]
    if not rows:
        return []
    lines = [f"### Instant re-ranking ({protocol} protocol; paired within each run, "
             "candidate − baseline, 95 % bootstrap interval)", "",
             "| suite | cycle | comparison | metric | runs | candidate | baseline "
             "| mean diff | 95 % interval |", "|---" * 9 + "|"]
    for suite in sorted({_suite(r["dataset"]) for r in rows}):
        ours = [r for r in rows if _suite(r["dataset"]) == suite]
        for cycle in range(1, max(len(r["cycles"]) for r in ours) + 1):
            at = [r["cycles"][cycle - 1] for r in ours if len(r["cycles"]) >= cycle]
            for cand, base, meaning in FAST_PAIRS:
                for metric in metrics:
                    a_key, b_key = f"{cand}_{metric}", f"{base}_{metric}" if base else metric
                    pairs = [(c[b_key], c[a_key]) for c in at
                             if c.get(a_key) is not None and c.get(b_key) is not None]
                    if not pairs:
                        continue
                    pc = paired_comparison(*zip(*pairs, strict=True))
                    lines.append(
                        f"| {suite} | {cycle} | {meaning} | {metric} | {pc.n} | "
                        f"{statistics.mean(p[1] for p in pairs):.3f} | "
                        f"{statistics.mean(p[0] for p in pairs):.3f} | {pc.mean_diff:+.3f} | "
                        f"[{pc.ci_low:+.3f}, {pc.ci_high:+.3f}] |")
    return [*lines, ""]


def calibration_report(paths: Sequence[Path], protocol: str, device: str = "cpu") -> list[str]:
    """Per suite, setting and cycle: the mean score of the top 1 % (what an annotator reads
    there) beside the share of anomalies in it (what is true), for the model and for the
    blend annotators see; rows from runs that logged it (`mean_score_top_1pct`)."""
    runs = [(setting, r) for (_, setting), by_seed in load_rows(paths, protocol, device).items()
            for r in by_seed.values()
            if r.get("cycles") and "mean_score_top_1pct" in r["cycles"][0]]
    if not runs:
        return []
    lines = [f"### Calibration at the top ({protocol} protocol; mean over runs)", "",
             "| suite | setting | cycle | runs | model: mean score of its top 1 % | true share "
             "| blend: mean score of its top 1 % | true share |", "|---" * 8 + "|"]
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for setting, row in runs:
        for cycle, c in enumerate(row["cycles"], 1):
            groups[(_suite(row["dataset"]), setting, cycle)].append(c)
    for (suite, setting, cycle), cs in sorted(groups.items()):
        def mean(key: str, rows: list[dict[str, Any]] = cs) -> str:
            values = [c[key] for c in rows if c.get(key) is not None]
            return f"{statistics.mean(values):.3f}" if values else "–"
        lines.append(f"| {suite} | {setting} | {cycle} | {len(cs)} | "
                     f"{mean('mean_score_top_1pct')} | {mean('precision_top_1pct')} | "
                     f"{mean('zblend_mean_score_top_1pct')} | "
                     f"{mean('zblend_precision_top_1pct')} |")
    return [*lines, ""]


def print_report(paths: Sequence[Path], baseline: str, protocol: str,
                 metrics: Sequence[str], device: str = "cpu",
                 only: Sequence[str] = ()) -> None:
    lines = report(paths, baseline, protocol, metrics, device, only)
    print("\n".join(lines + fast_head_report(paths, protocol, metrics, device)
                    + calibration_report(paths, protocol, device)))
