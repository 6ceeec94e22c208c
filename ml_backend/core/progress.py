"""Progress bars that show on a terminal and stay quiet in pipes unless verbose."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")

_verbose = False


def set_verbose(verbose: bool) -> None:
    """Force progress bars on (the CLI's -v) even when stderr is not a terminal."""
    global _verbose
    _verbose = verbose


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None,
             desc: str = "", unit: str = "it") -> tqdm:
    """A tqdm bar on stderr, disabled unless stderr is a TTY or verbose mode is on."""
    enabled = _verbose or sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)
