import subprocess
import sys
import textwrap
import threading

import h5py
import numpy as np
import pytest

from ml_backend.core.sources import ArraySource, ImageSource, StoreSubset
from ml_backend.core.store import CutoutStore

SHAPE = (12, 10, 3)


def random_images(n: int, seed: int = 0, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def new_store(tmp_path, name="s.h5", **kwargs) -> CutoutStore:
    h, w, c = SHAPE
    return CutoutStore.create(tmp_path / name, height=h, width=w, channels=c,
                              stretch=kwargs.pop("stretch", {"name": "none"}), **kwargs)


def test_round_trip_ids_pixels_metadata_stretch(tmp_path):
    images = random_images(5)
    ids = ["a", "b/ç", "c", "d", "e"]
    stretch = {"name": "asinh", "a": 0.1, "interval": "zscale"}
    with new_store(tmp_path, stretch=stretch) as store:
        store.append(ids, images, ra=[1.0, 2.0, np.nan, 4.0, 5.5], dec=[-1, -2, -3, -4, -5],
                     source=["f1.fits"] * 4 + ["f2.fits"], hdu="SCI")
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert len(store) == 5
        assert store.ids() == ids
        assert store.shape == SHAPE and store.channels == 3
        assert store.stretch == stretch
        np.testing.assert_array_equal(store.read(range(5)), images)
        assert store.meta(4) == {"ra": 5.5, "dec": -5.0, "source": "f2.fits", "hdu": "SCI"}
        assert np.isnan(store.meta(2)["ra"])
        table = store.meta_table([4, 0])
        np.testing.assert_array_equal(table["dec"], [-5.0, -1.0])
        assert list(table["source"]) == ["f2.fits", "f1.fits"]
        assert store.created.endswith("+00:00")


def test_missing_metadata_defaults_to_nan_and_empty(tmp_path):
    with new_store(tmp_path) as store:
        store.append(["x"], random_images(1))
        meta = store.meta(0)
    assert np.isnan(meta["ra"]) and np.isnan(meta["dec"])
    assert meta["source"] == "" and meta["hdu"] == ""


def test_append_in_batches_grows_linearly_and_keeps_first_batch(tmp_path):
    shape = (32, 32, 3)
    batches = [random_images(64, seed=s, shape=shape) for s in range(4)]
    sizes = []
    with CutoutStore.create(tmp_path / "s.h5", height=32, width=32, channels=3,
                            stretch={"name": "none"}) as store:
        for b, images in enumerate(batches):
            store.append([f"{b}-{i}" for i in range(64)], images)
            sizes.append((tmp_path / "s.h5").stat().st_size)
        np.testing.assert_array_equal(store.read(range(64)), batches[0])
        np.testing.assert_array_equal(store.read(range(192, 256)), batches[3])
    growth = np.diff(sizes)
    # random pixels do not compress: each batch adds about its raw size, no rewrite
    raw = 64 * 32 * 32 * 3
    assert np.all(growth > 0.8 * raw) and np.all(growth < 1.5 * raw), (sizes, raw)


def test_duplicate_ids_rejected_and_nothing_written(tmp_path):
    with new_store(tmp_path) as store:
        store.append(["a", "b"], random_images(2))
        with pytest.raises(ValueError, match=r"already in store.*'b'"):
            store.append(["c", "b"], random_images(2, seed=1))
        with pytest.raises(ValueError, match=r"repeated within the batch: \['d'\]"):
            store.append(["d", "d"], random_images(2, seed=1))
        assert len(store) == 2 and store.ids() == ["a", "b"]
        assert "c" not in store and "d" not in store
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert f["images"].shape[0] == 2 and f["ra"].shape[0] == 2


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, *SHAPE), dtype=np.float32), "uint8"),
    (np.zeros((2, 12, 10, 1), dtype=np.uint8), r"shape \(2, 12, 10, 3\)"),
    (np.zeros((3, *SHAPE), dtype=np.uint8), r"for 2 ids"),
])
def test_wrong_dtype_or_shape_rejected(tmp_path, images, message):
    with new_store(tmp_path) as store, pytest.raises(ValueError, match=message):
        store.append(["a", "b"], images)
        assert len(store) == 0


