"""`amls evaluate`: detection metrics of an `id,score` CSV against an `id,label` truth CSV."""

from __future__ import annotations

import argparse
import json
import logging
import sys

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `amls evaluate` to the `amls` parser."""
    p = sub.add_parser(
        "evaluate", help="AUROC, AP and top-k precision of scores against true labels",
        description="Compare SCORES.csv (id,score; higher = more anomalous) with TRUTH.csv "
        "(id,label with anomaly/normal). Prints one JSON object: auroc, ap, "
        "precision_top_0_1pct, precision_top_1pct, n, n_anomalies, n_scores_without_truth. "
        "Scored ids without a truth label are ignored; truth ids without a score are an error.")
    p.add_argument("scores", metavar="SCORES.csv", help="id,score CSV (e.g. from amls score)")
    p.add_argument("--truth", required=True, metavar="TRUTH.csv", help="id,label CSV")
    p.add_argument("--plot", metavar="OUT.png", help="also write ROC, PR and efficiency plots")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the metrics as JSON; bad or mismatched input is an error (exit status 2)."""
    import numpy as np

    from ml_backend.core import metrics
    from ml_backend.core.csvio import read_labels_csv, read_scores_csv

    ids, scores = read_scores_csv(args.scores)
    truth = read_labels_csv(args.truth)
    scored = set(ids)
    missing = [cid for cid in truth if cid not in scored]
    if missing:
        raise ValueError(f"{len(missing)} of {len(truth)} ids in {args.truth} have no score "
                         f"in {args.scores}, e.g. {missing[:5]}")
    keep = np.array([cid in truth for cid in ids], dtype=bool)
    labels = np.array([truth[cid] for cid, k in zip(ids, keep, strict=True) if k], dtype=int)
    result = metrics.evaluate(labels, scores[keep])
    if args.plot:
        metrics.plot_evaluation(labels, scores[keep], args.plot)
    ignored = int((~keep).sum())
    if ignored:
        log.warning("%d scored ids are not in %s and were ignored", ignored, args.truth)
    result["n_scores_without_truth"] = ignored
    sys.stdout.write(json.dumps(result) + "\n")
    return 0
