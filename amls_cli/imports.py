"""`amls import fits | hdf5 | zarr | images | push | labels`: data in; tasks and labels out."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from import_tools import cutana_reader, fits_reader, plan
from import_tools.labels import import_labels, write_label_report
from import_tools.pipeline import Output, Settings, Writer, open_existing, run_jobs
from import_tools.push import push
from import_tools.report import ImportSummary, write_report
from ml_backend.config import Config
from ml_backend.core.config import INVARIANCES
from ml_backend.core.stretch import make_stretch, parse_stretch_params
from ml_backend.labelstudio import LabelStudioClient
from ml_backend.task_rows import SKY_VIEWERS

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `amls import ...` to the `amls` parser."""
    parser = sub.add_parser("import", help="import FITS / HDF5 / Zarr / image folders; push tasks",
                            description="Import survey data as a cutout store + PNG previews "
                                        "+ Label Studio tasks, or push those tasks.")
    kinds = parser.add_subparsers(dest="import_kind", required=True, metavar="KIND")

    fits_p = kinds.add_parser("fits", help="FITS images or catalogue cutouts from frames")
    fits_p.add_argument("files", nargs="+", type=Path, help="FITS files (or frames)")
    fits_p.add_argument("--catalog", type=Path,
                        help="CSV ra,dec[,size][,id] (ICRS degrees, pixels): cut these "
                             "positions")
    fits_p.add_argument("--hdu", help="HDU index or name, or a comma list for channels "
                                      "(SCI,ERR,DQ; a repeated name means EXTVER 1, 2, ...)")
    fits_p.add_argument("--files-per-object", type=int, default=1, metavar="N",
                        help="N consecutive files form one object, one channel each")
    _add_common(fits_p, stretch_default="asinh")
    fits_p.set_defaults(func=_cmd_fits)

    for kind in ("hdf5", "zarr"):
        arr = kinds.add_parser(kind, help=f"an {kind.upper()} image stack or group-per-image file")
        arr.add_argument("path", type=Path)
        arr.add_argument("--dataset", help="dataset (N,H,W[,C]) or group of per-image groups")
        arr.add_argument("--ids", dest="ids_path", help="dataset of N ids")
        arr.add_argument("--image-key", default="Img",
                         help="image dataset inside each per-image group (default Img)")
        _add_common(arr, stretch_default="none")
        arr.set_defaults(func=_cmd_array, kind=kind)

    cutana = kinds.add_parser(
        "cutana", help="cutouts made by ESA's Cutana (zarr output)",
        description="Import the zarr output of ESA's Cutana (its output_dir, holding "
        "batch_*/images.zarr, or one images.zarr; images_to_zarr stores read the same). Ids, "
        "RA and Dec come from each store's <name>_metadata.parquet (needs pyarrow: the [esa] "
        "extra). --stretch auto keeps Cutana's normalisation: none for uint8, unit (x255) for "
        "floats in [0, 1], asinh for unnormalised fluxes.")
    cutana.add_argument("path", type=Path, help="Cutana output_dir or an images.zarr")
    cutana.add_argument("--layout", choices=cutana_reader.LAYOUTS, default="auto",
                        help="axis order of the images array: nhwc (Cutana), nchw "
                        "(images_to_zarr on files), or auto (default) from its shape")
    _add_common(cutana, stretch_default="auto")
    cutana.set_defaults(func=_cmd_cutana)

    images = kinds.add_parser("images", help="a PNG / JPEG / TIFF folder tree")
    images.add_argument("directory", type=Path)
    images.add_argument("--channels", type=int, default=3, choices=(1, 3))
    images.add_argument("--positions", type=Path, metavar="CSV",
                        help="id,ra,dec (ICRS degrees) per image, id = its path below the folder "
                        "without extension: fills the tasks' RA/Dec and sky link")
    _add_common(images, stretch_default=None)
    images.set_defaults(func=_cmd_images)

    _register_push(kinds)
    _register_labels(kinds)


