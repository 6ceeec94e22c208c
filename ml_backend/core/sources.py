"""Image sources: anything that reads uint8 images `(N, H, W, C)` by row, and a prefetching
batch reader over them. The cutout store (`ml_backend.core.store`) is one; in-memory arrays and
row subsets of a store are the others.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class ImageSource(Protocol):
    """Anything that holds uint8 images `(N, H, W, C)` addressable by row index."""

    def __len__(self) -> int: ...

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray: ...


def as_index_array(indices: Sequence[int] | np.ndarray, n: int, where: str) -> np.ndarray:
    """`indices` as int64 row numbers, each in [0, n); TypeError / IndexError naming `where`."""
    raw = np.asarray(indices)
    if raw.dtype == bool or (raw.size and not np.issubdtype(raw.dtype, np.integer)):
        raise TypeError(f"indices for {where} must be integers, got dtype {raw.dtype}")
    idx = raw.astype(np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        bad = idx[(idx < 0) | (idx >= n)][:5].tolist()
        raise IndexError(f"indices {bad} out of range for {where} with {n} rows")
    return idx


_DONE = object()


def prefetch_batches(source: ImageSource, batch_size: int,
                     indices: Sequence[int] | np.ndarray | None = None,
                     prefetch: int = 2) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`(indices, images)` batches of any :class:`ImageSource`, read ahead by a thread.

    `indices` (default all rows) are visited in the order given. At most `prefetch` batches
    wait in memory; reader errors are raised in the consumer; stopping early stops the thread.
    """
    if batch_size < 1 or prefetch < 1:
        raise ValueError(f"batch_size and prefetch must be >= 1, got {batch_size}, {prefetch}")
    order = (np.arange(len(source), dtype=np.int64) if indices is None
             else np.asarray(indices, dtype=np.int64).reshape(-1))
    batches = [order[i:i + batch_size] for i in range(0, order.size, batch_size)]
    ready: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            for batch in batches:
                if not put((batch, source.read(batch))):
                    return
        except BaseException as err:  # handed to the consumer, which re-raises it
            put(err)
            return
        put(_DONE)

    thread = threading.Thread(target=reader, name="store-prefetch", daemon=True)
    return _consume(thread, ready, stop)


def _consume(thread: threading.Thread, ready: queue.Queue[Any],
             stop: threading.Event) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class ArraySource:
    """An in-memory uint8 array `(N, H, W, C)` as an :class:`ImageSource`.

    `stretch` records how the pixels were made, as for a store (default ``{"name": "none"}``).
    """

    def __init__(self, images: np.ndarray, stretch: dict[str, Any] | None = None) -> None:
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} "
                             f"{images.shape}")
        self.images = images
        self.stretch: dict[str, Any] = dict(stretch or {"name": "none"})

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        return self.images[as_index_array(indices, len(self), "ArraySource")]

    def iter_batches(self, batch_size: int, *, indices: Sequence[int] | np.ndarray | None = None,
                     prefetch: int = 2) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return prefetch_batches(self, batch_size, indices, prefetch)


class StoreSubset:
    """Rows `indices` of a store as an :class:`ImageSource`: `read(i)` reads store row
    `indices[i]`; `store_indices(i)` maps subset positions to store rows."""

    def __init__(self, store: ImageSource, indices: Sequence[int] | np.ndarray) -> None:
        self.store = store
        self.indices = as_index_array(indices, len(store), "StoreSubset")

    def __len__(self) -> int:
        return self.indices.size

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.store.shape  # type: ignore[attr-defined,no-any-return]

    @property
    def stretch(self) -> dict[str, Any]:
        return self.store.stretch  # type: ignore[attr-defined,no-any-return]

    def store_indices(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        return self.indices[as_index_array(positions, len(self), "StoreSubset")]

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        return self.store.read(self.store_indices(indices))

    def iter_batches(self, batch_size: int, *, indices: Sequence[int] | np.ndarray | None = None,
                     prefetch: int = 2) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return prefetch_batches(self, batch_size, indices, prefetch)
