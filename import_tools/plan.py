"""Plan an import: turn inputs into jobs, leaving out ids already stored, and pick the size.

Every builder returns a :class:`Plan`: the jobs to run, how many items were skipped because
the store has them, failures found while planning (e.g. a catalogue position on no frame, a
repeated id) and how many items the jobs hold (for the progress bar).
"""

from __future__ import annotations

from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from import_tools import array_reader, cutana_reader, fits_reader
from import_tools.jobs import (
    CutanaJob,
    FitsCatalogJob,
    FitsImageJob,
    GroupJob,
    Job,
    RawItem,
    StackJob,
)
from import_tools.report import Failure

CHUNK = 128  # items per job: large enough to amortise process hand-off, small for memory


def chunks(items: Sequence, size: int = CHUNK) -> Iterator[tuple]:
    """`items` in consecutive tuples of at most `size` (one job each)."""
    for start in range(0, len(items), size):
        yield tuple(items[start:start + size])


@dataclass
class Plan:
    jobs: list[Job] = field(default_factory=list)
    skipped: int = 0
    failures: list[Failure] = field(default_factory=list)
    n_items: int = 0


def fits_image_plan(files: Sequence[Path], keys: tuple | None, files_per_object: int,
                    existing: Container[str]) -> Plan:
    """One job per object: ``files_per_object`` consecutive files (1 = one file each)."""
    plan = Plan()
    if len(files) % files_per_object:
        raise ValueError(f"{len(files)} files do not split into objects of "
                         f"{files_per_object} files each")
    seen: set[str] = set()
    for start in range(0, len(files), files_per_object):
        paths = tuple(files[start:start + files_per_object])
        cid = fits_reader.file_id(paths)
        if cid in existing:
            plan.skipped += 1
        elif cid in seen:
            plan.failures.append(Failure(str(paths[0]), "", f"id {cid!r} repeats an earlier "
                                         "file's id (same file name in another folder?)"))
        else:
            seen.add(cid)
            plan.jobs.append(FitsImageJob(paths=paths, keys=keys, id=cid))
            plan.n_items += 1
    return plan


def fits_catalog_plan(frames: Sequence[Sequence[Path]], keys: tuple | None,
                      rows: Sequence[fits_reader.CatalogRow], default_size: int,
                      existing: Container[str]) -> Plan:
    """Assign each new row to the first frame it falls on; chunk rows per frame into jobs.

    Frames are read once here for their WCS and shape; an unreadable frame or one without a
    celestial WCS is a failure for that frame, and a row on no frame a failure for that row.
    """
    plan = Plan()
    todo = []
    for row in rows:
        if row.id in existing:
            plan.skipped += 1
        else:
            todo.append(row)
    per_frame: dict[int, list[fits_reader.CatalogRow]] = {}
    geometry = []
    for paths in frames:
        try:
            image = fits_reader.read_fits(paths, keys)
        except fits_reader.FitsError as err:
            plan.failures.append(Failure(str(paths[0]), fits_reader.hdu_label(keys), str(err)))
            continue
        if image.wcs is None:
            plan.failures.append(Failure(str(paths[0]), image.hdu,
                                         "frame has no celestial WCS; cannot place positions"))
            continue
        geometry.append((paths, image.wcs, image.pixels.shape[:2]))
    ras, decs = np.array([r.ra for r in todo]), np.array([r.dec for r in todo])
    where = np.full(len(todo), -1)
    for i, (_, wcs, shape) in enumerate(geometry):
        if len(todo):
            hits = fits_reader.on_frame(*fits_reader.sky_to_pixel(wcs, ras, decs), shape)
            where[(where < 0) & hits] = i
    for row, frame in zip(todo, where.tolist(), strict=True):
        if frame < 0:
            plan.failures.append(Failure("catalogue", f"line {row.line} id={row.id}",
                                         f"position ra={row.ra}, dec={row.dec} is outside "
                                         "every frame"))
        else:
            per_frame.setdefault(frame, []).append(row)
    for frame, frame_rows in per_frame.items():
        paths = tuple(geometry[frame][0])
        for chunk in chunks(frame_rows):
            plan.jobs.append(FitsCatalogJob(paths=paths, keys=keys, rows=chunk,
                                            default_size=default_size))
            plan.n_items += len(chunk)
    return plan


def array_plan(kind: array_reader.Kind, path: Path, dataset: str | None, ids_path: str | None,
               image_key: str, existing: Container[str]) -> tuple[Plan, tuple[int, int] | None]:
    """Jobs over a stack or a group-per-image file, and the images' (H, W) when uniform."""
    layout = array_reader.inspect(kind, path, dataset, ids_path, image_key)
    plan = Plan()
    if isinstance(layout, array_reader.StackLayout):
        todo = [i for i, cid in enumerate(layout.ids) if cid not in existing]
        plan.skipped = len(layout.ids) - len(todo)
        for chunk in chunks(todo):
            plan.jobs.append(StackJob(kind, path, layout.dataset, chunk,
                                      tuple(layout.ids[i] for i in chunk)))
        plan.n_items = len(todo)
        with array_reader.open_container(kind, path) as root:
            shape = root[dataset.strip("/")].shape if dataset else root.shape
        return plan, (int(shape[1]), int(shape[2]))
    names = [n for n in layout.names if n not in existing]
    plan.skipped = len(layout.names) - len(names)
    for chunk in chunks(names):
        plan.jobs.append(GroupJob(kind, path, layout.group, layout.image_key, chunk))
    plan.n_items = len(names)
    return plan, None


def first_group_shape(kind: array_reader.Kind, path: Path,
                      layout_jobs: Sequence[Job]) -> tuple[int, int] | None:
    """(H, W) of the first image of a group-per-image plan (reads that one image)."""
    for job in layout_jobs:
        for raw in job.load():
            if isinstance(raw, RawItem):
                return raw.pixels.shape[:2]
    return None


def cutana_plan(batches: Sequence[cutana_reader.CutanaBatch], existing: Container[str]) -> Plan:
    """Jobs over every store of a Cutana output; an id in two stores is a failure."""
    plan = Plan()
    seen: set[str] = set()
    for batch in batches:
        todo = []
        for i, cid in enumerate(batch.ids):
            if cid in existing:
                plan.skipped += 1
            elif cid in seen:
                plan.failures.append(Failure(str(batch.zarr), f"images[{i}]",
                                             f"id {cid!r} repeats an earlier store's id"))
            else:
                seen.add(cid)
                todo.append(i)
        for chunk in chunks(todo):
            plan.jobs.append(CutanaJob(batch.zarr, batch.layout, chunk,
                                       tuple(batch.ids[i] for i in chunk),
                                       tuple(batch.ra[i] for i in chunk),
                                       tuple(batch.dec[i] for i in chunk)))
        plan.n_items += len(todo)
    return plan
