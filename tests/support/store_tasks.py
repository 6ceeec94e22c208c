"""A small cutout store of random pixels and the Label Studio tasks that point into it."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.core.store import CutoutStore
from tests.support.shipped import FROM_NAME, TO_NAME


def random_store_tasks(store: Path, n_tasks: int, anomalies: Collection[int],
                       normals: Collection[int], invariance: str = "dihedral",
                       ) -> list[dict[str, Any]]:
    """Write `n_tasks` random 32 px cutouts to `store`; tasks 0.. with those labelled."""
    ids = [f"c{i}" for i in range(n_tasks)]
    pixels = np.random.default_rng(0).integers(0, 255, (n_tasks, 32, 32, 1), dtype=np.uint8)
    with CutoutStore.create(store, height=32, width=32, channels=1, stretch={"name": "none"},
                            invariance=invariance) as s:
        s.append(ids, pixels)
    tasks = []
    for i, cid in enumerate(ids):
        label = "anomaly" if i in anomalies else "normal" if i in normals else None
        annotations = [] if label is None else [{"id": i, "result": [
            {"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
             "value": {"choices": [label]}}]}]
        tasks.append({"id": i, "data": {"image": f"/x/{cid}.png", "store": str(store),
                                        "cutout_id": cid}, "annotations": annotations})
    return tasks
