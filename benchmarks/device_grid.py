"""The suite's decision grid on a lent GPU, in one fixed time slot: smoke, screen, promote.

    python -m benchmarks.device_grid --out DIR --minutes 7 --workers 14

A lent GPU machine is held for minutes, not hours, so the grid is planned to use whatever
the slot allows and to leave complete pairs whenever it stops:

1. smoke: one "smoke" run per suite on CUDA, so that a broken machine fails in seconds;
2. screen: seed 0 of every candidate of `CANDIDATES` and every baseline, full protocol;
3. promote: seeds 1 and 2 (seed-major) of the baselines and of every candidate whose seed-0
   mean difference against its suite's base is positive on AUROC or on AP.

Every run measures the instant re-ranking too (`--fast-head`) and is logged with
``device: cuda`` to DIR/suite-cuda.jsonl (its keys differ from CPU runs: the two devices give
different numbers and the report never pairs them). No run starts after `--minutes`;
runs under way finish. Merge the log into benchmarks/results/suite.jsonl afterwards.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from benchmarks.suite import SETTINGS, SUITES, Job, done_keys, plan_jobs, run_grid

log = logging.getLogger(__name__)

# Per suite: the base every candidate is compared with, the other baselines, the candidates.
BASES = {"animal": "flip", "first": "default"}
BASELINES = {"animal": ("flip", "default", "supervised"), "first": ("default", "supervised")}
CANDIDATES = {
    "animal": ("flip+dist-align", "flip+tta", "flip+thr-0.8", "flip+iter-50",
               "flip+afrac-0.25", "flip+ema-off", "flip+strong-light", "flip+size-96",
               "flip+bn-frozen"),
    "first": ("dist-align", "tta", "thr-0.8", "iter-50", "afrac-0.25", "ema-off",
              "strong-light", "size-96", "bn-frozen"),
}


def jobs_for(suite: str, settings: Sequence[str], seeds: Sequence[int], protocol: str,
             device: str) -> list[Job]:
    return plan_jobs(SUITES[suite], [SETTINGS[s] for s in settings], seeds, protocol,
                     device=device, fast_head=True)


def promoted(log_path: Path, suite: str, protocol: str) -> list[str]:
    """Candidates of `suite` whose seed-0 mean paired difference against the base is > 0 on
    AUROC or on AP (over the classes where both ran)."""
    rows: dict[tuple[str, str], dict] = {}
    for line in log_path.read_text().splitlines():
        row = json.loads(line)
        if row["protocol"] == protocol and row["seed"] == 0 and row["dataset"].startswith(suite):
            rows[(row["dataset"], row["setting"])] = row
    chosen = []
    for cand in CANDIDATES[suite]:
        diffs = {m: [rows[(d, cand)][m] - rows[(d, BASES[suite])][m]
                     for d in {d for d, _ in rows}
                     if (d, cand) in rows and (d, BASES[suite]) in rows
                     and rows[(d, cand)][m] is not None and rows[(d, BASES[suite])][m] is not None]
                 for m in ("auroc", "ap")}
        means = {m: statistics.mean(v) for m, v in diffs.items() if v}
        log.warning("%s %s seed 0 against %s: %s", suite, cand, BASES[suite], means)
        if any(v > 0 for v in means.values()):
            chosen.append(cand)
    return chosen


def interleaved(lists: Iterable[list[Job]]) -> list[Job]:
    """The lists merged so that each advances at the same pace (a cut-off grid keeps some of
    every list)."""
    return [job for _, job in sorted(
        ((i / len(jobs), job) for jobs in lists for i, job in enumerate(jobs)),
        key=lambda pair: pair[0])]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=7.0,
                        help="no run starts after this many minutes (default 7)")
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--data", type=Path, default=Path("/tmp/suite-data"))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--protocol", default="full", help="of the screen and promoted runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    deadline = time.time() + 60 * args.minutes
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / f"suite-{args.device}.jsonl"

    def run(jobs: list[Job], workers: int) -> int:
        left = deadline - time.time()
        if left <= 0:
            return 0
        n = 0
        for row in run_grid(jobs, log_path, args.data, workers, 1, stop_after=left):
            n += 1
            print(json.dumps({k: row[k] for k in ("dataset", "seed", "setting", "auroc", "ap",
                                                 "precision_top_1pct", "wall_seconds")}),
                  flush=True)
        return n

    smoke = [jobs_for(s, [BASES[s]], [0], "smoke", args.device)[0] for s in SUITES]
    run(smoke, len(smoke))
    if not {j.key() for j in smoke} <= done_keys(log_path):  # new or already logged
        print("smoke runs failed", file=sys.stderr)
        return 1
    screen = {s: jobs_for(s, BASELINES[s] + CANDIDATES[s], [0], args.protocol, args.device)
              for s in SUITES}
    run(interleaved(screen.values()), args.workers)
    promote = {s: list(BASELINES[s]) + promoted(log_path, s, args.protocol) for s in SUITES}
    print(json.dumps({"promoted": promote}), flush=True)
    later = [j for s in SUITES for j in jobs_for(s, promote[s], [1, 2], args.protocol,
                                                 args.device)]
    run(sorted(later, key=lambda j: j.seed), args.workers)  # seed-major across suites
    return 0


if __name__ == "__main__":
    sys.exit(main())
