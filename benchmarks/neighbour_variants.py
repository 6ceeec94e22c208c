"""Other nearest-neighbour terms in the same suite runs' blends, without training again.

A run saved with `suite run --save-scores` keeps each cycle's logits and which images were
still unlabelled (the rest of the pool was labelled then). The ImageNet embeddings the
neighbour term reads are fixed per dataset (`simulate._imagenet_features`), so the term can
be refitted afterwards with another `k` (how many labelled neighbours of each kind are
averaged) on exactly the labels each cycle had. Each blend is the published sky rule's mean
of standardised logits (`simulate.mean_z`) over `--terms` and the refitted term; the first
`k` is the baseline the others pair with. The refit at the runs' own k must reproduce their
saved `knn` logits, which is checked.

    python -m benchmarks.neighbour_variants --setting dist-align+tta+stage-4 \\
        --log benchmarks/results/knn_rerun.jsonl --k 3 1 5 10 --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.blend_weights import paired_rows, saved_runs
from benchmarks.suite import SUITE_BASE
from ml_backend.core import metrics
from ml_backend.core.config import TrainConfig
from ml_backend.core.csvio import truth_vector
from ml_backend.core.fast_head import fit_neighbour_term
from ml_backend.core.simulate import SimulationPlan, _imagenet_features, choose_pool, mean_z
from ml_backend.core.store import CutoutStore

SAVED_K = 3  # the k every logged run's `knn` logits were fitted with


class Embeddings:
    """The pools, truths and ImageNet embeddings of logged runs, each embedded once."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self._seen: dict[tuple, np.ndarray] = {}

    def of(self, row: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pool, truth, the pool's ImageNet embeddings) of a logged run, as `simulate` made
        them (the same pool and framing share one embedding)."""
        kind, _, rare = row["dataset"].partition(":")
        root = self.data / f"{kind}-{rare}-{row['rare_fraction']:g}"
        cfg = TrainConfig(center_crop=row["center_crop"], device="cpu",
                          **(SUITE_BASE | row["overrides"]))
        with CutoutStore.open(root / "store.h5") as store:
            truth = truth_vector(store, str(root / "truth.csv"))
            pool, _ = choose_pool(truth, SimulationPlan(seed=row["seed"]))
            key = (str(root), repr(cfg), pool.tobytes())
            if key not in self._seen:
                self._seen[key] = _imagenet_features(store, pool, cfg).astype(np.float32)
        return pool, truth, self._seen[key]


def measure(rows: list[dict], data: Path, ks: Sequence[int],
            terms: Sequence[str]) -> dict[int, list[list[dict]]]:
    """Per cycle, per k, each run's metrics of the blend of `terms` and the term with that k."""
    out: dict[int, list[list[dict]]] = {}
    embedded = Embeddings(data)
    for row in rows:
        pool, truth, feats = embedded.of(row)
        folder = Path(row["scores_dir"])
        for path in sorted(folder.glob("cycle*.npz")):
            with np.load(path) as npz:
                saved = {k: npz[k] for k in npz.files}
            unlabelled = saved["rows"]
            labelled = np.setdiff1d(pool, unlabelled, assume_unique=True)
            known, at = np.searchsorted(pool, labelled), np.searchsorted(pool, unlabelled)
            per_k = out.setdefault(int(path.stem.removeprefix("cycle")), [[] for _ in ks])
            for i, k in enumerate(ks):
                knn = fit_neighbour_term(feats, known, truth[labelled], k=k).logits(feats[at])
                if k == SAVED_K and not np.allclose(knn, saved["knn"], atol=1e-4):
                    raise ValueError(f"{folder}: the refit neighbour term is not the saved one")
                per_k[i].append(metrics.evaluate(
                    saved["truth"], mean_z(*(saved[t] for t in terms), knn)))
    return out


def report(rows: list[dict], data: Path, ks: Sequence[int], terms: Sequence[str]) -> list[str]:
    """Markdown: per cycle and metric, each k's mean ± std and its pairing with the first."""
    lines = [f"{len(rows)} runs; blend: {', '.join(terms)} and the neighbour term", "",
             "| cycle | metric | k | mean ± std | − first [95 %] | wins / losses |",
             "|---|---|---|---|---|---|"]
    return lines + paired_rows(measure(rows, data, ks, terms), [str(k) for k in ks], len(rows))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", required=True, help="the suite setting whose runs to read")
    parser.add_argument("--log", type=Path, required=True, help="the suite log holding them")
    parser.add_argument("--data", type=Path, default=Path("runs/suite/data"),
                        help="the suite's datasets (default runs/suite/data)")
    parser.add_argument("--k", type=int, nargs="+", default=[SAVED_K, 1, 5, 10],
                        help="neighbours averaged per kind; the first is the baseline")
    parser.add_argument("--terms", nargs="+", default=["head", "probe"],
                        help="the saved logits blended beside the term (default head probe: "
                             "the sky blend since session 31)")
    parser.add_argument("--seeds", type=int, nargs="+", help="only these seeds (default all)")
    args = parser.parse_args(argv)
    if min(args.k) < 1:
        parser.error("every k must be >= 1")
    rows = [r for r in saved_runs([args.log], args.setting)
            if args.seeds is None or r["seed"] in args.seeds]
    if not rows:
        raise SystemExit(f"no run of {args.setting!r} in {args.log} saved its logits")
    print("\n".join(report(rows, args.data, args.k, args.terms)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