def test_metadata_length_mismatch_rejected(tmp_path):
    with new_store(tmp_path) as store, pytest.raises(ValueError, match="ra has 1 values"):
        store.append(["a", "b"], random_images(2), ra=[1.0])


def test_random_access_by_index_and_id(tmp_path):
    images = random_images(50)
    ids = [f"id{i}" for i in range(50)]
    with new_store(tmp_path, chunk_images=4) as store:
        store.append(ids, images)
        order = [49, 3, 3, 17, 0, 48, 17]
        np.testing.assert_array_equal(store.read(order), images[order])
        np.testing.assert_array_equal(store.read_ids(["id7", "id2"]), images[[7, 2]])
        np.testing.assert_array_equal(store.indices_of(["id9", "id1"]), [9, 1])
        assert store.index_of("id33") == 33 and "id33" in store and "nope" not in store
        assert store.read([]).shape == (0, *SHAPE)
        with pytest.raises(KeyError, match=r"'nope' is not in store .*s\.h5"):
            store.index_of("nope")
        with pytest.raises(IndexError, match="out of range"):
            store.read([50])


def test_open_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CutoutStore.open(tmp_path / "missing.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(ValueError, match="not a cutout store"):
        CutoutStore.open(tmp_path / "other.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(ValueError, match="not a readable HDF5 file"):
        CutoutStore.open(tmp_path / "text.h5")
    new_store(tmp_path).close()
    with pytest.raises(FileExistsError):
        new_store(tmp_path)


def test_read_only_store_refuses_append(tmp_path):
    new_store(tmp_path).close()
    with CutoutStore.open(tmp_path / "s.h5") as store, pytest.raises(PermissionError):
        store.append(["a"], random_images(1))


def test_reopen_for_append_continues(tmp_path):
    with new_store(tmp_path) as store:
        store.append(["a"], random_images(1, seed=1))
    with CutoutStore.open(tmp_path / "s.h5", mode="a") as store:
        assert "a" in store
        store.append(["b"], random_images(1, seed=2))
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert store.ids() == ["a", "b"]
        np.testing.assert_array_equal(store.read([1]), random_images(1, seed=2))


def test_half_written_append_is_truncated_on_reopen(tmp_path):
    with new_store(tmp_path) as store:
        store.append(["a", "b"], random_images(2))
    with h5py.File(tmp_path / "s.h5", "a", libver="latest") as f:  # an interrupted append
        f["images"].resize(3, axis=0)
        f["ra"].resize((3,))
    with CutoutStore.open(tmp_path / "s.h5") as store:
        assert len(store) == 2
    with CutoutStore.open(tmp_path / "s.h5", mode="a") as store:
        store.append(["c"], random_images(1, seed=5))
        np.testing.assert_array_equal(store.read([2]), random_images(1, seed=5))
        assert store.ids() == ["a", "b", "c"]


def test_iter_batches_covers_rows_once_in_order(tmp_path):
    images = random_images(23)
    with new_store(tmp_path) as store:
        store.append([str(i) for i in range(23)], images)
        batches = list(store.iter_batches(5, prefetch=2))
        assert [len(b[0]) for b in batches] == [5, 5, 5, 5, 3]
        np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), np.arange(23))
        np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), images)
        picked = [list(i) for i, _ in store.iter_batches(2, indices=[7, 1, 9])]
        assert picked == [[7, 1], [9]]


def test_iter_batches_stops_reader_thread_when_consumer_breaks(tmp_path):
    with new_store(tmp_path) as store:
        store.append([str(i) for i in range(40)], random_images(40))
        before = threading.active_count()
        for i, (_, _) in enumerate(store.iter_batches(2, prefetch=1)):
            if i == 1:
                break
        assert threading.active_count() == before


class FailingSource:
    def __len__(self) -> int:
        return 10

    def read(self, indices):
        if 6 in indices:
            raise OSError("disk on fire")
        return np.zeros((len(indices), 2, 2, 1), dtype=np.uint8)


def test_iter_batches_propagates_reader_errors():
    from ml_backend.core.sources import prefetch_batches

    seen = []
    with pytest.raises(OSError, match="disk on fire"):
        for idx, _ in prefetch_batches(FailingSource(), 3, None, 2):
            seen.append(idx.tolist())
    assert seen == [[0, 1, 2], [3, 4, 5]]


