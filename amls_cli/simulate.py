"""`amls simulate`: the paper's active-learning protocol with a simulated oracle."""

from __future__ import annotations

import argparse
import json
import sys

from amls_cli.options import add_training_options, center_crop_arg, training_overrides
from ml_backend.core.config import TrainConfig, kind_defaults
from ml_backend.core.csvio import truth_vector

FINAL_KEYS = ("auroc", "ap", "precision_top_0_1pct", "precision_top_1pct",
              "seconds_per_cycle", "score_images_per_second")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="active-learning simulation with a simulated oracle (prints JSON lines)",
        description="Start from a few labelled anomalies, train a cycle, let an oracle label "
        "the top-scoring anomalies and false positives, repeat. One JSON line per cycle; the "
        "last line is the final summary, measured on the pool minus labelled items.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("store", help="cutout store (HDF5)")
    p.add_argument("--truth", required=True, help="CSV id,label (anomaly|normal)")
    p.add_argument("--method", default="fixmatch",
                   help="fixmatch, supervised (labels only), isolation-forest or linear-probe "
                   "(a linear head on frozen ImageNet features, embedded over the test-time "
                   "views as the backend's first ranking embeds them, refit each cycle)")
    p.add_argument("--initial-anomalies", type=int, default=5,
                   help="anomalies labelled before the first cycle")
    p.add_argument("--initial-normals", type=int, default=495,
                   help="normals labelled before the first cycle")
    p.add_argument("--cycles", type=int, default=3, help="active-learning cycles")
    p.add_argument("--per-cycle", type=int, default=10,
                   help="anomalies and false positives the oracle labels after each cycle")
    p.add_argument("--iterations", type=int,
                   help="training steps per cycle (default: the kind of data's, 100 for "
                   "dihedral data, 200 for flip data)")
    p.add_argument("--pool", type=int, default=10_000,
                   help="images drawn from the store (labelled and unlabelled)")
    p.add_argument("--seed", type=int, default=42,
                   help="seeds the pool, the initial labels and training")
    p.add_argument("--size", type=int, default=TrainConfig.image_size, help="model input size")
    p.add_argument("--center-crop", type=center_crop_arg, default=TrainConfig.center_crop,
                   metavar="F", help="keep this fraction of each side around the centre "
                   "before resizing (1: whole cutout)")
    p.add_argument("--picks-from", choices=("model", "zblend", "lblend", "blend4"), default="model",
                   help="what the oracle labels from: the model's scores, or a blend the "
                   "backend publishes (zblend: the model with a head on its embeddings, "
                   "photographs' default; lblend: also a head on ImageNet embeddings; blend4: "
                   "also their nearest labelled neighbours, as published for sky cutouts); a "
                   "blend also measures the backend's fast rankings each cycle")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_training_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so that `amls --help` stays fast (torch loads on first real use).
    from ml_backend.core.simulate import SimulationPlan, run_simulation
    from ml_backend.core.store import CutoutStore

    plan = SimulationPlan(
        method=args.method, initial_anomalies=args.initial_anomalies,
        initial_normals=args.initial_normals, cycles=args.cycles, per_cycle=args.per_cycle,
        pool=args.pool, seed=args.seed, picks_from=args.picks_from,
        fast_head=args.picks_from != "model",
    )
    with CutoutStore.open(args.store) as store:
        # The store says which invariance suits its data unless --invariance is given, and
        # that kind of data has its defaults (test-time augmentation) unless told otherwise.
        given = training_overrides(args)
        if args.iterations is not None:
            given["iterations"] = args.iterations
        overrides = kind_defaults(given.get("invariance", store.invariance)) | given
        cfg = TrainConfig(image_size=args.size,
                          center_crop=args.center_crop, seed=args.seed, device=args.device,
                          **overrides)
        truth = truth_vector(store, args.truth)
        last: dict = {}
        for result in run_simulation(store, truth, plan, cfg):
            print(json.dumps(result), flush=True)
            last = result
    blend = {f"{plan.picks_from}_{k}": last[f"{plan.picks_from}_{k}"]
             for k in ("auroc", "ap", "precision_top_1pct") if plan.picks_from != "model"}
    print(json.dumps({k: last[k] for k in FINAL_KEYS} | blend | {"method": plan.method}),
          flush=True)
    sys.stdout.flush()
    return 0
