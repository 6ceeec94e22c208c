"""Other blends of the same suite runs, from the logits they saved (`suite run --save-scores`).

Each blend is a weighted mean of standardised logits (`simulate.mean_z`) over the
terms a run saved: `model` (the cycle's own logit), `head` (the fast head on its
embeddings), `probe` (the head on ImageNet embeddings, the backend's stage), `knn`
(nearest labelled neighbours on those embeddings, `fast_head.NeighbourTerm`; runs since
session 29), `mknn` (the same on the model's own embeddings; runs since session 32) and,
with a second ImageNet embedding, `fprobe`; with `--imagenet KEY=VALUE,...`, `probe2` and
`knn2`: the probe and neighbour terms refitted each cycle on the labels the run held, on the
ImageNet embeddings of the run's config changed so (e.g. `imagenet_zoom=0.7`), to measure
another first embedding on the same picks; `prev_<term>` is that term
of the previous cycle on the same images (an ensemble of the last two cycles; with it,
cycle 1 is not reported).
`--same-images` measures every cycle on the images still unlabelled after the run's last
one: the oracle takes the anomalies each cycle ranks highest, so each later cycle is
otherwise measured on a harder pool than the one before. The
first blend is the baseline; every other is paired with it over the same runs, per cycle
(wins / losses, mean difference, bootstrap 95 % interval: `benchmarks.paired`). The
published three-term blend is `model=1,head=1,probe=1`. With `--baseline-setting` every
blend is also paired with the first measured on that setting's runs of the same (dataset,
seed): the same blend of, say, training on the labels alone against FixMatch.

    python -m benchmarks.blend_weights --setting flip+tta@imagenet-last \\
        model=1,head=1 model=1,head=1,probe=1 model=1,head=1,probe=2
    python -m benchmarks.blend_weights --setting flip+tta+stage-4+iter-200+u2 \\
        model=1,head=1 model=2,head=2,prev_model=1,prev_head=1
    python -m benchmarks.blend_weights --setting dist-align+tta+stage-4 \\
        --imagenet imagenet_zoom=0.7 head=1,probe=1,knn=1 head=1,probe2=1,knn2=1
    python -m benchmarks.blend_weights --setting dist-align+tta+stage-4 \\
        --baseline-setting supervised+dist-align+tta+stage-4 head=1,probe=1,knn=1
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.detection_quality import dataset_paths
from benchmarks.paired import paired_comparison
from benchmarks.suite import (
    DEFAULT_LOG,
    PROTOCOLS,
    SUITE_BASE,
    dataset_spec,
    parse_overrides,
)
from benchmarks.suite_report import mean_std, setting_runs
from ml_backend.core import metrics
from ml_backend.core.config import TrainConfig
from ml_backend.core.csvio import truth_vector
from ml_backend.core.fast_head import fit_fast_head, fit_neighbour_term
from ml_backend.core.simulate import SimulationPlan, _imagenet_features, choose_pool, mean_z
from ml_backend.core.store import CutoutStore

CYCLE_TERMS = ("model", "head", "probe", "knn", "mknn", "fprobe", "probe2", "knn2")
REFIT_TERMS = ("probe2", "knn2")
PREVIOUS = "prev_"
TERMS = CYCLE_TERMS + tuple(PREVIOUS + t for t in CYCLE_TERMS)
METRICS = ("auroc", "ap", "precision_top_1pct")


def parse_blend(text: str) -> dict[str, float]:
    """"model=1,probe=2" -> {"model": 1.0, "probe": 2.0}; unknown terms are refused."""
    weights: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or name not in TERMS:
            raise argparse.ArgumentTypeError(
                f"blend {text!r}: expected TERM=WEIGHT,... with TERM one of {', '.join(TERMS)}")
        weights[name] = float(value)
    if not any(weights.values()):
        raise argparse.ArgumentTypeError(f"blend {text!r}: every weight is zero")
    return weights


def blend(saved: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """The weighted mean of the standardised logits named in `weights`."""
    missing = [t for t in weights if t not in saved]
    if missing:
        raise KeyError(f"these runs saved no {', '.join(missing)} logits")
    return mean_z(*(saved[t] for t in weights), weights=list(weights.values()))


def saved_runs(log_paths: Sequence[Path], setting: str, protocol: str = "full") -> list[dict]:
    """The latest row of each run of `setting` under `protocol`, where it saved its logits."""
    return [row for row in setting_runs(log_paths, setting, protocol).values()
            if row.get("scores_dir")]


class ImagenetRefit:
    """`probe2` and `knn2` of a run's cycle: the probe and neighbour terms refitted on the
    labels the run held then, on ImageNet embeddings of its pool under its config changed
    by `overrides` (embedded once per dataset, pool and config)."""

    def __init__(self, overrides: dict[str, Any], data_root: Path) -> None:
        self.overrides, self.data_root = overrides, data_root
        self._embedded: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._runs: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # by run key

    def embedded(self, row: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pool store rows, truth of every store row, the pool's embeddings) of `row`'s run,
        read once per run (each of its cycles asks)."""
        if row["key"] in self._runs:
            return self._runs[row["key"]]
        spec = dataset_spec(row["dataset"])
        store_path, truth_path = dataset_paths(spec.name, self.data_root, spec.rare_fraction)
        protocol = {k: v for k, v in PROTOCOLS[row["protocol"]].items() if k != "iterations"}
        cfg = TrainConfig(center_crop=row["center_crop"], device="cpu",
                          **(SUITE_BASE | row["overrides"] | self.overrides))
        with CutoutStore.open(store_path) as store:
            truth = truth_vector(store, str(truth_path))
            pool, _ = choose_pool(truth, SimulationPlan(seed=row["seed"], **protocol))
            key = (spec.name, pool.tobytes(), cfg)
            if key not in self._embedded:
                features = _imagenet_features(store, pool, cfg).astype(np.float32)
                self._embedded[key] = (pool, truth, features)
        self._runs[row["key"]] = self._embedded[key]
        return self._runs[row["key"]]

    def add_terms(self, row: dict, saved: dict[str, np.ndarray]) -> None:
        """Add `probe2` and `knn2` over `saved["rows"]` (the cycle's unlabelled images)."""
        pool, truth, features = self.embedded(row)
        labelled = np.setdiff1d(pool, saved["rows"])
        known, rows = np.searchsorted(pool, labelled), np.searchsorted(pool, saved["rows"])
        if not np.array_equal(pool[rows], saved["rows"]):
            raise ValueError(f"{row['scores_dir']}: saved rows outside the run's pool")
        saved["probe2"] = fit_fast_head(features, known, truth[labelled]).logits(features[rows])
        saved["knn2"] = fit_neighbour_term(features, known, truth[labelled]).logits(
            features[rows])


