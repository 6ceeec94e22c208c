"""FixMatch (Sohn et al. 2020): objective, optimiser step, EMA and labelled sampler. No I/O.

loss = CE(labelled) + lambda_u * mean_u[ 1(max p_weak >= tau) * CE(strong, argmax p_weak) ]
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ml_backend.core.config import TrainConfig


@dataclass
class StepStats:
    """What one step did. Losses are batch means (nats); rates are fractions in [0, 1]."""

    loss: float  # total loss that was back-propagated
    loss_x: float  # supervised cross-entropy on the labelled batch
    loss_u: float  # masked consistency cross-entropy, averaged over ALL unlabelled images
    mask_rate: float  # fraction of unlabelled images whose weak confidence reached threshold
    pseudo_anomaly_rate: float  # fraction of the masked-in pseudo-labels that say "anomaly"
    lr: float  # learning rate of the step (first parameter group)


class DistributionAlignment:
    """ReMixMatch's distribution alignment of the weak-view probabilities:
    p -> normalise(p * target / m), m the running mean of p over recent batches (an EMA with
    `momentum`). The pseudo-labels then follow the `target` class distribution rather than
    wherever the model's average drifts, which matters when one class is 1 % of the pool.
    """

    def __init__(self, target: Sequence[float], momentum: float = 0.99) -> None:
        target_t = torch.as_tensor(target, dtype=torch.float32)
        if target_t.ndim != 1 or (target_t <= 0).any() or not 0.0 <= momentum < 1.0:
            raise ValueError(f"need a positive target distribution and momentum in [0, 1), "
                             f"got {target} and {momentum}")
        self.target = target_t / target_t.sum()
        self.momentum = momentum
        self.mean: torch.Tensor | None = None
        self.last: torch.Tensor | None = None  # the latest aligned batch (for statistics)

    def __call__(self, probs: torch.Tensor) -> torch.Tensor:
        """(N, K) probabilities -> aligned (N, K) probabilities (rows sum to 1)."""
        if len(probs) == 0:
            return probs
        batch_mean = probs.mean(dim=0)
        self.mean = batch_mean if self.mean is None else (
            self.momentum * self.mean + (1.0 - self.momentum) * batch_mean)
        target = self.target.to(probs.device)
        aligned = probs * (target / self.mean.clamp_min(1e-6))
        self.last = aligned / aligned.sum(dim=1, keepdim=True)
        return self.last


def fixmatch_loss(logits_x: torch.Tensor, y: torch.Tensor, logits_u_weak: torch.Tensor,
                  logits_u_strong: torch.Tensor, threshold: float, lambda_u: float,
                  align: DistributionAlignment | None = None, protect_top_share: float = 0.0,
                  anomaly_threshold: float | None = None, teacher: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FixMatch loss from logits.

    logits_x (B, K) with labels y (B,) int64; logits_u_weak / logits_u_strong (µB, K) of two
    views of the same unlabelled images. Returns (loss, loss_x, loss_u, mask) where mask (µB,)
    is 1.0 where the weak view's top probability (after `align`, if given) is >= threshold
    (>= `anomaly_threshold` for an "anomaly" pseudo-label, if given), else 0.0 — and 0.0 for
    a "normal" pseudo-label on the `protect_top_share` of the batch with the highest anomaly
    probability, where unlabelled anomalies gather. `teacher` (µB,) int64 overrides both
    where it is 0 or 1: that pseudo-label, masked in (`teacher_pseudo_labels`); -1 leaves an
    image to the rule above. With no unlabelled images (µB = 0) loss_u is 0. NaN logits give
    a NaN loss.
    """
    # Supervised: cross-entropy on the labelled batch.
    loss_x = F.cross_entropy(logits_x, y)

    # Pseudo-labels: hard argmax of the weak view, with no gradient through it.
    probs_u = torch.softmax(logits_u_weak.detach(), dim=1)
    if align is not None:
        probs_u = align(probs_u)
    confidence, pseudo_label = probs_u.max(dim=1)

    # Confidence mask: only confident predictions teach the strong view.
    if anomaly_threshold is None:
        mask = (confidence >= threshold).float()
    else:
        needed = torch.where(pseudo_label == 1, anomaly_threshold, threshold)
        mask = (confidence >= needed).float()
    if protect_top_share > 0 and len(mask):
        anomaly = probs_u[:, 1]
        top = anomaly >= torch.quantile(anomaly, 1.0 - protect_top_share)
        mask = mask * ~(top & (pseudo_label == 0))
    if teacher is not None:
        pseudo_label = _taught(pseudo_label, teacher)
        mask = torch.where(teacher >= 0, torch.ones_like(mask), mask)

    # Consistency: masked cross-entropy of the strong view against the pseudo-labels.
    per_image = F.cross_entropy(logits_u_strong, pseudo_label, reduction="none")
    loss_u = (per_image * mask).mean() if len(mask) else logits_x.new_zeros(())

    # Total: weighted sum.
    loss = loss_x + lambda_u * loss_u
    return loss, loss_x, loss_u, mask


