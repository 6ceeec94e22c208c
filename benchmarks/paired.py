"""Paired comparison of two settings over the same (class, seed) runs.

A default changes only when the bootstrap 95 % interval of the mean difference excludes zero
on a whole suite, or when the candidate wins a clear majority of classes and loses none badly,
and never on one seed (`decide`). A majority is clear when a coin toss per class would give
it at most 5 % of the time (a one-sided sign test): 9 of 10 classes, never on 4 (4 of 4 is
6 %), so on a four-class suite only the interval decides. Differences are candidate minus
baseline, so positive means the candidate is better.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# A class "loses badly" when its mean difference is below minus this (AUROC-sized units).
BAD_LOSS = 0.02
# A majority of classes is clear when chance alone gives it at most this often.
MAJORITY_P = 0.05


@dataclass(frozen=True)
class PairedComparison:
    n: int  # pairs
    wins: int  # pairs where the candidate is ahead
    losses: int  # pairs where it is behind
    mean_diff: float  # mean of candidate - baseline
    ci_low: float  # bootstrap 95 % interval of mean_diff (percentile method)
    ci_high: float


def paired_comparison(baseline: Sequence[float], candidate: Sequence[float], *,
                      n_boot: int = 10_000, seed: int = 0) -> PairedComparison:
    """Wins, losses, mean difference and a percentile-bootstrap 95 % interval over pairs.

    baseline[i] and candidate[i] are the same (class, seed) run under the two settings.
    Exact ties count as neither a win nor a loss. Raises ValueError for unequal lengths or no
    pairs.
    """
    base = np.asarray(baseline, dtype=float)
    cand = np.asarray(candidate, dtype=float)
    if base.shape != cand.shape or base.ndim != 1:
        raise ValueError(f"need two equal-length 1-D sequences, got {base.shape} and {cand.shape}")
    if base.size == 0:
        raise ValueError("no pairs to compare")
    diff = cand - base
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(n_boot, diff.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return PairedComparison(n=int(diff.size), wins=int((diff > 0).sum()),
                            losses=int((diff < 0).sum()), mean_diff=float(diff.mean()),
                            ci_low=float(low), ci_high=float(high))


def decide(pairs: PairedComparison, class_diffs: Sequence[float], min_seeds: int = 2) -> str:
    """"better", "worse" or "undecided" for the candidate on a suite.

    class_diffs: the mean difference of each class over its seeds; min_seeds: the fewest
    seeds any class has. "better" when the interval lies above zero, or when a clear majority
    of the classes is ahead (`clear_majority_size`) and none is behind by more than BAD_LOSS;
    "worse" when the interval lies below zero or the mirror holds; always "undecided" on
    fewer than 2 seeds.
    """
    if min_seeds < 2:
        return "undecided"
    diffs = np.asarray(class_diffs, dtype=float)
    if pairs.ci_low > 0 or _clear_majority(diffs):
        return "better"
    if pairs.ci_high < 0 or _clear_majority(-diffs):
        return "worse"
    return "undecided"


def clear_majority_size(n_classes: int) -> int | None:
    """The fewest classes ahead, of `n_classes`, that a fair coin per class reaches at most
    MAJORITY_P of the time (one-sided sign test); None when no count is that rare."""
    for k in range(n_classes + 1):
        if sum(math.comb(n_classes, j) for j in range(k, n_classes + 1)) / 2**n_classes \
                <= MAJORITY_P:
            return k
    return None


def _clear_majority(diffs: np.ndarray) -> bool:
    needed = clear_majority_size(diffs.size)
    return (needed is not None and int((diffs > 0).sum()) >= needed
            and diffs.min() >= -BAD_LOSS)
