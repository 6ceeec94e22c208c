"""`amls train`: one training cycle on a cutout store and an `id,label` CSV.

    amls train STORE.h5 --labels LABELS.csv [--init MODEL_DIR] [--iterations N]
               [--image-size S] [--seed N] [--device auto] -o MODEL_DIR

Labelled ids are read from the store; every other row of the store is the unlabelled pool.
With --init the cycle continues from a previous model directory and keeps its training
configuration (command-line options still override it, except the image size, crop and
invariance, which a continued model cannot change). Prints one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from amls_cli.options import add_training_options, center_crop_arg, training_overrides
from ml_backend.core.config import TrainConfig, kind_defaults
from ml_backend.core.csvio import LABEL_NAMES, read_labels_csv
from ml_backend.core.sources import StoreSubset
from ml_backend.core.store import CutoutStore

if TYPE_CHECKING:
    from ml_backend.core.checkpoint import ModelMeta

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `amls train` to the `amls` parser."""
    p = sub.add_parser("train", help="run one FixMatch training cycle on a cutout store",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store", type=Path, metavar="STORE.h5", help="cutout store (HDF5)")
    p.add_argument("--labels", type=Path, required=True, metavar="LABELS.csv",
                   help="CSV with columns id,label (label: anomaly or normal)")
    p.add_argument("--init", type=Path, metavar="MODEL_DIR",
                   help="continue from this model directory (same image size, crop and "
                   "channels)")
    p.add_argument("--iterations", type=int,
                   help="training steps (default: the kind of data's, 100 for dihedral data, "
                   "200 for flip data; with --init the parent's)")
    p.add_argument("--image-size", type=int, metavar="S", help="model input side (default 64)")
    p.add_argument("--center-crop", type=center_crop_arg, metavar="F",
                   help="fraction of each cutout side kept around the centre before resizing "
                   "(default 1: whole cutout)")
    p.add_argument("--seed", type=int, help="random seed (default 42)")
    add_training_options(p)
    p.add_argument("--device", help='"auto" (default), "cpu" or "cuda"')
    p.add_argument("-o", "--output", type=Path, required=True, metavar="MODEL_DIR",
                   help="model directory to write (replaced atomically if it exists)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    summary = train_from_files(args.store, args.labels, args.output, init_dir=args.init,
                               overrides=_overrides(args))
    print(json.dumps(summary))
    return 0


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    given = {"iterations": args.iterations, "image_size": args.image_size,
             "center_crop": args.center_crop, "seed": args.seed, "device": args.device}
    return {k: v for k, v in given.items() if v is not None} | training_overrides(args)


def train_from_files(store_path: Path, labels_path: Path, out_dir: Path, *,
                     init_dir: Path | None = None,
                     overrides: dict[str, object] | None = None) -> dict[str, object]:
    """Train one cycle from files and save it; returns the summary the CLI prints."""
    from ml_backend.core.checkpoint import read_meta
    from ml_backend.core.train import save_cycle, train_cycle

    labels_by_id = read_labels_csv(labels_path)
    if not labels_by_id:
        raise ValueError(f"{labels_path} has no labels")
    parent = read_meta(init_dir) if init_dir is not None else None
    with CutoutStore.open(store_path) as store:
        # A new model takes the invariance the store records unless --invariance is given,
        # and that kind of data's defaults (test-time augmentation) unless told otherwise.
        overrides = overrides or {}
        if parent is None:
            overrides = kind_defaults(overrides.get("invariance", store.invariance)) | overrides
        cfg = _config(parent, overrides, init_dir, store.channels, store.stretch)
        labeled_rows = _rows_of(store, list(labels_by_id), labels_path)
        labels = np.fromiter(labels_by_id.values(), dtype=np.int64, count=len(labels_by_id))
        pool = StoreSubset(store, np.setdiff1d(np.arange(len(store)), labeled_rows))
        result = train_cycle(cfg, store.read(labeled_rows), labels, pool, init_dir=init_dir)
        counts = {LABEL_NAMES[v]: int((labels == v).sum()) for v in (1, 0)}
        meta = save_cycle(result, out_dir, cfg=cfg, stretch=store.stretch, parent=parent,
                          label_counts={**counts, "unlabeled": len(pool)})
    return {"version": meta.version, "output": str(out_dir), "seconds": round(result.seconds, 2),
            "iterations_total": meta.iterations_total, "label_counts": meta.label_counts,
            "final_mask_rate": meta.metrics["final_mask_rate"]}


def _config(parent: ModelMeta | None, overrides: dict[str, object], init_dir: Path | None,
            channels: int, stretch: dict[str, object]) -> TrainConfig:
    """Defaults, or the parent's training config, with command-line overrides applied.

    Raises ValueError when the result could not continue the parent (`lineage_mismatch`).
    """
    from ml_backend.core.checkpoint import lineage_mismatch

    if parent is None:
        return TrainConfig().replace(**overrides)
    # The device is where this run happens, not part of the lineage's hyperparameters.
    cfg = TrainConfig.from_dict(parent.config).replace(**({"device": "auto"} | overrides))
    changes = lineage_mismatch(parent, cfg, channels, stretch)
    if changes:
        raise ValueError(f"cannot continue from {init_dir}: {'; '.join(changes)}; keep those "
                         "settings or start a new model without --init")
    return cfg


def _rows_of(store: CutoutStore, ids: list[str], labels_path: Path) -> np.ndarray:
    missing = [cid for cid in ids if cid not in store]
    if missing:
        raise ValueError(f"{len(missing)} id(s) in {labels_path} are not in store {store.path}, "
                         f"e.g. {missing[:5]}")
    return store.indices_of(ids)