def _positions(have: np.ndarray, want: np.ndarray) -> np.ndarray | None:
    """Where each of `want` sits in the sorted `have`; None if any is missing."""
    at = np.minimum(np.searchsorted(have, want), len(have) - 1)
    return at if np.array_equal(have[at], want) else None


def load_cycle(folder: Path, cycle: int, previous: bool,
               on_rows: np.ndarray | None = None,
               refit: tuple[ImagenetRefit, dict] | None = None) -> dict[str, np.ndarray] | None:
    """A run's saved logits of `cycle`; with `previous`, also the previous cycle's logits of
    the same images as `prev_<term>` (None for a first cycle); with `on_rows`, only those
    images (pool rows); with `refit` (and the run's log row), also its refitted terms."""
    with np.load(folder / f"cycle{cycle}.npz") as npz:
        saved = {k: npz[k] for k in npz.files}
    if refit is not None:
        refit[0].add_terms(refit[1], saved)
    if previous:
        before = folder / f"cycle{cycle - 1}.npz"
        if not before.exists():
            return None
        with np.load(before) as npz:
            at = _positions(npz["rows"], saved["rows"])
            if at is None:
                raise ValueError(f"{folder}: cycle {cycle} scored images cycle {cycle - 1} did not")
            saved |= {PREVIOUS + t: npz[t][at] for t in CYCLE_TERMS if t in npz.files}
    if on_rows is not None:
        at = _positions(saved["rows"], on_rows)
        if at is None:
            raise ValueError(f"{folder}: cycle {cycle} did not score every image asked for")
        saved = {k: v[at] for k, v in saved.items()}
    return saved


def measure(rows: list[dict], blends: list[dict[str, float]], same_images: bool = False,
            refit: ImagenetRefit | None = None) -> dict[int, list[list[dict]]]:
    """Per cycle, per blend, each run's metrics (runs in `rows`' order). With `same_images`,
    every cycle is measured on the images its run's last cycle scored (still unlabelled);
    `refit` adds the refitted terms (`ImagenetRefit`)."""
    previous = any(t.startswith(PREVIOUS) for b in blends for t in b)
    out: dict[int, list[list[dict]]] = {}
    for row in rows:
        folder = Path(row["scores_dir"])
        cycles = sorted(int(path.stem.removeprefix("cycle")) for path in folder.glob("cycle*.npz"))
        on_rows = None
        if same_images and cycles:
            with np.load(folder / f"cycle{cycles[-1]}.npz") as npz:
                on_rows = npz["rows"]
        for cycle in cycles:
            saved = load_cycle(folder, cycle, previous, on_rows,
                               None if refit is None else (refit, row))
            if saved is None:
                continue
            per_blend = out.setdefault(cycle, [[] for _ in blends])
            for i, weights in enumerate(blends):
                per_blend[i].append(metrics.evaluate(saved["truth"], blend(saved, weights)))
    return out


