"""Scoring throughput: `score_store` on an HDF5 store vs the bare model forward pass.

Builds a store of synthetic uint8 noise (default 10,000 images of 64x64x3) in a temporary
directory, then times, in the same process and on the same device:

  store:  score_store(store, ...)  (HDF5 read + lzf decode in the prefetch thread,
          uint8 -> float, normalise, forward, softmax, copy back)
  bare:   model(x) on batches of ready-made, normalised, channels_last tensors in memory

and prints images/s for both (best of --repeats alternating passes) and their ratio
(target >= 0.9: the pipeline keeps the model busy), by wall clock and by process CPU time;
the CPU-time ratio stays meaningful on a machine shared with other jobs.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scoring_throughput.py [--n 10000] [--size 64]
        [--tta flip|dihedral]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ml_backend.core.checkpoint import ModelMeta, new_version, utc_now_iso
from ml_backend.core.config import TrainConfig
from ml_backend.core.model import build_model, resolve_device, set_seed
from ml_backend.core.preprocess import to_model_input
from ml_backend.core.scoring import score_store
from ml_backend.core.store import CutoutStore

STRETCH = {"name": "none"}


def build_store(path: Path, n: int, size: int, channels: int, seed: int = 0) -> CutoutStore:
    """A store of `n` noise images, appended in blocks of 1000 (bounded memory)."""
    rng = np.random.default_rng(seed)
    store = CutoutStore.create(path, height=size, width=size, channels=channels,
                               stretch=STRETCH)
    for start in range(0, n, 1000):
        count = min(1000, n - start)
        images = rng.integers(0, 256, (count, size, size, channels), dtype=np.uint8)
        store.append([f"noise-{i:07d}" for i in range(start, start + count)], images)
    return store


def bare_forward(model: torch.nn.Module, batches: list[torch.Tensor],
                 device: torch.device) -> None:
    """The forward pass alone (plus softmax) over ready-made input batches."""
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    with torch.inference_mode(), autocast:
        for x in batches:
            torch.softmax(model(x).float(), dim=1)[:, 1]
    _sync(device)


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="images in the store")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (model input)")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile both; use --repeats >= 2 (first pass compiles)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes; best is kept")
    parser.add_argument("--tta", choices=("none", "flip", "dihedral"), default="none",
                        help="score_store with test-time augmentation over these views "
                             "(the bare forward stays one pass: the ratio is its cost)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    cfg = TrainConfig(pretrained=False, image_size=args.size,
                      test_time_augmentation=args.tta != "none",
                      invariance="dihedral" if args.tta == "none" else args.tta)
    set_seed(0)
    model = build_model(cfg, args.channels).to(device=device, memory_format=torch.channels_last)
    model.eval()
    meta = ModelMeta(version=new_version(), parent=None, created=utc_now_iso(),
                     config=cfg.to_dict(), image_size=args.size, channels=args.channels,
                     stretch=STRETCH)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store = build_store(Path(tmp) / "bench.h5", args.n, args.size, args.channels)
        print(f"built store of {args.n} images {args.size}x{args.size}x{args.channels} "
              f"in {time.perf_counter() - t0:.1f} s")
        with store:
            images = store.read(np.arange(len(store)))
            batches = [to_model_input(images[i:i + args.batch_size], args.size, device)
                       for i in range(0, len(images), args.batch_size)]
            net = torch.compile(model) if args.compile else model
            bare_forward(net, batches[:2], device)  # warm-up
            store_times, bare_times = [], []
            # Alternate the two so that load from other processes hits both alike.
            for _ in range(args.repeats):
                store_times.append(timed(lambda: score_store(
                    store, model, meta, batch_size=args.batch_size, device=device,
                    compile=args.compile)))
                bare_times.append(timed(lambda: bare_forward(net, batches, device)))

    print(f"device {device}, torch threads {torch.get_num_threads()}, "
          f"batch {args.batch_size}, compile {args.compile}, test-time views {args.tta}, "
          f"best of {args.repeats}")
    report(args.n, store_times, bare_times)


def report(n: int, store_times: list[tuple[float, float]],
           bare_times: list[tuple[float, float]]) -> None:
    """Print images/s by wall clock (the target) and by CPU time (robust to other load)."""
    for what, column in (("wall", 0), ("cpu", 1)):
        store_s = min(t[column] for t in store_times)
        bare_s = min(t[column] for t in bare_times)
        print(f"[{what}] score_store: {n / store_s:8.1f} images/s ({store_s:.2f} s)   "
              f"bare forward: {n / bare_s:8.1f} images/s ({bare_s:.2f} s)   "
              f"ratio: {bare_s / store_s:.3f}" + ("  (target >= 0.9)" if column == 0 else ""))


if __name__ == "__main__":
    main()