def _add_common(parser: argparse.ArgumentParser, *, stretch_default: str | None) -> None:
    parser.add_argument("--store", type=Path, required=True, help="cutout store (.h5)")
    parser.add_argument("--previews", type=Path, required=True, help="PNG preview folder")
    parser.add_argument("--document-root", type=Path,
                        help="LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (default: previews' parent)")
    parser.add_argument("--url-prefix", help="preview URL prefix for cloud storage instead")
    parser.add_argument("--size", type=int, help="cutout size in pixels (N x N)")
    if stretch_default is not None:
        parser.add_argument("--stretch", default=stretch_default,
                            help="none, linear, log, asinh, zscale, or ESA fitsbolt's "
                            "fitsbolt-linear, -log, -asinh, -zscale, -midtones (default "
                            f"{stretch_default})")
        parser.add_argument("--stretch-param", action="append", metavar="KEY=VALUE",
                            help="stretch parameter, e.g. a=0.1 (repeatable)")
    parser.add_argument("--sky-viewer", default="esasky", choices=[*SKY_VIEWERS, "none"],
                        help="where each task's `sky` link (tasks with RA/Dec) points "
                        "(default esasky)")
    parser.add_argument("--preview-stretch", default="none",
                        help="display stretch of the preview PNGs only (the store keeps what "
                        "the model sees): any --stretch name; e.g. log for "
                        "radio or X-ray cutouts on a black sky (default none)")
    parser.add_argument("--preview-stretch-param", action="append", metavar="KEY=VALUE",
                        help="preview stretch parameter, e.g. a=100 (repeatable)")
    parser.add_argument("--preview-crop", type=float, default=1.0, metavar="FRACTION",
                        help="frame the previews on the central FRACTION of each side, as "
                        "AMLS_CENTER_CROP frames what the model sees; the whole cutout is "
                        "written to <previews>/full-field/ and linked from each task "
                        "(default 1: the whole cutout)")
    parser.add_argument("--invariance", choices=INVARIANCES,
                        help="what training on these images should treat as the same image: "
                        "dihedral (flips and 90° rotations: sky cutouts, the default for a new "
                        "store) or flip (left-right flips only: photographs of upright objects)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--allow-failures", action="store_true",
                        help="exit 0 even when some items failed")
    parser.add_argument("--report", type=Path,
                        help="failure report, JSON lines (default: <store>.report.jsonl)")


def _finish(args: argparse.Namespace, summary: ImportSummary) -> int:
    report = args.report or args.store.with_name(args.store.name + ".report.jsonl")
    write_report(report, summary.failures)
    print(summary.line())
    for failure in summary.failures[:5]:
        print(f"  failed: {failure.file} {failure.item}: {failure.reason}")
    if summary.failed:
        print(f"  ({summary.failed} failures in {report})")
    return 1 if summary.failed and not args.allow_failures else 0


def _stretch_spec(args: argparse.Namespace) -> dict:
    spec = parse_stretch_params(args.stretch, args.stretch_param)
    return make_stretch(spec).spec  # validates before any work starts


def _preview_spec(args: argparse.Namespace) -> dict:
    spec = parse_stretch_params(args.preview_stretch, args.preview_stretch_param)
    return make_stretch(spec).spec


def _preview_crop(args: argparse.Namespace) -> float:
    if not 0 < args.preview_crop <= 1:
        raise ValueError(f"--preview-crop must be in (0, 1] (1 = whole cutout), got "
                         f"{args.preview_crop}")
    return args.preview_crop


def _square(size: int | None) -> tuple[int, int] | None:
    if size is not None and size < 1:
        raise ValueError(f"--size must be >= 1, got {size}")
    return None if size is None else (size, size)


def _resolve_size(args: argparse.Namespace, store_shape: tuple[int, ...] | None,
                  fallback: tuple[int, int] | None) -> tuple[int, int]:
    wanted = _square(args.size)
    if store_shape is not None:
        if wanted is not None and wanted != tuple(store_shape[:2]):
            raise ValueError(f"--size {args.size} differs from store {args.store}'s "
                             f"{store_shape[0]}x{store_shape[1]}; a store holds one size")
        return (int(store_shape[0]), int(store_shape[1]))
    size = wanted or fallback
    if size is None:
        raise ValueError("cannot tell the cutout size: pass --size")
    return size


