"""What a re-ranking's Label Studio calls cost, by project size, against a real Label Studio.

For each `--tasks` size, in a fresh project of that many tasks: the seconds to read every task
with its annotations (`LabelStudioClient.iter_tasks`, what each job does first), to import one
prediction per task with the SDK's bulk call in one request (Label Studio's own bulk
prediction-import rate, the floor) and through `LabelStudioClient.write_predictions` (ours,
in batches of each `--batch`), to read only the labelled tasks (what a re-ranking reads), to
make a version current, and to delete a version's predictions (what pruning does).

    python -m benchmarks.label_studio_io --tasks 1000 100000

Starts a private Label Studio (tests/support/live_services.py; binary from
AMLS_LABEL_STUDIO_BIN). Prints one JSON object per size.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from ml_backend.label_schema import parse_label_config
from ml_backend.labelstudio import LabelStudioClient
from tests.support.live_services import running_label_studio

LABEL_CONFIG = """<View><Image name="image" value="$image"/>
<Choices name="morphology" toName="image"><Choice value="normal"/><Choice value="anomaly"/>
</Choices></View>"""
IMPORT_CHUNK = 10_000  # tasks per import request while setting up
LABELLED = 25  # annotations made before timing the labelled-only read


def measure(ls: Any, n_tasks: int, batches: list[int], slow_parts: bool = True,
            ) -> dict[str, Any]:
    sdk = ls.client
    project = sdk.projects.create(title=f"io {n_tasks}", label_config=LABEL_CONFIG)
    start = time.perf_counter()
    for first in range(0, n_tasks, IMPORT_CHUNK):
        sdk.projects.import_tasks(id=project.id, request=[
            {"image": f"/data/local-files/?d=x/{i}.png", "cutout_id": f"c{i}"}
            for i in range(first, min(n_tasks, first + IMPORT_CHUNK))])
    import_tasks_s = time.perf_counter() - start
    client = LabelStudioClient(ls.url, ls.token)
    schema = parse_label_config(LABEL_CONFIG, "anomaly")

    start = time.perf_counter()
    if slow_parts:
        tasks = list(client.iter_tasks(project.id))
    else:  # ids only (Label Studio's `include`), not timed
        tasks = [{"id": int(t.id)} for t in sdk.tasks.list(project=project.id, include="id",
                                                            page_size=5000)]
    read_s = time.perf_counter() - start if slow_parts else float("nan")
    for task in tasks[:LABELLED]:  # what a re-ranking reads: the labelled tasks only
        sdk.annotations.create(id=task["id"], result=schema.label_result(0))
    start = time.perf_counter()
    labelled = list(client.iter_tasks(project.id, annotated_only=True))
    read_labelled_s = time.perf_counter() - start
    if len(labelled) != min(LABELLED, n_tasks):
        raise RuntimeError(f"read {len(labelled)} labelled tasks, made {LABELLED}")
    scores = list(zip([int(t["id"]) for t in tasks],
                      np.random.default_rng(0).random(len(tasks)).tolist(), strict=True))

    start = time.perf_counter()
    sdk.projects.import_predictions(id=project.id, request=[
        {"task": t, **schema.prediction(s, "bulk")} for t, s in scores],
        request_options={"timeout_in_seconds": 1800})
    bulk_s = time.perf_counter() - start

    ours = {}
    for size in batches:
        start = time.perf_counter()
        client.write_predictions(project.id, schema, scores, f"ours-{size}", size)
        ours[size] = time.perf_counter() - start

    start = time.perf_counter()
    client.set_model_version(project.id, f"ours-{batches[0]}")
    switch_s = time.perf_counter() - start

    start = time.perf_counter()
    if slow_parts:
        client.delete_predictions(project.id, "bulk", n_tasks)
    delete_s = time.perf_counter() - start if slow_parts else float("nan")
    held = client.prediction_versions(project.id)
    if any(held.get(f"ours-{size}") != n_tasks for size in batches) or (
            slow_parts and "bulk" in held):
        raise RuntimeError(f"unexpected prediction counts after the run: {held}")
    return {"tasks": n_tasks, "import_tasks_s": round(import_tasks_s, 2),
            "read_tasks_s": round(read_s, 2),
            "read_labelled_tasks_s": round(read_labelled_s, 3),
            "bulk_import_predictions_s": round(bulk_s, 2),
            "bulk_predictions_per_s": round(n_tasks / bulk_s),
            "write_predictions_s_by_batch": {size: round(t, 2) for size, t in ours.items()},
            "ours_over_bulk_by_batch": {size: round(t / bulk_s, 2) for size, t in ours.items()},
            "set_model_version_s": round(switch_s, 3),
            "delete_version_s": round(delete_s, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[1000])
    parser.add_argument("--batch", type=int, nargs="+", default=[500],
                        help="predictions per request in write_predictions, one run each "
                        "(AMLS_PREDICTION_WRITE_BATCH; default 500)")
    parser.add_argument("--skip-slow", action="store_true",
                        help="do not time reading every task or deleting a version (minutes "
                        "each at 100,000 tasks); they print as NaN")
    args = parser.parse_args(argv)
    with running_label_studio() as ls:
        for n in args.tasks:
            print(json.dumps(measure(ls, n, args.batch, not args.skip_slow)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