def report(rows: list[dict], blends: list[dict[str, float]],
           same_images: bool = False, base_rows: list[dict] | None = None,
           refit: ImagenetRefit | None = None) -> list[str]:
    """Markdown: per cycle and metric, each blend's mean ± std and its pairing with the first;
    with `base_rows` (another setting's runs of the same (dataset, seed), in `rows`' order)
    the first blend is measured on those."""
    names = [",".join(f"{t}={w:g}" for t, w in b.items()) for b in blends]
    lines = [f"{len(rows)} runs: " + ", ".join(f"{r['dataset']} s{r['seed']}" for r in rows), "",
             "| cycle | metric | blend | mean ± std | − first [95 %] | wins / losses |",
             "|---|---|---|---|---|---|"]
    measured = measure(rows, blends, same_images, refit)
    if base_rows is not None:
        baseline = measure(base_rows, blends[:1], same_images, refit)
        measured = {c: [baseline[c][0], *per_blend] for c, per_blend in measured.items()
                    if c in baseline}
        names = ["baseline setting: " + names[0], *names]
    return lines + paired_rows(measured, names, len(rows))


def paired_rows(measured: dict[int, list[list[dict]]], names: Sequence[str],
                n_runs: int) -> list[str]:
    """Markdown table rows: per cycle every one of the `n_runs` runs reached and per metric,
    each named ranking's mean ± std and its pairing with the first (`measure`'s shape)."""
    lines = []
    for cycle, per_blend in sorted(measured.items()):
        if any(len(runs) != n_runs for runs in per_blend):
            continue  # not every run reached this cycle
        for metric in METRICS:
            base = [m[metric] for m in per_blend[0]]
            for name, runs in zip(names, per_blend, strict=True):
                values = [m[metric] for m in runs]
                pair = "— | —"
                if runs is not per_blend[0]:
                    c = paired_comparison(base, values)
                    pair = (f"{c.mean_diff:+.3f} [{c.ci_low:+.3f}, {c.ci_high:+.3f}] | "
                            f"{c.wins} / {c.losses}")
                lines.append(f"| {cycle} | {metric} | {name} | {mean_std(values)} | {pair} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("blends", nargs="+", type=parse_blend, metavar="TERM=W,...",
                        help="the first is the baseline")
    parser.add_argument("--setting", required=True, help="the suite setting whose runs to read")
    parser.add_argument("--baseline-setting",
                        help="read the first blend from this setting's runs of the same "
                             "(dataset, seed) instead")
    parser.add_argument("--seeds", type=int, nargs="+", help="only these seeds (default all)")
    parser.add_argument("--protocol", default="full", help="the runs' protocol (default full)")
    parser.add_argument("--log", type=Path, action="append",
                        help=f"a suite log (repeatable; default {DEFAULT_LOG})")
    parser.add_argument("--same-images", action="store_true",
                        help="measure every cycle on the images still unlabelled after the "
                             "run's last one (the oracle takes each cycle's top anomalies, "
                             "so later cycles are otherwise measured on a harder pool)")
    parser.add_argument("--imagenet", metavar="KEY=VALUE,...",
                        help="refit the probe and neighbour terms (probe2, knn2) on ImageNet "
                             "embeddings of each run's config changed so, e.g. "
                             "imagenet_zoom=0.7")
    parser.add_argument("--data", type=Path, default=Path("runs/suite/data"),
                        help="where the suite built its datasets (for --imagenet)")
    args = parser.parse_args(argv)
    logs = args.log or [DEFAULT_LOG]
    wants_refit = any(t in REFIT_TERMS for b in args.blends for t in b)
    if wants_refit != (args.imagenet is not None):
        parser.error("probe2 and knn2 need --imagenet, and --imagenet needs a blend of them")
    refit = None
    if args.imagenet is not None:
        try:
            overrides = parse_overrides(args.imagenet.split(","))
            TrainConfig(**overrides)
        except (TypeError, ValueError) as err:
            parser.error(f"--imagenet {args.imagenet!r}: {err}")
        refit = ImagenetRefit(overrides, args.data)
    rows = [r for r in saved_runs(logs, args.setting, args.protocol)
            if args.seeds is None or r["seed"] in args.seeds]
    base_rows = None
    if args.baseline_setting:
        base = {(r["dataset"], r["seed"]): r
                for r in saved_runs(logs, args.baseline_setting, args.protocol)}
        rows = [r for r in rows if (r["dataset"], r["seed"]) in base]
        base_rows = [base[r["dataset"], r["seed"]] for r in rows]
    if not rows:
        raise SystemExit(f"no {args.protocol} run of {args.setting!r} in "
                         f"{', '.join(map(str, logs))} saved its logits "
                         "(suite run --save-scores DIR)"
                         + (f" with one of {args.baseline_setting!r} beside it"
                            if args.baseline_setting else ""))
    print("\n".join(report(rows, args.blends, args.same_images, base_rows, refit)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
