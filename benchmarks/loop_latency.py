"""Active-learning loop latency against a real Label Studio.

Measures (1) seconds from the last annotation of a burst to the reordered queue (new model
version's predictions written, "Most anomalous first" view in place) for a project of
`--tasks` FIRST radio-galaxy images, and until the first ranking of all (polled from Label
Studio's current model version; it may come before the burst's last annotation), (2) for a
second burst once a cycle has cached its embeddings, the seconds until Label Studio's current
version changes to the instant re-ranking's (the new order is visible), until that job has
finished (its stages timed), and until the next cycle's, and (3) webhook response time p50 /
p99 under a burst of `--webhooks` concurrent POSTs to /webhook.

    python -m benchmarks.loop_latency --tasks 1000 --webhooks 500

Starts a private Label Studio (tests/support/live_services.py; binary from
AMLS_LABEL_STUDIO_BIN) and serves the backend in-process with in-process jobs. Prints one JSON
object.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import logging
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import requests

from demo.local_servers import free_port
from ml_backend.app import create_app
from ml_backend.config import Config
from ml_backend.core.config import TrainConfig
from ml_backend.service import AnomalyService
from tests.support.live_services import running_label_studio

logger = logging.getLogger("benchmarks.loop_latency")

LABEL_CONFIG = """<View><Image name="image" value="$image"/>
<Choices name="morphology" toName="image"><Choice value="normal"/><Choice value="anomaly"/>
</Choices></View>"""
RARE = "Bent"


def extract_images(root: Path, n_tasks: int) -> Path:
    """n_tasks FIRST PNGs, about 5 % Bent, into root/first/<class>/."""
    import firstgalaxydata

    archive = Path(firstgalaxydata.__file__).parent / "galaxy_data.zip"
    with zipfile.ZipFile(archive) as zf:
        names = sorted(n for n in zf.namelist()
                       if n.startswith("galaxy_data/all/") and n.endswith(".png"))
        rare = [n for n in names if n.split("/")[2] == RARE][:max(10, n_tasks // 20)]
        common = [n for n in names if n.split("/")[2] != RARE][:n_tasks - len(rare)]
        for name in rare + common:
            target = root / "first" / name.split("/")[2] / Path(name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
    return root / "first"


@contextlib.contextmanager
def serve(cfg: Config):
    from werkzeug.serving import make_server

    service = AnomalyService.from_config(cfg)
    server = make_server("127.0.0.1", free_port(), create_app(service, cfg), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", service
    finally:
        server.shutdown()
        service.close()


def wait_for_job(url: str, project_id: int, since: float, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        project = requests.get(f"{url}/metrics", timeout=5).json()["projects"].get(
            str(project_id))
        if project and not project["queue"]["queued"] and not project["queue"]["running"] \
                and _epoch(project["queue"]["last_finished"]) > since:
            return project
        time.sleep(0.25)
    raise TimeoutError(f"no finished job for project {project_id} within {timeout_s} s")


def wait_for_rerank(url: str, project_id: int, since: float,
                    timeout_s: float) -> dict[str, Any]:
    """The project's metrics once a re-ranking finished after `since` (epoch seconds)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        project = requests.get(f"{url}/metrics", timeout=5).json()["projects"][str(project_id)]
        rerank = project.get("rerank") or {}
        if _epoch(rerank.get("last_finished")) > since and not rerank.get("running") \
                and not rerank.get("queued"):
            return project
        time.sleep(0.1)
    raise TimeoutError(f"no finished re-ranking for project {project_id} within {timeout_s} s")


def wait_for_new_order(client: Any, project_id: int, before: str | None, since: float,
                       timeout_s: float) -> tuple[str, float]:
    """(Label Studio's model version once it is no longer `before`, seconds from `since`):
    the moment the Data Manager orders the queue by new scores."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = client.projects.get(id=project_id).model_version
        if current and current != before:
            return str(current), time.time() - since
        time.sleep(0.1)
    raise TimeoutError(f"Label Studio kept model version {before!r} for {timeout_s} s")


def _kind(cfg: Config, project_id: int, version: str) -> str:
    from ml_backend.registry import ModelRegistry

    return str(ModelRegistry(cfg.model_dir).read_meta(project_id, version).get("kind", "fixmatch"))


def _epoch(iso: str | None) -> float:
    """/metrics' ISO 8601 time as epoch seconds (0 for none)."""
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp() if iso else 0.0


def annotate(client: Any, labels: list[tuple[int, str]]) -> float:
    """Create the annotations one by one; the epoch time of the last."""
    for task_id, value in labels:
        client.annotations.create(id=task_id, result=[{
            "from_name": "morphology", "to_name": "image", "type": "choices",
            "value": {"choices": [value]}}])
    return time.time()


