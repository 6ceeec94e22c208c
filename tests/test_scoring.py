"""Preprocessing, scoring of images and stores, and `amls score`."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
import torch

from amls_cli import main
from ml_backend.core.checkpoint import ModelMeta, new_version, save_model_dir, utc_now_iso
from ml_backend.core.config import TrainConfig
from ml_backend.core.model import anomaly_probability, build_model, pooled_features, set_seed
from ml_backend.core.preprocess import center_crop, normalise, to_model_input, to_unit_tensor
from ml_backend.core.scoring import score_images, score_store
from ml_backend.core.sources import ArraySource
from ml_backend.core.store import CutoutStore

SIZE = 32
STRETCH = {"name": "asinh", "a": 0.1}
CFG = TrainConfig(pretrained=False, image_size=SIZE)


def random_images(n: int, size: int = SIZE, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), np.uint8)


def make_meta(channels: int = 3, stretch: dict | None = None, crop: float = 1.0) -> ModelMeta:
    return ModelMeta(version=new_version(), parent=None, created=utc_now_iso(),
                     config=CFG.replace(center_crop=crop).to_dict(), image_size=SIZE,
                     channels=channels, stretch=dict(stretch or STRETCH), center_crop=crop)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """A model whose scores spread out (the fresh head gives ~0.5 everywhere)."""
    set_seed(0)
    net = build_model(CFG.replace(head_init_std=0.5), 3)
    with torch.no_grad():
        net.train()(torch.randn(8, 3, SIZE, SIZE))  # non-trivial BN statistics
    return net.eval()


# ---- preprocess -----------------------------------------------------------------------


def test_to_model_input_values_shape_and_layout():
    images = np.array([0, 255, 51], dtype=np.uint8).reshape(1, 1, 1, 3).repeat(4, 1).repeat(4, 2)
    x = to_model_input(images, 4)
    assert x.shape == (1, 3, 4, 4) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([-1.0, 1.0, -0.6]))


def test_resize_is_antialiased_bilinear_and_keeps_constants():
    flat = np.full((2, 48, 40, 1), 200, dtype=np.uint8)
    x = to_model_input(flat, SIZE)
    assert x.shape == (2, 1, SIZE, SIZE)
    torch.testing.assert_close(x, torch.full_like(x, 200 / 255 * 2 - 1))
    # A one-pixel checkerboard averages out when downsampled 2x with antialiasing.
    board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)[None, :, :, None]
    assert to_model_input(board, SIZE).abs().max() < 0.05


def test_torch_input_equals_numpy_input_and_input_is_unchanged():
    images = random_images(3)
    copy = images.copy()
    torch.testing.assert_close(to_model_input(images, 16),
                               to_model_input(torch.from_numpy(images), 16))
    assert np.array_equal(images, copy)


def test_read_only_arrays_are_accepted():
    images = random_images(2)
    images.flags.writeable = False
    assert to_unit_tensor(images).max() <= 1.0


def test_unit_tensor_and_normalise():
    x01 = to_unit_tensor(random_images(2, size=8))
    assert x01.shape == (2, 3, 8, 8) and x01.min() >= 0.0 and x01.max() <= 1.0
    torch.testing.assert_close(normalise(x01), x01 * 2 - 1)
    assert torch.isnan(normalise(torch.tensor([float("nan")]))).all()


def test_center_crop_keeps_the_central_pixels():
    x = torch.arange(2 * 10 * 8, dtype=torch.float32).reshape(2, 1, 10, 8)
    assert center_crop(x, 1.0) is x
    half = center_crop(x, 0.5)
    assert half.shape == (2, 1, 5, 4)
    torch.testing.assert_close(half, x[..., 2:7, 2:6])
    assert center_crop(x, 0.01).shape == (2, 1, 1, 1)  # never empty


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5, float("nan")])
def test_center_crop_refuses_fractions_outside_0_1(fraction):
    with pytest.raises(ValueError, match="center_crop"):
        center_crop(torch.zeros(1, 1, 4, 4), fraction)
    with pytest.raises(ValueError, match="center_crop"):
        TrainConfig(center_crop=fraction)


def test_cropped_input_equals_cropping_the_pixels_first():
    images = random_images(3, size=48)
    torch.testing.assert_close(to_model_input(images, 16, crop=0.5),
                               to_model_input(images[:, 12:36, 12:36], 16))


@pytest.mark.parametrize("bad, error", [
    (np.zeros((2, 8, 8, 3), np.float32), TypeError),
    (np.zeros((8, 8, 3), np.uint8), ValueError),
    ([[1, 2]], TypeError),
])
def test_bad_pixels_are_refused(bad, error):
    with pytest.raises(error):
        to_model_input(bad, SIZE)


# ---- scoring --------------------------------------------------------------------------


def test_score_images_equals_the_model_forward(model):
    images = random_images(5)
    scores = score_images(model, images, SIZE)
    with torch.inference_mode():
        expected = anomaly_probability(model(to_model_input(images, SIZE))).numpy()
    assert scores.dtype == np.float32 and scores.shape == (5,)
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    assert scores.std() > 1e-3  # the fixture model really discriminates
    np.testing.assert_allclose(score_images(model, images, SIZE, batch_size=2), scores,
                               rtol=1e-5)


def test_score_store_matches_score_images_in_any_batching(model, tmp_path):
    images = random_images(23)
    with CutoutStore.create(tmp_path / "s.h5", height=SIZE, width=SIZE, channels=3,
                            stretch=STRETCH) as store:
        store.append([f"c{i}" for i in range(23)], images)
        expected = score_images(model, images, SIZE)
        for batch_size in (1, 7, 64):
            scores = score_store(store, model, make_meta(), batch_size=batch_size, device="cpu")
            np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)


def test_score_store_applies_the_models_center_crop(model, tmp_path):
    images = random_images(6, size=2 * SIZE)
    source = ArraySource(images, STRETCH)
    scores = score_store(source, model, make_meta(crop=0.5), batch_size=4, device="cpu")
    centres = images[:, SIZE // 2:SIZE // 2 + SIZE, SIZE // 2:SIZE // 2 + SIZE]
    np.testing.assert_allclose(scores, score_images(model, centres, SIZE), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(score_images(model, images, SIZE, crop=0.5), scores, rtol=1e-5,
                               atol=1e-6)
    assert not np.allclose(scores, score_images(model, images, SIZE), atol=1e-4)


def test_score_store_follows_the_order_of_indices(model):
    images = random_images(12)
    source = ArraySource(images, STRETCH)
    indices = np.array([9, 2, 11, 0, 5])
    scores = score_store(source, model, make_meta(), indices=indices, batch_size=2, device="cpu")
    np.testing.assert_allclose(scores, score_images(model, images[indices], SIZE), rtol=1e-5)


def test_features_come_from_the_same_pass_row_for_row_with_the_scores(model):
    images = random_images(12, seed=5)
    source = ArraySource(images, STRETCH)
    with torch.inference_mode():
        expected = pooled_features(model, to_model_input(images, SIZE)).numpy()
    everything = np.zeros((12, model.num_features), dtype=np.float16)
    scores = score_store(source, model, make_meta(), batch_size=5, device="cpu",
                         features=everything)
    np.testing.assert_allclose(everything, expected, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(scores, score_images(model, images, SIZE), rtol=1e-5)
    indices = np.array([7, 1, 7, 3])  # any order, repeats allowed
    some = np.zeros((4, model.num_features), dtype=np.float32)
    score_store(source, model, make_meta(), indices=indices, batch_size=2, device="cpu",
                features=some)
    np.testing.assert_allclose(some, expected[indices], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"features must have shape \(4, D\)"):
        score_store(source, model, make_meta(), indices=indices, device="cpu",
                    features=np.zeros((12, 4), dtype=np.float32))


class ShuffledSource(ArraySource):
    """A reader that returns batches in another order than requested (allowed by contract)."""

    def iter_batches(self, batch_size, *, indices=None, prefetch=2):
        batches = list(super().iter_batches(batch_size, indices=indices, prefetch=prefetch))
        yield from reversed(batches)


def test_scores_land_on_their_images_whatever_the_batch_order(model):
    images = random_images(10, seed=3)
    scores = score_store(ShuffledSource(images, STRETCH), model, make_meta(), batch_size=3)
    np.testing.assert_allclose(scores, score_images(model, images, SIZE), rtol=1e-5)


def test_resizes_stores_of_another_size(model):
    images = random_images(4, size=48)
    scores = score_store(ArraySource(images, STRETCH), model, make_meta(), device="cpu")
    np.testing.assert_allclose(scores, score_images(model, images, SIZE), rtol=1e-6)


@pytest.mark.parametrize("store_stretch, channels, message", [
    ({"name": "none"}, 3, "stretch"),
    ({"name": "asinh", "a": 0.2}, 3, "stretch"),
    (STRETCH, 1, "channel"),
])
def test_mismatched_store_is_refused(model, store_stretch, channels, message):
    source = ArraySource(random_images(2, channels=channels), store_stretch)
    with pytest.raises(ValueError, match=message) as info:
        score_store(source, model, make_meta())
    if message == "stretch":
        assert str(store_stretch["name"]) in str(info.value) and "asinh" in str(info.value)


def test_repeated_indices_get_the_same_score(model):
    images = random_images(6)
    indices = np.array([4, 1, 4, 4, 0, 1])
    scores = score_store(ArraySource(images, STRETCH), model, make_meta(), indices=indices,
                         batch_size=2)
    np.testing.assert_allclose(scores, score_images(model, images[indices], SIZE), rtol=1e-5)


def test_bad_indices_are_refused(model):
    source = ArraySource(random_images(4), STRETCH)
    for bad in ([-1], [4], [1.5], [[0, 1]]):
        with pytest.raises(ValueError, match="indices"):
            score_store(source, model, make_meta(), indices=np.array(bad))


def test_empty_selection_gives_empty_scores(model):
    source = ArraySource(random_images(4), STRETCH)
    scores = score_store(source, model, make_meta(), indices=np.array([], dtype=np.int64))
    assert scores.shape == (0,) and scores.dtype == np.float32


# ---- CLI ------------------------------------------------------------------------------


@pytest.fixture
def scored_files(model, tmp_path):
    images = random_images(9, seed=5)
    ids = [f"obj-{i}" for i in range(9)]
    with CutoutStore.create(tmp_path / "s.h5", height=SIZE, width=SIZE, channels=3,
                            stretch=STRETCH) as store:
        store.append(ids, images)
    model_dir = save_model_dir(tmp_path / "model", ema=model, student=model, meta=make_meta())
    return tmp_path / "s.h5", model_dir, dict(zip(ids, score_images(model, images, SIZE),
                                                  strict=True))


def read_csv(path) -> list[tuple[str, float]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["id", "score"]
    return [(cid, float(score)) for cid, score in rows[1:]]


def test_cli_writes_all_scores_sorted(scored_files, tmp_path):
    store, model_dir, expected = scored_files
    out = tmp_path / "scores.csv"
    assert main(["score", str(store), "--model", str(model_dir), "-o", str(out),
                 "--batch-size", "4", "--device", "cpu"]) == 0
    rows = read_csv(out)
    assert sorted(cid for cid, _ in rows) == sorted(expected)
    assert [s for _, s in rows] == sorted((s for _, s in rows), reverse=True)
    for cid, score in rows:
        assert score == pytest.approx(float(expected[cid]), rel=1e-5)


def test_cli_top_limits_csv_and_prints(scored_files, tmp_path, capsys):
    store, model_dir, expected = scored_files
    out = tmp_path / "top.csv"
    assert main(["score", str(store), "--model", str(model_dir), "-o", str(out),
                 "--top", "3"]) == 0
    rows = read_csv(out)
    best = sorted(expected, key=lambda k: -expected[k])[:3]
    assert [cid for cid, _ in rows] == best
    printed = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert printed == best


def test_cli_refuses_a_store_with_another_stretch(model, tmp_path, capsys):
    with CutoutStore.create(tmp_path / "png.h5", height=SIZE, width=SIZE, channels=3,
                            stretch={"name": "none"}) as store:
        store.append(["a"], random_images(1))
    model_dir = save_model_dir(tmp_path / "m", ema=model, student=model, meta=make_meta())
    status = main(["score", str(tmp_path / "png.h5"), "--model", str(model_dir),
                   "-o", str(tmp_path / "x.csv")])
    assert status == 2
    assert "amls score: error:" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("invariance, turns", [
    ("flip", [lambda a: a, lambda a: a[:, :, ::-1]]),
    ("dihedral", [lambda a, k=k, f=f: np.rot90(a[:, :, ::-1] if f else a, k, axes=(1, 2))
                  for k in range(4) for f in (False, True)]),
])
def test_test_time_augmentation_scores_the_mean_logits_over_the_views(model, invariance, turns):
    images = random_images(6, seed=8)
    meta = make_meta()
    tta = dataclasses.replace(meta, config={**meta.config, "invariance": invariance,
                                            "test_time_augmentation": True})
    features = np.zeros((6, model.num_features), dtype=np.float32)
    scores = score_store(ArraySource(images, STRETCH), model, tta, batch_size=4, device="cpu",
                         features=features)
    views = [np.ascontiguousarray(turn(images)) for turn in turns]
    with torch.inference_mode():
        logits = np.mean([model(to_model_input(v, SIZE)).float().numpy() for v in views], axis=0)
    expected = 1.0 / (1.0 + np.exp(logits[:, 0] - logits[:, 1]))  # softmax of the mean logits
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-6)
    with torch.inference_mode():
        mean_features = np.mean([pooled_features(model, to_model_input(v, SIZE)).numpy()
                                 for v in views], axis=0)
    np.testing.assert_allclose(features, mean_features, rtol=1e-3, atol=1e-4)
    plain = score_store(ArraySource(images, STRETCH), model, meta, device="cpu")
    assert not np.allclose(plain, scores)  # the views really changed the scores


def test_models_saved_before_test_time_augmentation_score_without_it():
    legacy = {k: v for k, v in CFG.to_dict().items() if k != "test_time_augmentation"}
    assert TrainConfig.from_dict(legacy).test_time_augmentation is False


def test_test_time_shifts_add_each_view_shifted_both_ways(model):
    images = random_images(5, seed=9)
    meta = make_meta()
    shifted_meta = dataclasses.replace(meta, config={
        **meta.config, "invariance": "flip", "test_time_augmentation": True,
        "test_time_shift": 0.125})  # 4 of 32 pixels
    scores = score_store(ArraySource(images, STRETCH), model, shifted_meta, device="cpu")
    x = to_model_input(images, SIZE).numpy()
    flips = [x, x[..., ::-1]]
    padded = [np.pad(v, ((0, 0), (0, 0), (4, 4), (4, 4)), mode="reflect") for v in flips]
    views = (flips + [p[..., 0:SIZE, 0:SIZE] for p in padded]  # moved 4 down and right
             + [p[..., 8:8 + SIZE, 8:8 + SIZE] for p in padded])  # and 4 up and left
    with torch.inference_mode():
        logits = np.mean([model(torch.from_numpy(np.ascontiguousarray(v))).float().numpy()
                          for v in views], axis=0)
    expected = 1.0 / (1.0 + np.exp(logits[:, 0] - logits[:, 1]))
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-6)
    flips_only = dataclasses.replace(meta, config={**shifted_meta.config, "test_time_shift": 0.0})
    assert not np.allclose(score_store(ArraySource(images, STRETCH), model, flips_only,
                                       device="cpu"), scores)


@pytest.mark.parametrize("bad", [-0.1, 0.5])
def test_test_time_shift_is_a_fraction_below_half_and_absent_means_none(bad):
    with pytest.raises(ValueError, match="test_time_shift"):
        TrainConfig(test_time_shift=bad)
    legacy = {k: v for k, v in CFG.to_dict().items() if k != "test_time_shift"}
    assert TrainConfig.from_dict(legacy).test_time_shift == 0.0
