"""Load test of /predict: N concurrent clients for T seconds on loopback against `amls serve`.

Sets up a model registry whose project 1 serves an untrained 64 px model (latency does not
depend on the weights) and a cutout store the tasks point at, starts `amls serve` (gunicorn,
gthread) on a free port with basic auth, then runs `--clients` threads that each POST
/predict with `--tasks` tasks in a loop for `--duration` seconds. Prints requests, errors
(non-200 answers and transport failures, by kind), throughput and p50 / p99 latency.

Soak mode (`--publish-every S`): meanwhile this process trains a real short FixMatch cycle
on the store every S seconds and publishes it as the project's new LATEST, pruning to three
versions, as a training job does, so the server keeps reloading models under load. The
server's resident memory (its process tree) is sampled every second and reported after the
warm-up (the first `--warmup` seconds), at its peak and at the end.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/predict_load.py [--clients 50]
        [--duration 60] [--tasks 4] [--workers 1]
    # the 10-minute soak
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/predict_load.py --clients 8 \
        --duration 600 --publish-every 30

With --url the server is not started and --user / --password are sent (the server must
serve a model for --project and see --store at the same path).
"""

from __future__ import annotations

import argparse
import collections
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

from ml_backend.core.checkpoint import ModelMeta, new_version, save_model_dir, utc_now_iso
from ml_backend.core.config import TrainConfig
from ml_backend.core.model import build_model, set_seed
from ml_backend.core.store import CutoutStore
from ml_backend.registry import ModelRegistry

SIZE = 64
STRETCH = {"name": "none"}
LABEL_CONFIG = ('<View><Image name="img" value="$image"/><Choices name="c" toName="img">'
                '<Choice value="normal"/><Choice value="anomaly"/></Choices></View>')
REPO = Path(__file__).resolve().parent.parent


def prepare(root: Path, n_images: int = 256) -> tuple[Path, Path, list[str]]:
    """(model registry root with project 1 trained, store path, store ids)."""
    registry = ModelRegistry(root / "models")
    set_seed(0)
    cfg = TrainConfig(pretrained=False, image_size=SIZE)
    net = build_model(cfg, 3).eval()
    version = new_version()
    meta = ModelMeta(version=version, parent=None, created=utc_now_iso(), config=cfg.to_dict(),
                     image_size=SIZE, channels=3, stretch=STRETCH)
    staging = registry.staging_dir(1)
    save_model_dir(staging, ema=net, student=net, meta=meta)
    registry.publish(1, staging, version)
    store = root / "cutouts.h5"
    ids = [f"c{i:05d}" for i in range(n_images)]
    rng = np.random.default_rng(0)
    with CutoutStore.create(store, height=SIZE, width=SIZE, channels=3, stretch=STRETCH) as s:
        s.append(ids, rng.integers(0, 256, (n_images, SIZE, SIZE, 3), np.uint8))
    return root / "models", store, ids


def start_server(model_dir: Path, port: int, user: str, password: str, workers: int,
                 log: Path) -> subprocess.Popen:
    env = {**os.environ, "MODEL_DIR": str(model_dir), "BASIC_AUTH_USER": user,
           "BASIC_AUTH_PASS": password, "AMLS_DEVICE": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("REDIS_URL", None)
    cmd = [sys.executable, "-m", "amls_cli", "serve", "--host", "127.0.0.1", "--port",
           str(port), "--workers", str(workers)]
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"amls serve exited: {log.read_text()[-2000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", auth=(user, password),
                            timeout=2).ok:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"amls serve did not come up: {log.read_text()[-2000:]}")


def publish_loop(registry: ModelRegistry, store: Path, every_s: float, iterations: int,
                 stop_at: float, published: list[str], failures: list[str]) -> None:
    """Every `every_s`: one real training cycle on the store, published and pruned to 3."""
    from ml_backend.core.sources import StoreSubset
    from ml_backend.core.train import save_cycle, train_cycle

    cfg = TrainConfig(pretrained=False, image_size=SIZE, iterations=iterations, batch_size=8,
                      device="cpu")
    while time.monotonic() + every_s < stop_at:
        time.sleep(every_s)
        try:
            with CutoutStore.open(store) as s:
                labeled = s.read(np.arange(16))
                pool = StoreSubset(s, np.arange(16, len(s)))
                labels = np.array([1, 1] + [0] * 14)
                result = train_cycle(cfg, labeled, labels, pool,
                                     init_dir=registry.latest_dir(1))
            staging = registry.staging_dir(1)
            meta = save_cycle(result, staging, cfg=cfg, stretch=STRETCH,
                              parent=result.init_meta, label_counts={"anomaly": 2,
                                                                     "normal": 14})
            registry.publish(1, staging, meta.version)
            registry.prune(1, 3)
            published.append(meta.version)
        except Exception as err:  # noqa: BLE001 - counted and reported
            failures.append(f"{type(err).__name__}: {err}")


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants, in MiB (Linux /proc)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        total += sum(int(line.split()[1]) for line in status.splitlines()
                     if line.startswith("VmRSS:"))
        todo.extend(int(c) for c in children)
    return total / 1024


