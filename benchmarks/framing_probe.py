"""Which crop, size and stage let ImageNet features tell FIRST's classes apart: a linear
probe, in minutes (a screen for the suite, never a decision).

    python -m benchmarks.framing_probe 0.5x64 0.35x64 0.5x96 0.5x64:log,a=100 [--draws 10]
    python -m benchmarks.framing_probe 0.5x64@dihedral 0.5x64@dihedral/b4 --cycles 3
    python -m benchmarks.framing_probe 1.0x64@flip 1.0x64@flip/b4 --cycles 3 --data animal

Each framing is CROPxSIZE (`TrainConfig.center_crop` x `image_size`), optionally followed by
"@INVARIANCE" (features averaged over that invariance's views, as test-time augmentation
scores), "/bN" (pooled after stage N of the backbone, `model.truncate_after_block`, instead
of its last) and ":STRETCH[,key=value...]", a store stretch (`core.stretch`) applied to each
8-bit cutout first, as `amls import --stretch` would; several framings joined by "+"
concatenate their features. The frozen ImageNet backbone embeds all 2,158 FIRST cutouts
(--data animal: the 10,000 Animal-MNIST images) once per framing (cached under --cache).
Then, for each class as the rare one (FIRST at 5 %, Animal-MNIST at 1 %, as in the suite) and
each draw, the suite's start is drawn: 5 anomalies and 495 normals labelled; the instant
re-ranking's head (`core.fast_head`) is fitted on them and ranks the rest. With --cycles N
it goes on as the suite's oracle does (`simulate.oracle_picks`: the 10 highest-ranked
anomalies and normals labelled per cycle) with the head picking its own, and ranks again, N
rankings in all (the first is the backend's first ranking). The same draws serve every
framing, so the first framing is the baseline of a paired comparison over (class, draw)
pairs (`benchmarks.paired`), per cycle and metric.
"""

from __future__ import annotations

import argparse
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from benchmarks.datasets import (
    ANIMAL_CLASSES,
    FIRST_CLASSES,
    FIRST_ZIP,
    _first_members,
    _read_grey_png,
    load_animal_mnist,
    package_dir,
    rare_count,
)
from benchmarks.paired import paired_comparison
from ml_backend.core import metrics
from ml_backend.core.augment import symmetry_views
from ml_backend.core.baselines import extract_features, pretrained_feature_fn
from ml_backend.core.config import TrainConfig
from ml_backend.core.fast_head import DEFAULT_C, fit_fast_head
from ml_backend.core.simulate import oracle_picks
from ml_backend.core.sources import ArraySource
from ml_backend.core.stretch import make_stretch

LABELLED = (5, 495)  # anomalies, normals: the suite's start
PER_CYCLE = 10  # the suite's oracle: anomalies and normals labelled per cycle
METRICS = ("auroc", "ap", "precision_top_1pct")


def first_images() -> tuple[np.ndarray, np.ndarray]:
    """Every FIRST cutout, uint8 (n, 300, 300, 1), and its class index into FIRST_CLASSES."""
    path = package_dir("firstgalaxydata", "firstgalaxydata") / FIRST_ZIP
    with zipfile.ZipFile(path) as archive:
        members = _first_members(archive)
        images = np.stack([_read_grey_png(archive, name) for _, _, name in members])
    classes = np.array([FIRST_CLASSES.index(c) for _, c, _ in members])
    return images[..., None], classes


def animal_images() -> tuple[np.ndarray, np.ndarray]:
    """Every Animal-MNIST image, uint8 (n, 28, 28, 1), and its class index into ANIMAL_CLASSES."""
    images, classes = load_animal_mnist()
    return images[..., None], classes


# Class names, images and classes, the rare class's share: the suite's datasets.
DATA = {"first": (FIRST_CLASSES, first_images, 0.05),
        "animal": (ANIMAL_CLASSES, animal_images, 0.01)}


def framing_features(images: np.ndarray, framing: str, cache: Path) -> np.ndarray:
    """(n, D) ImageNet features of `framing` ("0.5x64", or several joined by "+")."""
    parts = []
    for part in framing.split("+"):
        frame, _, stretch = part.partition(":")
        frame, _, stage = frame.partition("/b")
        frame, _, invariance = frame.partition("@")
        crop, _, size = frame.partition("x")
        path = cache / f"{part.replace('/', '_')}.npy"
        if not path.exists():
            cfg = TrainConfig(center_crop=float(crop), image_size=int(size), device="cpu")
            started = time.perf_counter()
            source = restretch(images, stretch) if stretch else images
            fn = pretrained_feature_fn(cfg, images.shape[-1], block=int(stage) if stage else None)
            feats = np.mean([extract_features(ArraySource(view), None, fn, 128)
                             for view in symmetry_views_np(source, invariance)], axis=0)
            print(f"{part}: features in {time.perf_counter() - started:.0f} s", flush=True)
            cache.mkdir(parents=True, exist_ok=True)
            np.save(path, feats)
        parts.append(np.load(path))
    return np.concatenate(parts, axis=1)