def fixmatch_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, u_weak: torch.Tensor,
                  u_strong: torch.Tensor, optimizer: torch.optim.Optimizer,
                  cfg: TrainConfig, align: DistributionAlignment | None = None,
                  teacher: torch.Tensor | None = None) -> StepStats:
    """One forward of [x; u_weak; u_strong] (one BN batch), backward and optimiser step.

    x (B, C, S, S) labelled model inputs with labels y (B,) in {0, 1}; u_weak / u_strong
    (µB, C, S, S) two views of the same unlabelled images (µB may be 0: supervised only).
    The model is put in train mode. Uses cfg.threshold and cfg.lambda_u; `align` (kept by
    the caller across steps) aligns the pseudo-label distribution; `teacher` (µB,) gives
    the frozen teacher's pseudo-labels (`fixmatch_loss`).
    """
    model.train()
    b, n_u = len(x), len(u_weak)
    logits = model(torch.cat([x, u_weak, u_strong]))  # (B + 2µB, 2)
    logits_x, logits_u_weak, logits_u_strong = logits.split([b, n_u, n_u])
    loss, loss_x, loss_u, mask = fixmatch_loss(
        logits_x, y, logits_u_weak, logits_u_strong, cfg.threshold, cfg.lambda_u, align,
        cfg.protect_top_share, cfg.anomaly_threshold, teacher)

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()

    # One device-to-host transfer for all statistics.
    pseudo = align.last if align is not None and align.last is not None else logits_u_weak
    pseudo_label = pseudo.detach().argmax(1)
    if teacher is not None:
        pseudo_label = _taught(pseudo_label, teacher)
    pseudo_anomaly = (pseudo_label == 1).float()
    n_masked_t = mask.sum()
    values = torch.stack([loss.detach(), loss_x.detach(), loss_u.detach(), n_masked_t,
                          (pseudo_anomaly * mask).sum()]).tolist()
    loss_v, loss_x_v, loss_u_v, n_masked, n_pseudo_anomaly = values
    return StepStats(
        loss=loss_v,
        loss_x=loss_x_v,
        loss_u=loss_u_v,
        mask_rate=n_masked / n_u if n_u else 0.0,
        pseudo_anomaly_rate=n_pseudo_anomaly / n_masked if n_masked else 0.0,
        lr=optimizer.param_groups[0]["lr"],
    )


