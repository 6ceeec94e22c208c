"""What a class's rankings reach with every label: k-fold cross-validation over a suite pool.

For each fold, the kind's model is trained on the other folds with all their labels and no
unlabelled images (as `--method supervised` trains), and three rankings score the fold held
out: the model's own logit, a linear head refit on its embeddings (`fast_head`), and a linear
head on the frozen ImageNet embeddings (the first ranking's). Few-label figures can then be
read against what the same rankers reach with every label (benchmarks/RESULTS.md, "Session
36"). Prints one JSON line per fold; `--summarise` prints per-class means of such lines.

    python -m benchmarks.label_ceiling --dataset first:FRI >> runs/label_ceiling.jsonl
    python -m benchmarks.label_ceiling --summarise runs/label_ceiling.jsonl
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.detection_quality import dataset_paths
from benchmarks.suite import SETTINGS, Job, dataset_spec, job_config, parse_overrides
from ml_backend.core import metrics
from ml_backend.core.checkpoint import load_model_dir
from ml_backend.core.csvio import truth_vector
from ml_backend.core.fast_head import fit_fast_head
from ml_backend.core.scoring import score_store
from ml_backend.core.simulate import SimulationPlan, _imagenet_features, _train_one_cycle
from ml_backend.core.store import CutoutStore

# The suite setting each kind trains with (the product's defaults of session 36, two views
# for photographs).
KIND_SETTING = {"first": "dist-align+tta+stage-4", "animal": "flip+tta+stage-4+iter-200+u2"}
RANKINGS = ("model", "head", "probe")
METRICS = ("auroc", "ap", "precision_top_1pct")


def fold_rows(n: int, folds: int, seed: int = 0) -> list[np.ndarray]:
    """A random partition of range(n) into `folds` sorted parts of near-equal size."""
    if not 2 <= folds <= n:
        raise ValueError(f"folds must be in [2, {n}], got {folds}")
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, folds)]


def _metrics(labels: np.ndarray, scores: dict[str, np.ndarray]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, s in scores.items():
        out[f"{name}_auroc"] = round(metrics.auroc(labels, s), 4)
        out[f"{name}_ap"] = round(metrics.average_precision(labels, s), 4)
        out[f"{name}_precision_top_1pct"] = round(metrics.precision_at_fraction(labels, s, 0.01), 4)
    return out


def run(data: Path, dataset: str, iterations: int, folds: int,
        overrides: dict[str, Any] | None = None) -> None:
    spec = dataset_spec(dataset)
    store_path, truth_path = dataset_paths(dataset, data, spec.rare_fraction)
    kind = dataset.partition(":")[0]
    job = Job(dataset=spec, seed=0, setting=SETTINGS[KIND_SETTING[kind]], protocol="full")
    base = dataclasses.replace(job_config(job), iterations=iterations, **(overrides or {}))
    with CutoutStore.open(store_path) as store:
        truth = truth_vector(store, str(truth_path))
        rows = np.flatnonzero(truth >= 0)
        imagenet = _imagenet_features(store, rows, base).astype(np.float32)
        for k, held in enumerate(fold_rows(len(rows), folds)):
            train = np.setdiff1d(np.arange(len(rows)), held, assume_unique=True)
            cfg = dataclasses.replace(base, seed=k)
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                model_dir, _ = _train_one_cycle(store, truth, rows[train], rows[held],
                                                SimulationPlan(method="supervised", seed=k),
                                                cfg, Path(tmp) / "model", None)
                model, meta = load_model_dir(model_dir)
                embedded = np.empty((len(rows), model.num_features), dtype=np.float16)
                logits = score_store(store, model, meta, indices=rows, features=embedded,
                                     device=cfg.device, progress_desc=f"fold {k}")
            embedded32 = embedded.astype(np.float32)
            head = fit_fast_head(embedded32, train, truth[rows[train]])
            probe = fit_fast_head(imagenet, train, truth[rows[train]])
            scores = {"model": logits[held], "head": head.logits(embedded32[held]),
                      "probe": probe.logits(imagenet[held])}
            print(json.dumps({"dataset": dataset, "fold": k, "folds": folds,
                              "iterations": iterations, **_named(overrides), "n": len(held),
                              "anomalies": int(truth[rows[held]].sum()),
                              **_metrics(truth[rows[held]], scores),
                              "seconds": round(time.perf_counter() - started, 1)}), flush=True)


def _named(overrides: dict[str, Any] | None) -> dict[str, Any]:
    return {"overrides": overrides} if overrides else {}


def summarise(path: Path) -> None:
    """Per (dataset, iterations, overrides): mean AUROC, AP and top-1 % precision of each
    ranking over its folds ("-" for a metric some of its lines lack)."""
    groups: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
    for line in path.read_text().splitlines():
        row = json.loads(line)
        how = " ".join([str(row["iterations"])] + [f"{k}={v}" for k, v in
                                                    sorted(row.get("overrides", {}).items())])
        groups[(row["dataset"], how)].append(row)
    print("| dataset | iterations, overrides | folds | " + " | ".join(
        f"{r} AUROC / AP / top 1 %" for r in RANKINGS) + " |")
    print("|---|---|---|" + "---|" * len(RANKINGS))
    for (dataset, how), rows in sorted(groups.items()):
        cells = [" / ".join(_mean(rows, f"{name}_{metric}") for metric in METRICS)
                 for name in RANKINGS]
        print(f"| {dataset} | {how} | {len(rows)} | " + " | ".join(cells) + " |")


def _mean(rows: list[dict], key: str) -> str:
    return f"{np.mean([r[key] for r in rows]):.3f}" if all(key in r for r in rows) else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", help="a suite class, e.g. first:FRI or animal:Dog")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="TrainConfig fields to change, e.g. center_crop=0.35 image_size=96")
    parser.add_argument("--data", type=Path, default=Path("runs/suite/data"),
                        help="where the suite built its datasets")
    parser.add_argument("--summarise", type=Path, help="summarise a file of this tool's lines")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.summarise:
        summarise(args.summarise)
    elif args.dataset:
        try:
            overrides = parse_overrides(args.set)
        except ValueError as exc:
            parser.error(str(exc))
        run(args.data, args.dataset, args.iterations, args.folds, overrides)
    else:
        parser.error("give --dataset or --summarise")


if __name__ == "__main__":
    main()
