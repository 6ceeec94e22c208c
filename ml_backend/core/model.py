"""The network: timm `tf_efficientnet_lite0` with an adapted stem and a small binary head.

Output: logits of shape (B, 2); index 1 is "anomaly". Inputs come from
`preprocess.to_model_input`: (B, C, S, S) float32 normalised with mean = std = 0.5.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.models import adapt_input_conv
from torch import nn

from ml_backend.core.config import TrainConfig
from ml_backend.core.pretrained import ARCH, imagenet_state_dict

logger = logging.getLogger(__name__)

NUM_CLASSES = 2
ANOMALY_INDEX = 1
_STEM = "conv_stem.weight"
_HEAD = ("classifier.weight", "classifier.bias")


def build_model(cfg: TrainConfig, in_chans: int) -> nn.Module:
    """EfficientNet-Lite0 for `in_chans`-channel images with a 2-way head.

    With `cfg.pretrained` the ImageNet weights are loaded (all but the classifier) and the
    stem is adapted to `in_chans` (1 channel: RGB filters summed, so a grey image gives the
    activations of its RGB copy; N != 3: filters repeated cyclically and scaled by 3/N).
    The head is re-initialised from normal(0, cfg.head_init_std) with zero bias so the
    first predictions sit near probability 0.5, and every BatchNorm gets `cfg.bn_momentum`.
    `cfg.drop_path_rate` (stochastic depth) and `cfg.drop_rate` (dropout before the head)
    act in training mode only. With `cfg.backbone_stage` the backbone is cut after that stage.
    Weights that are not loaded come from torch's global RNG: call `set_seed` first.
    """
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    model = timm.create_model(ARCH, pretrained=False, num_classes=NUM_CLASSES,
                              in_chans=in_chans, drop_rate=cfg.drop_rate,
                              drop_path_rate=cfg.drop_path_rate)
    if cfg.pretrained:
        _load_imagenet_backbone(model, in_chans)
    if cfg.backbone_stage is not None:
        truncate_after_block(model, cfg.backbone_stage)
    init_head(model.get_classifier(), cfg.head_init_std)
    set_bn_momentum(model, cfg.bn_momentum)
    return model


def _load_imagenet_backbone(model: nn.Module, in_chans: int) -> None:
    state = imagenet_state_dict()
    for key in _HEAD:
        del state[key]
    state[_STEM] = adapt_input_conv(in_chans, state[_STEM])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) != set(_HEAD) or unexpected:
        raise RuntimeError(
            f"ImageNet backbone did not load cleanly: missing {missing}, unexpected {unexpected}")
    logger.debug("ImageNet backbone loaded, stem adapted to %d channel(s)", in_chans)


def init_head(head: nn.Module, std: float) -> None:
    """Weights ~ normal(0, std), bias 0: near-equal logits so pseudo-labels start below 0.95."""
    if not isinstance(head, nn.Linear):
        raise TypeError(f"expected a Linear classifier, got {type(head).__name__}")
    nn.init.normal_(head.weight, mean=0.0, std=std)
    nn.init.zeros_(head.bias)


def set_bn_momentum(model: nn.Module, momentum: float) -> int:
    """Set PyTorch BatchNorm momentum (weight of the new batch statistic) on every BN layer.

    Returns the number of layers changed.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"bn_momentum must be in [0, 1], got {momentum}")
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        layer.momentum = momentum
    return len(layers)


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Within the block the model is in eval mode except that BatchNorm normalises with the
    batch's own statistics, as in training, without updating its running statistics."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training, momenta = model.training, [m.momentum for m in layers]
    counts = [m.num_batches_tracked.clone() for m in layers if m.num_batches_tracked is not None]
    model.eval()
    for layer in layers:
        layer.train()
        layer.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
        for layer, count in zip((m for m in layers if m.num_batches_tracked is not None),
                                counts, strict=True):
            layer.num_batches_tracked.copy_(count)
        model.train(was_training)


