"""HDF5 and Zarr input: image stacks ``(N, H, W)`` / ``(N, H, W, C)`` or one group per image.

Stacks are read in index ranges, so memory stays bounded whatever N is. Ids come from an ids
dataset (``--ids``: strings, bytes or integers, length N) or default to
``<file stem>_<index:06d>``.

Group-per-image layout (e.g. firstgalaxydata's HDF5): ``--dataset`` names a group (default:
the root) whose member groups each hold an image dataset (``--image-key``, default ``Img``).
The member name is the id; attributes ``RA`` / ``DEC`` (any case, degrees) give coordinates.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

Kind = Literal["hdf5", "zarr"]


class ArrayInputError(ValueError):
    """An HDF5 / Zarr input that cannot be read as images; the message names file and path."""


@dataclass(frozen=True)
class ArrayItem:
    """One image ``(H, W, C)`` (any real dtype) with its id, position in the file and coords."""

    id: str
    pixels: np.ndarray
    where: str
    ra: float | None = None
    dec: float | None = None


@contextmanager
def open_container(kind: Kind, path: Path) -> Iterator[Any]:
    """An open h5py File or zarr group/array (read-only); ArrayInputError if unreadable."""
    if kind == "hdf5":
        try:
            handle = h5py.File(path, "r")
        except OSError as err:
            raise ArrayInputError(f"{path}: not a readable HDF5 file ({err})") from err
        with handle:
            yield handle
        return
    import zarr

    try:
        yield zarr.open(str(path), mode="r")
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise ArrayInputError(f"{path}: not a readable Zarr store ({err})") from err


def _member(root: Any, name: str | None, path: Path) -> Any:
    if name in (None, "", "/"):
        return root
    try:
        return root[name.strip("/")]
    except KeyError:
        raise ArrayInputError(f"{path}: no dataset or group {name!r}") from None


def _is_array(node: Any) -> bool:
    return hasattr(node, "shape") and hasattr(node, "dtype")


@dataclass(frozen=True)
class StackLayout:
    """A dataset of N images; ``ids[i]`` names image i."""

    dataset: str
    ids: tuple[str, ...]


@dataclass(frozen=True)
class GroupLayout:
    """A group whose members ``names`` each hold an image dataset ``image_key``."""

    group: str
    names: tuple[str, ...]
    image_key: str


def inspect(kind: Kind, path: Path, dataset: str | None, ids_path: str | None,
            image_key: str = "Img") -> StackLayout | GroupLayout:
    """Work out the layout and the ids without reading any image."""
    with open_container(kind, path) as root:
        node = _member(root, dataset, path)
        if _is_array(node):
            return StackLayout(dataset=dataset or "", ids=_stack_ids(root, node, ids_path, path))
        names = tuple(sorted(k for k in node
                             if not _is_array(node[k]) and image_key in node[k]))
        if not names:
            raise ArrayInputError(f"{path}: {dataset or '/'} is a group without member groups "
                                  f"holding {image_key!r}; pass --dataset for an image stack")
        return GroupLayout(group=dataset or "", names=names, image_key=image_key)


def _stack_ids(root: Any, node: Any, ids_path: str | None, path: Path) -> tuple[str, ...]:
    if node.ndim not in (3, 4):
        raise ArrayInputError(f"{path}: dataset has shape {node.shape}; need (N, H, W) or "
                              "(N, H, W, C)")
    n = node.shape[0]
    if ids_path is None:
        return tuple(f"{path.stem}_{i:06d}" for i in range(n))
    raw = np.asarray(_member(root, ids_path, path)[...]).reshape(-1)
    if raw.size != n:
        raise ArrayInputError(f"{path}: ids {ids_path!r} has {raw.size} entries for {n} images")
    ids = tuple(v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in raw.tolist())
    if len(set(ids)) != n:
        raise ArrayInputError(f"{path}: ids {ids_path!r} has repeated values")
    return ids


def _as_hwc(array: np.ndarray, where: str) -> np.ndarray:
    if array.size == 0:
        raise ArrayInputError(f"{where}: zero-size image {array.shape}")
    if array.ndim == 2:
        return array[..., None]
    if array.ndim == 3:
        return array
    raise ArrayInputError(f"{where}: image has shape {array.shape}; need (H, W) or (H, W, C)")


def read_stack(kind: Kind, path: Path, dataset: str, indices: Sequence[int],
               ids: Sequence[str]) -> Iterator[ArrayItem | ArrayInputError]:
    """Images at sorted ``indices`` of a stack (named ``ids``), read as one spanning slice."""
    if not indices:
        return
    with open_container(kind, path) as root:
        node = _member(root, dataset, path)
        lo, hi = indices[0], indices[-1] + 1
        block = np.asarray(node[lo:hi])
        for i, cid in zip(indices, ids, strict=True):
            where = f"{dataset or '/'}[{i}]"
            try:
                pixels = _as_hwc(block[i - lo], f"{path}: {where}")
            except ArrayInputError as err:
                yield err
                continue
            yield ArrayItem(id=cid, pixels=pixels, where=where)


def read_groups(kind: Kind, path: Path, group: str, image_key: str,
                names: Sequence[str]) -> Iterator[ArrayItem | ArrayInputError]:
    """Images of the named member groups, with RA / DEC attributes when present."""
    with open_container(kind, path) as root:
        parent = _member(root, group, path)
        for name in names:
            where = f"{group.rstrip('/')}/{name}/{image_key}"
            try:
                node = parent[name][image_key]
                pixels = _as_hwc(np.asarray(node[...]), f"{path}: {where}")
            except (KeyError, OSError, ArrayInputError) as err:
                yield ArrayInputError(f"{path}: {where}: {err}")
                continue
            ra, dec = _coords(dict(node.attrs) | dict(parent[name].attrs))
            yield ArrayItem(id=name, pixels=pixels, where=where, ra=ra, dec=dec)


def _coords(attrs: dict[str, Any]) -> tuple[float | None, float | None]:
    lower = {k.lower(): v for k, v in attrs.items()}
    try:
        ra, dec = float(lower["ra"]), float(lower["dec"])
    except (KeyError, TypeError, ValueError):
        return None, None
    return ra, dec