def _run(args: argparse.Namespace, spec: dict, build) -> int:
    """Open the store, plan with `build(existing, store_shape)`, run, report."""
    preview = _preview_spec(args)
    crop = _preview_crop(args)
    store = open_existing(args.store, spec, args.invariance, preview, crop)
    try:
        existing = set(store.ids()) if store is not None else set()
        shape = store.shape if store is not None else None
        work, size = build(existing, shape)
    except BaseException:
        if store is not None:
            store.close()
        raise
    output = Output(store=args.store, previews=args.previews,
                    document_root=args.document_root, url_prefix=args.url_prefix,
                    sky_viewer=args.sky_viewer)
    settings = Settings(stretch=spec, size=size, previews=args.previews,
                        invariance=args.invariance or "dihedral", preview_stretch=preview,
                        preview_crop=crop)
    writer = Writer(output, settings, store)
    summary = run_jobs(work.jobs, writer, workers=args.workers, total=work.n_items)
    summary.skipped += work.skipped
    summary.failures[:0] = work.failures
    return _finish(args, summary)


def _cmd_fits(args: argparse.Namespace) -> int:
    spec = _stretch_spec(args)
    keys = fits_reader.parse_hdu_spec(args.hdu)
    if args.files_per_object < 1:
        raise ValueError(f"--files-per-object must be >= 1, got {args.files_per_object}")

    def build(existing, shape):
        if args.catalog is None:
            work = plan.fits_image_plan(args.files, keys, args.files_per_object, existing)
            fallback = None
            if shape is None and args.size is None:
                # None when no file reads: then every job fails per item and no store is made
                fallback = fits_reader.first_shape([job.paths for job in work.jobs], keys)
                fallback = fallback or (1, 1)
            return work, _resolve_size(args, shape, fallback)
        rows = fits_reader.read_catalog(args.catalog)
        sizes = [r.size for r in rows if r.size]
        size = _resolve_size(args, shape, (sizes[0], sizes[0]) if sizes else None)
        groups = [tuple(args.files[i:i + args.files_per_object])
                  for i in range(0, len(args.files), args.files_per_object)]
        return plan.fits_catalog_plan(groups, keys, rows, size[0], existing), size

    return _run(args, spec, build)


def _cmd_array(args: argparse.Namespace) -> int:
    spec = _stretch_spec(args)

    def build(existing, shape):
        work, stack_size = plan.array_plan(args.kind, args.path, args.dataset, args.ids_path,
                                           args.image_key, existing)
        fallback = stack_size
        if fallback is None and shape is None and args.size is None:
            fallback = plan.first_group_shape(args.kind, args.path, work.jobs)
        return work, _resolve_size(args, shape, fallback)

    return _run(args, spec, build)


def _cmd_cutana(args: argparse.Namespace) -> int:
    batches = [cutana_reader.inspect_batch(store, args.layout)
               for store in cutana_reader.find_batches(args.path)]
    if args.stretch == "auto":
        first = next((b for b in batches if b.ids), batches[0])
        args.stretch = cutana_reader.default_stretch(first)
        log.info("cutana: stretch %s for %s pixels", args.stretch, first.dtype)
    spec = _stretch_spec(args)
    sizes = {b.hwc[:2] for b in batches if b.ids}
    if len(sizes) > 1 and args.size is None:
        raise ValueError(f"{args.path}: stores hold cutouts of sizes {sorted(sizes)}; pass "
                         "--size to resize them to one")

    def build(existing, shape):
        fallback = next(iter(sizes)) if sizes else None
        return plan.cutana_plan(batches, existing), _resolve_size(args, shape, fallback)

    return _run(args, spec, build)


