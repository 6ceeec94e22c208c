import dataclasses

import numpy as np
import pytest
import torch

from ml_backend.core.fast_head import fit_fast_head, fit_neighbour_term, similar


def clustered(n=400, n_anomalies=8, dim=32, seed=0):
    """Normals around one centre, anomalies shifted along a few dimensions."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, dim)).astype(np.float32)
    truth = np.zeros(n, dtype=np.int64)
    truth[rng.choice(n, n_anomalies, replace=False)] = 1
    features[truth == 1, :4] += 4.0
    return features.astype(np.float16), truth


def test_one_labelled_anomaly_already_ranks_the_others_first():
    features, truth = clustered()
    anomaly = int(np.flatnonzero(truth)[0])
    normals = np.flatnonzero(truth == 0)[:50]
    labelled = np.r_[anomaly, normals]
    head = fit_fast_head(features, labelled, truth[labelled])
    assert (head.n_anomalies, head.n_normals) == (1, 50)
    scores = head.scores(features)
    others = np.setdiff1d(np.flatnonzero(truth), [anomaly])
    top = np.argsort(-scores)[:len(others) + 1]
    assert set(others) <= set(top)
    assert scores.dtype == np.float32 and ((scores >= 0) & (scores <= 1)).all()


def test_scores_agree_with_standardising_by_hand():
    features, truth = clustered(n=100, n_anomalies=5)
    labelled = np.arange(100)
    head = fit_fast_head(features, labelled, truth)
    x = (features.astype(np.float32) - head.mean) / head.scale
    expected = 1 / (1 + np.exp(-(x @ head.weights + head.bias)))
    np.testing.assert_allclose(head.scores(features), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("labels, message", [
    ([0, 0, 0], "has 0 anomalies and 3 normals"),
    ([1, 1, 1], "has 3 anomalies and 0 normals"),
])
def test_one_class_only_is_refused(labels, message):
    features, _ = clustered(n=20)
    with pytest.raises(ValueError, match=message):
        fit_fast_head(features, np.arange(3), np.array(labels))


def test_bad_inputs_are_refused_clearly():
    features, truth = clustered(n=20, n_anomalies=2)
    with pytest.raises(ValueError, match="3 labelled rows but 2 labels"):
        fit_fast_head(features, np.arange(3), np.array([0, 1]))
    with pytest.raises(ValueError, match="must be 0"):
        fit_fast_head(features, np.arange(2), np.array([0, 2]))
    broken = features.copy()
    broken[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_fast_head(broken, np.arange(20), truth)
    head = fit_fast_head(features, np.arange(20), truth)
    with pytest.raises(ValueError, match="8 dimensions, the head 32"):
        head.scores(np.zeros((3, 8), dtype=np.float32))


def test_similar_orders_by_cosine_of_standardised_features_to_the_query_direction():
    features = np.array([[1, 0], [0.9, 0.1], [0, 1], [-1, 0], [0.7, 0.7]], dtype=np.float32)
    z = (features - features.mean(axis=0)) / features.std(axis=0)  # by hand
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    rows, sims = similar(features, [0], k=3)
    expected = np.argsort(-(unit @ unit[0]), kind="stable")[:3]
    assert list(rows) == list(expected) and rows[0] == 0
    np.testing.assert_allclose(sims, (unit @ unit[0])[expected], rtol=1e-5)
    direction = unit[[0, 2]].mean(axis=0)
    rows, sims = similar(features, [0, 2], k=10)  # mean direction of two queries; k capped
    by_hand = unit @ (direction / np.linalg.norm(direction))
    assert len(rows) == 5 and rows[0] == 4  # (rows 0 and 2 tie next)
    np.testing.assert_allclose(sims, np.sort(by_hand)[::-1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least one query"):
        similar(features, [], k=2)


def test_similar_ignores_what_every_row_shares_and_loud_uninformative_features():
    """Raw pooled features share a large offset and differ in scale per feature; raw cosine
    then follows the loudest features. Standardised, the ranking is the same under any
    per-feature offset and scale, and the query's own cluster comes first."""
    features, truth = clustered(n=400, n_anomalies=8)
    features = features.astype(np.float32)
    anomalies = np.flatnonzero(truth)
    loud = features * np.r_[np.ones(4), np.full(28, 30.0)].astype(np.float32) + 50.0
    rows, sims = similar(loud, anomalies[:2], k=8)
    same_rows, same_sims = similar(features, anomalies[:2], k=8)
    assert set(rows) == set(same_rows) and len(set(rows) & set(anomalies)) >= 6
    np.testing.assert_allclose(sims, same_sims, atol=1e-4)
    direction = (loud[anomalies[:2]] / np.linalg.norm(loud[anomalies[:2]], axis=1,
                                                      keepdims=True)).mean(axis=0)
    raw = loud @ direction / np.linalg.norm(loud, axis=1)
    assert len(set(np.argsort(-raw)[:8]) & set(anomalies)) <= 3  # raw cosine is lost


