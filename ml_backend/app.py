"""The Label Studio ML backend protocol on Flask: JSON in, JSON out.

Routes (all optionally behind HTTP basic auth):

    GET  /health, GET /    {"status": "UP", "model_class": ...}
    POST /setup            {"model_version": <serving version or "untrained">}
    POST /predict          {"results": [one prediction per task, in order]}
    POST /webhook          annotation events and START_TRAINING -> queue a training job
    POST /train            legacy "train now" -> queue a training job
    GET  /versions         {"versions": [...]} for ?project= (or a JSON body's "project")
    GET  /metrics          per-project serving version, queue state and last job outcome
    GET  /similar          "more like this": ?project=&tasks=12,40&top= -> tasks by similarity
    POST /similar/view     the same as a Data Manager tab in Label Studio -> its id and URL
    GET  /dashboard/<id>   an HTML page for people: scores, quality, training, top candidates

Label Studio identifies a project as an int, as "<id>.<created timestamp>" (ML API calls)
or as a serialized project object (webhooks); `project_id_of` accepts all three.
Bad requests get a 4xx JSON `{"error": ...}` naming what is wrong, never a traceback.
An unreachable job queue (Redis) is a 503 `{"status": "error", "error": ...}`, logged as one
line: the request was fine but nothing was queued, and a 503 says "try again later" honestly
(Label Studio only logs a webhook's status, and shows it for "Start Training").
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import re
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import (
    BadGateway,
    HTTPException,
    NotFound,
    RequestEntityTooLarge,
    ServiceUnavailable,
)

from ml_backend.config import Config
from ml_backend.dashboard_page import render_dashboard
from ml_backend.label_schema import LabelConfigError, parse_label_config
from ml_backend.labelstudio import API_FAILURES, LabelStudioClient, describe_failure
from ml_backend.rerank import similar_tab, similar_tasks
from ml_backend.service import AnomalyService
from ml_backend.submitters import QueueUnavailable

logger = logging.getLogger(__name__)

TRAINING_ACTIONS = frozenset({"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED",
                              "ANNOTATIONS_DELETED", "START_TRAINING"})
# The payload key each annotation action must carry (Label Studio's webhook serializers).
ACTION_PAYLOAD_KEY = {"ANNOTATION_CREATED": "annotation", "ANNOTATIONS_CREATED": "annotation",
                      "ANNOTATION_UPDATED": "annotation", "ANNOTATIONS_DELETED": "annotations"}


# Request bodies above this are refused with 413 before they are read.
MAX_BODY_BYTES = 32 * 2**20
# Tasks one /predict may ask for (Label Studio sends one, or a page of them).
MAX_PREDICT_TASKS = 10_000
# Tasks "more like this" may return at most.
MAX_SIMILAR = 1000
MAX_TAB = 200  # tasks in a 'more like this' tab (one filter item each)
# Label Studio project ids are database integers.
MAX_PROJECT_ID = 2**31 - 1
# "7" or "7.1700000000" (id and creation timestamp): ASCII digits only.
_PROJECT_TEXT = re.compile(r"([0-9]{1,10})(?:\.[0-9]{1,20})?")


class BadRequest(ValueError):
    """A request body the backend cannot act on; becomes a 400 with the message."""


def create_app(service: AnomalyService, cfg: Config) -> Flask:
    """Build the Flask app around an existing service (one per process; tests build many)."""
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    _register_auth(app, cfg)
    _register_errors(app)

    @app.get("/")
    @app.get("/health")
    def health() -> Response:
        return jsonify(service.health())

    @app.post("/setup")
    def setup() -> Response:
        body = _json_object()
        project_id = project_id_of(body.get("project"))
        schema = body.get("schema")
        if isinstance(schema, str) and schema.strip():
            parse_label_config(schema, cfg.anomaly_label)  # LabelConfigError -> 400
        return jsonify({"model_version": service.model_version(project_id)})

    @app.post("/predict")
    def predict() -> Response:
        body = _json_object()
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
            raise BadRequest("'tasks' must be a list of task objects")
        if len(tasks) > MAX_PREDICT_TASKS:
            raise RequestEntityTooLarge(f"at most {MAX_PREDICT_TASKS} tasks per /predict, got "
                                        f"{len(tasks)}")
        label_config = body.get("label_config")
        if not isinstance(label_config, str) or not label_config.strip():
            raise BadRequest("'label_config' must be the project's label config XML")
        project_id = project_id_of(body.get("project", _first_task_project(tasks)))
        return jsonify({"results": service.predict(project_id, tasks, label_config)})

    @app.post("/webhook")
    def webhook() -> Response:
        body = _json_object()
        action = body.get("action")
        if not isinstance(action, str):
            raise BadRequest("webhook body needs an 'action' string")
        if action not in TRAINING_ACTIONS:
            return jsonify({"status": "ignored", "action": action})
        key = ACTION_PAYLOAD_KEY.get(action)
        if key is not None and not body.get(key):
            raise BadRequest(f"{action} webhook lacks its {key!r} payload")
        project_id = project_id_of(_webhook_project(body))
        outcome = service.request_training(project_id)
        return jsonify({"status": outcome, "project": project_id, "action": action})

    @app.post("/train")
    def train() -> Response:
        body = _json_object()
        project_id = project_id_of(body.get("project"))
        outcome = service.request_training(project_id)
        return jsonify({"status": outcome, "project": project_id})

    @app.get("/versions")
    def versions() -> Response:
        raw = request.args.get("project")
        if raw is None:
            body = _json_body(required=False)
            raw = body.get("project") if isinstance(body, dict) else None
        return jsonify(service.versions(project_id_of(raw)))

    @app.get("/metrics")
    def metrics() -> Response:
        return jsonify(service.metrics())

    @app.post("/similar/view")
    def similar_view() -> Response:
        """"More like this" as a Data Manager tab: {"project": 7, "tasks": [12], "top": 20}
        -> {"view": id, "url": the tab in Label Studio, "similar": [...]}."""
        body = _json_object()
        project_id = project_id_of(body.get("project"))
        tasks, top = body.get("tasks"), body.get("top", 20)
        if not isinstance(tasks, list) or not tasks or not all(
                isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in tasks):
            raise BadRequest("'tasks' must be a non-empty list of task ids")
        if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= MAX_TAB:
            raise BadRequest(f"'top' must be an integer in 1..{MAX_TAB}")
        if not cfg.label_studio_url or not cfg.label_studio_api_key:
            raise ServiceUnavailable("LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are needed to "
                                     "create a Data Manager tab")
        client = LabelStudioClient(cfg.label_studio_url, cfg.label_studio_api_key)
        try:
            view, ranked = similar_tab(service.registry, client, project_id, tasks, top)
        except ValueError as err:  # no model, no cache, or unknown tasks
            raise NotFound(str(err)) from None
        except API_FAILURES as err:
            raise BadGateway(f"Label Studio: {describe_failure(err)}") from None
        return jsonify({"project": project_id, "view": view,
                        "url": f"{cfg.label_studio_url}/projects/{project_id}/data?tab={view}",
                        "similar": [{"task": t, "similarity": round(sim, 4)}
                                    for t, sim in ranked]})

    @app.get("/dashboard/<project>")
    def dashboard(project: str) -> Response:
        """The project's model at a glance: HTML for people (`ml_backend.dashboard_page`)."""
        project_id = project_id_of(project)
        page = render_dashboard(service.registry, project_id,
                                service.project_metrics(project_id), cfg.label_studio_url)
        return Response(page, mimetype="text/html")

    @app.get("/similar")
    def similar() -> Response:
        """"More like this": ?project=7&tasks=12,40&top=20 -> tasks ranked by similarity."""
        project_id = project_id_of(request.args.get("project"))
        raw = request.args.get("tasks", "")
        if not raw or not all(part.strip().isascii() and part.strip().isdigit()
                              for part in raw.split(",")):
            raise BadRequest("'tasks' must be comma-separated task ids, e.g. tasks=12,40")
        top = request.args.get("top", "20")
        if not (top.isascii() and top.isdigit()) or not 1 <= int(top) <= MAX_SIMILAR:
            raise BadRequest(f"'top' must be an integer in 1..{MAX_SIMILAR}")
        task_ids = [int(part) for part in raw.split(",")]
        try:
            ranked = similar_tasks(service.registry, project_id, task_ids, int(top))
        except ValueError as err:  # no model, no cache, or unknown tasks: the caller's to fix
            raise NotFound(str(err)) from None
        return jsonify({"project": project_id, "tasks": task_ids, "similar": [
            {"task": t, "similarity": round(sim, 4)} for t, sim in ranked]})

    return app


