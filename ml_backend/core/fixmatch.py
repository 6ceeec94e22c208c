"""The FixMatch objective (Sohn et al. 2020) and one optimiser step. No I/O, no data loading.

loss = CE(labelled) + lambda_u * mean_u[ 1(max p_weak >= tau) * CE(strong, argmax p_weak) ]
"""

from __future__ import annotations

from dataclasses import dataclass

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


def fixmatch_loss(logits_x: torch.Tensor, y: torch.Tensor, logits_u_weak: torch.Tensor,
                  logits_u_strong: torch.Tensor, threshold: float, lambda_u: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FixMatch loss from logits.

    logits_x (B, K) with labels y (B,) int64; logits_u_weak / logits_u_strong (µB, K) of two
    views of the same unlabelled images. Returns (loss, loss_x, loss_u, mask) where mask (µB,)
    is 1.0 where the weak view's top probability is >= threshold, else 0.0. With no unlabelled
    images (µB = 0) loss_u is 0. NaN logits give a NaN loss.
    """
    # Supervised: cross-entropy on the labelled batch.
    loss_x = F.cross_entropy(logits_x, y)

    # Pseudo-labels: hard argmax of the weak view, with no gradient through it.
    probs_u = torch.softmax(logits_u_weak.detach(), dim=1)
    confidence, pseudo_label = probs_u.max(dim=1)

    # Confidence mask: only confident predictions teach the strong view.
    mask = (confidence >= threshold).float()

    # Consistency: masked cross-entropy of the strong view against the pseudo-labels.
    per_image = F.cross_entropy(logits_u_strong, pseudo_label, reduction="none")
    loss_u = (per_image * mask).mean() if len(mask) else logits_x.new_zeros(())

    # Total: weighted sum.
    loss = loss_x + lambda_u * loss_u
    return loss, loss_x, loss_u, mask


def fixmatch_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, u_weak: torch.Tensor,
                  u_strong: torch.Tensor, optimizer: torch.optim.Optimizer,
                  cfg: TrainConfig) -> StepStats:
    """One forward of [x; u_weak; u_strong] (one BN batch), backward and optimiser step.

    x (B, C, S, S) labelled model inputs with labels y (B,) in {0, 1}; u_weak / u_strong
    (µB, C, S, S) two views of the same unlabelled images (µB may be 0: supervised only).
    The model is put in train mode. Uses cfg.threshold and cfg.lambda_u.
    """
    model.train()
    b, n_u = len(x), len(u_weak)
    logits = model(torch.cat([x, u_weak, u_strong]))  # (B + 2µB, 2)
    logits_x, logits_u_weak, logits_u_strong = logits.split([b, n_u, n_u])
    loss, loss_x, loss_u, mask = fixmatch_loss(
        logits_x, y, logits_u_weak, logits_u_strong, cfg.threshold, cfg.lambda_u)

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()

    # One device-to-host transfer for all statistics.
    pseudo_anomaly = (logits_u_weak.detach().argmax(1) == 1).float()
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
