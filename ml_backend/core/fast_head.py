"""Seconds-fast rankings from cached embeddings: a refit linear head, and "more like this".

The instant re-ranking fits a class-balanced, L2-regularised logistic regression on the
pooled features (`model.pooled_features`) of the labelled tasks and scores every other task
with it: a few hundred labels and 100,000 cached embeddings take well under a second, against
minutes for a FixMatch cycle. Features are standardised with the statistics of the
embeddings given at fit time (labelled and unlabelled alike; at most 16,384 evenly spaced
rows), so rare directions of the unlabelled pool count as much as common ones.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression  # at import: a job's first fit stays fast
from torch import nn

# Inverse L2 strength of the logistic regression on standardised features (benchmarks/RESULTS.md,
# "Instant re-ranking": chosen over 0.01..1 on both suites).
DEFAULT_C = 0.1
# Rows converted to float32 at a time when scoring a float16 cache.
_CHUNK = 32_768
# Rows the standardisation statistics are taken from.
_MOMENT_ROWS = 16_384
# Quantiles of the project's logits a blend shares with its model (`blend_with_model`).
_ANCHORS = (0.5, 0.99)


@dataclass(frozen=True)
class FastHead:
    """A fitted linear head over standardised features; `scores` gives anomaly probabilities."""

    mean: np.ndarray  # (D,) float32
    scale: np.ndarray  # (D,) float32, > 0
    weights: np.ndarray  # (D,) float32
    bias: float
    n_anomalies: int
    n_normals: int

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Anomaly probabilities (n,) float32 of feature rows (float16 or float32, memmap ok)."""
        return torch.sigmoid(self._logits(features).clamp(-60.0, 60.0)).numpy()

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Anomaly logits (n,) float32 of feature rows (what `scores` passes through a sigmoid)."""
        return self._logits(features).numpy()

    def _logits(self, features: np.ndarray) -> torch.Tensor:
        features = _check_features(features, len(self.weights))
        w = torch.from_numpy(self.weights / self.scale)
        b = self.bias - float(self.mean @ (self.weights / self.scale))
        return torch.cat([block @ w for block in _float_blocks(features)]) + b


def fit_fast_head(features: np.ndarray, labelled: np.ndarray, labels: np.ndarray, *,
                  c: float = DEFAULT_C, seed: int = 0) -> FastHead:
    """Fit the head on `features[labelled]` with 0/1 `labels` (1 = anomaly).

    `features`: (n, D) embeddings of the whole project (their mean and spread standardise the
    inputs); `labelled`: row indices into it. Classes are weighted to balance, so one anomaly
    among hundreds of normals still moves the ranking. Raises ValueError without at least one
    anomaly and one normal, or on NaN/infinite features.
    """
    features = _check_features(features)
    labelled = np.asarray(labelled, dtype=np.int64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if len(labelled) != len(labels):
        raise ValueError(f"{len(labelled)} labelled rows but {len(labels)} labels")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 (normal) or 1 (anomaly), got {np.unique(labels)}")
    n_anomalies, n_normals = int(labels.sum()), int((labels == 0).sum())
    if n_anomalies == 0 or n_normals == 0:
        raise ValueError(f"a ranking head needs at least one anomaly and one normal label; "
                         f"has {n_anomalies} anomalies and {n_normals} normals")
    if c <= 0:
        raise ValueError(f"c must be > 0, got {c}")
    mean, scale = _moments(features)
    x = (np.asarray(features[labelled], dtype=np.float32) - mean) / scale
    if not np.isfinite(x).all():
        raise ValueError("the labelled embeddings contain NaN or infinity")
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=seed)
    model.fit(x, labels.astype(np.int64))
    return FastHead(mean=mean, scale=scale, weights=model.coef_[0].astype(np.float32),
                    bias=float(model.intercept_[0]), n_anomalies=n_anomalies,
                    n_normals=n_normals)


def install_head(model: nn.Module, head: FastHead) -> None:
    """Make the model's 2-way classifier compute the fast head: softmax(logits)[anomaly] =
    sigmoid(w·(f − mean)/scale + b) for pooled features f."""
    from ml_backend.core.model import ANOMALY_INDEX

    classifier = model.get_classifier()
    w = torch.as_tensor(head.weights / head.scale, dtype=classifier.weight.dtype)
    b = head.bias - float(head.mean @ (head.weights / head.scale))
    with torch.no_grad():
        classifier.weight.zero_()
        classifier.bias.zero_()
        classifier.weight[ANOMALY_INDEX] = w
        classifier.bias[ANOMALY_INDEX] = b


def blend_with_model(head: FastHead, weight: np.ndarray, bias: float, features: np.ndarray,
                     *, imagenet: tuple[FastHead, np.ndarray] | None = None) -> FastHead:
    """One linear head that ranks by the mean of the model's own anomaly logit
    (`weight · f + bias`) and `head`'s, each standardised to mean 0 and spread 1 over
    `features` (at most _MOMENT_ROWS evenly spaced rows), so neither dominates by its scale;
    that mean is then mapped onto the model's own logit scale by the increasing affine map
    that puts its median and its top-1 % boundary (99th percentile) over the same rows where
    the model's are, so the blend's scores read like the model's: the bulk of the project
    stays near the model's low scores instead of at 0.5, and the top of the queue reads as
    the model's top does (benchmarks/RESULTS.md, "Session 12"). The ranking is the mean's.

    `imagenet`: a third term, (a head fitted on the same tasks' ImageNet embeddings, those
    embeddings row for row with `features`); the blend then reads the two embeddings side
    by side, [f, g], and ranks by the mean of three standardised logits (benchmarks/RESULTS.md,
    "Session 19": ahead of the two-term blend on FIRST).

    Every logit is linear in the pooled features, so the blend is too: it installs as a
    classifier like the head itself. (D,) `weight`: the model's anomaly-minus-normal row.
    """
    features = _check_features(features, len(head.weights))
    weight = np.asarray(weight, dtype=np.float64).reshape(-1)
    if weight.shape != head.weights.shape:
        raise ValueError(f"model weight has shape {weight.shape}, the head {head.weights.shape}")
    # In standardised coordinates x = (f - mean) / scale every logit is w·x + b.
    mean, scale = head.mean.astype(np.float64), head.scale.astype(np.float64)
    terms = [(weight * scale, float(bias + weight @ mean)),
             (head.weights.astype(np.float64), head.bias)]
    step = max(1, len(features) // _MOMENT_ROWS)
    x = (np.asarray(features[::step], dtype=np.float64) - mean) / scale
    if imagenet is not None:
        other, other_features = imagenet
        other_features = _check_features(other_features, len(other.weights))
        if len(other_features) != len(features):
            raise ValueError(f"{len(features)} embeddings but {len(other_features)} ImageNet "
                             "embeddings; they must be the same tasks, row for row")
        pad = np.zeros(len(other.weights))
        terms = [(np.concatenate([w, pad]), b) for w, b in terms]
        terms.append((np.concatenate([np.zeros_like(mean), other.weights]), other.bias))
        mean = np.concatenate([mean, other.mean])
        scale = np.concatenate([scale, other.scale])
        x = np.hstack([x, (np.asarray(other_features[::step], dtype=np.float64)
                           - mean[len(head.weights):]) / scale[len(head.weights):]])
    blended_w, blended_b = np.zeros_like(mean), 0.0
    for w, b in terms:
        w_std, b_std = _standardised(x, w, b)
        blended_w += w_std / len(terms)
        blended_b += b_std / len(terms)
    # Onto the model's scale: the blend's median and top-1 % boundary go where the model's are.
    blended = x @ blended_w + blended_b
    model = x @ terms[0][0] + terms[0][1]
    (b_mid, b_top), (m_mid, m_top) = (np.quantile(v, _ANCHORS) for v in (blended, model))
    gain = (m_top - m_mid) / (b_top - b_mid) if b_top > b_mid and m_top > m_mid else 1.0
    return FastHead(mean=mean.astype(np.float32), scale=scale.astype(np.float32),
                    weights=(blended_w * gain).astype(np.float32),
                    bias=float((blended_b - b_mid) * gain + m_mid),
                    n_anomalies=head.n_anomalies, n_normals=head.n_normals)


def scores_side_by_side(head: FastHead, parts: Sequence[np.ndarray]) -> np.ndarray:
    """`head.scores` of the feature blocks `parts` set side by side (a three-term blend reads
    [f, g]), without building the wide array: its logit is the sum of each block's share."""
    widths = np.cumsum([0, *(p.shape[1] for p in parts)])
    if widths[-1] != len(head.weights):
        raise ValueError(f"feature blocks of {widths[-1]} dimensions, the head {len(head.weights)}")
    logits = np.zeros(len(parts[0]), dtype=np.float32)
    for part, start, stop in zip(parts, widths[:-1], widths[1:], strict=True):
        share = FastHead(mean=head.mean[start:stop], scale=head.scale[start:stop],
                         weights=head.weights[start:stop], bias=0.0,
                         n_anomalies=head.n_anomalies, n_normals=head.n_normals)
        logits += share.logits(part)
    logits += np.float32(head.bias)
    return torch.sigmoid(torch.from_numpy(logits).clamp(-60.0, 60.0)).numpy()