def sample_rss(pid: int, stop_at: float, samples: list[tuple[float, float]]) -> None:
    start = time.monotonic()
    while time.monotonic() < stop_at:
        samples.append((time.monotonic() - start, tree_rss_mb(pid)))
        time.sleep(1.0)


def client_loop(url: str, auth: tuple[str, str], body_of, stop_at: float,
                latencies: list[float], errors: collections.Counter, lock: threading.Lock) -> None:
    session = requests.Session()
    session.auth = auth
    mine: list[float] = []
    while time.monotonic() < stop_at:
        start = time.perf_counter()
        try:
            response = session.post(f"{url}/predict", json=body_of(), timeout=60)
            kind = None if response.status_code == 200 else f"HTTP {response.status_code}"
        except requests.RequestException as err:
            kind = type(err).__name__
        elapsed = time.perf_counter() - start
        with lock:
            if kind is None:
                mine.append(elapsed)
            else:
                errors[kind] += 1
    with lock:
        latencies.extend(mine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds")
    parser.add_argument("--tasks", type=int, default=4, help="tasks per /predict request")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn workers")
    parser.add_argument("--url", help="an already running backend (skips setup)")
    parser.add_argument("--user", default="bench")
    parser.add_argument("--password", default=None)
    parser.add_argument("--store", type=Path, help="with --url: the store tasks point at")
    parser.add_argument("--project", type=int, default=1)
    parser.add_argument("--publish-every", type=float, default=0.0,
                        help="soak: train and publish a new version every S seconds (0: off)")
    parser.add_argument("--publish-iterations", type=int, default=5,
                        help="FixMatch iterations of each published cycle (default 5)")
    parser.add_argument("--warmup", type=float, default=60.0,
                        help="seconds before the post-warm-up memory reading (default 60)")
    args = parser.parse_args()
    if args.publish_every and args.url:
        parser.error("--publish-every needs the server this script starts (no --url)")
    password = args.password or secrets.token_urlsafe(12)
    with tempfile.TemporaryDirectory() as tmp:
        proc = None
        if args.url:
            url, store = args.url.rstrip("/"), args.store
            with CutoutStore.open(store) as s:
                ids = s.ids()
        else:
            model_dir, store, ids = prepare(Path(tmp))
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            proc = start_server(model_dir, port, args.user, password, args.workers,
                                Path(tmp) / "serve.log")
            url = f"http://127.0.0.1:{port}"
        rng = np.random.default_rng()

        def body_of() -> dict:
            picks = rng.choice(len(ids), size=args.tasks)
            return {"project": args.project, "label_config": LABEL_CONFIG,
                    "tasks": [{"id": int(i) + 1, "data": {"store": str(store),
                                                          "cutout_id": ids[int(i)]}}
                              for i in picks]}

        latencies: list[float] = []
        errors: collections.Counter = collections.Counter()
        lock = threading.Lock()
        stop_at = time.monotonic() + args.duration
        threads = [threading.Thread(target=client_loop, args=(url, (args.user, password),
                                                               body_of, stop_at, latencies,
                                                               errors, lock))
                   for _ in range(args.clients)]
        published: list[str] = []
        failures: list[str] = []
        rss: list[tuple[float, float]] = []
        if args.publish_every:
            threads.append(threading.Thread(target=publish_loop, args=(
                ModelRegistry(model_dir), store, args.publish_every, args.publish_iterations,
                stop_at, published, failures)))
        if proc is not None:
            threads.append(threading.Thread(target=sample_rss, args=(proc.pid, stop_at, rss)))
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    ok = np.array(latencies) * 1000
    total = len(ok) + sum(errors.values())
    print(f"{args.clients} clients x {args.duration:.0f} s, {args.tasks} task(s)/request, "
          f"{args.workers} gunicorn worker(s), {os.cpu_count()} CPUs")
    print(f"requests: {total}, ok: {len(ok)}, errors: {sum(errors.values())} {dict(errors)}")
    if len(ok):
        print(f"throughput: {len(ok) / wall:.1f} req/s; latency p50 {np.percentile(ok, 50):.0f} "
              f"ms, p99 {np.percentile(ok, 99):.0f} ms, max {ok.max():.0f} ms")
    if args.publish_every:
        print(f"published while serving: {len(published)} versions, failures: "
              f"{len(failures)} {failures[:3]}")
    if rss:
        after = [mb for t, mb in rss if t >= args.warmup] or [rss[-1][1]]
        print(f"server RSS (MiB): at warm-up end {after[0]:.0f}, peak after warm-up "
              f"{max(after):.0f}, at the end {rss[-1][1]:.0f} (peak overall "
              f"{max(mb for _, mb in rss):.0f})")


if __name__ == "__main__":
    main()