def _taught(pseudo_label: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The teacher's pseudo-label where it gives one (0 or 1), the model's where it is -1."""
    return torch.where(teacher >= 0, teacher, pseudo_label)


def teacher_pseudo_labels(ranking: np.ndarray, top_share: float,
                          normal_share: float) -> np.ndarray:
    """int64 pseudo-labels (n,) of images ranked by a frozen teacher (`ranking`, higher = more
    anomalous): 1 for the top `top_share` of them, 0 for the bottom `normal_share`, -1 (the
    model's own rule) between. Ties are broken by position; shares round to whole images."""
    ranking = np.asarray(ranking, dtype=np.float64).reshape(-1)
    if not np.isfinite(ranking).all():
        raise ValueError("the teacher's ranking contains NaN or infinity")
    n = len(ranking)
    order = np.argsort(-ranking, kind="stable")  # most anomalous first
    labels = np.full(n, -1, dtype=np.int64)
    n_top = round(top_share * n)
    n_normal = min(round(normal_share * n), n - n_top)
    labels[order[:n_top]] = 1
    if n_normal:
        labels[order[n - n_normal:]] = 0
    return labels


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD(lr, momentum, nesterov) with weight decay on weight matrices / kernels only.

    Parameters with fewer than two dimensions (BatchNorm scales and shifts, all biases) get
    no weight decay: shrinking them towards zero only fights the normalisation. Everything
    but the classifier head learns at lr * cfg.backbone_lr_scale. The first group is the
    head's decayed weights, so `param_groups[0]["lr"]` is cfg.lr.
    """
    head = {id(p) for p in model.get_classifier().parameters()}
    groups = []
    for in_head, lr in ((True, cfg.lr), (False, cfg.lr * cfg.backbone_lr_scale)):
        for decayed in (True, False):
            params = [p for p in model.parameters() if p.requires_grad
                      and (id(p) in head) == in_head and (p.ndim > 1) == decayed]
            if params:
                groups.append({"params": params, "lr": lr,
                               "weight_decay": cfg.weight_decay if decayed else 0.0})
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


class ModelEMA:
    """Exponential moving average of a model's weights AND buffers (BatchNorm statistics).

    After each step: ema = d * ema + (1 - d) * student, for every floating-point tensor in
    the state dict; integer buffers (BN's num_batches_tracked) are copied. With `warmup`,
    d = min(decay, (1 + step) / (10 + step)) where `step` counts updates over the model's
    whole life (it continues across cycles): a 100-iteration cycle at d = 0.99 would
    otherwise leave 0.99^100 = 37 % of the starting weights (and a near-zero head) in the
    model that scores. `module` is a frozen copy in eval mode; it is what scoring uses.
    """

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = False,
                 step: int = 0) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {decay}")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self.decay = decay
        self.warmup = warmup
        self.step = step
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.step) / (10 + self.step))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        student = model.state_dict()
        for name, value in self.module.state_dict().items():
            if value.is_floating_point():
                value.lerp_(student[name].detach(), 1.0 - decay)
            else:
                value.copy_(student[name])
        self.step += 1


class WeightedLabeledSampler:
    """Labelled batches (with replacement) in which anomalies make up ~anomaly_fraction.

    Each anomaly has weight anomaly_fraction / n_anomalies and each normal
    (1 - anomaly_fraction) / n_normals, so the expected anomaly share of a batch is
    anomaly_fraction whatever the class balance of the labels. With `hardness` (one
    non-negative value per label, e.g. the model's anomaly probability) and `hard_share` > 0,
    that share of the normals' weight is spread in proportion to the normals' hardness
    instead of evenly (all-zero hardness: evenly).
    """

    def __init__(self, labels: np.ndarray, batch_size: int, anomaly_fraction: float,
                 generator: torch.Generator, *, hardness: np.ndarray | None = None,
                 hard_share: float = 0.0) -> None:
        if not 0.0 < anomaly_fraction < 1.0:
            raise ValueError(f"anomaly_fraction must be in (0, 1), got {anomaly_fraction}")
        if not 0.0 <= hard_share < 1.0:
            raise ValueError(f"hard_share must be in [0, 1), got {hard_share}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        is_anomaly = torch.as_tensor(np.asarray(labels) == 1)
        n_anomalies = int(is_anomaly.sum())
        n_normals = len(is_anomaly) - n_anomalies
        if n_anomalies == 0 or n_normals == 0:
            raise ValueError("need at least one anomaly and one normal label")
        self.weights = torch.where(is_anomaly, anomaly_fraction / n_anomalies,
                                   (1.0 - anomaly_fraction) / n_normals).double()
        if hardness is not None and hard_share > 0:
            hard = (1.0 - anomaly_fraction) * _spread(hardness, ~is_anomaly)
            self.weights = torch.where(is_anomaly, self.weights,
                                       (1.0 - hard_share) * self.weights + hard_share * hard)
        self.batch_size = batch_size
        self.generator = generator

    def sample(self) -> torch.Tensor:
        """Indices (batch_size,) int64 into the labelled set."""
        return torch.multinomial(self.weights, self.batch_size, replacement=True,
                                 generator=self.generator)


def _spread(hardness: np.ndarray, among: torch.Tensor) -> torch.Tensor:
    """Weights summing to 1 over `among`, in proportion to `hardness` (evenly if all zero)."""
    h = torch.as_tensor(np.asarray(hardness, dtype=np.float64))
    if h.shape != among.shape or not bool(torch.isfinite(h).all()) or bool((h < 0).any()):
        raise ValueError(f"hardness must be {tuple(among.shape)} finite values >= 0")
    h = torch.where(among, h, 0.0)
    total = float(h.sum())
    return h / total if total > 0 else among.double() / float(among.sum())