def knn_logits(features: np.ndarray, labelled: np.ndarray, labels: np.ndarray,
               rows: np.ndarray, k: int = 3) -> np.ndarray:
    """A nearest-neighbour anomaly score of `features[rows]`: the mean cosine similarity to its
    `k` most similar labelled anomalies minus that to its `k` most similar labelled normals
    (fewer where fewer are labelled), on standardised features as `similar` uses. Not linear
    in the features, so unlike the head it cannot install as a classifier; measured as a blend
    term by `simulate` (benchmarks/RESULTS.md, "Session 29")."""
    features = _check_features(features)
    labels = np.asarray(labels).reshape(-1)
    labelled = np.asarray(labelled, dtype=np.int64).reshape(-1)
    if len(labelled) != len(labels) or not ((labels == 1).any() and (labels == 0).any()):
        raise ValueError("need the labels of the labelled rows, at least one anomaly and one "
                         "normal among them")
    mean, std = _moments(features)

    def unit(idx: np.ndarray) -> np.ndarray:
        z = (np.asarray(features[np.asarray(idx, dtype=np.int64)], dtype=np.float32) - mean) / std
        return z / _norms(z)[:, None]

    query = unit(rows)
    out = np.zeros(len(query), dtype=np.float64)
    for label, sign in ((1, 1.0), (0, -1.0)):
        sims = query @ unit(labelled[labels == label]).T
        top = min(k, sims.shape[1])
        out += sign * -np.sort(-sims, axis=1)[:, :top].mean(axis=1)
    return out.astype(np.float32)