def test_array_source_and_store_subset(tmp_path):
    images = random_images(8)
    source = ArraySource(images)
    assert isinstance(source, ImageSource) and len(source) == 8
    np.testing.assert_array_equal(source.read([3, 1]), images[[3, 1]])
    with new_store(tmp_path) as store:
        store.append([str(i) for i in range(8)], images)
        subset = StoreSubset(store, [6, 2, 4])
        assert isinstance(subset, ImageSource) and len(subset) == 3
        np.testing.assert_array_equal(subset.read([0, 2]), images[[6, 4]])
        np.testing.assert_array_equal(subset.store_indices([1]), [2])
        got = np.concatenate([b for _, b in subset.iter_batches(2)])
        np.testing.assert_array_equal(got, images[[6, 2, 4]])
    with pytest.raises(ValueError, match="uint8"):
        ArraySource(images.astype(np.float32))


READER = textwrap.dedent("""
    import sys, time
    from ml_backend.core.store import CutoutStore
    store = CutoutStore.open(sys.argv[1])
    print(len(store), flush=True)
    sys.stdin.readline()  # the writer appends meanwhile
    store.refresh()
    print(len(store), store.ids()[-1], int(store.read([len(store) - 1])[0, 0, 0, 0]), flush=True)
""")


def test_swmr_reader_sees_rows_appended_after_it_opened(tmp_path):
    images = random_images(3)
    images[2, 0, 0, 0] = 77
    with new_store(tmp_path) as store:
        store.append(["a"], images[:1])
        reader = subprocess.Popen([sys.executable, "-c", READER, str(store.path)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert reader.stdout.readline().strip() == "1"
            store.append(["b", "c"], images[1:])
            out, _ = reader.communicate("go\n", timeout=30)
        finally:
            if reader.poll() is None:
                reader.kill()
    assert out.split() == ["3", "c", "77"]


def test_append_mode_while_reader_open_in_same_process_gives_clear_error(tmp_path):
    new_store(tmp_path).close()
    with CutoutStore.open(tmp_path / "s.h5") as reader:
        with pytest.raises((ValueError, OSError), match=r"s\.h5"):
            CutoutStore.open(tmp_path / "s.h5", mode="a")
        assert len(reader) == 0


@pytest.mark.parametrize("compression, filters", [
    ("lzf", "lzf"), ("gzip", "gzip"), ("none", None),
])
def test_compression_choices(tmp_path, compression, filters):
    images = random_images(3)
    with new_store(tmp_path, compression=compression) as store:
        store.append(["a", "b", "c"], images)
        np.testing.assert_array_equal(store.read([2, 0]), images[[2, 0]])
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert f["images"].compression == filters
    with pytest.raises(ValueError, match="compression must be one of"):
        new_store(tmp_path, name="t.h5", compression="zstd")


def test_boolean_or_float_indices_rejected():
    source = ArraySource(random_images(3))
    with pytest.raises(TypeError, match="integers"):
        source.read(np.array([True, False, True]))
    with pytest.raises(TypeError, match="integers"):
        source.read(np.array([0.0]))


def test_store_records_the_invariance_its_data_suits(tmp_path):
    with CutoutStore.create(tmp_path / "photos.h5", height=4, width=4, channels=1,
                            stretch={"name": "none"}, invariance="flip") as store:
        assert store.invariance == "flip"
    with CutoutStore.open(tmp_path / "photos.h5") as store:
        assert store.invariance == "flip"
    with CutoutStore.create(tmp_path / "sky.h5", height=4, width=4, channels=1,
                            stretch={"name": "none"}):
        pass
    with h5py.File(tmp_path / "sky.h5", "a") as f:  # a store made before the attribute
        assert f.attrs["invariance"] == "dihedral"
        del f.attrs["invariance"]
    with CutoutStore.open(tmp_path / "sky.h5") as store:
        assert store.invariance == "dihedral"
    with pytest.raises(ValueError, match="invariance"):
        CutoutStore.create(tmp_path / "bad.h5", height=4, width=4, channels=1,
                           stretch={"name": "none"}, invariance="upright")
    assert not (tmp_path / "bad.h5").exists()
