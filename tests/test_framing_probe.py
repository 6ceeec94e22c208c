"""The framing probe's re-stretch: the same per-image stretch an import applies."""

import numpy as np
import pytest

from benchmarks.framing_probe import restretch
from ml_backend.core.stretch import make_stretch


def test_restretch_applies_the_named_stretch_to_each_image_on_its_own():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 40, size=(3, 8, 8, 1), dtype=np.uint8)
    images[1] *= 5  # another range: per-image limits must differ
    out = restretch(images, "log,a=100")
    stretch = make_stretch({"name": "log", "a": 100.0})
    assert out.shape == images.shape and out.dtype == np.uint8
    for image, got in zip(images, out, strict=True):
        np.testing.assert_array_equal(got, stretch(image))
    assert not np.array_equal(out, images)


def test_restretch_names_a_bad_parameter():
    with pytest.raises(ValueError, match="'log'"):
        restretch(np.zeros((1, 4, 4, 1), np.uint8), "log,a=-1")


def test_symmetry_views_np_are_the_models_views_in_image_layout():
    from benchmarks.framing_probe import symmetry_views_np

    images = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 1)
    assert [v.shape for v in symmetry_views_np(images, "")] == [images.shape]
    views = symmetry_views_np(images, "dihedral")
    assert len(views) == 8 and all(v.shape == images.shape for v in views)
    np.testing.assert_array_equal(views[0], images)
    np.testing.assert_array_equal(views[1], np.rot90(images, 1, axes=(1, 2)))
    assert len({v.tobytes() for v in views}) == 8
    flip = symmetry_views_np(images, "flip")
    np.testing.assert_array_equal(flip[1], images[:, :, ::-1])


def test_the_probe_refits_on_its_own_picks_each_cycle(monkeypatch):
    from benchmarks import framing_probe

    rng = np.random.default_rng(0)
    classes = np.repeat(np.arange(4), 200)
    features = rng.normal(size=(800, 6)).astype(np.float32)
    features[np.arange(800), classes] += 6.0  # each class its own direction: separable
    fitted = []
    real_fit = framing_probe.fit_fast_head

    def recording_fit(features, labelled, labels, **kw):
        fitted.append((len(labelled), int(labels.sum()), kw["c"]))
        return real_fit(features, labelled, labels, **kw)

    monkeypatch.setattr(framing_probe, "fit_fast_head", recording_fit)
    found = framing_probe.probe_metrics(features, classes, draws=2, cycles=3, c=0.5,
                                         rare_share=0.05)
    assert found.shape == (4, 2, 3, len(framing_probe.METRICS))
    # 5 + 495 to start, then the 10 top anomalies and 10 top normals per cycle.
    assert fitted[:3] == [(500, 5, 0.5), (520, 15, 0.5), (540, 25, 0.5)]
    assert len(fitted) == 4 * 2 * 3
    np.testing.assert_allclose(found[..., 0], 1.0)  # separable: every ranking perfect


def test_a_framing_can_pool_an_earlier_stage(tmp_path):
    from benchmarks.framing_probe import framing_features
    from ml_backend.core.baselines import pretrained_feature_fn
    from ml_backend.core.config import TrainConfig

    images = np.random.default_rng(1).integers(0, 255, size=(3, 40, 40, 1), dtype=np.uint8)
    got = framing_features(images, "1.0x32/b4", tmp_path)
    expected = pretrained_feature_fn(TrainConfig(image_size=32, device="cpu"), 1, block=4)(images)
    assert got.shape == (3, 112)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "1.0x32_b4.npy").exists()
