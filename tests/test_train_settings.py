"""Training settings for ranking quality: drop path, dropout, weak-view invariance.

Each is validated, changes what it claims in training, leaves scoring (eval mode) alone, and
is recorded in the checkpoint; configs saved before a field existed read its old value.
"""

from __future__ import annotations

import pytest
import torch
from timm.layers import DropPath

from ml_backend.core.augment import WeakStrong
from ml_backend.core.checkpoint import (
    ModelMeta,
    load_model_dir,
    new_version,
    read_meta,
    save_model_dir,
    utc_now_iso,
)
from ml_backend.core.config import LEGACY_VALUES, TrainConfig
from ml_backend.core.model import build_model, set_seed

CFG = TrainConfig(pretrained=False, image_size=32)


@pytest.mark.parametrize("bad", [{"drop_path_rate": -0.1}, {"drop_path_rate": 1.0},
                                 {"drop_rate": 1.5}, {"invariance": "rotate"},
                                 {"invariance": ""}])
def test_bad_settings_are_refused_with_the_field_named(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        TrainConfig(**bad)


def test_configs_saved_before_a_field_existed_read_its_old_value():
    old = TrainConfig().to_dict()
    for name in LEGACY_VALUES:
        del old[name]
    changed = TrainConfig(invariance="flip", drop_path_rate=0.2).to_dict()
    assert TrainConfig.from_dict(old).invariance == "dihedral"
    assert TrainConfig.from_dict(old).drop_path_rate == 0.0
    assert TrainConfig.from_dict(changed).invariance == "flip"
    assert TrainConfig.from_dict(changed).drop_path_rate == 0.2


def test_drop_path_and_dropout_reach_the_network():
    model = build_model(CFG.replace(drop_path_rate=0.2, drop_rate=0.3), 1)
    rates = sorted({m.drop_prob for m in model.modules() if isinstance(m, DropPath)})
    assert rates and rates[0] > 0 and rates[-1] == pytest.approx(0.2, abs=0.02)
    assert model.drop_rate == 0.3
    plain = build_model(CFG, 1)
    assert not any(isinstance(m, DropPath) for m in plain.modules())


def test_drop_settings_randomise_training_but_not_scoring():
    set_seed(0)
    dropped = build_model(CFG.replace(drop_path_rate=0.5, drop_rate=0.5), 1)
    plain = build_model(CFG, 1)
    plain.load_state_dict(dropped.state_dict())
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dropped.eval()(x), plain.eval()(x))
        dropped.train()
        assert not torch.allclose(dropped(x), dropped(x))


def test_flip_invariance_never_turns_an_image_upside_down():
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(translate_fraction=0.0, invariance="flip")
    weak = WeakStrong(cfg).weak(x, torch.Generator().manual_seed(1))
    flipped = 0
    for img, view in zip(x, weak, strict=True):
        assert torch.equal(view, img) or torch.equal(view, img.flip(-1))
        flipped += torch.equal(view, img.flip(-1))
    assert 10 < flipped < 54  # about half, per sample


def test_dihedral_invariance_also_turns_images():
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    weak = WeakStrong(TrainConfig(translate_fraction=0.0)).weak(x, torch.Generator())
    other = [not (torch.equal(v, i) or torch.equal(v, i.flip(-1))) for i, v in zip(x, weak,
                                                                                   strict=True)]
    assert sum(other) > 10


def test_settings_are_recorded_in_the_checkpoint_and_rebuild_the_model(tmp_path):
    cfg = CFG.replace(drop_path_rate=0.1, drop_rate=0.2, invariance="flip", bn_momentum=0.01)
    set_seed(0)
    model = build_model(cfg, 1)
    meta = ModelMeta(version=new_version(), parent=None, created=utc_now_iso(),
                     config=cfg.to_dict(), image_size=32, channels=1, stretch={"name": "none"})
    save_model_dir(tmp_path / "m", ema=model, student=model, meta=meta)
    saved = TrainConfig.from_dict(read_meta(tmp_path / "m").config)
    assert (saved.drop_path_rate, saved.drop_rate, saved.invariance, saved.bn_momentum) == (
        0.1, 0.2, "flip", 0.01)
    loaded, _ = load_model_dir(tmp_path / "m")
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
