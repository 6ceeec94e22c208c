"""The Flask protocol layer: every route, bad bodies, auth; a fake service records the calls."""

from __future__ import annotations

import base64
import time
from typing import Any

import pytest

from ml_backend.app import create_app, project_id_of
from ml_backend.config import Config
from ml_backend.core.config import TrainConfig, kind_defaults
from ml_backend.label_schema import parse_label_config

LABEL_CONFIG = """<View>
  <Image name="img" value="$picture"/>
  <Choices name="verdict" toName="img"><Choice value="normal"/><Choice value="anomaly"/></Choices>
</View>"""


class FakeService:
    """Records what the routes ask; answers like AnomalyService would."""

    def __init__(self) -> None:
        self.trained: list[int] = []
        self.predicted: list[tuple[int, int]] = []
        self.cfg = Config()

    def health(self) -> dict[str, Any]:
        return {"status": "UP", "model_class": "Fake"}

    def model_version(self, project_id: int) -> str:
        return f"v-{project_id}"

    def request_training(self, project_id: int) -> str:
        outcome = "already-queued" if project_id in self.trained else "queued"
        self.trained.append(project_id)
        return outcome

    def predict(self, project_id: int, tasks: list[dict[str, Any]],
                label_config: str) -> list[dict[str, Any]]:
        schema = parse_label_config(label_config, "anomaly")
        self.predicted.append((project_id, len(tasks)))
        return [{"result": schema.prediction_result(t["id"] / 10), "score": t["id"] / 10,
                 "model_version": "v"} for t in tasks]

    def versions(self, project_id: int) -> dict[str, Any]:
        return {"versions": [f"v-{project_id}"]}

    def metrics(self) -> dict[str, Any]:
        return {"projects": {"3": {"model_version": "v-3"}}}


@pytest.fixture
def service() -> FakeService:
    return FakeService()


@pytest.fixture
def client(service: FakeService):
    return create_app(service, Config()).test_client()  # type: ignore[arg-type]


def annotation_webhook(action: str = "ANNOTATION_CREATED", project: Any = None) -> dict:
    return {"action": action, "annotation": {"id": 5, "project": 3, "result": []},
            "task": {"id": 9, "project": 3}, "project": project or {"id": 3, "title": "p"}}


@pytest.mark.parametrize("path", ["/", "/health"])
def test_health(client, path):
    response = client.get(path)
    assert response.status_code == 200
    assert response.json["status"] == "UP"
    assert response.json["model_class"] == "Fake"


@pytest.mark.parametrize("project, expected", [
    ("7.1700000000", "v-7"), (7, "v-7"), ("12", "v-12"), ({"id": 4}, "v-4")])
def test_setup_reports_the_model_version(client, project, expected):
    response = client.post("/setup", json={"project": project, "schema": LABEL_CONFIG})
    assert response.status_code == 200
    assert response.json == {"model_version": expected}


def test_setup_rejects_a_config_without_our_choice(client):
    config = LABEL_CONFIG.replace('value="anomaly"', 'value="weird"')
    response = client.post("/setup", json={"project": "1.1", "schema": config})
    assert response.status_code == 400
    assert "anomaly" in response.json["error"]


def test_predict_answers_one_result_per_task_in_order(client, service):
    tasks = [{"id": i, "data": {"picture": f"/x/{i}.png"}} for i in (8, 2, 6)]
    response = client.post("/predict", json={"tasks": tasks, "project": "3.17",
                                             "label_config": LABEL_CONFIG, "params": {}})
    assert response.status_code == 200
    results = response.json["results"]
    assert [r["score"] for r in results] == [0.8, 0.2, 0.6]
    first = results[0]["result"][0]
    assert (first["from_name"], first["to_name"], first["type"]) == ("verdict", "img", "choices")
    assert [r["result"][0]["value"]["choices"] for r in results] == [
        ["anomaly"], ["normal"], ["anomaly"]]
    assert service.predicted == [(3, 3)]


