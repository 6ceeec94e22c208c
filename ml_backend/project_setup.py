"""`amls setup-project`: a Label Studio project wired to the AnomalyMatch backend, idempotently.

One run leaves the project in this state, creating or fixing only what differs:

1. the project (found by `--project ID` or by exact title) uses the given label config;
2. training starts on every submitted annotation (`min_annotations_to_start_training = 1`,
   shown in the UI as "Start model training on annotation submission");
3. the ML backend at `--backend-url` is connected, with HTTP basic auth when
   BASIC_AUTH_USER / BASIC_AUTH_PASS are set;
4. the webhook Label Studio creates for that backend (`<backend>/webhook`, created without
   credentials) carries the backend's `Authorization` header;
5. the preview folder is registered as local-files import storage (when `--previews` is given);
6. the Data Manager tabs "Most anomalous first" (the queue), "Labelled" and "All tasks" exist,
   with columns for eyes (no server paths, no bookkeeping).

A second run with the same arguments changes nothing and creates no duplicates.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ml_backend.label_schema import VIEW_TITLE, parse_label_config
from ml_backend.labelstudio import LabelStudioClient

logger = logging.getLogger(__name__)

DEFAULT_TITLE = "AnomalyMatch"
# Relative to the working directory: the repository root, or /app in the Docker image.
DEFAULT_CONFIG = Path("label_config") / "anomaly_binary.xml"
DEFAULT_BACKEND_URL = "http://localhost:9090"
# Label Studio calls the backend's train hook after every N-th annotation; 1 = each one (the
# backend debounces bursts into one job).
TRAIN_EVERY_N_ANNOTATIONS = 1
BACKEND_TITLE = "AnomalyMatch"


@dataclass(frozen=True)
class SetupRequest:
    """What the project should look like."""

    title: str
    label_config: str
    backend_url: str
    project_id: int | None = None           # update this project instead of finding by title
    previews: Path | None = None            # folder under LOCAL_FILES_DOCUMENT_ROOT, or None
    basic_auth: tuple[str, str] | None = None  # (user, password) the backend requires
    anomaly_label: str = "anomaly"


@dataclass
class SetupResult:
    """What exists after the run, and which parts this run created or changed."""

    project_id: int
    project_url: str
    ml_backend_id: int
    webhook_id: int
    view_id: int
    changes: list[str] = field(default_factory=list)  # empty when nothing had to change


def basic_auth_header(user: str, password: str) -> str:
    """The value of an HTTP `Authorization` header for basic auth (RFC 7617, UTF-8)."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


def setup_project(client: LabelStudioClient, request: SetupRequest) -> SetupResult:
    """Create or update the project described by `request`; see the module docstring."""
    parse_label_config(request.label_config, request.anomaly_label)  # fail before any write
    changes: list[str] = []
    project = _ensure_project(client, request, changes)
    project_id = int(project.id)
    # Label Studio never returns the backend's stored password; a webhook header that differs
    # from the wanted one is how a changed BASIC_AUTH_PASS shows, so re-send it then.
    hook = _find_webhook(client, project_id, request.backend_url)
    wanted = _auth_headers(request).get("Authorization")
    stale = hook is not None and (hook.headers or {}).get("Authorization") != wanted
    backend = _ensure_ml_backend(client, project_id, request, changes, resend_auth=stale)
    webhook_id = _ensure_webhook_auth(client, project_id, request, changes)
    if request.previews is not None and client.ensure_local_storage(
            project_id, request.previews.resolve()):
        changes.append(f"registered local-files storage {request.previews}")
    views_before = client.view_ids(project_id)
    views = client.ensure_views(project_id)
    changes += [f"created view {view_id} {title!r}" for title, view_id in views.items()
                if view_id not in views_before]
    view_id = views[VIEW_TITLE]
    url = f"{client.url}/projects/{project_id}/data?tab={view_id}"
    return SetupResult(project_id=project_id, project_url=url, ml_backend_id=int(backend.id),
                       webhook_id=webhook_id, view_id=view_id, changes=changes)


def _find_project(client: LabelStudioClient, request: SetupRequest) -> Any | None:
    if request.project_id is not None:
        return client.project(request.project_id)
    matches = client.projects_titled(request.title)
    if len(matches) > 1:
        ids = ", ".join(str(p.id) for p in sorted(matches, key=lambda p: p.id))
        raise ValueError(f"{len(matches)} projects are titled {request.title!r} (ids {ids}); "
                         "pick one with --project ID")
    return matches[0] if matches else None


