"""The label-ceiling benchmark's folds and summary."""

import json

import numpy as np
import pytest

from benchmarks.label_ceiling import fold_rows, parse_overrides, summarise


def test_fold_rows_partition_every_row_once_in_near_equal_sorted_parts():
    parts = fold_rows(23, 5, seed=3)
    assert [len(p) for p in parts] == [5, 5, 5, 4, 4]
    assert all(np.array_equal(p, np.sort(p)) for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(23))
    assert not np.array_equal(np.concatenate(parts), np.arange(23))  # shuffled across parts
    assert all(np.array_equal(a, b) for a, b in zip(parts, fold_rows(23, 5, seed=3), strict=True))


@pytest.mark.parametrize("folds", [1, 24])
def test_fold_rows_refuses_impossible_counts(folds):
    with pytest.raises(ValueError, match="folds must be in"):
        fold_rows(23, folds)


def test_summarise_averages_each_ranking_over_folds(tmp_path, capsys):
    rows = [{"dataset": "first:FRI", "iterations": 200, "model_auroc": a, "model_ap": 0.1,
             "head_auroc": 0.8, "head_ap": ap, "probe_auroc": 0.7, "probe_ap": 0.3}
            for a, ap in ((0.6, 0.2), (0.9, 0.4))]
    for row, top in zip(rows, (0.5, 1.0), strict=True):
        row |= {"model_precision_top_1pct": top, "head_precision_top_1pct": top,
                "probe_precision_top_1pct": top}
    rows.append({**rows[0], "iterations": 600, "overrides": {"image_size": 96}})
    del rows[-1]["probe_precision_top_1pct"]  # older lines lack the top 1 %
    path = tmp_path / "ceiling.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    summarise(path)
    out = capsys.readouterr().out.splitlines()
    assert out[2] == ("| first:FRI | 200 | 2 | 0.750 / 0.100 / 0.750 | 0.800 / 0.300 / 0.750 "
                      "| 0.700 / 0.300 / 0.750 |")
    assert out[3] == ("| first:FRI | 600 image_size=96 | 1 | 0.600 / 0.100 / 0.500 "
                      "| 0.800 / 0.200 / 0.500 | 0.700 / 0.300 / - |")


def test_parse_overrides_reads_json_values_and_names_a_bad_item():
    assert parse_overrides(["center_crop=0.35", "image_size=96", "invariance=flip"]) == {
        "center_crop": 0.35, "image_size": 96, "invariance": "flip"}
    with pytest.raises(ValueError, match="'image_size'"):
        parse_overrides(["image_size"])
    with pytest.raises(ValueError, match="'imagesize' is not a TrainConfig field"):
        parse_overrides(["imagesize=96"])
