"""What the instant re-ranking costs, by project size, without Label Studio.

For each `--tasks` size: an embedding cache of that many tasks (random float16 features, the
shape EfficientNet-Lite0 caches) written and memory-mapped as a job reads it; the seconds to
fit the fast head on `--labelled` of them, to score all, and to answer "more like this"
(top 100); the cache's bytes per task. Then the scoring pass over `--images` cutouts with and
without the features (the cost of writing the cache), best of `--repeats`.

    python -m benchmarks.rerank_scale --tasks 1000 100000

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.core.embedding_cache import FEATURES_FILE, read_embeddings, write_embeddings
from ml_backend.core.fast_head import (
    FastHead,
    blend_with_model,
    fit_fast_head,
    fit_neighbour_term,
    similar,
)

DIM = 1280
# Width of the ImageNet embeddings the blend's third and fourth terms read (stage 4, 112 channels).
IMAGENET_DIM = 112


def cache_costs(n_tasks: int, n_labelled: int, root: Path) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(n_tasks, DIM)).astype(np.float16)
    truth = np.zeros(n_tasks, dtype=np.int64)
    truth[rng.choice(n_tasks, max(1, n_tasks // 100), replace=False)] = 1
    features[truth == 1, :8] += 2.0
    folder = root / f"cache-{n_tasks}"
    folder.mkdir()
    write_embeddings(folder, np.arange(n_tasks) + 1, features)
    cache = read_embeddings(folder)
    labelled = np.r_[np.flatnonzero(truth)[:5], np.flatnonzero(truth == 0)[:n_labelled - 5]]
    started = time.perf_counter()
    head = fit_fast_head(cache.features, labelled, truth[labelled])
    fitted = time.perf_counter()
    head.scores(cache.features)
    scored = time.perf_counter()
    similar(cache.features, labelled[:1], 100)
    answered = time.perf_counter()
    return {"tasks": n_tasks, "labelled": len(labelled),
            "bytes_per_task": round((folder / FEATURES_FILE).stat().st_size / n_tasks, 1),
            "fit_s": round(fitted - started, 3), "score_all_s": round(scored - fitted, 3),
            "more_like_this_s": round(answered - scored, 3),
            **blend_costs(head, cache.features, labelled, truth, rng)}


def blend_costs(head: FastHead, features: np.ndarray, labelled: np.ndarray, truth: np.ndarray,
                rng: np.random.Generator) -> dict[str, float]:
    """Seconds to blend `head` with a (random) model's logit and score every task: two terms,
    three (a second head fitted on a second embedding of the same tasks, as the sky
    cutouts' blend has one on their ImageNet embeddings) and four (with the nearest-neighbour
    term on that second embedding)."""
    imagenet = rng.normal(size=(len(features), IMAGENET_DIM)).astype(np.float16)
    weight = rng.normal(size=DIM)
    started = time.perf_counter()
    blend_with_model(head, weight, 0.0, features).scores([features])
    two = time.perf_counter()
    other = fit_fast_head(imagenet, labelled, truth[labelled])
    blended = blend_with_model(head, weight, 0.0, features, imagenet=(other, imagenet))
    blended.scores([features, imagenet])
    three = time.perf_counter()
    term = fit_neighbour_term(imagenet, labelled, truth[labelled])
    blended = blend_with_model(head, weight, 0.0, features, imagenet=(other, imagenet),
                               neighbours=(term, labelled))
    blended.scores([features, imagenet])
    four = time.perf_counter()
    return {"blend_two_terms_s": round(two - started, 3),
            "blend_three_terms_s": round(three - two, 3),
            "blend_four_terms_s": round(four - three, 3)}


def scoring_overhead(n_images: int, repeats: int) -> dict[str, Any]:
    """Best-of seconds of `score_store` over n_images 64 px cutouts, without / with features."""
    from ml_backend.core.checkpoint import ModelMeta, new_version, utc_now_iso
    from ml_backend.core.config import TrainConfig
    from ml_backend.core.model import build_model
    from ml_backend.core.scoring import score_store
    from ml_backend.core.sources import ArraySource

    cfg = TrainConfig(pretrained=False)
    model = build_model(cfg, 1).eval()
    meta = ModelMeta(version=new_version(), parent=None, created=utc_now_iso(),
                     config=cfg.to_dict(), image_size=64, channels=1, stretch={"name": "none"})
    images = np.random.default_rng(0).integers(0, 255, (n_images, 64, 64, 1), dtype=np.uint8)
    source = ArraySource(images, {"name": "none"})
    times: dict[str, list[float]] = {"plain": [], "with_features": []}
    for _ in range(repeats):
        for kind in times:
            out = (np.empty((n_images, model.num_features), np.float16)
                   if kind == "with_features" else None)
            started = time.perf_counter()
            score_store(source, model, meta, device="cpu", features=out)
            times[kind].append(time.perf_counter() - started)
    plain, with_features = min(times["plain"]), min(times["with_features"])
    return {"images": n_images, "plain_s": round(plain, 3),
            "with_features_s": round(with_features, 3),
            "overhead_pct": round(100 * (with_features / plain - 1), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--labelled", type=int, default=500)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sizes = [cache_costs(n, min(args.labelled, n // 2), Path(tmp)) for n in args.tasks]
    print(json.dumps({"cache": sizes,
                      "scoring_pass": scoring_overhead(args.images, args.repeats)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
