"""Read -> stretch -> resize -> preview in worker processes; store + tasks in the main process.

A *job* is a small picklable description of some items (a FITS file, a catalogue chunk of a
frame, an index range of a stack). Workers run :func:`run_job`: decode, stretch to uint8,
resize to the store's size, write each preview PNG atomically. The main process alone writes
the store and the tasks file, in job order as results arrive, with at most ``2 * workers``
jobs in flight so memory stays bounded.

Resuming: job builders leave out ids already in the store, so re-running an interrupted
import continues where it stopped. Task lines are appended before the store rows; an item cut
off between the two is imported again on the next run and its task line rewritten (readers
keep the last line per id).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from import_tools.jobs import Job
from import_tools.previews import Preview, preview_url, write_preview
from import_tools.report import Failure, ImportSummary
from ml_backend.core.progress import progress
from ml_backend.core.store import CutoutStore
from ml_backend.core.stretch import make_stretch
from ml_backend.task_rows import append_tasks, make_task, tasks_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DoneItem:
    """A stretched, resized uint8 cutout whose preview is on disk."""

    id: str
    pixels: np.ndarray
    source: str
    hdu: str
    ra: float | None
    dec: float | None
    preview: Preview
    n_nonfinite: int


@dataclass(frozen=True)
class Settings:
    """What every worker needs: the stretch spec, the store's (H, W), the preview root and
    look (display stretch, framing crop); and the invariance a new store records."""

    stretch: dict
    size: tuple[int, int]
    previews: Path
    invariance: str = "dihedral"
    preview_stretch: dict = field(default_factory=lambda: {"name": "none"})
    preview_crop: float = 1.0


# ---- the worker ---------------------------------------------------------------------------

def resize_uint8(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of uint8 ``(H, W, C)`` to ``size`` = (H, W), channel by channel."""
    if pixels.shape[:2] == size:
        return pixels
    h, w = size
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(pixels[..., c]), mode="L")
                         .resize((w, h), Image.Resampling.BILINEAR))
              for c in range(pixels.shape[-1])]
    return np.stack(planes, axis=-1)


def run_job(job: Job, settings: Settings) -> list[DoneItem | Failure]:
    """Decode, stretch, resize and write previews for one job (runs in a worker process)."""
    stretch = make_stretch(settings.stretch)
    display = make_stretch(settings.preview_stretch)
    out: list[DoneItem | Failure] = []
    for raw in job.load():
        if isinstance(raw, Failure):
            out.append(raw)
            continue
        try:
            result = stretch.apply(raw.pixels)
            pixels = resize_uint8(result.pixels, settings.size)
            preview = write_preview(settings.previews, raw.id, pixels, display,
                                    settings.preview_crop)
        except (ValueError, OSError) as err:
            out.append(Failure(raw.source, f"{raw.hdu} id={raw.id}", str(err)))
            continue
        out.append(DoneItem(raw.id, pixels, raw.source, raw.hdu, raw.ra, raw.dec, preview,
                            result.n_nonfinite))
    return out


# ---- the main process ---------------------------------------------------------------------

@dataclass(frozen=True)
class Output:
    """Where results go: the store, the previews and how their URLs are made."""

    store: Path
    previews: Path
    document_root: Path | None = None
    url_prefix: str | None = None
    sky_viewer: str = "esasky"  # where each task's `sky` link points (task_rows.SKY_VIEWERS)

    def url(self, preview: Path) -> str:
        root = self.document_root if self.document_root is not None else self.previews.parent
        return preview_url(preview, document_root=root, url_prefix=self.url_prefix,
                           previews_root=self.previews)

    def task(self, cutout_id: str, preview: Preview, *, source: str, hdu: str,
             ra: float | None, dec: float | None) -> dict:
        """The Label Studio task data of one imported cutout (`task_rows.make_task`)."""
        full = None if preview.full_field is None else self.url(preview.full_field)
        return make_task(image_url=self.url(preview.path), cutout_id=cutout_id,
                         store_path=self.store, source=source, hdu=hdu, ra=ra, dec=dec,
                         sky_viewer=self.sky_viewer, full_field_url=full)