def project_id_of(value: Any) -> int:
    """Project id from an int, "7", "7.1700000000" or {"id": 7}; BadRequest otherwise.

    Only ASCII digits count (not "²" or Arabic-Indic digits), and the id must lie in
    1..MAX_PROJECT_ID.
    """
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, bool):
        raise BadRequest("'project' must be a project id, got a boolean")
    match = _PROJECT_TEXT.fullmatch(value) if isinstance(value, str) else None
    if isinstance(value, int):
        project_id = value
    elif match is not None:
        project_id = int(match.group(1))
    else:
        raise BadRequest(f"'project' must be a project id like 7 or '7.1700000000', got "
                         f"{_short(value)}")
    if not 1 <= project_id <= MAX_PROJECT_ID:
        raise BadRequest(f"project id must lie in 1..{MAX_PROJECT_ID}, got {_short(value)}")
    return project_id


def _webhook_project(body: dict[str, Any]) -> Any:
    """The project of a webhook: its "project" object, else the annotation's / task's field."""
    if body.get("project") is not None:
        return body["project"]
    for key in ("annotation", "task"):
        item = body.get(key)
        if isinstance(item, dict) and item.get("project") is not None:
            return item["project"]
    raise BadRequest("webhook body names no project")


def _first_task_project(tasks: list[dict[str, Any]]) -> Any:
    return tasks[0].get("project") if tasks else None


