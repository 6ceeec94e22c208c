"""Model input: detection quality vs cost at 64 / 96 / 128 / 224 px and centre crops.

For each size and centre crop (--center-crops, fractions of the cutout side) it measures, on
one dataset and seed:
- a linear probe: logistic regression on frozen ImageNet features of the initial labels
  (5 anomalies + 495 normals), metrics on the rest of the pool; cheap, so every size gets
  it. It has no oracle cycles, so compare it across sizes, not with the simulate rows;
- the paper's protocol (`amls simulate`) for each method in --methods, unless the size is
  above --max-train-size (training cost grows with the square of the side).

    python -m benchmarks.image_size --dataset first:Bent --sizes 64 96 128 224 --max-train-size 128
    python -m benchmarks.image_size --dataset first:Bent --sizes 64 --center-crops 1 0.5 0.33
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from pathlib import Path

import numpy as np

from amls_cli.options import center_crop_arg
from benchmarks.datasets import FIRST_CLASSES
from benchmarks.detection_quality import dataset_paths, run_one, table_header, table_row
from ml_backend.core import metrics
from ml_backend.core.baselines import extract_features, pretrained_feature_fn
from ml_backend.core.config import TrainConfig
from ml_backend.core.csvio import truth_vector
from ml_backend.core.simulate import SimulationPlan, choose_pool
from ml_backend.core.store import CutoutStore

PROBE_C = 0.01  # strong regularisation: 5 positives against 1,280 features
COLUMNS = ("auroc", "ap", "precision_top_1pct", "seconds_per_cycle", "score_images_per_second")


def linear_probe(store_path: Path, truth_path: Path, cfg: TrainConfig,
                 initial_normals: int) -> dict[str, float | str]:
    """AUROC of logistic regression on frozen features, like a simulate row (one 'cycle')."""
    from sklearn.linear_model import LogisticRegression

    with CutoutStore.open(store_path) as store:
        truth = truth_vector(store, str(truth_path))
        pool, labelled = choose_pool(truth, SimulationPlan(seed=cfg.seed,
                                                           initial_normals=initial_normals))
        started = time.perf_counter()
        features = extract_features(store, pool, pretrained_feature_fn(cfg, store.channels), 128)
        seconds = time.perf_counter() - started
    is_labelled = np.isin(pool, labelled)
    probe = LogisticRegression(C=PROBE_C, class_weight="balanced", max_iter=5000)
    probe.fit(features[is_labelled], truth[pool[is_labelled]])
    scores = probe.decision_function(features[~is_labelled])
    return {"method": "linear-probe", "auroc": metrics.auroc(truth[pool[~is_labelled]], scores),
            "ap": metrics.average_precision(truth[pool[~is_labelled]], scores),
            "precision_top_1pct": metrics.precision_at_fraction(truth[pool[~is_labelled]],
                                                                scores, 0.01),
            "score_images_per_second": len(pool) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/image_size"))
    parser.add_argument("--dataset", default="first:Bent",
                        help=f"first:<{'|'.join(FIRST_CLASSES)}> or animal:<class>")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128, 224])
    parser.add_argument("--methods", nargs="*", default=["fixmatch", "supervised"])
    parser.add_argument("--center-crops", type=center_crop_arg, nargs="+", default=[1.0])
    parser.add_argument("--max-train-size", type=int, default=128,
                        help="run --methods only at sizes up to this (the probe runs at all)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rare-fraction", type=float, default=0.05)
    parser.add_argument("--initial-normals", type=int, default=495)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    fraction = 0.01 if args.dataset.startswith("animal") else args.rare_fraction
    store, truth = dataset_paths(args.dataset, args.out / "data", fraction)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "runs.jsonl"
    table = table_header(["size", "crop", "method"], COLUMNS)
    for size, crop in itertools.product(args.sizes, args.center_crops):
        methods = ["linear-probe"] + (args.methods if size <= args.max_train_size else [])
        for method in methods:
            rows = []
            for seed in range(args.seeds):
                cfg = TrainConfig(image_size=size, center_crop=crop, seed=seed)
                if method == "linear-probe":
                    row = linear_probe(store, truth, cfg, args.initial_normals)
                else:
                    plan = SimulationPlan(method=method, seed=seed,
                                          initial_normals=args.initial_normals)
                    row = run_one(store, truth, plan, cfg)[-1]
                row |= {"dataset": args.dataset, "size": size, "center_crop": crop,
                        "seed": seed}
                with log_path.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                rows.append(row)
            table.append(table_row([size, f"{crop:g}", method], rows, COLUMNS))
            print(table[-1], flush=True)
    print("\n".join(table))


if __name__ == "__main__":
    main()