def test_blend_ranks_by_both_standardised_logits_and_reads_on_the_models_scale():
    from ml_backend.core.fast_head import blend_with_model

    features, truth = clustered(n=300, n_anomalies=6)
    head = fit_fast_head(features, np.arange(300), truth)
    rng = np.random.default_rng(1)
    weight, bias = rng.normal(size=features.shape[1]).astype(np.float32), 0.7
    blended = blend_with_model(head, weight, bias, features).head

    f = features.astype(np.float64)
    model_logit = f @ weight + bias
    head_logit = ((f - head.mean) / head.scale) @ head.weights + head.bias
    z = 0.5 * ((model_logit - model_logit.mean()) / model_logit.std()
               + (head_logit - head_logit.mean()) / head_logit.std())
    # The mean of both, mapped so that its median and 99th percentile are the model's.
    (z_mid, z_top), (m_mid, m_top) = (np.quantile(v, (0.5, 0.99)) for v in (z, model_logit))
    logit = m_mid + (z - z_mid) * (m_top - m_mid) / (z_top - z_mid)
    np.testing.assert_allclose(blended.scores(features), 1 / (1 + np.exp(-logit)), atol=1e-5)
    assert (blended.n_anomalies, blended.n_normals) == (6, 294)


def test_a_three_term_blend_reads_both_embeddings_and_ranks_by_three_standardised_logits():
    from ml_backend.core.fast_head import blend_with_model

    features, truth = clustered(n=300, n_anomalies=6)
    other = np.random.default_rng(3).normal(size=(300, 5)).astype(np.float32)
    other[truth == 1] += 1.5
    head = fit_fast_head(features, np.arange(300), truth)
    other_head = fit_fast_head(other, np.arange(300), truth)
    weight, bias = np.random.default_rng(1).normal(size=features.shape[1]), -0.4
    blended = blend_with_model(head, weight, bias, features, imagenet=(other_head, other))

    def z(logit: np.ndarray) -> np.ndarray:
        return (logit - logit.mean()) / logit.std()

    model_logit = features.astype(np.float64) @ weight + bias
    mean_z = (z(model_logit) + z(head.logits(features).astype(np.float64))
              + z(other_head.logits(other).astype(np.float64))) / 3
    (z_mid, z_top), (m_mid, m_top) = (np.quantile(v, (0.5, 0.99)) for v in (mean_z, model_logit))
    logit = m_mid + (mean_z - z_mid) * (m_top - m_mid) / (z_top - z_mid)
    side_by_side = blended.scores([features, other])
    np.testing.assert_allclose(side_by_side, 1 / (1 + np.exp(-logit)), atol=1e-4)
    np.testing.assert_allclose(blended.head.scores(np.hstack([features, other])), side_by_side,
                               atol=1e-6)
    assert len(blended.head.weights) == features.shape[1] + other.shape[1]
    assert blended.neighbours is None
    with pytest.raises(ValueError, match="row for row"):
        blend_with_model(head, weight, bias, features, imagenet=(other_head, other[:10]))
    with pytest.raises(ValueError, match="feature blocks of"):
        blended.scores([features])