def open_existing(store_path: Path, stretch_spec: dict, invariance: str | None = None,
                  preview_stretch: dict | None = None,
                  preview_crop: float | None = None) -> CutoutStore | None:
    """The store opened for appending, or None if absent; ValueError on another stretch, or
    on another invariance, preview stretch or preview crop (when given)."""
    if not store_path.exists():
        return None
    store = CutoutStore.open(store_path, mode="a")
    try:
        _check_same_settings(store, store_path, make_stretch(stretch_spec).spec, invariance,
                             preview_stretch, preview_crop)
    except ValueError:
        store.close()
        raise
    return store


def _check_same_settings(store: CutoutStore, store_path: Path, stretch: dict,
                         invariance: str | None, preview_stretch: dict | None,
                         preview_crop: float | None) -> None:
    """ValueError naming the first setting this import would change in `store`."""
    if store.stretch != stretch:
        raise ValueError(f"store {store_path} holds pixels made with stretch {store.stretch}; "
                         f"this import asks for {stretch}. Use another --store or the same "
                         "stretch.")
    store.check_recorded(invariance=invariance, preview_stretch=preview_stretch,
                         preview_crop=preview_crop)


class Writer:
    """Appends finished items to the store (created on first use) and the tasks file."""

    def __init__(self, output: Output, settings: Settings, store: CutoutStore | None) -> None:
        self.output = output
        self.settings = settings
        self.store = store
        self.summary = ImportSummary()

    def add(self, results: list[DoneItem | Failure]) -> None:
        done = [r for r in results if isinstance(r, DoneItem)]
        self.summary.failures.extend(r for r in results if isinstance(r, Failure))
        if not done:
            return
        if self.store is None:
            h, w = self.settings.size
            self.store = CutoutStore.create(self.output.store, height=h, width=w,
                                            channels=done[0].pixels.shape[-1],
                                            stretch=make_stretch(self.settings.stretch).spec,
                                            invariance=self.settings.invariance,
                                            preview_stretch=self.settings.preview_stretch,
                                            preview_crop=self.settings.preview_crop)
        accepted = []
        for item in done:
            if item.pixels.shape != self.store.shape:
                self.summary.failures.append(Failure(
                    item.source, f"{item.hdu} id={item.id}",
                    f"shape {item.pixels.shape} does not match the store's {self.store.shape} "
                    "(H, W, C): channel counts must agree"))
            elif item.id in self.store:
                self.summary.skipped += 1
            else:
                accepted.append(item)
        if not accepted:
            return
        append_tasks(tasks_path(self.output.store), (self.output.task(
            i.id, i.preview, source=i.source, hdu=i.hdu, ra=i.ra, dec=i.dec)
            for i in accepted))
        self.store.append([i.id for i in accepted], np.stack([i.pixels for i in accepted]),
                          ra=[np.nan if i.ra is None else i.ra for i in accepted],
                          dec=[np.nan if i.dec is None else i.dec for i in accepted],
                          source=[i.source for i in accepted], hdu=[i.hdu for i in accepted])
        self.summary.imported += len(accepted)
        self.summary.nonfinite += sum(i.n_nonfinite for i in accepted)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def run_jobs(jobs: Iterable[Job], writer: Writer, *, workers: int = 1,
             total: int | None = None) -> ImportSummary:
    """Run jobs inline (workers <= 1) or in a process pool; returns the writer's summary."""
    bar = progress(total=total, desc="import", unit="cutout")
    try:
        if workers <= 1:
            for job in jobs:
                results = run_job(job, writer.settings)
                writer.add(results)
                bar.update(len(results))
        else:
            _run_pool(jobs, writer, workers, bar)
    finally:
        bar.close()
        writer.close()
    return writer.summary


def _run_pool(jobs: Iterable[Job], writer: Writer, workers: int, bar) -> None:
    pending: list[Future] = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for job in jobs:
            pending.append(pool.submit(run_job, job, writer.settings))
            if len(pending) >= 2 * workers:
                results = pending.pop(0).result()
                writer.add(results)
                bar.update(len(results))
        for future in pending:
            results = future.result()
            writer.add(results)
            bar.update(len(results))
