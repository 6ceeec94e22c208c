"""A nearest-neighbour score against the linear head on frozen ImageNet features.

Each ranking picks its own labels over the paper's three cycles, as `amls simulate
--method linear-probe` does: the linear head (`fast_head.fit_fast_head`), the
nearest-neighbour score (`fast_head.NeighbourTerm`) and the mean rank of the two. Features are
the backend's first-ranking embeddings (`simulate._imagenet_features`, the kind's views).
Prints one JSON line per (run, ranking); `--pair` summarises such lines, paired with the
linear head (benchmarks/RESULTS.md, "Session 29", part 4).

    python -m benchmarks.knn_probe --dataset first:Bent --seeds 5 >> runs/knn_probe.jsonl
    python -m benchmarks.knn_probe --pair runs/knn_probe.jsonl
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np
import torch

from benchmarks.paired import paired_comparison
from benchmarks.suite import SUITES
from ml_backend.core import metrics
from ml_backend.core.config import TrainConfig, kind_defaults
from ml_backend.core.csvio import truth_vector
from ml_backend.core.fast_head import fit_fast_head, fit_neighbour_term
from ml_backend.core.simulate import (
    SimulationPlan,
    _imagenet_features,
    _mean_rank,
    choose_pool,
    oracle_picks,
)
from ml_backend.core.store import CutoutStore

RANKINGS = ("linear", "knn", "mix")
KEYS = ("auroc", "ap", "precision_top_1pct")


def run(data: Path, dataset: str, seeds: int) -> None:
    spec = {s.name: s for suite in SUITES.values() for s in suite}[dataset]
    kind, rare = dataset.split(":")
    root = data / f"{kind}-{rare}-{spec.rare_fraction:g}"
    cfg = TrainConfig(**kind_defaults("dihedral" if kind == "first" else "flip"),
                      center_crop=spec.center_crop, device="cpu")
    with CutoutStore.open(root / "store.h5") as store:
        truth = truth_vector(store, str(root / "truth.csv"))
        for seed in range(seeds):
            pool, first = choose_pool(truth, SimulationPlan(seed=seed))
            feats = _imagenet_features(store, pool, cfg.replace(seed=seed)).astype(np.float32)
            for ranking in RANKINGS:
                labelled, cycles = first, []
                for _ in range(3):
                    unlabelled = np.setdiff1d(pool, labelled, assume_unique=True)
                    rows, known = np.searchsorted(pool, unlabelled), np.searchsorted(pool, labelled)
                    linear = fit_fast_head(feats, known, truth[labelled]).scores(feats[rows])
                    knn = fit_neighbour_term(feats, known, truth[labelled]).logits(feats[rows])
                    scores = {"linear": linear, "knn": knn,
                              "mix": _mean_rank(linear, knn)}[ranking]
                    result = metrics.evaluate(truth[unlabelled], scores)
                    cycles.append({k: round(result[k], 4) for k in KEYS})
                    labelled = np.union1d(labelled, oracle_picks(unlabelled, scores, truth, 10))
                print(json.dumps({"dataset": dataset, "seed": seed, "method": ranking,
                                  "cycles": cycles}), flush=True)


def pair(path: Path) -> None:
    by_run: dict[tuple, dict] = collections.defaultdict(dict)
    for line in path.read_text().splitlines():
        row = json.loads(line)
        by_run[(row["dataset"], row["seed"])][row["method"]] = row["cycles"]
    runs = [k for k, v in by_run.items() if len(v) == len(RANKINGS)]
    print(f"{len(runs)} runs")
    for ranking in RANKINGS[1:]:
        for cycle in range(3):
            for key in KEYS:
                base = [by_run[r]["linear"][cycle][key] for r in runs]
                cand = [by_run[r][ranking][cycle][key] for r in runs]
                p = paired_comparison(base, cand)
                print(f"{ranking} − linear, cycle {cycle + 1}, {key}: {np.mean(base):.3f} → "
                      f"{np.mean(cand):.3f}, {p.mean_diff:+.3f} [{p.ci_low:+.3f}, "
                      f"{p.ci_high:+.3f}], {p.wins} / {p.losses}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", help="e.g. first:Bent or animal:Dog")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--data", type=Path, default=Path("runs/suite/data"),
                        help="where the suite built its datasets")
    parser.add_argument("--pair", type=Path, help="summarise a file of this tool's lines")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.pair:
        pair(args.pair)
    elif args.dataset:
        run(args.data, args.dataset, args.seeds)
    else:
        parser.error("give --dataset or --pair")


if __name__ == "__main__":
    main()