@pytest.mark.parametrize("body, fragment", [
    ({"tasks": "nope", "label_config": LABEL_CONFIG, "project": 1}, "tasks"),
    ({"tasks": [], "project": 1}, "label_config"),
    ({"tasks": [{"id": 1}], "label_config": LABEL_CONFIG, "project": "abc"}, "project"),
    ({"tasks": [{"id": 1}], "label_config": "<View/>", "project": 1}, "Choices"),
])
def test_predict_rejects_bad_bodies(client, body, fragment):
    response = client.post("/predict", json=body)
    assert response.status_code == 400
    assert fragment in response.json["error"]


@pytest.mark.parametrize("action", ["ANNOTATION_CREATED", "ANNOTATION_UPDATED",
                                    "START_TRAINING"])
def test_training_webhooks_queue_a_job(client, service, action):
    response = client.post("/webhook", json=annotation_webhook(action))
    assert response.status_code == 200
    assert response.json["status"] == "queued"
    assert service.trained == [3]


def test_annotations_deleted_webhook_queues_a_job(client, service):
    body = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}], "project": {"id": 5}}
    assert client.post("/webhook", json=body).json["status"] == "queued"
    assert service.trained == [5]


def test_second_webhook_reports_already_queued(client):
    client.post("/webhook", json=annotation_webhook())
    assert client.post("/webhook", json=annotation_webhook()).json["status"] == "already-queued"


def test_webhook_answers_fast(client):
    start = time.perf_counter()
    for _ in range(20):
        client.post("/webhook", json=annotation_webhook())
    assert (time.perf_counter() - start) / 20 < 0.05


@pytest.mark.parametrize("action", ["PROJECT_UPDATED", "TASKS_CREATED", "SOMETHING_NEW"])
def test_other_actions_are_ignored(client, service, action):
    response = client.post("/webhook", json={"action": action, "project": {"id": 1}})
    assert response.status_code == 200
    assert response.json["status"] == "ignored"
    assert service.trained == []


@pytest.mark.parametrize("body, fragment", [
    ({"action": "ANNOTATION_CREATED", "project": {"id": 3}}, "annotation"),
    ({"action": "ANNOTATIONS_DELETED", "project": {"id": 3}}, "annotations"),
    ({"annotation": {"id": 1}}, "action"),
    ({"action": "START_TRAINING"}, "project"),
    ({"action": "START_TRAINING", "project": {"id": -2}}, "must lie in 1.."),
    ({"action": "START_TRAINING", "project": {"id": True}}, "boolean"),
])
def test_webhook_rejects_incomplete_bodies(client, service, body, fragment):
    response = client.post("/webhook", json=body)
    assert response.status_code == 400
    assert fragment in response.json["error"]
    assert service.trained == []


@pytest.mark.parametrize("route", ["/webhook", "/predict", "/setup", "/train"])
def test_malformed_json_is_a_400_not_a_500(client, route):
    response = client.post(route, data=b"{not json", content_type="application/json")
    assert response.status_code == 400
    assert "JSON" in response.json["error"]


def test_json_array_body_is_rejected(client):
    response = client.post("/webhook", json=[1, 2])
    assert response.status_code == 400
    assert "object" in response.json["error"]


def test_legacy_train_queues_a_job(client, service):
    response = client.post("/train", json={"annotations": [], "project": "9.1700000000"})
    assert response.status_code == 200
    assert service.trained == [9]


def test_versions_from_query_or_body(client):
    assert client.get("/versions?project=4").json == {"versions": ["v-4"]}
    assert client.get("/versions", json={"project": "6.123"}).json == {"versions": ["v-6"]}
    assert client.get("/versions").status_code == 400


def test_metrics(client):
    assert client.get("/metrics").json["projects"]["3"]["model_version"] == "v-3"


def test_unknown_route_and_method_are_json(client):
    assert client.get("/nope").status_code == 404
    assert "error" in client.get("/nope").json
    response = client.get("/webhook")
    assert response.status_code == 405
    assert "error" in response.json


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture
def auth_client(service: FakeService):
    cfg = Config(basic_auth_user="ls", basic_auth_pass="s3cret")
    return create_app(service, cfg).test_client()  # type: ignore[arg-type]


