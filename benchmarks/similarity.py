"""Which similarity finds more of the rare class for "more like this": a screen on suite stores.

For each store (a suite dataset built by `benchmarks.suite`, e.g. runs/suite/data/first-Bent-0.05):
ImageNet embeddings (64 px; FIRST with centre crop 0.5) of every rare image and a random sample
of the others (`--images` in all); then, for each rare image, and for `--trials` random sets
of 5, the share of the rare class among the 20 nearest neighbours by cosine of the raw pooled
features and of the standardised ones (what `fast_head.similar` uses).

    python -m benchmarks.similarity runs/suite/data/first-Bent-0.05 runs/suite/data/animal-Dog-0.01

Prints one JSON object per store.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ml_backend.core.checkpoint import ModelMeta
from ml_backend.core.config import TrainConfig
from ml_backend.core.model import build_model
from ml_backend.core.scoring import score_store
from ml_backend.core.store import CutoutStore

K = 20


def embed(folder: Path, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(features, is_rare) of all rare images and random others, n_images in all."""
    rows = list(csv.DictReader((folder / "truth.csv").open()))
    key = next(k for k in rows[0] if k != "label")
    truth = {r[key]: r["label"] == "anomaly" for r in rows}
    sky = folder.name.startswith("first")
    cfg = TrainConfig(image_size=64, center_crop=0.5 if sky else 1.0, device="cpu",
                      invariance="dihedral" if sky else "flip")
    with CutoutStore.open(folder / "store.h5") as store:
        rare = np.array([truth[i] for i in store.ids()])
        others = np.flatnonzero(~rare)
        n_others = min(len(others), max(0, n_images - int(rare.sum())))
        pick = np.sort(np.r_[np.flatnonzero(rare), np.random.default_rng(0).choice(
            others, n_others, replace=False)])
        model = build_model(cfg, store.shape[-1])
        meta = ModelMeta(version="imagenet", parent=None, created="", config=cfg.to_dict(),
                         image_size=cfg.image_size, channels=store.shape[-1],
                         stretch=dict(store.stretch), center_crop=cfg.center_crop,
                         kind="imagenet")
        features = np.zeros((len(pick), model.num_features), np.float32)
        score_store(store, model, meta, indices=pick, device="cpu", features=features)
    return features, rare[pick]


def rare_share(features: np.ndarray, is_rare: np.ndarray, queries: list[np.ndarray]) -> np.ndarray:
    """Per query set: the rare share among the K rows nearest its mean unit direction."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True).clip(1e-12)
    shares = []
    for q in queries:
        direction = unit[q].mean(axis=0)
        sims = unit @ (direction / np.linalg.norm(direction))
        sims[q] = -np.inf
        shares.append(is_rare[np.argsort(-sims)[:K]].mean())
    return np.array(shares)


def screen(folder: Path, n_images: int, trials: int) -> dict[str, Any]:
    features, is_rare = embed(folder, n_images)
    standardised = (features - features.mean(axis=0)) / (features.std(axis=0) + 1e-6)
    rare = np.flatnonzero(is_rare)
    rng = np.random.default_rng(1)
    singles = [np.array([r]) for r in rare]
    fives = [rng.choice(rare, 5, replace=False) for _ in range(trials)]
    out: dict[str, Any] = {"store": folder.name, "images": len(is_rare),
                           "rare_share": round(float(is_rare.mean()), 3)}
    for name, f in (("raw", features), ("standardised", standardised)):
        one, five = rare_share(f, is_rare, singles), rare_share(f, is_rare, fives)
        out[name] = {"one_query": round(float(one.mean()), 3),
                     "five_queries": round(float(five.mean()), 3),
                     "five_queries_q05": round(float(np.quantile(five, 0.05)), 3)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stores", type=Path, nargs="+", help="suite dataset folders")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--trials", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for folder in args.stores:
        print(json.dumps(screen(folder, args.images, args.trials)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
