"""Seconds-fast rankings from cached embeddings: a refit linear head, and "more like this".

The instant re-ranking fits a class-balanced, L2-regularised logistic regression on the
pooled features (`model.pooled_features`) of the labelled tasks and scores every other task
with it: a few hundred labels and 100,000 cached embeddings take well under a second, against
minutes for a FixMatch cycle. Features are standardised with the statistics of the
embeddings given at fit time (labelled and unlabelled alike; at most 16,384 evenly spaced
rows), so rare directions of the unlabelled pool count as much as common ones.
"""

from __future__ import annotations

import dataclasses
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


def install_blend(model: nn.Module, blend: Blend) -> None:
    """Make the model's classifier compute `blend` from its pooled features: its linear head
    (`install_head`), and with a neighbour term a `NeighbourClassifier` in place of the
    model's `classifier`, which reads the term's features as the last columns."""
    if blend.neighbours is not None:
        term, old = blend.neighbours, model.get_classifier()
        model.classifier = NeighbourClassifier(old.in_features, old.out_features,
                                               len(term.mean), len(term.anomalies),
                                               len(term.normals))
        model.classifier.hold(term)
    install_head(model, blend.head)


class NeighbourClassifier(nn.Linear):
    """A 2-way linear classifier whose anomaly logit also gets a nearest-neighbour term
    (`NeighbourTerm`) of the last `term_dims` input features: what a four-term blend
    installs as. The labelled unit vectors are buffers, so a saved version holds them."""

    def __init__(self, in_features: int, out_features: int, term_dims: int, n_anomalies: int,
                 n_normals: int) -> None:
        super().__init__(in_features, out_features)
        self.register_buffer("term_mean", torch.zeros(term_dims))
        self.register_buffer("term_scale", torch.ones(term_dims))
        self.register_buffer("term_anomalies", torch.zeros(n_anomalies, term_dims))
        self.register_buffer("term_normals", torch.zeros(n_normals, term_dims))
        # k, weight, offset
        self.register_buffer("term_rule", torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64))

    @classmethod
    def shaped_like(cls, state: dict[str, torch.Tensor], prefix: str) -> NeighbourClassifier:
        """An empty one whose tensors have the shapes `state` holds under `prefix`."""
        out_features, in_features = state[f"{prefix}weight"].shape
        return cls(int(in_features), int(out_features), len(state[f"{prefix}term_mean"]),
                   len(state[f"{prefix}term_anomalies"]), len(state[f"{prefix}term_normals"]))

    def hold(self, term: NeighbourTerm) -> None:
        """Take `term`'s statistics, labelled vectors and rule."""
        with torch.no_grad():
            for name in ("mean", "scale", "anomalies", "normals"):
                getattr(self, f"term_{name}").copy_(torch.from_numpy(getattr(term, name)))
            self.term_rule.copy_(torch.tensor([term.k, term.weight, term.offset]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ml_backend.core.model import ANOMALY_INDEX

        logits = super().forward(x).float()
        k, weight, offset = self.term_rule.tolist()
        with torch.autocast(x.device.type, enabled=False):
            term = neighbour_logits(x[:, -len(self.term_mean):].float(), self.term_mean,
                                    self.term_scale, self.term_anomalies, self.term_normals,
                                    int(k), weight, offset)
        logits[:, ANOMALY_INDEX] = logits[:, ANOMALY_INDEX] + term
        return logits


def blend_with_model(head: FastHead, weight: np.ndarray, bias: float, features: np.ndarray,
                     *, imagenet: tuple[FastHead, np.ndarray] | None = None,
                     neighbours: tuple[NeighbourTerm, np.ndarray] | None = None,
                     model_term: bool = True) -> Blend:
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

    `neighbours`: a fourth term beside the third, (the nearest-neighbour term fitted on the
    same ImageNet embeddings, the labelled rows it was fitted on); its spread is taken over
    the rows it did not learn from, which are their own nearest neighbours
    (benchmarks/RESULTS.md, "Session 30": ahead of the three-term blend on FIRST).

    `model_term=False` leaves the model's own logit out of the mean (it still sets the scale
    the blend is read on): with the ImageNet and neighbour terms beside it, it lowered the sky
    blend's precision at the top (benchmarks/RESULTS.md, "Session 31").

    Without the fourth term every logit is linear in the pooled features, so the blend is
    too: it installs as a classifier like the head itself (`install_blend`). (D,) `weight`:
    the model's anomaly-minus-normal row.
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
    if neighbours is not None and imagenet is None:
        raise ValueError("the neighbour term reads the ImageNet embeddings: give `imagenet` too")
    averaged = terms if model_term else terms[1:]
    n_terms = len(averaged) + (neighbours is not None)
    blended_w, blended_b = np.zeros_like(mean), 0.0
    for w, b in averaged:
        w_std, b_std = _standardised(x, w, b)
        blended_w += w_std / n_terms
        blended_b += b_std / n_terms
    blended = x @ blended_w + blended_b
    term = None
    if neighbours is not None:
        term, learnt = neighbours
        sampled = np.arange(0, len(features), step)
        raw = term.logits(other_features[sampled]).astype(np.float64)
        unseen = raw[~np.isin(sampled, learnt)]
        unseen = unseen if len(unseen) else raw
        term_w = 1.0 / (max(float(unseen.std()), 1e-6) * n_terms)
        term_b = -float(unseen.mean()) * term_w
        blended = blended + raw * term_w + term_b
    # Onto the model's scale: the blend's median and top-1 % boundary go where the model's are.
    model = x @ terms[0][0] + terms[0][1]
    (b_mid, b_top), (m_mid, m_top) = (np.quantile(v, _ANCHORS) for v in (blended, model))
    gain = (m_top - m_mid) / (b_top - b_mid) if b_top > b_mid and m_top > m_mid else 1.0
    linear = FastHead(mean=mean.astype(np.float32), scale=scale.astype(np.float32),
                      weights=(blended_w * gain).astype(np.float32),
                      bias=float((blended_b - b_mid) * gain + m_mid),
                      n_anomalies=head.n_anomalies, n_normals=head.n_normals)
    if term is not None:
        term = dataclasses.replace(term, weight=term_w * gain, offset=term_b * gain)
    return Blend(linear, term)


@dataclass(frozen=True)
class Blend:
    """What a re-ranking publishes: a linear head over the feature blocks set side by side
    (the cycle's embeddings, then the ImageNet ones), plus optionally the nearest-neighbour
    term over the last block; their logits add."""

    head: FastHead
    neighbours: NeighbourTerm | None = None

    def logits(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """Anomaly logits (n,) float32 of the feature blocks `parts` set side by side, without
        building the wide array: the head's logit is the sum of each block's share."""
        widths = np.cumsum([0, *(p.shape[1] for p in parts)])
        if widths[-1] != len(self.head.weights):
            raise ValueError(f"feature blocks of {widths[-1]} dimensions, the head "
                             f"{len(self.head.weights)}")
        head = self.head
        logits = np.zeros(len(parts[0]), dtype=np.float32)
        for part, start, stop in zip(parts, widths[:-1], widths[1:], strict=True):
            share = FastHead(mean=head.mean[start:stop], scale=head.scale[start:stop],
                             weights=head.weights[start:stop], bias=0.0,
                             n_anomalies=head.n_anomalies, n_normals=head.n_normals)
            logits += share.logits(part)
        logits += np.float32(head.bias)
        if self.neighbours is not None:
            logits += self.neighbours.logits(parts[-1])
        return logits

    def scores(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """Anomaly probabilities (n,) float32: `logits` through a sigmoid."""
        return torch.sigmoid(torch.from_numpy(self.logits(parts)).clamp(-60.0, 60.0)).numpy()


@dataclass(frozen=True)
class NeighbourTerm:
    """A nearest-neighbour anomaly logit: `weight` × (the mean cosine similarity of a row to
    its `k` most similar labelled anomalies minus that to its `k` most similar labelled
    normals, fewer where fewer are labelled) + `offset`, on features standardised by `mean`
    and `scale`, as `similar` compares them. Not linear in the features: it keeps the
    labelled rows' unit vectors to score any new row."""

    mean: np.ndarray  # (D,) float32
    scale: np.ndarray  # (D,) float32, > 0
    anomalies: np.ndarray  # (a, D) float32, unit rows
    normals: np.ndarray  # (n, D) float32, unit rows
    k: int = 3
    weight: float = 1.0
    offset: float = 0.0

    def logits(self, features: np.ndarray) -> np.ndarray:
        """The term (n,) float32 of feature rows (float16 or float32, memmap ok)."""
        features = _check_features(features, len(self.mean))
        mean, scale = torch.from_numpy(self.mean), torch.from_numpy(self.scale)
        refs = [torch.from_numpy(v) for v in (self.anomalies, self.normals)]
        return torch.cat([neighbour_logits(block, mean, scale, *refs, self.k, self.weight,
                                           self.offset) for block in _float_blocks(features)]
                         ).numpy()


def neighbour_logits(features: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor,
                     anomalies: torch.Tensor, normals: torch.Tensor, k: int, weight: float,
                     offset: float) -> torch.Tensor:
    """`NeighbourTerm.logits` of float32 (n, D) rows, on tensors (what an installed blend's
    classifier computes, `install_blend`)."""
    z = (features - mean) / scale
    z = z / torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp_min(1e-12)
    out = torch.zeros(len(z), dtype=torch.float64, device=z.device)
    for refs, sign in ((anomalies, 1.0), (normals, -1.0)):
        sims = z @ refs.T
        out += sign * sims.topk(min(k, sims.shape[1]), dim=1).values.mean(dim=1).double()
    return (out * weight + offset).float()


def fit_neighbour_term(features: np.ndarray, labelled: np.ndarray, labels: np.ndarray,
                       k: int = 3) -> NeighbourTerm:
    """The nearest-neighbour term of `features[labelled]` with 0/1 `labels` (1 = anomaly),
    standardised by the statistics of all `features`, unweighted (weight 1, offset 0).
    Raises ValueError without at least one anomaly and one normal."""
    features = _check_features(features)
    labels = np.asarray(labels).reshape(-1)
    labelled = np.asarray(labelled, dtype=np.int64).reshape(-1)
    if len(labelled) != len(labels) or not ((labels == 1).any() and (labels == 0).any()):
        raise ValueError("need the labels of the labelled rows, at least one anomaly and one "
                         "normal among them")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    mean, std = _moments(features)

    def unit(idx: np.ndarray) -> np.ndarray:
        z = (np.asarray(features[idx], dtype=np.float32) - mean) / std
        return (z / _norms(z)[:, None]).astype(np.float32)

    return NeighbourTerm(mean=mean, scale=std, anomalies=unit(labelled[labels == 1]),
                         normals=unit(labelled[labels == 0]), k=k)


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
