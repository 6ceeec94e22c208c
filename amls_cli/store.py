"""`amls store build | info`: a cutout store from an image folder, and what a store holds."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ml_backend.core.config import INVARIANCES

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `amls store build` and `amls store info` to the `amls` parser."""
    parser = sub.add_parser("store", help="build a cutout store from images; describe a store",
                            description="Cutout stores: one HDF5 file of uint8 images with ids.")
    actions = parser.add_subparsers(dest="store_action", required=True, metavar="ACTION")

    build = actions.add_parser(
        "build", help="add a PNG / JPEG / TIFF folder tree to a store",
        description="Add every PNG / JPEG / TIFF under IMAGES_DIR (recursively) to STORE.h5, "
        "creating it if needed. Ids are relative paths without extension. Images already in "
        "the store are skipped, so re-running is safe. 16-bit images are scaled to 8 bits by "
        "their own min and max.")
    build.add_argument("images_dir", metavar="IMAGES_DIR", help="folder of images")
    build.add_argument("-o", "--output", required=True, metavar="STORE.h5",
                       help="store to create or append to")
    build.add_argument("--size", type=_positive_int, default=None, metavar="S",
                       help="resize to S x S pixels (default: the first image's size)")
    build.add_argument("--channels", type=int, choices=(1, 3), default=3,
                       help="1 = grey, 3 = RGB (default 3)")
    build.add_argument("--compression", choices=("lzf", "gzip", "none"), default="lzf",
                       help="image compression of a new store (default lzf; 'none' reads "
                       "fastest for noisy cutouts that barely compress)")
    build.add_argument("--invariance", choices=INVARIANCES,
                       help="recorded for training: dihedral (sky cutouts; default for a new "
                       "store) or flip (photographs of upright objects)")
    build.add_argument("--skip-bad", action="store_true",
                       help="exit with status 0 even if some files could not be read")
    build.set_defaults(func=run_build)

    info = actions.add_parser("info", help="print a store's count, shape and stretch as JSON")
    info.add_argument("store", metavar="STORE.h5")
    info.set_defaults(func=run_info)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def run_build(args: argparse.Namespace) -> int:
    """Build; print a summary line (and each failed file); status 1 on failures."""
    from ml_backend.core.image_folder import BuildFailed, build_store_from_folder

    try:
        report = build_store_from_folder(args.images_dir, args.output, size=args.size,
                                         channels=args.channels, skip_bad=args.skip_bad,
                                         compression=args.compression,
                                         invariance=args.invariance)
    except BuildFailed as err:
        report = err.report
    for path, reason in report.failed:
        sys.stdout.write(f"failed: {path}: {reason}\n")
    sys.stdout.write(f"{args.output}: {report.summary()}\n")
    return 1 if report.failed and not args.skip_bad else 0


def run_info(args: argparse.Namespace) -> int:
    """Print {"path", "count", "shape", "channels", "stretch", "invariance", "created"}."""
    from ml_backend.core.store import CutoutStore

    with CutoutStore.open(args.store) as store:
        info = {"path": str(store.path), "count": len(store), "shape": list(store.shape),
                "channels": store.channels, "stretch": store.stretch,
                "invariance": store.invariance, "created": store.created}
    sys.stdout.write(json.dumps(info) + "\n")
    return 0
