"""What a training cycle costs under two or more suite settings, measured side by side in one run.

Each setting trains one cycle on a suite dataset as `amls simulate` starts (the suite's first
5 anomalies + 495 normals, seed 0, with the setting's own iterations, unlabelled ratio and
backbone) and then scores every image of the store with that model (its own test-time views),
as a backend job does. The settings take turns, --repeats times, and each keeps its fastest
cycle, which resists a busy machine. Ratios are against the first setting (the issue's
limit: 1.2x).

    python -m benchmarks.settings_cycle_cost --dataset animal:Dog \
        --settings flip+tta+stage-4 flip+tta+stage-4+iter-200+u2 [--threads 1] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.detection_quality import dataset_paths
from benchmarks.suite import SETTINGS, Job, dataset_spec, job_config
from ml_backend.core.checkpoint import load_model_dir
from ml_backend.core.config import TrainConfig
from ml_backend.core.csvio import truth_vector
from ml_backend.core.scoring import score_store
from ml_backend.core.simulate import SimulationPlan, choose_pool
from ml_backend.core.sources import StoreSubset
from ml_backend.core.store import CutoutStore
from ml_backend.core.train import save_cycle, train_cycle


def cycle_seconds(store: CutoutStore, truth: np.ndarray, cfg: TrainConfig) -> dict[str, float]:
    """Train one cycle with `cfg` on the suite's first labels and score the whole store."""
    pool, labelled = choose_pool(truth, SimulationPlan(seed=cfg.seed))
    labels = truth[labelled].astype(np.int64)
    start = time.perf_counter()
    result = train_cycle(cfg, store.read(labelled), labels,
                         StoreSubset(store, np.setdiff1d(pool, labelled)))
    train = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        save_cycle(result, Path(tmp), cfg=cfg, stretch=store.stretch, parent=None,
                   label_counts={"anomaly": int(labels.sum()), "normal": int((labels == 0).sum())})
        model, meta = load_model_dir(Path(tmp))
        start = time.perf_counter()
        score_store(store, model, meta, batch_size=cfg.score_batch_size, device=cfg.device,
                    progress_desc="scoring")
        score = time.perf_counter() - start
    return {"train_seconds": train, "score_seconds": score, "cycle_seconds": train + score}


def measure(dataset: str, root: Path, settings: list[str], repeats: int) -> list[dict[str, object]]:
    """Each setting's fastest cycle over `repeats` turns, and its ratio to the first's."""
    spec = dataset_spec(dataset)
    configs = {name: job_config(Job(spec, 0, SETTINGS[name], "full")) for name in settings}
    store_path, truth_path = dataset_paths(dataset, root, spec.rare_fraction)
    best: dict[str, dict[str, float]] = {}
    with CutoutStore.open(store_path) as store:
        truth = truth_vector(store, str(truth_path))
        for _ in range(repeats):
            for name, cfg in configs.items():
                seconds = cycle_seconds(store, truth, cfg)
                if name not in best or seconds["cycle_seconds"] < best[name]["cycle_seconds"]:
                    best[name] = seconds
        n = len(store)
    first = best[settings[0]]["cycle_seconds"]
    return [{"dataset": dataset, "setting": name, "images_scored": n,
             "iterations": configs[name].iterations, "uratio": configs[name].uratio,
             **{k: round(v, 1) for k, v in best[name].items()},
             "ratio": round(best[name]["cycle_seconds"] / first, 3)} for name in settings]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="first:Bent")
    parser.add_argument("--settings", nargs="+", required=True, choices=sorted(SETTINGS),
                        metavar="SETTING", help="suite settings; ratios are against the first")
    parser.add_argument("--data", type=Path, default=Path("runs/suite/data"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for row in measure(args.dataset, args.data, args.settings, args.repeats):
        print(json.dumps({**row, "threads": args.threads}))


if __name__ == "__main__":
    main()