def symmetry_views_np(images: np.ndarray, invariance: str) -> list[np.ndarray]:
    """(n, H, W, C) images and, given an invariance, every view of it (`augment.symmetry_views`)."""
    if not invariance:
        return [images]
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    return [np.ascontiguousarray(v.permute(0, 2, 3, 1).numpy())
            for v in symmetry_views(x, invariance)]


def restretch(images: np.ndarray, spec: str) -> np.ndarray:
    """Each cutout through the stretch "NAME[,key=value...]" (per image, as an import does)."""
    name, *pairs = spec.split(",")
    params = {k: float(v) for k, v in (pair.split("=") for pair in pairs)}
    stretch = make_stretch({"name": name, **params})
    return np.stack([stretch(image) for image in images])


def probe_metrics(features: np.ndarray, classes: np.ndarray, draws: int, cycles: int = 1,
                  c: float = DEFAULT_C, rare_share: float = 0.05) -> np.ndarray:
    """(number of classes, draws, cycles, len(METRICS)): each ranking's metrics over what the
    draw has left unlabelled, each class rare at `rare_share` in turn, the head (inverse
    regularisation `c`) refit on its own picks between rankings."""
    n_classes = int(classes.max()) + 1
    out = np.empty((n_classes, draws, cycles, len(METRICS)))
    for k in range(n_classes):
        for draw in range(draws):
            rng = np.random.default_rng(draw)
            normals, rares = np.flatnonzero(classes != k), np.flatnonzero(classes == k)
            rares = rng.choice(rares, rare_count(len(normals), rare_share), replace=False)
            pool = np.concatenate([normals, rares])
            truth = (classes[pool] == k).astype(np.int64)
            labelled = np.concatenate([
                rng.choice(np.flatnonzero(truth == 1), LABELLED[0], replace=False),
                rng.choice(np.flatnonzero(truth == 0), LABELLED[1], replace=False)])
            for cycle in range(cycles):
                rest = np.setdiff1d(np.arange(len(pool)), labelled)
                head = fit_fast_head(features[pool], labelled, truth[labelled], c=c)
                scores = head.logits(features[pool][rest])
                found = metrics.evaluate(truth[rest], scores)
                out[k, draw, cycle] = [found[m] for m in METRICS]
                labelled = np.concatenate([labelled,
                                           oracle_picks(rest, scores, truth, PER_CYCLE)])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("framings", nargs="+", help="CROPxSIZE[+CROPxSIZE], the first the "
                                                     "baseline")
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--cycles", type=int, default=1,
                        help="rankings per draw, the head picking its own labels between them")
    parser.add_argument("--c", type=float, default=DEFAULT_C,
                        help="the head's inverse L2 strength (fast_head.DEFAULT_C)")
    parser.add_argument("--data", choices=sorted(DATA), default="first")
    parser.add_argument("--cache", type=Path, default=None,
                        help="default runs/framing_probe (FIRST), runs/framing_probe_animal")
    args = parser.parse_args(argv)
    if args.cycles < 1 or args.draws < 1:
        parser.error("--cycles and --draws must be >= 1")
    torch.set_num_threads(1)
    names, load, share = DATA[args.data]
    cache = args.cache or Path("runs/framing_probe" + ("" if args.data == "first" else
                                                        f"_{args.data}"))
    images, classes = load()
    results = {framing: probe_metrics(framing_features(images, framing, cache), classes,
                                      args.draws, args.cycles, args.c, share)
               for framing in args.framings}
    base = results[args.framings[0]]
    for cycle in sorted({0, args.cycles - 1}):
        for j, metric in enumerate(METRICS):
            print(f"\nranking {cycle + 1}, {metric}\n| framing | mean | paired vs first, "
                  "95 % interval | " + " | ".join(names) + " |")
            for framing, found in results.items():
                pc = paired_comparison(base[:, :, cycle, j].ravel(), found[:, :, cycle, j].ravel())
                print(f"| {framing} | {found[:, :, cycle, j].mean():.3f} | {pc.mean_diff:+.3f} "
                      f"[{pc.ci_low:+.3f}, {pc.ci_high:+.3f}], {pc.wins} / {pc.losses} | "
                      + " | ".join(f"{m:.3f}" for m in found[:, :, cycle, j].mean(axis=1))
                      + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