@pytest.mark.parametrize("route, method", [("/health", "get"), ("/setup", "post"),
                                           ("/webhook", "post"), ("/metrics", "get")])
def test_auth_required_on_every_route(auth_client, service, route, method):
    call = getattr(auth_client, method)
    body = annotation_webhook() if method == "post" else None
    assert call(route, json=body).status_code == 401
    assert call(route, json=body, headers=basic("ls", "wrong")).status_code == 401
    assert call(route, json=body, headers=basic("other", "s3cret")).status_code == 401
    assert service.trained == []
    ok = call(route, json=body, headers=basic("ls", "s3cret"))
    assert ok.status_code == 200


def test_auth_failure_does_not_echo_credentials(auth_client):
    response = auth_client.get("/health", headers=basic("ls", "guess-me"))
    assert b"guess-me" not in response.data
    assert response.headers["WWW-Authenticate"].startswith("Basic")


@pytest.mark.parametrize("value, expected", [(3, 3), ("3", 3), ("3.1716", 3), ({"id": 8}, 8)])
def test_project_id_of(value, expected):
    assert project_id_of(value) == expected


# ---- configuration from the environment ---------------------------------------------------------

def test_config_defaults_and_overrides():
    assert Config.from_env({}) == Config()
    cfg = Config.from_env({"LABEL_STUDIO_URL": "http://ls:8080/", "MODEL_DIR": "/m",
                           "AMLS_ITERATIONS": "30", "AMLS_ALLOWED_IMAGE_HOSTS": "a.org, b:81",
                           "AMLS_DEBOUNCE_S": "0.5", "LABEL_STUDIO_API_KEY": "sekrit",
                           "AMLS_CENTER_CROP": "0.4", "AMLS_INVARIANCE": "flip",
                           "AMLS_TEST_TIME_AUGMENTATION": "true",
                           "AMLS_DISTRIBUTION_ALIGNMENT": "on", "AMLS_TEST_TIME_SHIFT": "0.0625"})
    forced = cfg.train_config("dihedral")  # both forced on, whatever the kind
    assert forced.test_time_augmentation and forced.distribution_alignment
    assert cfg.label_studio_url == "http://ls:8080"
    assert (cfg.iterations, cfg.debounce_s, str(cfg.model_dir)) == (30, 0.5, "/m")
    assert cfg.train_config("dihedral").iterations == cfg.train_config("flip").iterations == 30
    assert cfg.train.center_crop == 0.4 and cfg.for_jobs().train.center_crop == 0.4
    # test-time shifts: the kind's (photographs 4 of 64 pixels, sky none) unless set
    assert forced.test_time_shift == cfg.train_config("flip").test_time_shift == 0.0625
    assert Config().train_config("flip").test_time_shift == 0.0625
    assert Config().train_config("dihedral").test_time_shift == 0.0
    assert Config.from_env({"AMLS_TEST_TIME_SHIFT": "0"}).train_config("flip").test_time_shift == 0
    assert Config.from_env({"AMLS_TEST_TIME_SHIFT": "auto"}) == Config()
    # the zoomed ImageNet reading: the kind's unless set, 0 = off, for either kind
    assert Config().train_config("flip").imagenet_zoom == kind_defaults("flip")["imagenet_zoom"]
    assert (Config().train_config("dihedral").imagenet_zoom
            == kind_defaults("dihedral")["imagenet_zoom"])
    zoom = Config.from_env({"AMLS_IMAGENET_ZOOM": "0.6"})
    assert zoom.train_config("flip").imagenet_zoom == zoom.train_config("dihedral").imagenet_zoom
    assert zoom.train_config("flip").imagenet_zoom == 0.6
    assert Config.from_env({"AMLS_IMAGENET_ZOOM": "0"}).train_config("dihedral").imagenet_zoom == 0
    assert Config.from_env({"AMLS_IMAGENET_ZOOM": "auto"}) == Config()
    assert cfg.train_config("dihedral").invariance == "flip"
    assert cfg.image_hosts == frozenset({"a.org", "b:81", "ls:8080"})
    assert "sekrit" not in repr(cfg)
    # The blend's ImageNet term: auto is on for sky cutouts only; forced either way.
    assert Config().imagenet_term("dihedral") and not Config().imagenet_term("flip")
    assert Config.from_env({"AMLS_RERANK_IMAGENET": "true"}).imagenet_term("flip")
    assert not Config.from_env({"AMLS_RERANK_IMAGENET": "off"}).imagenet_term("dihedral")
    # Its neighbour term likewise.
    assert Config().neighbour_term("dihedral") and not Config().neighbour_term("flip")
    assert Config.from_env({"AMLS_RERANK_NEIGHBOURS": "on"}).neighbour_term("flip")
    assert not Config.from_env({"AMLS_RERANK_NEIGHBOURS": "false"}).neighbour_term("dihedral")
    # The cycle's own logit in the blend's mean: left out for sky cutouts only, unless told.
    assert not Config().model_term("dihedral") and Config().model_term("flip")
    assert Config.from_env({"AMLS_RERANK_MODEL_TERM": "on"}).model_term("dihedral")
    assert not Config.from_env({"AMLS_RERANK_MODEL_TERM": "false"}).model_term("flip")


