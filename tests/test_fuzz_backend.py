"""Property-based fuzzing: hostile request bodies and FITS headers never crash or hang.

The app is the real `create_app` around a real `AnomalyService` whose project 1 serves a
small untrained model, so /predict runs the scoring path; only the job submitter is a stub
(training jobs are tested elsewhere). "Never a 500" is checked on the status code because
the app turns unhandled exceptions into a JSON 500.
"""

from __future__ import annotations

import io
import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from astropy.io import fits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from import_tools.fits_reader import FitsError, read_fits
from import_tools.jobs import FitsImageJob
from import_tools.pipeline import DoneItem, Settings, run_job
from import_tools.report import Failure
from ml_backend.app import create_app
from ml_backend.config import Config
from ml_backend.core.checkpoint import ModelMeta, new_version, save_model_dir, utc_now_iso
from ml_backend.core.config import TrainConfig
from ml_backend.core.model import build_model, set_seed
from ml_backend.core.store import CutoutStore
from ml_backend.registry import ModelRegistry
from ml_backend.service import AnomalyService
from tests.support.shipped import BINARY_CONFIG

SIZE = 32
STRETCH = {"name": "none"}
LABEL_CONFIG = BINARY_CONFIG
# Each example must answer well within this, or hypothesis reports a hang.
FUZZ = settings(max_examples=150, deadline=timedelta(seconds=5),
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


class StubSubmitter:
    """Accepts training requests without running them."""

    def submit(self, project_id: int) -> str:
        return "queued"

    def state(self, project_id: int) -> dict[str, bool]:
        return {"queued": False, "running": False}

    def health(self) -> str:
        return "ok"

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[Any, Path, list[str]]:
    """(Flask test client, a cutout store path, its ids) with project 1 trained."""
    root = tmp_path_factory.mktemp("fuzz")
    registry = ModelRegistry(root / "models")
    set_seed(0)
    cfg_train = TrainConfig(pretrained=False, image_size=SIZE)
    net = build_model(cfg_train, 3).eval()
    version = new_version()
    meta = ModelMeta(version=version, parent=None, created=utc_now_iso(),
                     config=cfg_train.to_dict(), image_size=SIZE, channels=3, stretch=STRETCH)
    staging = registry.staging_dir(1)
    save_model_dir(staging, ema=net, student=net, meta=meta)
    registry.publish(1, staging, version)
    store_path = root / "cutouts.h5"
    ids = [f"c{i}" for i in range(8)]
    with CutoutStore.create(store_path, height=SIZE, width=SIZE, channels=3,
                            stretch=STRETCH) as store:
        store.append(ids, np.zeros((8, SIZE, SIZE, 3), np.uint8))
    cfg = Config(model_dir=root / "models", train=TrainConfig(device="cpu"), store_roots=(root,))
    service = AnomalyService(cfg, registry, StubSubmitter())  # type: ignore[arg-type]
    torch.set_num_threads(1)
    return create_app(service, cfg).test_client(), store_path, ids


# ---- strategies -------------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
projects = st.one_of(st.sampled_from([1, "1", "1.1700000000", {"id": 1}, 2, 0, -3, "x",
                                      "1.", ".1", True, None, 10**30, {"id": "1"}]),
                     json_values)
label_configs = st.one_of(st.just(LABEL_CONFIG), st.text(max_size=40),
                          st.sampled_from(["<View/>", "<View><Image/></View>", "<<>>",
                                           LABEL_CONFIG.replace("anomaly", "odd")]),
                          json_values)


@st.composite
def task_data(draw: st.DrawFn, store: str, ids: list[str]) -> Any:
    """Task data: mostly the real store with a fuzzed cutout id and image URL; sometimes
    a hostile or broken `store`, or `data` that is not an object at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    hostile = st.sampled_from(["/etc/passwd", "/", "/nonexistent.h5", store + "/..",
                               str(Path(store).parent), "", "a\x00b", "../" * 40 + "etc"])
    store_value = draw(st.one_of(st.just(store), st.just(store), hostile, json_values))
    cutout = draw(st.one_of(st.sampled_from(ids + ["nope", "../c0", ""]), json_values))
    return {"store": store_value, "cutout_id": cutout,
            "image": draw(st.one_of(st.sampled_from(["http://169.254.169.254/x",
                                                     "file:///etc/passwd", "/data/upload/1.png",
                                                     ""]), json_values))}


@st.composite
def predict_bodies(draw: st.DrawFn, store: str, ids: list[str]) -> Any:
    tasks = draw(st.one_of(
        st.lists(st.fixed_dictionaries({"id": st.one_of(st.integers(-5, 10**12), json_values),
                                        "data": task_data(store, ids)}), max_size=4),
        json_values))
    body = {"tasks": tasks, "label_config": draw(label_configs), "project": draw(projects)}
    return draw(st.one_of(st.just(body), json_values))


webhook_bodies = st.one_of(
    st.fixed_dictionaries({
        "action": st.one_of(st.sampled_from(["ANNOTATION_CREATED", "ANNOTATIONS_CREATED",
                                             "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED",
                                             "START_TRAINING", "PROJECT_UPDATED"]),
                            json_values),
        "annotation": st.one_of(st.fixed_dictionaries({"id": json_values,
                                                       "project": projects}), json_values),
        "annotations": json_values,
        "task": json_values,
        "project": projects}),
    json_values)
setup_bodies = st.one_of(st.fixed_dictionaries({"project": projects, "schema": label_configs}),
                         json_values)


def post(client: Any, path: str, body: Any) -> Any:
    response = client.post(path, data=json.dumps(body), content_type="application/json")
    assert response.status_code < 500, (path, body, response.get_json())
    assert isinstance(response.get_json(), dict), "every answer is a JSON object"
    return response


# ---- the routes -------------------------------------------------------------------------

def test_predict_scores_a_task_of_a_known_store(served):
    client, store, _ = served
    body = {"tasks": [{"id": 1, "data": {"store": str(store), "cutout_id": "c0"}}],
            "label_config": LABEL_CONFIG, "project": 1}
    result = post(client, "/predict", body).get_json()["results"][0]
    assert 0.0 <= result["score"] <= 1.0, "the fuzzed service really scores"


def test_predict_refuses_a_store_inside_another_projects_folder(served):
    import shutil

    client, store, _ = served
    models = store.parent / "models"
    (models / "2").mkdir(exist_ok=True)
    other = shutil.copy(store, models / "2" / "cache.h5")  # e.g. project 2's image cache
    own = shutil.copy(store, models / "1" / "cache-copy.h5")

    def score(path: object) -> dict:
        body = {"tasks": [{"id": 1, "data": {"store": str(path), "cutout_id": "c0"}}],
                "label_config": LABEL_CONFIG, "project": 1}
        return post(client, "/predict", body).get_json()["results"][0]

    assert "score" not in score(other) and score(other)["result"] == []
    assert 0.0 <= score(own)["score"] <= 1.0


@FUZZ
@given(data=st.data())
def test_predict_never_errors(served, data):
    client, store, ids = served
    body = data.draw(predict_bodies(str(store), ids))
    response = post(client, "/predict", body)
    if response.status_code == 200:
        assert len(response.get_json()["results"]) == len(body["tasks"])


@FUZZ
@given(body=webhook_bodies)
def test_webhook_never_errors(served, body):
    post(served[0], "/webhook", body)


@FUZZ
@given(body=setup_bodies)
def test_setup_never_errors(served, body):
    post(served[0], "/setup", body)


@FUZZ
@given(raw=st.binary(max_size=200), path=st.sampled_from(["/predict", "/webhook", "/setup",
                                                           "/train"]))
def test_non_json_bodies_are_4xx(served, raw, path):
    response = served[0].post(path, data=raw, content_type="application/json")
    assert response.status_code < 500


# Task data the fuzzer once found to crash /predict with a 500 (AnomalyService._locate /
# CutoutStore.open on task-controlled `data.store`).
PREDICT_CRASHES = {
    "data is not an object": {"id": 1, "data": "x"},
    "store is not a string": {"id": 1, "data": {"store": 7, "cutout_id": "a"}},
    "store is not a cutout store": {"id": 1, "data": {"store": "/etc/passwd", "cutout_id": "a"}},
    "store is a directory": {"id": 1, "data": {"store": "/", "cutout_id": "a"}},
    "store does not exist": {"id": 1, "data": {"store": "/nonexistent.h5", "cutout_id": "a"}},
    "data is a list": {"id": 1, "data": ["/etc/passwd"]},
    "store has a NUL byte": {"id": 1, "data": {"store": "a\x00b.h5", "cutout_id": "a"}},
    "store is a list": {"id": 1, "data": {"store": ["/etc/passwd"], "cutout_id": "a"}},
}


@pytest.mark.parametrize("task", PREDICT_CRASHES.values(), ids=PREDICT_CRASHES.keys())
def test_predict_task_with_unusable_data_gets_an_empty_prediction(served, task):
    client, store, _ = served
    good = {"id": 2, "data": {"store": str(store), "cutout_id": "c1"}}
    response = client.post("/predict", json={"tasks": [good, task, good],
                                             "label_config": LABEL_CONFIG, "project": 1})
    assert response.status_code == 200, response.get_json()
    first, bad, last = response.get_json()["results"]
    assert bad["result"] == [] and "score" not in bad
    assert bad["model_version"] == first["model_version"]
    for result in (first, last):
        assert 0.0 <= result["score"] <= 1.0, "the others are scored"


# ---- FITS headers -----------------------------------------------------------------------

KEYWORDS = st.sampled_from(["SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS3", "BZERO", "BSCALE",
                            "CTYPE1", "CTYPE2", "CRVAL1", "CRPIX1", "CDELT1", "CD1_1", "PC1_1",
                            "EQUINOX", "RADESYS", "CUNIT1", "WCSAXES", "BLANK", "LONPOLE",
                            "A_ORDER", "CTYPE3", "PV2_1", "CRVAL2", "CRPIX2", "CDELT2",
                            "CD2_2", "PC2_2", "DATE-OBS", "MJD-OBS", "WCSAXESA", "CTYPE1A",
                            "CUNIT2"])
VALUES = st.one_of(st.integers(-10**6, 10**6), st.integers(-4, 40),
                   st.floats(allow_nan=False, width=32),
                   st.booleans(),
                   st.sampled_from(["RA---TAN", "DEC--TAN", "RA---TAN-SIP", "GLON-CAR", "deg",
                                    "ICRS", "", "IMAGE", "RA---XYZ"]),
                   st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126),
                           max_size=12))


def fits_bytes(cards: list[tuple[str, Any]], shape: tuple[int, int]) -> bytes:
    """A valid FITS image, then cards written over the padding cards of its raw header.

    The header is SIMPLE, BITPIX, NAXIS, NAXIS1, NAXIS2, EXTEND, 30 COMMENT cards, END: card
    slots 6..35 can be overwritten without touching the structure keywords or END.
    """
    hdu = fits.PrimaryHDU(np.arange(shape[0] * shape[1], dtype=np.float32).reshape(shape))
    for _ in range(30):
        hdu.header.add_comment("padding")
    buffer = io.BytesIO()
    hdu.writeto(buffer)
    raw = bytearray(buffer.getvalue())
    for k, (keyword, value) in enumerate(cards):
        card = f"{keyword:<8}= {value!r:>20}"[:80].ljust(80)
        slot = 6 + k % 30
        raw[slot * 80:(slot + 1) * 80] = card.encode("ascii", "replace")
    return bytes(raw)


@settings(max_examples=150, deadline=timedelta(seconds=10),
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cards=st.lists(st.tuples(KEYWORDS, VALUES), max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 2880 * 2)),
       shape=st.sampled_from([(8, 8), (1, 5), (16, 4)]))
def test_fits_reader_turns_bad_headers_into_fits_errors(tmp_path, cards, cut, shape):
    raw = fits_bytes(cards, shape)
    if cut is not None:
        raw = raw[:cut]
    path = tmp_path / "fuzz.fits"
    path.write_bytes(raw)
    try:
        image = read_fits([path], None)
    except FitsError as err:
        assert str(path) in str(err)
        return
    assert image.pixels.ndim == 3 and image.pixels.dtype == np.float32


@settings(max_examples=40, deadline=timedelta(seconds=10),
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cards=st.lists(st.tuples(KEYWORDS, VALUES), max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 2880 * 3)))
def test_import_job_reports_a_bad_fits_file_as_one_failed_item(tmp_path, cards, cut):
    raw = fits_bytes(cards, (8, 8))
    path = tmp_path / "item.fits"
    path.write_bytes(raw if cut is None else raw[:cut])
    job = FitsImageJob(paths=(path,), keys=None, id="item")
    out = run_job(job, Settings(stretch={"name": "asinh"}, size=(8, 8),
                                previews=tmp_path / "previews"))
    assert len(out) == 1
    assert isinstance(out[0], (Failure, DoneItem))
    if isinstance(out[0], Failure):
        assert out[0].reason


@pytest.mark.parametrize(("cards", "message"), [
    ([("CTYPE1", 0)], "CTYPE1 = 0 is not a string"),
    ([("CUNIT1", 1.5)], "CUNIT1 = 1.5 is not a string"),
    ([("CTYPE2A", 7)], "CTYPE2A = 7 is not a string"),
    ([("CUNIT2", True)], "card CUNIT2 cannot be parsed"),  # Python's True is not FITS T
    ([("SIMPLE", 0)], "structure cards"),  # a second SIMPLE, after EXTEND
    ([("BITPIX", 7)], "BITPIX = 7"),
    ([("BZERO", 1), ("BLANK", False), ("BLANK", 0)], "Unparsable card (BLANK)"),
    ([("CDELT1", 0.0)], "invalid WCS"),
])
def test_fits_malformed_header_is_a_fits_error_naming_file_and_cause(tmp_path, cards, message):
    path = tmp_path / "bad.fits"
    path.write_bytes(fits_bytes(cards, (8, 8)))
    with pytest.raises(FitsError) as caught:
        read_fits([path], None)
    assert str(caught.value).startswith(str(path))
    assert message in str(caught.value)


@pytest.mark.parametrize("cards", [
    [("WCSAXES", 4000)], [("WCSAXES", 20000)], [("WCSAXESA", 20000)],
    [("WCSAXES", 2), ("WCSAXES", 20000)],  # wcslib reads the repeat too
    [("WCSAXES", 11)],
])
def test_fits_huge_wcsaxes_is_refused_quickly(tmp_path, cards):
    path = tmp_path / "axes.fits"
    path.write_bytes(fits_bytes(cards, (8, 8)))
    started = time.perf_counter()
    with pytest.raises(FitsError, match=r"axes\.fits: HDU 0: WCSAXESA? = \d+ is not an axis count"):
        read_fits([path], None)
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("wcsaxes", [0, 2, 4, 10])
def test_fits_plausible_wcsaxes_still_reads(tmp_path, wcsaxes):
    path = tmp_path / "axes.fits"
    path.write_bytes(fits_bytes([("WCSAXES", wcsaxes)], (8, 8)))
    assert read_fits([path], None).pixels.shape == (8, 8, 1)


# ---- a hostile-input corpus: every route answers below 500 -----------------------------------

DEEP_ARRAY = "[" * 100_000 + "]" * 100_000
DEEP_OBJECT = '{"a":' * 5_000 + "1" + "}" * 5_000
HOSTILE_IDS = ["²", "1²", "١٢", "٣", "0", "-1", " 7", "7 ", "7.x", "1e3", "0x10", "", "7" * 5000,
               "9" * 11, 2**31, 10**400, -5, 3.5, True, None, [], {"id": "²"}, {"id": 10**30}]


@pytest.mark.parametrize("raw", [DEEP_ARRAY, DEEP_OBJECT, '{"project": ' + "9" * 5000 + "}",
                                 "{" * 3 + "]", "\udcff", "null", "[]", '"text"'])
@pytest.mark.parametrize("path", ["/setup", "/predict", "/webhook", "/train"])
def test_hostile_bodies_are_400s(served, raw, path):
    client = served[0]
    response = client.post(path, data=raw.encode("utf-8", "surrogatepass"),
                           content_type="application/json")
    assert response.status_code == 400, (path, raw[:40], response.get_json())
    assert "error" in response.get_json()


@pytest.mark.parametrize("project", HOSTILE_IDS)
def test_hostile_project_ids_are_400s_on_every_route(served, project):
    client = served[0]
    for path, body in [("/setup", {"project": project}), ("/train", {"project": project}),
                       ("/predict", {"project": project, "label_config": LABEL_CONFIG,
                                     "tasks": [{"id": 1, "data": {}}]}),
                       ("/webhook", {"action": "START_TRAINING", "project": project})]:
        response = client.post(path, data=json.dumps(body), content_type="application/json")
        assert response.status_code == 400, (path, project, response.get_json())
    if isinstance(project, float):
        return  # as query text, "3.5" is Label Studio's "<id>.<timestamp>": project 3
    text = json.dumps(project) if not isinstance(project, str) else project
    response = client.get("/versions", query_string={"project": text[:6000]})
    assert response.status_code == 400, (project, response.get_json())


def test_ls_style_project_ids_still_work(served):
    client = served[0]
    for project in (1, "1", "1.1700000000", {"id": 1}, 2**31 - 1):
        response = client.post("/setup", data=json.dumps({"project": project}),
                               content_type="application/json")
        assert response.status_code == 200, (project, response.get_json())


def test_oversized_bodies_and_task_lists_are_413s(served, monkeypatch):
    from ml_backend import app as app_module

    client = served[0]
    big = b'{"project": 1, "pad": "' + b"x" * (app_module.MAX_BODY_BYTES + 1) + b'"}'
    response = client.post("/train", data=big, content_type="application/json")
    assert response.status_code == 413 and "error" in response.get_json()
    monkeypatch.setattr(app_module, "MAX_PREDICT_TASKS", 3)
    body = {"project": 1, "label_config": LABEL_CONFIG, "tasks": [{"id": i} for i in range(4)]}
    response = client.post("/predict", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 413 and "at most 3 tasks" in response.get_json()["error"]


# ---- a hostile-input corpus for every route ------------------------------------------------

DEEP = 100_000  # far beyond Python's recursion limit
BILLION_LAUGHS = ('<?xml version="1.0"?><!DOCTYPE v [<!ENTITY a "aaaaaaaaaa">'
                  + "".join(f'<!ENTITY {c} "{("&" + p + ";") * 10}">'
                            for p, c in zip("abcdefgh", "bcdefghi", strict=True))
                  + ']><View><Image name="image" value="$image"/><Choices name="c" '
                    'toName="image"><Choice value="&i;"/></Choices></View>')
HOSTILE_PROJECTS = [10**400, -10**400, "1" + "0" * 5000, "١٢", "²", "1e400", "NaN", "Infinity",
                    1.5, True, None, [], {"id": {"id": 1}}, "1.2.3", " 1", "0x1", "1_000"]
HOSTILE_RAW = [b"[" * DEEP + b"]" * DEEP, b'{"project":' * DEEP + b"1" + b"}" * DEEP,
               b'{"project": 1' + b"0" * 100_000 + b"}", b'{"project": 1e999}',
               b'{"project": NaN}', b'{"project": "\\ud800"}', b"\xff\xfe{}", b""]


def hostile_bodies(store: str) -> list[Any]:
    bodies: list[Any] = []
    for project in HOSTILE_PROJECTS:
        bodies += [{"project": project, "label_config": LABEL_CONFIG,
                    "tasks": [{"id": 1, "data": {"store": store, "cutout_id": "c0"}}]},
                   {"action": "ANNOTATION_CREATED", "project": {"id": project}},
                   {"project": project, "schema": LABEL_CONFIG}]
    for task_id in (10**400, "١", 2**70, -1, 1.0, True, None):
        bodies.append({"project": 1, "label_config": LABEL_CONFIG,
                       "tasks": [{"id": task_id, "data": {"store": store, "cutout_id": "c0"}}]})
    for label_config in (BILLION_LAUGHS, "<View>" * 50_000, "x" * 2_000_000):
        bodies += [{"project": 1, "label_config": label_config, "tasks": []},
                   {"project": 1, "schema": label_config}]
    bodies.append({"project": 1, "label_config": LABEL_CONFIG,
                   "tasks": [{"id": i, "data": {"store": store, "cutout_id": f"c{i % 8}"}}
                             for i in range(5000)]})
    return bodies


ROUTES = ["/predict", "/webhook", "/setup", "/train", "/versions"]


def test_every_route_answers_the_hostile_corpus_below_500(served):
    client, store, _ = served
    for path in ROUTES:
        for body in hostile_bodies(str(store)):
            raw = json.dumps(body)
            response = client.post(path, data=raw, content_type="application/json")
            assert response.status_code < 500, (path, raw[:200], response.get_json())
        for raw_bytes in HOSTILE_RAW:
            response = client.post(path, data=raw_bytes, content_type="application/json")
            assert response.status_code < 500, (path, raw_bytes[:60], response.get_data()[:200])
    for query in ("project=" + "9" * 5000, "project=١", "project=-1", "project=%00"):
        for path in ("/versions", "/metrics", "/health"):
            assert client.get(f"{path}?{query}").status_code < 500, (path, query)