def _json_object() -> dict[str, Any]:
    body = _json_body(required=True)
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _json_body(*, required: bool) -> Any:
    """The parsed JSON body (None when absent and not required); BadRequest for bodies that
    do not parse, including nesting too deep for the parser."""
    data = request.get_data(cache=True)
    if not data.strip():
        if required:
            raise BadRequest("request body must be JSON (Content-Type: application/json)")
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:
        raise BadRequest(f"request body is not usable JSON: {type(err).__name__}") from None


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # deeply nested, or an int too long to print
        return f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def _register_auth(app: Flask, cfg: Config) -> None:
    if not cfg.auth_enabled:
        return
    users, passwords = _encodings(cfg.basic_auth_user), _encodings(cfg.basic_auth_pass)

    @app.before_request
    def require_basic_auth() -> Response | None:
        given_user, given_pass = _basic_credentials(request.headers.get("Authorization", ""))
        # Compare both fields always, so timing says nothing about which one was wrong.
        ok = _matches(given_user, users) & _matches(given_pass, passwords)
        if given_user is not None and ok:
            return None
        response = jsonify({"error": "authentication required"})
        response.status_code = 401
        response.headers["WWW-Authenticate"] = 'Basic realm="amls"'
        return response


def _basic_credentials(header: str) -> tuple[bytes | None, bytes]:
    """(user, password) bytes of a Basic Authorization header, left undecoded because
    clients differ: `requests` (Label Studio) sends latin-1, browsers and curl UTF-8.
    (None, b"") when the header is absent or not valid Basic."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic":
        return None, b""
    try:
        raw = base64.b64decode(token.strip(" \t"), validate=True)
    except binascii.Error:
        return None, b""
    user, _, password = raw.partition(b":")
    return user, password


def _encodings(text: str) -> list[bytes]:
    """`text` as UTF-8 and, where it can be, latin-1."""
    try:
        return [text.encode(), text.encode("latin-1")]
    except UnicodeEncodeError:
        return [text.encode()]


def _matches(given: bytes | None, candidates: list[bytes]) -> bool:
    """Constant-time: does `given` equal any candidate? (Every candidate is compared.)"""
    ok = False
    for candidate in candidates:
        ok |= hmac.compare_digest(given or b"", candidate)
    return ok


def _register_errors(app: Flask) -> None:
    @app.errorhandler(BadRequest)
    @app.errorhandler(LabelConfigError)
    def bad_request(err: ValueError) -> tuple[Response, int]:
        return jsonify({"error": str(err)}), 400

    @app.errorhandler(QueueUnavailable)
    def queue_unavailable(err: QueueUnavailable) -> tuple[Response, int]:
        logger.error("%s %s: no training job queued: %s", request.method, request.path, err)
        return jsonify({"status": "error", "error": str(err)}), 503

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException) -> tuple[Response, int]:
        return jsonify({"error": err.description or err.name}), err.code or 500

    @app.errorhandler(Exception)
    def internal_error(err: Exception) -> tuple[Response, int]:
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify({"error": f"internal error: {type(err).__name__}"}), 500