@pytest.mark.parametrize("env, store_invariance, invariance, tta, align, stage", [
    # sky cutouts: alignment on, eight views; photographs: two views, no alignment; both
    # train the backbone cut after stage 4
    ({}, "dihedral", "dihedral", True, True, 4),
    ({"AMLS_TEST_TIME_AUGMENTATION": "false"}, "dihedral", "dihedral", False, True, 4),
    ({}, "flip", "flip", True, False, 4),
    ({"AMLS_INVARIANCE": "flip"}, "dihedral", "flip", True, False, 4),
    ({"AMLS_TEST_TIME_AUGMENTATION": "auto"}, "flip", "flip", True, False, 4),
    ({"AMLS_TEST_TIME_AUGMENTATION": "false"}, "flip", "flip", False, False, 4),
    ({"AMLS_BACKBONE_STAGE": "whole"}, "flip", "flip", True, False, None),
    ({"AMLS_TEST_TIME_AUGMENTATION": "true"}, "dihedral", "dihedral", True, True, 4),
    ({"AMLS_DISTRIBUTION_ALIGNMENT": "off"}, "dihedral", "dihedral", True, False, 4),
    ({"AMLS_BACKBONE_STAGE": "whole"}, "dihedral", "dihedral", True, True, None),
    ({"AMLS_BACKBONE_STAGE": "5"}, "flip", "flip", True, False, 5),
    ({"AMLS_BACKBONE_STAGE": "auto"}, "dihedral", "dihedral", True, True, 4),
])
def test_a_jobs_training_config_follows_the_kind_of_data(env, store_invariance, invariance,
                                                          tta, align, stage):
    cfg = Config.from_env(env).train_config(store_invariance)
    assert (cfg.invariance, cfg.test_time_augmentation, cfg.distribution_alignment,
            cfg.backbone_stage) == (invariance, tta, align, stage)


@pytest.mark.parametrize("env, kind, iterations, uratio", [
    # photographs train 200 iterations with 2 unlabelled images per labelled one, sky
    # cutouts the paper's 100 with 5; AMLS_ITERATIONS sets both kinds' iterations
    ({}, "flip", 200, 2), ({}, "dihedral", 100, 5),
    ({"AMLS_ITERATIONS": "auto"}, "flip", 200, 2),
    ({"AMLS_ITERATIONS": "150"}, "flip", 150, 2), ({"AMLS_ITERATIONS": "50"}, "dihedral", 50, 5),
])
def test_a_jobs_iterations_follow_the_kind_of_data_unless_set(env, kind, iterations, uratio):
    cfg = Config.from_env(env).train_config(kind)
    assert (cfg.iterations, cfg.uratio) == (iterations, uratio)