def _standardised(x: np.ndarray, w: np.ndarray, b: float) -> tuple[np.ndarray, float]:
    """(w', b') such that x @ w' + b' is x @ w + b with mean 0 and spread 1 over the rows x."""
    logits = x @ w + b
    spread = max(float(logits.std()), 1e-6)
    return w / spread, (b - float(logits.mean())) / spread


def similar(features: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` rows most similar to the query rows: (row indices, cosine similarity), best first.

    Features are standardised first (per-feature mean and standard deviation of the cache, as
    the head does), so the similarity weighs what varies between images rather than what
    they all share; a row's similarity is its cosine to the mean direction of the
    (unit-length) standardised query rows. On ImageNet features that found rare-class
    neighbours more often for 5-task queries on all 6 classes tried (benchmarks/RESULTS.md).
    The query rows themselves are included in the ranking (callers drop what they exclude).
    """
    features = _check_features(features)
    mean, std = _moments(features)
    query = (np.asarray(features[np.asarray(query, dtype=np.int64)], dtype=np.float32)
             - mean) / std
    if len(query) == 0:
        raise ValueError("more-like-this needs at least one query row")
    direction = (query / _norms(query)[:, None]).mean(axis=0)
    direction /= max(float(np.linalg.norm(direction)), 1e-12)
    towards = torch.from_numpy(direction.astype(np.float32))
    inverse = torch.from_numpy((1.0 / std).astype(np.float32))
    shift = -torch.from_numpy(mean) * inverse
    sims = []
    for block in _float_blocks(features):
        z = torch.addcmul(shift, block, inverse)  # (f - mean) / std in one pass
        sims.append((z @ towards) / torch.linalg.vector_norm(z, dim=1).clamp_min(1e-12))
    sims = torch.cat(sims).numpy()
    k = min(k, len(sims))
    top = np.argpartition(-sims, k - 1)[:k] if k < len(sims) else np.arange(len(sims))
    top = top[np.argsort(-sims[top], kind="stable")]
    return top, sims[top]


def _moments(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation (floored), from at most _MOMENT_ROWS evenly
    spaced rows: plenty for standardising, and a 100,000-task cache stays sub-second."""
    step = max(1, len(features) // _MOMENT_ROWS)
    sample = np.asarray(features[::step], dtype=np.float32)
    mean = sample.mean(axis=0, dtype=np.float64)
    std = sample.std(axis=0, dtype=np.float64)
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def _float_blocks(features: np.ndarray) -> Iterator[torch.Tensor]:
    """float32 tensors of _CHUNK rows at a time (torch converts float16 faster than numpy)."""
    for start in range(0, len(features), _CHUNK):
        block = np.asarray(features[start:start + _CHUNK])
        if not block.flags.writeable:  # a read-only memory map: torch wants writable memory
            block = block.copy()
        yield torch.from_numpy(block).float()


def _check_features(features: np.ndarray, dim: int | None = None) -> np.ndarray:
    if features.ndim != 2 or len(features) == 0:
        raise ValueError(f"expected a non-empty (n, D) feature array, got shape {features.shape}")
    if dim is not None and features.shape[1] != dim:
        raise ValueError(f"features have {features.shape[1]} dimensions, the head {dim}")
    return features


def _norms(x: np.ndarray) -> np.ndarray:
    return np.maximum(np.linalg.norm(x, axis=1), 1e-12)
