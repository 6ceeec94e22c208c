import json

import numpy as np
import pytest

from benchmarks import neighbour_variants
from benchmarks.paired import paired_comparison
from ml_backend.core import metrics
from ml_backend.core.fast_head import fit_neighbour_term
from ml_backend.core.simulate import mean_z

POOL = np.arange(60)
TRUTH = np.r_[np.ones(8), np.zeros(52)].astype(np.int64)


class FixedEmbeddings:
    """Stands in for the ImageNet embedding of a suite dataset (tested in test_simulate)."""

    def __init__(self, data):
        rng = np.random.default_rng(0)
        self.features = rng.normal(size=(60, 6)).astype(np.float32)
        self.features[TRUTH == 1] += 1.0

    def of(self, row):
        return POOL, TRUTH, self.features


def _save_run(folder, rng, features, corrupt=False):
    folder.mkdir(parents=True)
    labelled = np.r_[0, 1, 20, 21, 22]
    for cycle in (1, 2):
        labelled = np.union1d(labelled, [1 + cycle, 30 + cycle])
        rows = np.setdiff1d(POOL, labelled)
        knn = fit_neighbour_term(features, labelled, TRUTH[labelled]).logits(features[rows])
        np.savez_compressed(folder / f"cycle{cycle}.npz", rows=rows, truth=TRUTH[rows],
                            knn=knn + corrupt, **{t: rng.normal(size=len(rows))
                                                  + TRUTH[rows] * rng.uniform(0, 2)
                                                  for t in ("model", "head", "probe")})


def test_the_refitted_term_is_blended_and_paired_with_the_first_k(tmp_path, monkeypatch):
    monkeypatch.setattr(neighbour_variants, "Embeddings", FixedEmbeddings)
    features = FixedEmbeddings(None).features
    rng = np.random.default_rng(1)
    rows = []
    for seed in range(3):
        _save_run(tmp_path / f"r{seed}", rng, features)
        rows.append({"key": f"k{seed}", "setting": "s", "dataset": "first:Bent", "seed": seed,
                     "protocol": "full", "scores_dir": str(tmp_path / f"r{seed}")})
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    lines = neighbour_variants.report(rows, tmp_path, [3, 1], ["head", "probe"])
    by_hand = []
    for r in rows:
        with np.load(f"{r['scores_dir']}/cycle2.npz") as npz:
            s = {k: npz[k] for k in npz.files}
        labelled = np.setdiff1d(POOL, s["rows"])
        by_hand.append([metrics.evaluate(s["truth"], mean_z(
            s["head"], s["probe"], fit_neighbour_term(features, labelled, TRUTH[labelled], k=k)
            .logits(features[s["rows"]])))["ap"] for k in (3, 1)])
    c = paired_comparison(*zip(*by_hand, strict=True))
    line = next(x for x in lines if x.startswith("| 2 | ap | 1 |"))
    assert f"{c.mean_diff:+.3f} [{c.ci_low:+.3f}, {c.ci_high:+.3f}] | {c.wins} / {c.losses}" in line
    assert sum(x.startswith("| 1 | ") for x in lines) == 6  # 3 metrics x 2 values of k

    # A run whose saved term the refit does not reproduce is refused, not measured.
    _save_run(tmp_path / "bad", rng, features, corrupt=True)
    bad = {**rows[0], "scores_dir": str(tmp_path / "bad")}
    with pytest.raises(ValueError, match="not the saved one"):
        neighbour_variants.report([bad], tmp_path, [3], ["head", "probe"])
    with pytest.raises(SystemExit, match="saved its logits"):
        neighbour_variants.main(["--setting", "t", "--log", str(tmp_path / "log.jsonl")])
