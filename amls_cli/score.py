"""`amls score`: anomaly scores for every image of a cutout store, as an `id,score` CSV."""

from __future__ import annotations

import argparse
import logging
import sys
import time

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `amls score` to the `amls` parser."""
    p = sub.add_parser(
        "score",
        help="score every image of a store with a trained model (CSV id,score)",
        description="Score every image of a cutout store with a model directory's EMA "
        "weights. Writes `id,score` rows sorted by descending score, where score is the "
        "anomaly probability in [0, 1]. The store's channels and stretch must match the "
        "model's.",
    )
    p.add_argument("store", metavar="STORE.h5", help="cutout store (HDF5)")
    p.add_argument("--model", required=True, metavar="MODEL_DIR",
                   help="model directory written by `amls train` (meta.json + safetensors)")
    p.add_argument("-o", "--output", required=True, metavar="SCORES.csv",
                   help="CSV to write (id,score; highest score first)")
    p.add_argument("--batch-size", type=_positive_int, default=256,
                   help="images per forward pass (default 256)")
    p.add_argument("--top", type=_positive_int, default=None, metavar="N",
                   help="write only the N highest-scoring rows to the CSV and also print "
                   "them on stdout (all images are still scored)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (default: cuda when available), cpu or cuda")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model first (pays off for large stores on GPU)")
    p.set_defaults(func=run)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    """Score the store and write the CSV."""
    import numpy as np

    from ml_backend.core.checkpoint import load_model_dir
    from ml_backend.core.csvio import write_scores_csv
    from ml_backend.core.scoring import score_store
    from ml_backend.core.store import CutoutStore

    model, meta = load_model_dir(args.model)
    with CutoutStore.open(args.store) as store:
        start = time.perf_counter()
        scores = score_store(store, model, meta, batch_size=args.batch_size,
                             device=args.device, compile=args.compile,
                             progress_desc=f"scoring {store.path.name}")
        seconds = time.perf_counter() - start
        ids = store.ids()[:len(scores)]
    write_scores_csv(args.output, ids, scores, top=args.top)
    logger.info("scored %d images with model %s in %.1f s (%.0f images/s); wrote %s",
                len(scores), meta.version, seconds, len(scores) / max(seconds, 1e-9),
                args.output)
    if args.top is not None:
        for i in np.argsort(-scores, kind="stable")[:args.top]:
            sys.stdout.write(f"{ids[i]}\t{scores[i]:.6f}\n")
    return 0