def _ensure_project(client: LabelStudioClient, request: SetupRequest,
                    changes: list[str]) -> Any:
    project = _find_project(client, request)
    if project is None:
        project = client.create_project(
            title=request.title, label_config=request.label_config,
            min_annotations_to_start_training=TRAIN_EVERY_N_ANNOTATIONS,
            show_collab_predictions=True)
        changes.append(f"created project {project.id}")
        logger.info("created project %d %r", project.id, request.title)
        return project
    updates: dict[str, Any] = {}
    if _normalise_xml(project.label_config) != _normalise_xml(request.label_config):
        updates["label_config"] = request.label_config
    if project.min_annotations_to_start_training != TRAIN_EVERY_N_ANNOTATIONS:
        updates["min_annotations_to_start_training"] = TRAIN_EVERY_N_ANNOTATIONS
    if updates:
        project = client.update_project(project.id, **updates)
        changes.append(f"updated project {project.id}: {', '.join(sorted(updates))}")
        logger.info("project %d: updated %s", project.id, ", ".join(sorted(updates)))
    return project


def _normalise_xml(xml: str | None) -> str:
    return " ".join((xml or "").split())


def _ensure_ml_backend(client: LabelStudioClient, project_id: int, request: SetupRequest,
                       changes: list[str], resend_auth: bool = False) -> Any:
    """Connect the backend; Label Studio checks its /health and /setup while doing so."""
    url = request.backend_url.rstrip("/")
    auth: dict[str, Any] = {"auth_method": "NONE"}
    if request.basic_auth is not None:
        auth = {"auth_method": "BASIC_AUTH", "basic_auth_user": request.basic_auth[0],
                "basic_auth_pass": request.basic_auth[1]}
    for backend in client.ml_backends(project_id):
        if backend.url.rstrip("/") != url:
            continue
        same_auth = (backend.auth_method == auth["auth_method"]
                     and (backend.basic_auth_user or None) == auth.get("basic_auth_user"))
        if same_auth and not backend.is_interactive and not resend_auth:
            return backend
        backend = client.update_ml_backend(backend.id, project_id, url=url,
                                           is_interactive=False, **auth)
        changes.append(f"updated ML backend {backend.id} auth")
        return backend
    backend = client.create_ml_backend(project_id, url=url, title=BACKEND_TITLE,
                                       is_interactive=False, **auth)
    changes.append(f"connected ML backend {backend.id} at {url}")
    logger.info("project %d: connected ML backend %s", project_id, url)
    return backend


def _ensure_webhook_auth(client: LabelStudioClient, project_id: int, request: SetupRequest,
                         changes: list[str]) -> int:
    """Give the backend's webhook the backend's credentials; create it if it is missing."""
    headers = _auth_headers(request)
    hook = _find_webhook(client, project_id, request.backend_url)
    if hook is None:
        hook = client.create_webhook(project_id, url=_webhook_url(request.backend_url),
                                     send_payload=True, send_for_all_actions=True,
                                     headers=headers)
        changes.append(f"created webhook {hook.id}")
        return int(hook.id)
    current = dict(hook.headers or {})
    wanted = {**current, **headers}  # keep headers someone else added
    if request.basic_auth is None:
        wanted.pop("Authorization", None)
    if current != wanted:
        client.update_webhook(hook.id, url=hook.url, headers=wanted)
        changes.append(f"set webhook {hook.id} headers")
    return int(hook.id)


def _webhook_url(backend_url: str) -> str:
    """The URL Label Studio gives the webhook it creates for an ML backend."""
    return backend_url.rstrip("/") + "/webhook"


def _find_webhook(client: LabelStudioClient, project_id: int, backend_url: str) -> Any | None:
    url = _webhook_url(backend_url)
    for hook in client.webhooks(project_id):
        if hook.url.rstrip("/") == url and hook.project == project_id:
            return hook
    return None


def _auth_headers(request: SetupRequest) -> dict[str, str]:
    if request.basic_auth is None:
        return {}
    return {"Authorization": basic_auth_header(*request.basic_auth)}
