"""A resizable HDF5 column of UTF-8 strings that an SWMR writer may append to.

Stored as two datasets, ``<name>/data`` (uint8, the concatenated UTF-8 bytes) and
``<name>/ends`` (int64, end offset of each row): the HDF5 SWMR writer may not append to
variable-length strings. The cutout store keeps its ids, sources and HDUs this way.
"""

from __future__ import annotations

from collections.abc import Sequence

import h5py
import numpy as np


class TextColumn:
    """A resizable column of UTF-8 strings: concatenated bytes plus end offsets."""

    def __init__(self, group: h5py.Group) -> None:
        self.data: h5py.Dataset = group["data"]
        self.ends: h5py.Dataset = group["ends"]

    @staticmethod
    def create(parent: h5py.Group, name: str) -> None:
        group = parent.create_group(name)
        group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.uint8,
                             chunks=(65536,), compression="lzf")
        group.create_dataset("ends", shape=(0,), maxshape=(None,), dtype=np.int64,
                             chunks=(8192,), compression="lzf")

    def __len__(self) -> int:
        return self.ends.shape[0]

    def refresh(self) -> None:
        self.data.refresh()
        self.ends.refresh()

    def all(self) -> list[str]:
        return self.span(0, len(self))

    def span(self, start: int, stop: int) -> list[str]:
        """Rows start..stop-1 as strings."""
        if stop <= start:
            return []
        ends = self.ends[start:stop]
        first = int(self.ends[start - 1]) if start > 0 else 0
        raw = self.data[first:int(ends[-1])].tobytes()
        offsets = np.concatenate([[0], ends - first])
        return [raw[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:], strict=True)]

    def get(self, indices: np.ndarray) -> list[str]:
        """Rows at `indices` (any order) by reading the span that covers them."""
        if len(indices) == 0:
            return []
        lo, hi = int(indices.min()), int(indices.max())
        rows = self.span(lo, hi + 1)
        return [rows[i - lo] for i in indices]

    def append(self, values: Sequence[str], n_rows: int) -> None:
        """Write `values` as rows n_rows, n_rows + 1, ... (overwriting anything beyond)."""
        encoded = [v.encode("utf-8") for v in values]
        start = int(self.ends[n_rows - 1]) if n_rows > 0 else 0
        lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
        blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.data.resize((start + blob.size,))
        self.data[start:] = blob
        self.ends.resize((n_rows + len(encoded),))
        self.ends[n_rows:] = start + np.cumsum(lengths)

    def truncate(self, n_rows: int) -> None:
        end = int(self.ends[n_rows - 1]) if n_rows > 0 else 0
        self.ends.resize((n_rows,))
        self.data.resize((end,))
