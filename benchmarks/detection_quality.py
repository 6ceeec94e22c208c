"""Detection quality: FixMatch vs supervised vs isolation forest on real packaged data.

Runs the paper's protocol (`amls simulate`: 5 initial anomalies, 3 cycles, oracle adds the
10 top anomalies and 10 top false positives per cycle) over several seeds, with the kind of
data's defaults as `amls simulate` picks them from the store, and prints a markdown table of
mean ± std for AUROC, AP and top-k precision. The suite (`benchmarks.suite`) is what decides
defaults; this is the quick look.

    python -m benchmarks.detection_quality --out runs/quality            # everything
    python -m benchmarks.detection_quality --datasets first:Bent --seeds 1 --methods fixmatch
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from amls_cli.options import center_crop_arg
from benchmarks.datasets import FIRST_CLASSES, build_animal, build_first
from benchmarks.suite_report import mean_std
from ml_backend.core.config import TrainConfig, kind_defaults
from ml_backend.core.csvio import truth_vector
from ml_backend.core.simulate import METHODS, SimulationPlan, run_simulation
from ml_backend.core.store import CutoutStore

log = logging.getLogger(__name__)

METRICS = ("auroc", "ap", "precision_top_1pct", "precision_top_0_1pct", "seconds_per_cycle")


def dataset_paths(spec: str, root: Path, rare_fraction: float) -> tuple[Path, Path]:
    """Build (once) and return (store, truth) for 'first:<Class>' or 'animal:<class>'."""
    kind, _, rare = spec.partition(":")
    builders = {"first": build_first, "animal": build_animal}
    if kind not in builders:
        raise ValueError(f"unknown dataset {spec!r}: use first:<class> or animal:<class>")
    out = root / f"{kind}-{rare}-{rare_fraction:g}"
    store, truth = out / "store.h5", out / "truth.csv"
    if not store.exists():
        builders[kind](out, rare=rare, fraction=rare_fraction)
    return store, truth


def run_one(store_path: Path, truth_path: Path, plan: SimulationPlan,
            cfg: TrainConfig) -> list[dict]:
    """All cycles' metrics of one `amls simulate` run."""
    with CutoutStore.open(store_path) as store:
        truth = truth_vector(store, str(truth_path))
        return list(run_simulation(store, truth, plan, cfg))


def store_invariance(store_path: Path) -> str:
    """The invariance a store records (as `amls simulate` reads it to pick the kind's defaults)."""
    with CutoutStore.open(store_path) as store:
        return store.invariance


def summarise(rows: list[dict], keys: tuple[str, ...] = METRICS) -> dict[str, str]:
    """'mean ± std' over rows for each key ('n/a' where no row has it)."""
    values = {key: [r[key] for r in rows if r.get(key) is not None] for key in keys}
    return {key: mean_std(v) if v else "n/a" for key, v in values.items()}


def table_header(labels: Sequence[str], keys: tuple[str, ...] = METRICS) -> list[str]:
    """The two header lines of a markdown table: `labels`, 'seeds', then `keys`."""
    names = [*labels, "seeds", *keys]
    return ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]


def table_row(labels: Sequence[object], rows: list[dict],
              keys: tuple[str, ...] = METRICS) -> str:
    """One markdown row: `labels`, the number of rows (seeds), mean ± std of each key."""
    summary = summarise(rows, keys)
    return "| " + " | ".join([*map(str, labels), str(len(rows)),
                              *(summary[k] for k in keys)]) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--datasets", nargs="+",
                        default=[f"first:{c}" for c in FIRST_CLASSES] + ["animal:Zebra"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds run are first-seed .. first-seed + seeds - 1")
    parser.add_argument("--rare-fraction", type=float, default=0.05,
                        help="the rare class is subsampled to this fraction of the set")
    parser.add_argument("--initial-normals", type=int, default=495)
    parser.add_argument("--size", type=int, default=TrainConfig.image_size)
    parser.add_argument("--center-crop", type=center_crop_arg, default=TrainConfig.center_crop,
                        help="fraction of each cutout side kept around the centre (default 1)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="training steps per cycle (default: the kind of data's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    given = {"image_size": args.size, "center_crop": args.center_crop}
    if args.iterations is not None:
        given["iterations"] = args.iterations
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "runs.jsonl"
    table = table_header(["dataset", "method"])
    for spec in args.datasets:
        fraction = 0.01 if spec.startswith("animal") else args.rare_fraction
        store, truth = dataset_paths(spec, args.out / "data", fraction)
        cfg = TrainConfig(**kind_defaults(store_invariance(store)) | given)
        for method in args.methods:
            rows = []
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                started = time.perf_counter()
                plan = SimulationPlan(method=method, seed=seed,
                                      initial_normals=args.initial_normals)
                cycles = run_one(store, truth, plan, cfg)
                with log_path.open("a") as fh:
                    for row in cycles:
                        row.update(dataset=spec, seed=seed, center_crop=cfg.center_crop)
                        fh.write(json.dumps(row) + "\n")
                row = cycles[-1] | {"wall_seconds": round(time.perf_counter() - started, 1)}
                print(json.dumps(row), flush=True)
                rows.append(row)
            table.append(table_row([spec, method], rows))
            print(table[-1], flush=True)
    print("\n".join(table))


if __name__ == "__main__":
    main()