def truncate_after_block(model: nn.Module, block: int) -> nn.Module:
    """Cut an EfficientNet after stage `block` (0-based index into `model.blocks`), in place:
    `pooled_features` then pools that stage's output, and the 2-way classifier reads it.

    The stages after it, the 1x1 head convolution and its BatchNorm are dropped; the new
    classifier is freshly initialised (mid-level ImageNet features for cutouts unlike
    ImageNet's photographs: benchmarks/RESULTS.md, "Session 22"). Returns `model`.
    """
    stages = len(model.blocks)
    if not 0 <= block < stages:
        raise ValueError(f"block must be in 0..{stages - 1} for this backbone, got {block}")
    model.blocks = model.blocks[:block + 1]
    model.conv_head, model.bn2 = nn.Identity(), nn.Identity()
    width = [m for m in model.blocks.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features
    model.num_features = model.head_hidden_size = width
    old = model.get_classifier()
    model.classifier = nn.Linear(width, old.out_features)
    return model


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The globally pooled penultimate features (B, model.num_features) the head reads.

    In eval mode the head's dropout is off, so `model.get_classifier()(pooled_features(m, x))`
    equals `model(x)`.
    """
    return model.forward_head(model.forward_features(x), pre_logits=True)


class _PooledScorer(nn.Module):
    """A scoring-only model whose `forward_features` already pools, under one 2-way linear
    `classifier`: it answers what scoring asks of the timm model (`forward_features`,
    `forward_head`, `get_classifier`, `num_features`), so `pooled_features` and the test-time
    views work unchanged."""

    classifier: nn.Module

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))

    def get_classifier(self) -> nn.Linear:
        return self.classifier


class SideBySide(_PooledScorer):
    """Two backbones read as one: the pooled features of `first` and `second` set side by
    side, [f, g], and one 2-way linear classifier over them (the three-term blend of the
    instant re-ranking: a cycle's backbone beside the ImageNet one, `fast_head.blend_with_model`).
    It only scores, in eval mode."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second
        self.num_features = int(first.num_features + second.num_features)
        self.classifier = nn.Linear(self.num_features, NUM_CLASSES)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([pooled_features(self.first, x), pooled_features(self.second, x)], 1)


class WithZoom(_PooledScorer):
    """A backbone read twice per image: on the image and on its central `zoom` share
    enlarged back to the image's size (bilinear), the two pooled features side by side, [f,
    f_zoomed], under one 2-way linear classifier (`TrainConfig.imagenet_zoom`: a tighter
    framing of the frozen ImageNet embeddings from the pixels already read). It only scores,
    in eval mode."""

    def __init__(self, backbone: nn.Module, zoom: float) -> None:
        super().__init__()
        if not 0 < zoom < 1:
            raise ValueError(f"zoom must be in (0, 1), got {zoom}")
        self.backbone, self.zoom = backbone, zoom
        self.num_features = int(2 * backbone.num_features)
        self.classifier = nn.Linear(self.num_features, NUM_CLASSES)

    def zoomed(self, x: torch.Tensor) -> torch.Tensor:
        """The central `zoom` share of each (B, C, H, W) image, resized back to (H, W)."""
        height, width = x.shape[-2:]
        keep_h, keep_w = max(1, round(height * self.zoom)), max(1, round(width * self.zoom))
        top, left = (height - keep_h) // 2, (width - keep_w) // 2
        centre = x[..., top:top + keep_h, left:left + keep_w]
        return F.interpolate(centre, size=(height, width), mode="bilinear", align_corners=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([pooled_features(self.backbone, x),
                          pooled_features(self.backbone, self.zoomed(x))], 1)


def anomaly_logit_weights(model: nn.Module) -> tuple[np.ndarray, float]:
    """(weight (D,), bias) of the anomaly-minus-normal logit over pooled features: the
    model's anomaly probability is sigmoid(weight · f + bias)."""
    classifier = model.get_classifier()
    w = classifier.weight.detach().float().cpu().numpy()
    b = classifier.bias.detach().float().cpu().numpy()
    other = 1 - ANOMALY_INDEX
    return w[ANOMALY_INDEX] - w[other], float(b[ANOMALY_INDEX] - b[other])


def anomaly_probability(logits: torch.Tensor) -> torch.Tensor:
    """Softmax probability of the anomaly class, (B, 2) logits -> (B,) float32 in [0, 1].

    NaN logits give NaN probabilities.
    """
    if logits.ndim != 2 or logits.shape[1] != NUM_CLASSES:
        raise ValueError(f"expected logits of shape (B, 2), got {tuple(logits.shape)}")
    return torch.softmax(logits.float(), dim=1)[:, ANOMALY_INDEX]


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda when available else cpu; "cpu", "cuda", "cuda:1" pass through.

    Raises ValueError for CUDA requested on a machine without it.
    """
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r} requested but CUDA is not available")
    return device


def set_seed(seed: int) -> None:
    """Seed Python's `random`, NumPy's global RNG and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
