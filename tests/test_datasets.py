import gzip
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from benchmarks import datasets
from ml_backend.core.csvio import read_labels_csv
from ml_backend.core.store import CutoutStore

pytest.importorskip("firstgalaxydata", reason="pip install firstgalaxydata")


def test_first_store_counts_and_truth(tmp_path):
    summary = datasets.build_first(tmp_path, rare="FRI", channels=1, size=24)
    assert summary.n == 2158 and sum(summary.class_counts.values()) == 2158
    assert set(summary.class_counts) == set(datasets.FIRST_CLASSES)
    assert summary.n_anomalies == summary.class_counts["FRI"] > 0
    truth = read_labels_csv(tmp_path / "truth.csv")
    with CutoutStore.open(tmp_path / "store.h5") as store:
        assert len(store) == 2158 and store.shape == (24, 24, 1)
        assert store.ids() == list(truth)
        meta = store.meta(0)
        ra, dec = store.ids()[0].split("_")
        assert (meta["ra"], meta["dec"]) == (float(ra), float(dec))
        assert store.read([0]).max() > 0
    assert sum(truth.values()) == summary.class_counts["FRI"]
    # the same images, labelled by another rare class, have that class's count of anomalies
    json_summary = json.loads((tmp_path / "dataset.json").read_text())
    assert json_summary["rare"] == "FRI"
    with pytest.raises(FileExistsError, match="already exists"):
        datasets.build_first(tmp_path, rare="Bent")


def test_first_labels_follow_the_class_folders(tmp_path):
    import zipfile

    zip_path = datasets.package_dir("firstgalaxydata", "firstgalaxydata") / datasets.FIRST_ZIP
    with zipfile.ZipFile(zip_path) as archive:
        members = datasets._first_members(archive)
    bent = {cid for cid, cls, _ in members if cls == "Bent"}
    datasets.build_first(tmp_path, rare="Bent", size=8)
    truth = read_labels_csv(tmp_path / "truth.csv")
    assert {cid for cid, label in truth.items() if label == 1} == bent


@pytest.mark.skipif(datasets.importlib.util.find_spec("animal_mnist") is None,
                    reason="pip install --no-deps animal-mnist")
def test_animal_rare_fraction_and_truth(tmp_path):
    summary = datasets.build_animal(tmp_path, rare="Cat", fraction=0.02, seed=1, channels=3)
    n_rare = round(0.02 * 9000 / 0.98)
    assert summary.n == 9000 + n_rare and summary.n_anomalies == n_rare
    assert summary.class_counts["Cat"] == n_rare and summary.class_counts["Dog"] == 1000
    truth = read_labels_csv(tmp_path / "truth.csv")
    assert sum(truth.values()) == n_rare
    with CutoutStore.open(tmp_path / "store.h5") as store:
        assert store.shape == (28, 28, 3) and store.ids() == list(truth)
        assert store.invariance == "flip"  # `amls simulate` picks the photographs' defaults
        img = store.read([0])[0]
        np.testing.assert_array_equal(img[..., 0], img[..., 2])


def test_rare_count():
    assert datasets.rare_count(9000, 0.01) == 91
    assert datasets.rare_count(10, 0.001) == 1
    with pytest.raises(ValueError, match="fraction"):
        datasets.rare_count(9000, 1.0)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_numpy_only_unpickler_refuses_other_globals(tmp_path):
    good = tmp_path / "good.gz"
    with gzip.open(good, "wb") as fh:
        pickle.dump(np.arange(6, dtype=np.uint8).reshape(2, 3), fh)
    np.testing.assert_array_equal(datasets.load_numpy_pickle(good), [[0, 1, 2], [3, 4, 5]])
    evil = tmp_path / "evil.gz"
    with gzip.open(evil, "wb") as fh:
        pickle.dump(Evil(), fh)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
        datasets.load_numpy_pickle(evil)
    objects = tmp_path / "objects.gz"
    with gzip.open(objects, "wb") as fh:
        pickle.dump(np.array([{"a": 1}]), fh)
    with pytest.raises(ValueError, match="numeric numpy array"):
        datasets.load_numpy_pickle(objects)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        datasets.NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(Path("x")))).load()


def test_missing_package_error_names_pip_install():
    with pytest.raises(ModuleNotFoundError, match="pip install no-such-pkg"):
        datasets.package_dir("no_such_module_xyz", "no-such-pkg")
