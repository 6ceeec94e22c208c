"""What test-time augmentation adds to a training cycle, measured side by side in one run.

Trains one FixMatch cycle on a suite dataset exactly as `amls simulate` starts (the suite's
first 5 anomalies + 495 normals, seed 0), then scores the whole project with the same model
once per view count, alternately, --repeats times (fastest kept, which resists a busy
machine). A cycle is training plus scoring every task, as a backend job does; the printed
ratio is the cycle with test-time augmentation over the cycle without (the issue's limit is
1.2x).

    python -m benchmarks.tta_cycle_cost --dataset first:Bent [--threads 1] [--repeats 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.detection_quality import dataset_paths
from benchmarks.suite import dataset_spec
from ml_backend.core.checkpoint import ModelMeta, load_model_dir
from ml_backend.core.config import TrainConfig
from ml_backend.core.csvio import truth_vector
from ml_backend.core.scoring import score_store
from ml_backend.core.simulate import SimulationPlan, choose_pool
from ml_backend.core.sources import StoreSubset
from ml_backend.core.store import CutoutStore
from ml_backend.core.train import save_cycle, train_cycle


def _score_seconds(store: CutoutStore, model: torch.nn.Module, meta: ModelMeta, tta: bool,
                   batch_size: int) -> float:
    meta = dataclasses.replace(meta, config={**meta.config, "test_time_augmentation": tta})
    start = time.perf_counter()
    score_store(store, model, meta, batch_size=batch_size, device="cpu",
                progress_desc=f"scoring (tta={tta})")
    return time.perf_counter() - start


def measure(dataset: str, root: Path, cfg: TrainConfig, repeats: int) -> dict[str, float]:
    spec = dataset_spec(dataset)
    store_path, truth_path = dataset_paths(dataset, root, spec.rare_fraction)
    cfg = cfg.replace(center_crop=spec.center_crop)
    with CutoutStore.open(store_path) as store, tempfile.TemporaryDirectory() as tmp:
        truth = truth_vector(store, str(truth_path))
        pool, labelled = choose_pool(truth, SimulationPlan(seed=cfg.seed))
        unlabelled = np.setdiff1d(pool, labelled)
        start = time.perf_counter()
        result = train_cycle(cfg, store.read(labelled), truth[labelled].astype(np.int64),
                             StoreSubset(store, unlabelled))
        train = time.perf_counter() - start
        labels = truth[labelled]
        save_cycle(result, Path(tmp), cfg=cfg, stretch=store.stretch, parent=None,
                   label_counts={"anomaly": int(labels.sum()), "normal": int((labels == 0).sum())})
        model, meta = load_model_dir(Path(tmp))
        best = {False: float("inf"), True: float("inf")}
        for _ in range(repeats):
            for tta in (False, True):
                best[tta] = min(best[tta], _score_seconds(store, model, meta, tta,
                                                          cfg.score_batch_size))
        n = len(store)
    plain, views = train + best[False], train + best[True]
    return {"dataset": dataset, "images_scored": n, "train_seconds": round(train, 1),
            "score_seconds_one_view": round(best[False], 1),
            "score_seconds_tta": round(best[True], 1), "cycle_seconds_one_view": round(plain, 1),
            "cycle_seconds_tta": round(views, 1), "ratio": round(views / plain, 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="first:Bent")
    parser.add_argument("--data", type=Path, default=Path("runs/suite/data"))
    parser.add_argument("--invariance", choices=("dihedral", "flip"), default=None,
                        help="default: dihedral for first:*, flip for animal:*")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    invariance = args.invariance or ("flip" if args.dataset.startswith("animal") else "dihedral")
    cfg = TrainConfig(device="cpu", iterations=args.iterations, invariance=invariance,
                      distribution_alignment=invariance == "dihedral", seed=0)
    out = measure(args.dataset, args.data, cfg, args.repeats)
    print(json.dumps({**out, "invariance": invariance, "threads": args.threads}))


if __name__ == "__main__":
    main()
