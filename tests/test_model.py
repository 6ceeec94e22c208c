"""build_model: channel counts, stem adaptation, quiet initial head, BN momentum, seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.models import adapt_input_conv
from torch import nn

from ml_backend.core.config import TrainConfig
from ml_backend.core.model import (
    anomaly_probability,
    build_model,
    pooled_features,
    resolve_device,
    set_bn_momentum,
    set_seed,
    truncate_after_block,
)

CFG = TrainConfig(pretrained=False, image_size=32)


@pytest.mark.parametrize("in_chans", [1, 3, 4])
def test_model_takes_any_channel_count_and_gives_two_logits(in_chans):
    set_seed(0)
    model = build_model(CFG, in_chans).eval()
    with torch.inference_mode():
        logits = model(torch.randn(2, in_chans, 32, 32))
    assert logits.shape == (2, 2)
    assert torch.isfinite(logits).all()


def test_stem_adaptation_makes_grey_equal_its_rgb_copy():
    set_seed(0)
    rgb = build_model(CFG, 3).eval()
    grey = build_model(CFG, 1).eval()
    state = rgb.state_dict()
    state["conv_stem.weight"] = adapt_input_conv(1, state["conv_stem.weight"])
    grey.load_state_dict(state)
    image = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.inference_mode():
        torch.testing.assert_close(grey.forward_features(image),
                                   rgb.forward_features(image.expand(-1, 3, -1, -1)),
                                   rtol=1e-4, atol=1e-5)


def test_four_channel_stem_repeats_filters_scaled():
    weight = torch.randn(8, 3, 3, 3)
    adapted = adapt_input_conv(4, weight)
    torch.testing.assert_close(adapted[:, :3], weight * 3 / 4)
    torch.testing.assert_close(adapted[:, 3], weight[:, 0] * 3 / 4)


def test_initial_predictions_are_near_one_half():
    set_seed(1)
    model = build_model(CFG, 3).train()  # train mode: batch statistics, as in FixMatch
    with torch.no_grad():
        probs = torch.softmax(model(torch.randn(16, 3, 32, 32)), dim=1)
    assert probs.max() < 0.6


def test_head_is_reinitialised_small_with_zero_bias():
    model = build_model(CFG.replace(head_init_std=1e-3), 3)
    head = model.get_classifier()
    assert head.out_features == 2
    assert torch.count_nonzero(head.bias) == 0
    assert 2e-4 < head.weight.std().item() < 5e-3


def test_bn_momentum_is_applied_and_used():
    model = build_model(CFG.replace(bn_momentum=0.25), 3)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) > 40
    assert {m.momentum for m in norms} == {0.25}
    # The momentum really drives the update: running = (1 - m) * running + m * batch_mean.
    bn = model.bn1
    seen = {}
    bn.register_forward_hook(lambda _m, inputs, _out: seen.update(x=inputs[0].detach()))
    before = bn.running_mean.clone()
    model.train()(torch.randn(4, 3, 32, 32) + 3.0)
    batch_mean = seen["x"].mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn.running_mean, 0.75 * before + 0.25 * batch_mean)


def test_bn_momentum_out_of_range_is_refused():
    with pytest.raises(ValueError, match="bn_momentum"):
        set_bn_momentum(nn.BatchNorm2d(3), 1.5)


def test_same_seed_same_weights_other_seed_other_weights():
    def weights(seed: int) -> dict[str, torch.Tensor]:
        set_seed(seed)
        return build_model(CFG, 3).state_dict()

    a, b, c = weights(7), weights(7), weights(8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv_stem.weight"], c["conv_stem.weight"])


def test_set_seed_seeds_numpy_and_random():
    import random

    set_seed(3)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_seed(3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_anomaly_probability_is_softmax_of_index_one():
    logits = torch.tensor([[0.0, 0.0], [0.0, 10.0], [10.0, 0.0]])
    probs = anomaly_probability(logits)
    torch.testing.assert_close(probs, torch.softmax(logits, 1)[:, 1])
    assert probs[1] > 0.99 > 0.01 > probs[2]
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        anomaly_probability(torch.zeros(3))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda"}
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")


def test_in_chans_must_be_positive():
    with pytest.raises(ValueError, match="in_chans"):
        build_model(CFG, 0)


def test_anomaly_logit_weights_reproduce_the_models_probability():
    from ml_backend.core.model import anomaly_logit_weights, pooled_features

    torch.manual_seed(0)
    model = build_model(TrainConfig(pretrained=False, head_init_std=0.3), 3).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = anomaly_probability(model(x)).numpy()
        features = pooled_features(model, x).numpy()
    weight, bias = anomaly_logit_weights(model)
    np.testing.assert_allclose(1 / (1 + np.exp(-(features @ weight + bias))), expected,
                               rtol=1e-5, atol=1e-6)


def test_batch_statistics_normalise_with_the_batch_and_leave_the_model_as_it_was():
    from ml_backend.core.model import batch_statistics

    set_seed(0)
    model = build_model(TrainConfig(pretrained=False, image_size=32), 1)
    x = torch.rand(6, 1, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        eval_out = model.eval()(x)
        with batch_statistics(model):
            inside = model(x)
            assert not model.training
        train_out = model.train()(x)  # batch statistics, and updates the running ones
    assert not torch.allclose(inside, eval_out)
    torch.testing.assert_close(inside, train_out)
    model.load_state_dict(before)
    model.train()
    with torch.no_grad(), batch_statistics(model):
        model(x)
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_truncating_after_a_block_pools_that_stages_output():
    torch.manual_seed(0)
    model = build_model(CFG, 1).eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        hidden = model.bn1(model.conv_stem(x))
        for stage in model.blocks[:5]:
            hidden = stage(hidden)
        expected = hidden.mean((2, 3))
        truncate_after_block(model, 4)
        pooled = pooled_features(model, x)
        logits = model(x)
    assert model.num_features == 112 and len(model.blocks) == 5
    torch.testing.assert_close(pooled, expected)
    torch.testing.assert_close(logits, model.get_classifier()(expected))
    with pytest.raises(ValueError, match=r"block must be in 0\.\.4"):
        truncate_after_block(model, 5)


def test_a_backbone_cut_after_a_stage_keeps_the_small_head_init():
    cfg = TrainConfig(pretrained=False, image_size=32, backbone_stage=4)
    model = build_model(cfg, 1)
    assert model.num_features == 112 and len(model.blocks) == 5
    head = model.get_classifier()
    assert head.in_features == 112 and float(head.weight.detach().std()) < 1e-2
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 2)
    with pytest.raises(ValueError, match="block must be in 0..6"):
        build_model(cfg.replace(backbone_stage=7), 1)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="backbone_stage must be"):
            TrainConfig(backbone_stage=bad)
