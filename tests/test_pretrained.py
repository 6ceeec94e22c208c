"""ImageNet weights: renamed keys load strictly into timm and still recognise a cat."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from skimage import data

from ml_backend.core import pretrained
from ml_backend.core.config import TrainConfig
from ml_backend.core.model import build_model
from ml_backend.core.preprocess import to_model_input
from ml_backend.core.pretrained import (
    ARCH,
    PretrainedWeightsError,
    block_positions,
    check_matches,
    imagenet_state_dict,
    rename_keys,
)

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def imagenet_model() -> torch.nn.Module:
    model = timm.create_model(ARCH, pretrained=False)
    model.load_state_dict(imagenet_state_dict(), strict=True)
    return model.eval()


def test_chelsea_is_a_cat(imagenet_model):
    x = to_model_input(data.chelsea()[None], 224, "cpu")
    with torch.inference_mode():
        top5 = imagenet_model(x).topk(5, dim=1).indices[0].tolist()
    assert any(c in IMAGENET_CATS for c in top5), top5


def test_block_positions_follow_stage_depths():
    assert block_positions([1, 2, 1]) == [(0, 0), (1, 0), (1, 1), (2, 0)]


def test_missing_key_is_refused():
    state = imagenet_state_dict()
    target = timm.create_model(ARCH, pretrained=False).state_dict()
    del state["blocks.3.1.conv_dw.weight"]
    with pytest.raises(PretrainedWeightsError, match="missing"):
        check_matches(state, target)


def test_wrong_stage_depths_are_refused():
    """Shifting one block into the next stage gives keys timm does not have."""
    source = pretrained.load_source_state_dict()
    renamed = rename_keys(source, [1, 1, 3, 3, 3, 4, 1])
    target = timm.create_model(ARCH, pretrained=False).state_dict()
    with pytest.raises(PretrainedWeightsError):
        check_matches(renamed, target)


def test_swapped_tensor_shapes_are_refused():
    state = imagenet_state_dict()
    target = timm.create_model(ARCH, pretrained=False).state_dict()
    state["blocks.1.0.conv_pw.weight"] = state["blocks.2.0.conv_pw.weight"]
    with pytest.raises(PretrainedWeightsError, match="shapes"):
        check_matches(state, target)


def test_unknown_source_key_is_refused():
    with pytest.raises(PretrainedWeightsError, match="_blocks.0._mystery"):
        rename_keys({"_blocks.0._mystery.weight": torch.zeros(1)}, [1])


def test_missing_package_file_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(pretrained, "weights_path", lambda: tmp_path / "absent.pth")
    with pytest.raises(PretrainedWeightsError, match="absent.pth"):
        imagenet_state_dict()


def test_grey_model_sees_what_the_rgb_model_sees():
    """Pretrained 1-channel stem = summed RGB filters: grey image == its RGB copy."""
    cfg = TrainConfig(pretrained=True)
    rgb, grey = build_model(cfg, 3).eval(), build_model(cfg, 1).eval()
    image = (data.camera()[::8, ::8, None]).astype(np.uint8)[None]  # (1, 64, 64, 1)
    with torch.inference_mode():
        f_grey = grey.forward_features(to_model_input(image, 64))
        f_rgb = rgb.forward_features(to_model_input(np.repeat(image, 3, axis=-1), 64))
    torch.testing.assert_close(f_grey, f_rgb, rtol=1e-4, atol=1e-4)
