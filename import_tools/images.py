"""`amls import images`: a PNG / JPEG / TIFF folder tree through the core's store builder.

The store is built by :func:`ml_backend.core.image_folder.build_store_from_folder` (ids are
relative paths without extension). Previews and task lines are then written for every stored
cutout that has no task line yet, which also finishes a run interrupted after the store step.
Positions (``--positions id,ra,dec``) go into the task lines: the RA/Dec columns and the sky
link of images that carry no WCS of their own.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from import_tools.fits_reader import read_catalog
from import_tools.pipeline import Output
from import_tools.previews import write_preview
from import_tools.report import Failure, ImportSummary
from ml_backend.core.image_folder import build_store_from_folder
from ml_backend.core.progress import progress
from ml_backend.core.store import CutoutStore
from ml_backend.core.stretch import Stretch, make_stretch
from ml_backend.task_rows import append_tasks, read_tasks, tasks_path

log = logging.getLogger(__name__)
_BATCH = 256


Positions = Mapping[str, tuple[float, float]]


def read_positions(path: Path) -> dict[str, tuple[float, float]]:
    """``id -> (ra, dec)`` from a CSV with columns ``id,ra,dec`` (ICRS degrees); ValueError
    naming the line for a bad row, and for a file without an id column."""
    with path.open(newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), [])
    if "id" not in {h.strip().lower() for h in header}:
        raise ValueError(f"{path}: positions need an 'id' column (the image's path below the "
                         f"folder, without extension), got {header}")
    return {row.id: (row.ra, row.dec) for row in read_catalog(path)}


def import_image_folder(directory: Path, output: Output, *, size: int | None,
                        channels: int, invariance: str | None = None,
                        preview_stretch: dict | None = None,
                        preview_crop: float | None = None,
                        positions: Positions | None = None) -> ImportSummary:
    """Build / extend the store from ``directory``, then write missing previews (through
    the store's preview stretch and crop) and tasks, with RA/Dec from ``positions`` where
    given."""
    built = build_store_from_folder(directory, output.store, size=size, channels=channels,
                                    skip_bad=True, invariance=invariance,
                                    preview_stretch=preview_stretch,
                                    preview_crop=preview_crop)
    summary = ImportSummary(imported=built.added, skipped=built.skipped_existing,
                            failures=[Failure(path, "", reason) for path, reason in built.failed])
    if not output.store.exists():
        return summary
    done = read_tasks(tasks_path(output.store)) if tasks_path(output.store).exists() else {}
    with CutoutStore.open(output.store, "r") as store:
        display = make_stretch(store.preview_stretch)
        todo = np.array([i for i, cid in enumerate(store.ids()) if cid not in done],
                        dtype=np.int64)
        with progress(total=todo.size, desc="previews", unit="img") as bar:
            for indices, images in store.iter_batches(_BATCH, indices=todo):
                summary.failures.extend(_previews(store, output, indices, images, display,
                                                  store.preview_crop, positions or {}))
                bar.update(len(indices))
    return summary


def _previews(store: CutoutStore, output: Output, indices: np.ndarray,
              images: np.ndarray, display: Stretch, crop: float,
              positions: Positions) -> list[Failure]:
    ids = store.ids()
    meta = store.meta_table(indices)
    tasks, failures = [], []
    for k, i in enumerate(indices):
        cid = ids[int(i)]
        try:
            preview = write_preview(output.previews, cid, images[k], display, crop)
        except (ValueError, OSError) as err:
            failures.append(Failure(str(meta["source"][k]), f"id={cid}", str(err)))
            continue
        ra, dec = positions.get(cid, (float(meta["ra"][k]), float(meta["dec"][k])))
        tasks.append(output.task(cid, preview, source=str(meta["source"][k]),
                                 hdu=str(meta["hdu"][k]), ra=ra, dec=dec))
    append_tasks(tasks_path(output.store), tasks)
    return failures