def test_a_four_term_blend_adds_the_neighbour_term_standardised_over_the_unlearnt_rows():
    from ml_backend.core.fast_head import blend_with_model

    features, truth = clustered(n=300, n_anomalies=6)
    other = np.random.default_rng(3).normal(size=(300, 5)).astype(np.float32)
    other[truth == 1] += 1.5
    labelled = np.arange(0, 300, 3)
    labelled = np.union1d(labelled, np.flatnonzero(truth)[:3])
    head = fit_fast_head(features, labelled, truth[labelled])
    other_head = fit_fast_head(other, labelled, truth[labelled])
    term = fit_neighbour_term(other, labelled, truth[labelled])
    weight, bias = np.random.default_rng(1).normal(size=features.shape[1]), -0.4
    blended = blend_with_model(head, weight, bias, features, imagenet=(other_head, other),
                               neighbours=(term, labelled))

    def z(logit: np.ndarray, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        return (logit - logit[rows].mean()) / logit[rows].std()

    model_logit = features.astype(np.float64) @ weight + bias
    unlearnt = np.setdiff1d(np.arange(300), labelled)
    mean_z = (z(model_logit) + z(head.logits(features).astype(np.float64))
              + z(other_head.logits(other).astype(np.float64))
              + z(term.logits(other).astype(np.float64), unlearnt)) / 4
    (z_mid, z_top), (m_mid, m_top) = (np.quantile(v, (0.5, 0.99)) for v in (mean_z, model_logit))
    logit = m_mid + (mean_z - z_mid) * (m_top - m_mid) / (z_top - z_mid)
    np.testing.assert_allclose(blended.logits([features, other]), logit, atol=2e-4)
    # Installed in a model that reads both blocks side by side, it scores the same.
    from torch import nn

    from ml_backend.core.fast_head import install_blend
    from ml_backend.core.model import anomaly_probability

    model = nn.Module()
    model.classifier = nn.Linear(features.shape[1] + 5, 2)
    model.get_classifier = lambda: model.classifier
    install_blend(model, blended)
    wide = torch.from_numpy(np.hstack([features, other]).astype(np.float32))
    with torch.no_grad():
        served = anomaly_probability(model.classifier(wide)).numpy()
    np.testing.assert_allclose(served, blended.scores([features, other]), atol=1e-5)
    # Without the model's own logit: the other three averaged, read on the model's scale.
    without = blend_with_model(head, weight, bias, features, imagenet=(other_head, other),
                               neighbours=(term, labelled), model_term=False)
    mean_z = (mean_z * 4 - z(model_logit)) / 3
    (z_mid, z_top) = np.quantile(mean_z, (0.5, 0.99))
    logit = m_mid + (mean_z - z_mid) * (m_top - m_mid) / (z_top - z_mid)
    np.testing.assert_allclose(without.logits([features, other]), logit, atol=2e-4)
    with pytest.raises(ValueError, match="give `imagenet` too"):
        blend_with_model(head, weight, bias, features, neighbours=(term, labelled))


def test_blend_ranks_the_same_whatever_the_scale_of_either_logit():
    from ml_backend.core.fast_head import blend_with_model

    features, truth = clustered(n=200, n_anomalies=5)
    head = fit_fast_head(features, np.arange(200), truth)
    weight = np.random.default_rng(2).normal(size=features.shape[1])
    small = blend_with_model(head, weight, 0.0, features).head
    large = blend_with_model(head, 1000 * weight, 0.0, features).head
    # Only the reading scales with the model's logit (x 1000, so sigmoids saturate); the
    # blended logit is the same one times 1000, so the ranking does not move.
    np.testing.assert_allclose(large.weights, 1000 * small.weights, rtol=1e-4)
    assert large.bias == pytest.approx(1000 * small.bias, rel=1e-4)
    with pytest.raises(ValueError, match="model weight has shape"):
        blend_with_model(head, weight[:3], 0.0, features)


def test_neighbour_term_by_hand():
    # Two features; standardising over the four rows maps them to the corners (±1, ±1).
    features = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=np.float32)
    labelled, labels = np.array([0, 3]), np.array([1, 0])  # row 0 anomaly, row 3 normal
    term = fit_neighbour_term(features, labelled, labels, k=3)
    # Cosines to the anomaly (1, 1)/√2 and the normal (−1, −1)/√2: 1 and −1, 0 and 0, ...
    np.testing.assert_allclose(term.logits(features), [2.0, 0.0, 0.0, -2.0], atol=1e-6)
    # k = 2 of two anomalies: the mean of both cosines; weight and offset apply after.
    term = fit_neighbour_term(features, np.array([0, 1, 3]), np.array([1, 1, 0]), k=2)
    np.testing.assert_allclose(term.logits(features[[2]]), [0.5 * (0 - 1) - 0], atol=1e-6)
    scaled = dataclasses.replace(term, weight=2.0, offset=-1.0)
    np.testing.assert_allclose(scaled.logits(features[[2]]), [2 * -0.5 - 1], atol=1e-6)
    with pytest.raises(ValueError, match="at least one anomaly"):
        fit_neighbour_term(features, labelled, np.array([1, 1]))
