"""What the dashboard costs for a large project, without Label Studio.

Builds `--versions` model versions of a `--tasks`-task project in a temporary registry, each
with the summary a job writes (`dashboard_data.summarise_version`: every task scored, `--labels`
of them labelled, `--held-out` ground-truth tasks, a 100-step cycle), then times the page
(`GET /dashboard/<project>` through the Flask app, best and median of `--repeats`).

    python -m benchmarks.dashboard_render --tasks 100000

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.app import create_app
from ml_backend.config import Config
from ml_backend.core.fixmatch import StepStats
from ml_backend.dashboard_data import SUMMARY, summarise_version, write_summary
from ml_backend.registry import ModelRegistry
from ml_backend.service import AnomalyService
from ml_backend.submitters import InProcessSubmitter

PROJECT = 1


def build(root: Path, n_tasks: int, n_versions: int, n_labels: int,
          n_held_out: int) -> dict[str, Any]:
    """A registry with `n_versions` versions and their summaries; the seconds each summary
    took to compute (the job's cost)."""
    rng = np.random.default_rng(0)
    registry = ModelRegistry(root)
    truth = (rng.random(n_tasks) < 0.01).astype(int)
    ids = np.arange(1, n_tasks + 1)
    labelled = rng.choice(ids, n_labels + n_held_out, replace=False)
    labels = {int(t): int(truth[t - 1]) for t in labelled[:n_labels]}
    held_out = {int(t): int(truth[t - 1]) for t in labelled[n_labels:]}
    images = {int(t): f"/data/local-files/?d=previews/{t}.png" for t in ids}
    steps = [StepStats(loss=1.0, loss_x=0.5, loss_u=0.5, mask_rate=0.9,
                       pseudo_anomaly_rate=0.01, lr=0.03)] * 100
    previous, seconds = None, []
    for v in range(n_versions):
        scores = np.clip(rng.normal(0.1 + 0.6 * truth, 0.15), 0, 1)
        start = time.perf_counter()
        summary = summarise_version(dict(zip(ids.tolist(), scores.tolist(), strict=True)),
                                    labels, held_out, images=images, steps=steps,
                                    previous=previous)
        seconds.append(time.perf_counter() - start)
        staging = registry.staging_dir(PROJECT)
        staging.mkdir()
        version = f"amls-2026120{v}T000000000Z-bench"
        (staging / "meta.json").write_text(json.dumps({"version": version, "kind": "fixmatch",
                                                       "label_counts": {"anomaly": 1}}))
        write_summary(staging, summary)
        registry.publish(PROJECT, staging, version)
        previous = summary
    size = (registry.latest_dir(PROJECT) / SUMMARY).stat().st_size
    return {"summary_seconds": round(max(seconds), 3), "summary_bytes": size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--versions", type=int, default=3)
    parser.add_argument("--labels", type=int, default=500)
    parser.add_argument("--held-out", type=int, default=1_000)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config(model_dir=Path(tmp), label_studio_url="http://localhost:8080")
        built = build(Path(tmp), args.tasks, args.versions, args.labels, args.held_out)
        service = AnomalyService(cfg, ModelRegistry(cfg.model_dir),
                                 InProcessSubmitter(lambda p: None))
        client = create_app(service, cfg).test_client()
        times, page_bytes = [], 0
        for _ in range(args.repeats):
            start = time.perf_counter()
            answer = client.get(f"/dashboard/{PROJECT}")
            times.append(time.perf_counter() - start)
            if answer.status_code != 200:
                raise SystemExit(f"the page answered {answer.status_code}")
            page_bytes = len(answer.data)
    print(json.dumps({"tasks": args.tasks, "versions": args.versions, **built,
                      "render_best_s": round(min(times), 4),
                      "render_median_s": round(statistics.median(times), 4),
                      "page_bytes": page_bytes}))


if __name__ == "__main__":
    main()