@pytest.mark.parametrize("env, fragment", [
    ({"AMLS_ITERATIONS": "many"}, "AMLS_ITERATIONS"),
    ({"AMLS_ITERATIONS": "0"}, "iterations"),
    ({"AMLS_IMAGE_SIZE": "16"}, "image_size"),
    ({"AMLS_CENTER_CROP": "0"}, "AMLS_CENTER_CROP"),
    ({"AMLS_CENTER_CROP": "1.2"}, "AMLS_CENTER_CROP"),
    ({"AMLS_INVARIANCE": "upright"}, "AMLS_INVARIANCE"),
    ({"AMLS_DEBOUNCE_S": "nan"}, "AMLS_DEBOUNCE_S"),
    ({"BASIC_AUTH_USER": "u"}, "BASIC_AUTH_PASS"),
    ({"LABEL_STUDIO_URL": "localhost:8080"}, "LABEL_STUDIO_URL"),
    ({"REDIS_URL": "localhost:6379"}, "REDIS_URL"),
    ({"AMLS_DEVICE": "tpu"}, "AMLS_DEVICE"),
    ({"AMLS_TEST_TIME_AUGMENTATION": "maybe"}, "AMLS_TEST_TIME_AUGMENTATION"),
    ({"AMLS_DISTRIBUTION_ALIGNMENT": "2"}, "AMLS_DISTRIBUTION_ALIGNMENT"),
    ({"AMLS_RERANK_IMAGENET": "sometimes"}, "AMLS_RERANK_IMAGENET"),
    ({"AMLS_RERANK_NEIGHBOURS": "2"}, "AMLS_RERANK_NEIGHBOURS"),
    ({"AMLS_RERANK_MODEL_TERM": "maybe"}, "AMLS_RERANK_MODEL_TERM"),
    ({"AMLS_BACKBONE_STAGE": "7"}, "AMLS_BACKBONE_STAGE"),
    ({"AMLS_BACKBONE_STAGE": "last"}, "AMLS_BACKBONE_STAGE"),
    ({"AMLS_TEST_TIME_SHIFT": "some"}, "AMLS_TEST_TIME_SHIFT"),
    ({"AMLS_TEST_TIME_SHIFT": "0.5"}, "AMLS_TEST_TIME_SHIFT"),
    ({"AMLS_IMAGENET_ZOOM": "1"}, "AMLS_IMAGENET_ZOOM: imagenet_zoom must be in"),
    ({"AMLS_IMAGENET_ZOOM": "wide"}, "AMLS_IMAGENET_ZOOM"),
    ({"ANOMALY_LABEL": " "}, "ANOMALY_LABEL"),
])
def test_config_rejects_bad_values(env, fragment):
    from ml_backend.config import ConfigError

    with pytest.raises(ConfigError, match=fragment):
        Config.from_env(env)


def test_kind_field_hints_cover_every_kind_governed_setting():
    from ml_backend.config import KIND_FIELD_HINTS
    from ml_backend.core.config import kind_defaults

    assert set(KIND_FIELD_HINTS) == set(kind_defaults("dihedral")) == set(kind_defaults("flip"))


@pytest.mark.parametrize("field, value, hint", [
    ("iterations", 2, "AMLS_ITERATIONS"),
    ("uratio", 3, "no override"),
    ("invariance", "flip", "AMLS_INVARIANCE"),
    ("backbone_stage", 3, "AMLS_BACKBONE_STAGE"),
    ("test_time_shift", 0.125, "AMLS_TEST_TIME_SHIFT"),
])
def test_config_refuses_a_train_whose_kind_governed_fields_jobs_would_ignore(field, value, hint):
    from ml_backend.config import ConfigError

    with pytest.raises(ConfigError, match=f"Config.train.{field} is not used by jobs.*{hint}"):
        Config(train=TrainConfig(**{field: value}))
    assert Config(train=TrainConfig(image_size=32, batch_size=4)).train.batch_size == 4
