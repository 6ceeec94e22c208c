"""Import throughput: FITS -> cutout store + PNG previews, cutouts per second by worker count.

Two workloads on astropy's ``m13.fits`` (300 x 300 int16 with a celestial WCS):

* ``catalog``: ``--n`` cutouts (``--size`` pixels) cut at random catalogue positions on the
  frame (jobs of 128 rows; each worker reads the frame once and keeps it);
* ``files``: ``--n-files`` copies of the file imported as whole images, resized to ``--size``.

Each run writes a fresh store in a temporary folder through the same code as ``amls import
fits`` (asinh stretch). Usage::

    OMP_NUM_THREADS=1 python benchmarks/import_throughput.py --workers 1 2
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import astropy
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from amls_cli import build_parser
from amls_cli import main as amls
from ml_backend.core.store import CutoutStore

M13 = Path(astropy.__file__).parent / "io/fits/hdu/compressed/tests/data/m13.fits"


def make_catalog(path: Path, n: int, seed: int = 0) -> None:
    """n random positions on m13 (ra, dec in degrees), ids c000000..."""
    wcs = WCS(fits.getheader(M13)).celestial
    rng = np.random.default_rng(seed)
    sky = wcs.pixel_to_world(rng.uniform(0, 299, n), rng.uniform(0, 299, n))
    with path.open("w") as fh:
        fh.write("ra,dec,id\n")
        for i, s in enumerate(sky):
            fh.write(f"{s.ra.deg:.8f},{s.dec.deg:.8f},c{i:06d}\n")


def copies(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"m13_{i:05d}.fits" for i in range(n)]
    for path in paths:
        shutil.copyfile(M13, path)
    return paths


def timed_import(args: list[str], store: Path) -> tuple[float, int]:
    start = time.perf_counter()
    status = amls(["import", "fits", *args, "--store", str(store),
                   "--previews", str(store.parent / "previews")])
    elapsed = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"import failed with status {status}")
    with CutoutStore.open(store) as opened:
        return elapsed, len(opened)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="catalogue cutouts")
    parser.add_argument("--n-files", type=int, default=200, help="whole-image files")
    parser.add_argument("--size", type=int, default=64, help="cutout side in pixels")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    build_parser()  # import every room's modules (torch included) before any timing
    with tempfile.TemporaryDirectory(prefix="amls-bench-") as tmp:
        root = Path(tmp)
        make_catalog(root / "cat.csv", args.n)
        files = copies(root / "files", args.n_files)
        print(f"{'workload':<10} {'workers':>7} {'cutouts':>8} {'seconds':>8} {'cutouts/s':>10}")
        for workers in args.workers:
            cases = {
                "catalog": [str(M13), "--catalog", str(root / "cat.csv"),
                            "--size", str(args.size)],
                "files": [*map(str, files), "--size", str(args.size)],
            }
            for name, case in cases.items():
                run = root / f"{name}-{workers}"
                run.mkdir()
                seconds, n = timed_import([*case, "--workers", str(workers)], run / "s.h5")
                print(f"{name:<10} {workers:>7} {n:>8} {seconds:>8.2f} {n / seconds:>10.1f}")


if __name__ == "__main__":
    main()
