"""The side-by-side cycle-cost benchmark times a real cycle: training, then scoring every image."""

import pytest

from benchmarks.settings_cycle_cost import cycle_seconds
from ml_backend.core.config import TrainConfig
from ml_backend.core.store import CutoutStore
from tests.test_simulate import make_toy_store


@pytest.mark.slow
def test_a_cycle_is_its_training_then_scoring_the_whole_store(tmp_path, monkeypatch):
    import benchmarks.settings_cycle_cost as bench

    _, truth = make_toy_store(tmp_path / "toy.h5", n=520, n_anomalies=8)
    scored: list[int] = []
    real_score = bench.score_store
    monkeypatch.setattr(bench, "score_store", lambda store, *a, **k: (
        scored.append(len(store)), real_score(store, *a, **k))[1])
    cfg = TrainConfig(image_size=32, iterations=2, batch_size=4, uratio=1, pretrained=False,
                      device="cpu", seed=0)
    with CutoutStore.open(tmp_path / "toy.h5") as store:
        seconds = cycle_seconds(store, truth, cfg)
    assert scored == [520]
    assert seconds["train_seconds"] > 0 and seconds["score_seconds"] > 0
    assert seconds["cycle_seconds"] == seconds["train_seconds"] + seconds["score_seconds"]