def _cmd_images(args: argparse.Namespace) -> int:
    from import_tools.images import import_image_folder, read_positions

    output = Output(store=args.store, previews=args.previews,
                    document_root=args.document_root, url_prefix=args.url_prefix,
                    sky_viewer=args.sky_viewer)
    summary = import_image_folder(args.directory, output, size=args.size,
                                  channels=args.channels, invariance=args.invariance,
                                  preview_stretch=_preview_spec(args),
                                  preview_crop=_preview_crop(args),
                                  positions=read_positions(args.positions) if args.positions
                                  else None)
    return _finish(args, summary)


def _register_labels(kinds: argparse._SubParsersAction) -> None:
    """Add `amls import labels`."""
    p = kinds.add_parser(
        "labels", help="annotate tasks from an id,label CSV (e.g. esa/AnomalyMatch's)",
        description="Each id,label row (label anomaly or normal) annotates the project's task "
        "whose cutout_id is that id. Tasks already labelled are left alone (a different "
        "label is reported as a conflict, never overwritten); a second run creates nothing. "
        "Ids without a task and conflicts go to the report. Exit status 1 when some rows "
        "were not imported (0 with --allow-failures).")
    p.add_argument("labels", type=Path, metavar="LABELS.csv")
    p.add_argument("--project", type=int, required=True, help="Label Studio project id")
    p.add_argument("--report", type=Path,
                   help="rows not imported, CSV (default: <LABELS>.not-imported.csv)")
    p.add_argument("--allow-failures", action="store_true",
                   help="exit 0 even when some rows were not imported")
    p.set_defaults(func=_cmd_labels)


def _cmd_labels(args: argparse.Namespace) -> int:
    cfg = Config.from_env()
    if not cfg.label_studio_url or not cfg.label_studio_api_key:
        raise ValueError("amls import labels needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
    client = LabelStudioClient(cfg.label_studio_url, cfg.label_studio_api_key)
    outcome = import_labels(client, args.project, args.labels, anomaly_label=cfg.anomaly_label)
    print(outcome.line())
    missed = outcome.unmatched + outcome.conflicts
    if not missed:
        return 0
    report = args.report or args.labels.with_name(args.labels.stem + ".not-imported.csv")
    write_label_report(report, outcome)
    print(f"  not imported: {', '.join(missed[:5])}{' ...' if len(missed) > 5 else ''} "
          f"({len(missed)} rows in {report})")
    return 0 if args.allow_failures else 1


def _register_push(kinds: argparse._SubParsersAction) -> None:
    """Add `amls import push`."""
    p = kinds.add_parser("push", help="create Label Studio tasks from imported stores")
    p.add_argument("--project", type=int, required=True, help="Label Studio project id")
    p.add_argument("--store", type=Path, action="append", required=True, dest="stores",
                   help="cutout store whose <store>.tasks.jsonl to push (repeatable)")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--with-predictions", type=Path, metavar="MODEL_DIR",
                   help="score the stores with this model and attach predictions")
    p.add_argument("--anomaly-label", default="anomaly",
                   help="choice value meaning anomaly in the label config (default anomaly)")
    p.add_argument("--document-root", type=Path,
                   help="LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, to register local-files storage "
                        "(default: the environment variable, if set)")
    p.add_argument("--url", help="Label Studio URL (default: $LABEL_STUDIO_URL)")
    p.add_argument("--api-key", help="API token (default: $LABEL_STUDIO_API_KEY)")
    p.set_defaults(func=_cmd_push)


def _cmd_push(args: argparse.Namespace) -> int:
    cfg = Config.from_env()
    url = args.url or cfg.label_studio_url
    key = args.api_key or cfg.label_studio_api_key
    if not url or not key:
        raise ValueError("need --url/--api-key or LABEL_STUDIO_URL and "
                         "LABEL_STUDIO_API_KEY")
    root = args.document_root or cfg.local_files_root
    client = LabelStudioClient(url, key)
    summary = push(client, args.project, args.stores, batch_size=args.batch_size,
                   document_root=Path(root) if root else None,
                   model_dir=args.with_predictions, anomaly_label=args.anomaly_label,
                   prelabel=cfg.prelabel)
    print(summary.line())
    return 0
