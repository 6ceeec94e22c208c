import json
import math

import numpy as np
import pytest
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from ml_backend.core import metrics

# (labels, scores, AUROC, AP) computed by hand; the second and third have tied scores.
TABLE = [
    ([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1], 3 / 4, (1 + 2 / 3) / 2),
    ([1, 0, 1, 0], [0.5, 0.5, 0.9, 0.1], 3.5 / 4, 0.5 * 1 + 0.5 * 2 / 3),
    ([0, 1, 0, 1, 0], [0.3, 0.3, 0.3, 0.3, 0.3], 0.5, 2 / 5),
    ([0, 0, 1], [0.9, 0.8, 0.1], 0.0, 1 / 3),
    ([1, 1, 0], [0.9, 0.8, 0.1], 1.0, 1.0),
]


@pytest.mark.parametrize("labels, scores, expected_auroc, expected_ap", TABLE)
def test_auroc_and_ap_match_hand_computed_values(labels, scores, expected_auroc, expected_ap):
    assert metrics.auroc(labels, scores) == pytest.approx(expected_auroc)
    assert metrics.average_precision(labels, scores) == pytest.approx(expected_ap)


def test_ap_is_step_wise_not_trapezoid():
    labels, scores = [1, 0, 1, 0], [0.5, 0.5, 0.9, 0.1]
    precision, recall, _ = precision_recall_curve(labels, scores)
    trapezoid = auc(recall, precision)
    ap = metrics.average_precision(labels, scores)
    assert trapezoid == pytest.approx(0.5 + 0.5 * (1 + 2 / 3) / 2)
    assert abs(ap - trapezoid) > 0.05
    assert ap == pytest.approx(average_precision_score(labels, scores))


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_scikit_learn_on_random_tables_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.1
    labels[:2] = [True, False]
    scores = np.round(rng.random(300) + labels * 0.3, 1)  # coarse rounding: many ties
    assert metrics.auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    assert metrics.average_precision(labels, scores) == pytest.approx(
        average_precision_score(labels, scores))


def test_metrics_do_not_modify_inputs():
    labels = np.array([1, 0, 1, 0])
    scores = np.array([0.2, 0.9, 0.4, 0.1])
    metrics.evaluate(labels, scores)
    np.testing.assert_array_equal(scores, [0.2, 0.9, 0.4, 0.1])
    np.testing.assert_array_equal(labels, [1, 0, 1, 0])


@pytest.mark.parametrize("n, fraction, k", [
    (10, 0.1, 1), (10, 0.001, 1), (10, 0.25, 3), (100, 0.07, 7), (1000, 0.001, 1),
    (1001, 0.001, 2), (5, 1.0, 5),
])
def test_top_count_is_ceil_at_least_one(n, fraction, k):
    assert metrics.top_count(n, fraction) == k


def test_precision_at_fraction():
    labels = [0, 1, 1, 0, 0, 0, 0, 0, 0, 1]
    scores = [0.0, 0.9, 0.8, 0.85, 0.1, 0.2, 0.3, 0.4, 0.5, 0.05]
    assert metrics.precision_at_fraction(labels, scores, 0.1) == 1.0  # top 1
    assert metrics.precision_at_fraction(labels, scores, 0.3) == pytest.approx(2 / 3)
    assert metrics.precision_at_fraction(labels, scores, 1.0) == pytest.approx(0.3)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        metrics.precision_at_fraction(labels, scores, 0)


def test_efficiency_curve():
    fraction, found = metrics.efficiency_curve([0, 1, 1, 0], [0.1, 0.9, 0.2, 0.8])
    np.testing.assert_allclose(fraction, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(found, [0, 0.5, 0.5, 1, 1])


def test_evaluate_keys_and_values():
    result = metrics.evaluate([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1])
    assert result == {"auroc": pytest.approx(0.75), "ap": pytest.approx(5 / 6),
                      "precision_top_0_1pct": 1.0, "precision_top_1pct": 1.0,
                      "n": 4, "n_anomalies": 2}


def test_evaluate_one_class_gives_none_not_crash():
    no_anomalies = metrics.evaluate([0, 0, 0], [0.1, 0.2, 0.3])
    assert no_anomalies["auroc"] is None and no_anomalies["ap"] is None
    assert no_anomalies["precision_top_1pct"] == 0.0 and no_anomalies["n_anomalies"] == 0
    only_anomalies = metrics.evaluate([1, 1], [0.1, 0.2])
    assert only_anomalies["auroc"] is None and only_anomalies["ap"] == 1.0
    with pytest.raises(ValueError, match="undefined"):
        metrics.auroc([0, 0], [0.1, 0.2])


@pytest.mark.parametrize("labels, scores, message", [
    ([1, 0], [0.5, math.nan], "NaN"),
    ([1, 0, 1], [0.5, 0.2], "3 labels but 2 scores"),
    ([1, 2], [0.5, 0.2], "labels must be 0"),
    ([], [], "no labels"),
])
def test_bad_inputs_raise_clear_errors(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        metrics.evaluate(labels, scores)


def test_plot_evaluation_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.random(200) < 0.1
    scores = rng.random(200) + labels
    out = metrics.plot_evaluation(labels, scores, tmp_path / "eval.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics.plot_evaluation(np.zeros(5, int), np.arange(5.0), tmp_path / "one_class.png")
    assert (tmp_path / "one_class.png").stat().st_size > 1000


def test_cli_evaluate_prints_one_json_object(tmp_path, capsys):
    from amls_cli import main

    (tmp_path / "scores.csv").write_text("id,score\na,0.9\nb,0.8\nc,0.7\nd,0.1\nextra,0.5\n")
    (tmp_path / "truth.csv").write_text("id,label\na,anomaly\nb,normal\nc,anomaly\nd,normal\n")
    code = main(["evaluate", str(tmp_path / "scores.csv"), "--truth", str(tmp_path / "truth.csv"),
                 "--plot", str(tmp_path / "plot.png")])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["auroc"] == pytest.approx(0.75) and result["ap"] == pytest.approx(5 / 6)
    assert result["n"] == 4 and result["n_anomalies"] == 2
    assert result["n_scores_without_truth"] == 1
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_cli_evaluate_truth_without_score_is_an_error(tmp_path, capsys):
    from amls_cli import main

    (tmp_path / "scores.csv").write_text("id,score\na,0.9\n")
    (tmp_path / "truth.csv").write_text("id,label\na,anomaly\nb,normal\n")
    code = main(["evaluate", str(tmp_path / "scores.csv"), "--truth", str(tmp_path / "truth.csv")])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert "amls evaluate: error: 1 of 2 ids" in captured.err
