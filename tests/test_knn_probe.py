import json

from benchmarks import knn_probe


def test_pair_compares_each_ranking_with_the_linear_head(tmp_path, capsys):
    lines = []
    for seed, (lin, knn) in enumerate([(0.70, 0.80), (0.60, 0.50)]):
        for method, auroc in (("linear", lin), ("knn", knn), ("mix", lin)):
            cycles = [{"auroc": auroc, "ap": 0.1, "precision_top_1pct": 0.2}] * 3
            lines.append(json.dumps({"dataset": "first:FRI", "seed": seed, "method": method,
                                     "cycles": cycles}))
    # A run lacking a ranking is left out of every pair.
    lines.append(json.dumps({"dataset": "first:FRI", "seed": 9, "method": "linear",
                             "cycles": [{"auroc": 0.9, "ap": 0.1, "precision_top_1pct": 0.2}] * 3}))
    path = tmp_path / "probe.jsonl"
    path.write_text("\n".join(lines))
    knn_probe.pair(path)
    out = capsys.readouterr().out
    assert out.startswith("2 runs")
    # kNN: +0.10 and −0.10 against the linear head, one win and one loss.
    assert "knn − linear, cycle 3, auroc: 0.650 → 0.650, +0.000" in out
    assert ", 1 / 1\n" in out
    assert "mix − linear, cycle 1, auroc: 0.650 → 0.650, +0.000 [+0.000, +0.000], 0 / 0" in out
