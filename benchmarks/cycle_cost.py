"""What a training cycle costs beyond the network's own forward + backward passes.

Times `train_cycle` (store reads, sampling, weak/strong augmentation, preprocessing, FixMatch
step, EMA) against a bare loop of forward + backward + SGD step on random tensors of the same
shapes (batch_size labelled + 2 x uratio*batch_size unlabelled) with nothing else, and prints
both and their ratio. The target is a ratio of at most 1.5. The two are timed alternately
--repeats times and the fastest run of each is kept, which resists a busy shared machine.

    python benchmarks/cycle_cost.py [--iterations 100] [--repeats 3] [--device auto]
                                    [--backbone-stage 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ml_backend.core.config import TrainConfig
from ml_backend.core.fixmatch import make_optimizer
from ml_backend.core.model import build_model, resolve_device, set_seed
from ml_backend.core.store import CutoutStore
from ml_backend.core.train import train_cycle


def bare_seconds(cfg: TrainConfig, channels: int, device: torch.device) -> float:
    """Seconds for cfg.iterations forward + backward + step on fixed random inputs."""
    set_seed(cfg.seed)
    model = build_model(cfg, channels).to(device, memory_format=torch.channels_last).train()
    optimizer = make_optimizer(model, cfg)
    n = cfg.batch_size * (1 + 2 * cfg.uratio)
    x = torch.randn(n, channels, cfg.image_size, cfg.image_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (n,), device=device)
    _step(model, optimizer, x, y)  # warm-up (cudnn autotuning, allocator)
    _sync(device)
    start = time.perf_counter()
    for _ in range(cfg.iterations):
        _step(model, optimizer, x, y)
    _sync(device)
    return time.perf_counter() - start


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
          y: torch.Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cycle_seconds(cfg: TrainConfig, store_path: Path, n_labeled: int) -> float:
    """Seconds of train_cycle's loop with the unlabelled pool read from an HDF5 store."""
    with CutoutStore.open(store_path) as store:
        labeled = store.read(np.arange(n_labeled))
        labels = (np.arange(n_labeled) % 4 == 0).astype(np.int64)
        return train_cycle(cfg, labeled, labels, store).seconds


def make_store(path: Path, n: int, size: int, channels: int) -> None:
    rng = np.random.default_rng(0)
    with CutoutStore.create(path, height=size, width=size, channels=channels,
                            stretch={"name": "none"}) as store:
        for start in range(0, n, 1000):
            count = min(1000, n - start)
            images = rng.integers(0, 256, (count, size, size, channels), dtype=np.uint8)
            store.append([f"b{i}" for i in range(start, start + count)], images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--store-images", type=int, default=5000,
                        help="rows in the temporary store (stored at the model input size)")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating timings of each; the fastest is reported")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backbone-stage", type=int, default=None,
                        help="train the backbone cut after this stage (default: whole)")
    args = parser.parse_args()

    cfg = TrainConfig(iterations=args.iterations, image_size=args.image_size,
                      device=args.device, pretrained=False, backbone_stage=args.backbone_stage)
    device = resolve_device(cfg.device)
    with tempfile.TemporaryDirectory() as tmp:
        store_path = Path(tmp) / "bench.h5"
        make_store(store_path, args.store_images, args.image_size, args.channels)
        cycle_seconds(cfg.replace(iterations=1), store_path, n_labeled=40)  # warm-up
        cycles, bares = [], []
        for _ in range(args.repeats):
            cycles.append(cycle_seconds(cfg, store_path, n_labeled=40))
            bares.append(bare_seconds(cfg, args.channels, device))
    cycle, bare = min(cycles), min(bares)
    print(json.dumps({
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch_threads": torch.get_num_threads(),
        "iterations": cfg.iterations, "image_size": cfg.image_size,
        "backbone_stage": cfg.backbone_stage,
        "batch": f"{cfg.batch_size} labelled + 2 x {cfg.uratio * cfg.batch_size} unlabelled",
        "cycle_seconds": round(cycle, 2), "bare_seconds": round(bare, 2),
        "all_cycle_seconds": [round(t, 2) for t in cycles],
        "all_bare_seconds": [round(t, 2) for t in bares],
        "ratio": round(cycle / bare, 3),
    }))


if __name__ == "__main__":
    main()
