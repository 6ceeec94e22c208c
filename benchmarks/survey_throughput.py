"""Survey throughput: images/s of `amls survey score` with 1 and 2 `amls worker` processes.

Builds a store of synthetic uint8 noise and an untrained model (scoring cost does not depend
on the weights), then for each worker count plans a fresh survey, enqueues its shards on a
private queue, starts that many `amls worker --burst` processes (OMP_NUM_THREADS per worker,
default 1) and times enqueue -> last worker exit. Prints wall-clock images/s (what a user
sees, including each job's model load) and the summed per-shard scoring rate.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/survey_throughput.py [--n 4000] [--size 64]
        [--shards 8] [--workers 1 2] [--redis-url redis://...]

Without --redis-url a throw-away redis-server (/usr/bin/redis-server) is started on a free
loopback port.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from benchmarks.scoring_throughput import STRETCH, build_store
from ml_backend import survey
from ml_backend.core.checkpoint import ModelMeta, new_version, save_model_dir, utc_now_iso
from ml_backend.core.config import TrainConfig
from ml_backend.core.model import build_model, set_seed

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def private_redis(binary: str = "/usr/bin/redis-server") -> Iterator[str]:
    """A non-persistent redis-server on a free loopback port; yields its URL."""
    from redis import Redis

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as workdir:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save",
                                 "", "--appendonly", "no", "--dir", workdir],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            for _ in range(100):
                with contextlib.suppress(Exception):
                    if Redis.from_url(url).ping():
                        break
                time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def save_model(path: Path, size: int, channels: int) -> Path:
    set_seed(0)
    cfg = TrainConfig(pretrained=False, image_size=size)
    net = build_model(cfg, channels).eval()
    meta = ModelMeta(version=new_version(), parent=None, created=utc_now_iso(),
                     config=cfg.to_dict(), image_size=size, channels=channels, stretch=STRETCH)
    return save_model_dir(path, ema=net, student=net, meta=meta)


def run_survey(store: Path, model: Path, out: Path, redis_url: str, workers: int, shards: int,
               batch_size: int, threads: int) -> tuple[float, survey.ShardState]:
    """Wall seconds from enqueue to the last worker's exit, and the final survey state."""
    queue = f"bench-{secrets.token_hex(3)}"
    manifest = survey.plan_survey([store], model, shards, out, batch_size=batch_size)
    env = {**os.environ, "REDIS_URL": redis_url, "AMLS_QUEUE": queue, "AMLS_DEVICE": "cpu",
           "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    survey.enqueue_pending(manifest.parent, redis_url, queue)
    procs = [subprocess.Popen([sys.executable, "-m", "amls_cli", "worker", "--burst"],
                              env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(workers)]
    for proc in procs:
        proc.wait()
    seconds = time.perf_counter() - start
    state = survey.survey_state(out)
    if state.pending or state.failed:
        raise RuntimeError(f"survey {out} did not finish: {state}")
    return seconds, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="images in the store")
    parser.add_argument("--size", type=int, default=64, help="image side (pixels)")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per worker")
    parser.add_argument("--redis-url", help="use this Redis instead of a private one")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        url = args.redis_url or stack.enter_context(private_redis())
        store_path = Path(tmp) / "noise.h5"
        build_store(store_path, args.n, args.size, 3).close()
        model = save_model(Path(tmp) / "model", args.size, 3)
        print(f"{args.n} images {args.size}x{args.size}x3, {args.shards} shards, batch "
              f"{args.batch_size}, {args.threads} thread(s) per worker, {os.cpu_count()} CPUs")
        for workers in args.workers:
            seconds, state = run_survey(store_path, model, Path(tmp) / f"survey-{workers}", url,
                                        workers, args.shards, args.batch_size, args.threads)
            print(f"{workers} worker(s): {args.n / seconds:8.1f} images/s wall "
                  f"({seconds:.1f} s incl. start-up and model loads); "
                  f"{state.images_per_s_per_worker:8.1f} images/s per worker while scoring")


if __name__ == "__main__":
    main()