def webhook_burst(url: str, project_id: int, n: int, workers: int) -> np.ndarray:
    """Seconds per webhook response for n concurrent ANNOTATION_UPDATED posts."""
    body = {"action": "ANNOTATION_UPDATED", "annotation": {"id": 1, "project": project_id},
            "project": {"id": project_id}}
    session = requests.Session()

    def one(_: int) -> float:
        start = time.perf_counter()
        response = session.post(f"{url}/webhook", json=body, timeout=10)
        response.raise_for_status()
        return time.perf_counter() - start

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return np.array(list(pool.map(one, range(n))))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ml_backend.core.image_folder import build_store_from_folder

    with running_label_studio() as ls, tempfile.TemporaryDirectory() as tmp:
        folder = extract_images(ls.document_root, args.tasks)
        store = Path(tmp) / "first.h5"
        build_store_from_folder(folder, store, size=args.image_size, channels=1)
        client = ls.client
        project = client.projects.create(title="loop latency", label_config=LABEL_CONFIG)
        pngs = sorted(folder.rglob("*.png"))
        client.projects.import_tasks(id=project.id, request=[
            {"image": f"/data/local-files/?d={p.relative_to(ls.document_root).as_posix()}",
             "cutout_id": f"{p.parent.name}/{p.stem}", "store": str(store)} for p in pngs])
        tasks = [t.dict() for t in client.tasks.list(project=project.id, page_size=5000)]
        rare = [t["id"] for t in tasks if t["data"]["cutout_id"].startswith(RARE)]
        common = [t["id"] for t in tasks if not t["data"]["cutout_id"].startswith(RARE)]
        cfg = Config(label_studio_url=ls.url, label_studio_api_key=ls.token,
                     model_dir=Path(tmp) / "models", store_roots=(Path(tmp),),
                     train=TrainConfig(image_size=args.image_size, device="cpu"),
                     iterations=args.iterations,
                     debounce_s=args.debounce)
        with serve(cfg) as (url, _service):
            client.ml.create(url=url, project=project.id)
            normals = common[::len(common) // 40]
            last = annotate(client, [(t, "anomaly") for t in rare[:5]]
                            + [(t, "normal") for t in normals[:20]])
            first_version, first_order_s = wait_for_new_order(client, project.id, None, last,
                                                              args.timeout)
            first_kind = _kind(cfg, project.id, first_version)
            metrics = wait_for_job(url, project.id, last, args.timeout)
            loop_s = time.time() - last
            if metrics["model_version"] == "untrained" or metrics["queue"]["last_error"]:
                raise RuntimeError(f"the training job did not publish a model: {metrics}")
            # A second burst: the instant re-ranking now has the cycle's embeddings.
            before = client.projects.get(id=project.id).model_version
            last = annotate(client, [(t, "anomaly") for t in rare[5:7]]
                            + [(t, "normal") for t in normals[20:23]])
            fast_version, visible_s = wait_for_new_order(client, project.id, before, last,
                                                         args.timeout)
            fast_kind = _kind(cfg, project.id, fast_version)
            fast = wait_for_rerank(url, project.id, last, args.timeout)
            rerank_s = time.time() - last
            result = fast["rerank"]["last_result"] or {}
            if result.get("status") != "reranked":
                raise RuntimeError(f"the re-ranking did not publish: {fast['rerank']}")
            current = client.projects.get(id=project.id).model_version
            second = wait_for_job(url, project.id, last, args.timeout)
            cycle_s = time.time() - last
            latencies = webhook_burst(url, project.id, args.webhooks, args.concurrency)
        return {
            "tasks": len(tasks), "iterations": args.iterations, "image_size": args.image_size,
            "debounce_s": args.debounce,
            "first_burst_to_first_order_s": round(first_order_s, 2),
            "first_order_kind": first_kind,
            "last_annotation_to_reordered_queue_s": round(loop_s, 2),
            "job_duration_s": metrics["queue"]["last_duration_s"],
            "second_burst_to_instant_order_visible_s": round(visible_s, 2),
            "instant_order_kind": fast_kind,
            "second_burst_to_rerank_finished_s": round(rerank_s, 2),
            "rerank_duration_s": fast["rerank"]["last_duration_s"],
            "rerank_stage_seconds": result.get("stage_seconds"),
            "rerank_imagenet_term": result.get("imagenet_term"),
            "instant_version_current_in_label_studio": current == result["model_version"],
            "second_burst_to_next_cycle_s": round(cycle_s, 2),
            "jobs_run": second["queue"]["jobs_total"],
            "webhooks": args.webhooks, "concurrency": args.concurrency,
            "webhook_p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 2),
            "webhook_p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 2),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--webhooks", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--debounce", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    print(json.dumps(run(args), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
