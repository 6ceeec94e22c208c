"""Label Studio's client: every call to its API, through label-studio-sdk 2.x or plain HTTP.

Labels in; predictions, model version, views, tasks, storages, ML backend and webhook out;
task images fetched under the SSRF rules of `fetch_image`. Nothing else in the project talks
to Label Studio or imports the SDK's client; the data shapes are in `label_schema`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

import httpx
import requests
from label_studio_sdk import LabelStudio, PredictionRequest
from label_studio_sdk.core.api_error import ApiError

from ml_backend.core.errors import AmlsError
from ml_backend.label_schema import (
    VIEW_TITLE,
    VIEWS,
    ChoiceSchema,
    base_title,
    queue_title,
    task_query,
)

logger = logging.getLogger(__name__)

HTTP_TIMEOUT_S = 60.0
# Extra wait per prediction when deleting a version: Label Studio takes about 10 ms each.
DELETE_S_PER_PREDICTION = 0.05
# ... and when importing predictions (about 1 ms each, plus a recount of the project's tasks).
WRITE_S_PER_PREDICTION = 0.005
# Redirects followed when downloading a task image; every hop must be an allowed host.
MAX_REDIRECTS = 3
# A task image larger than this is refused before it is read to the end.
MAX_IMAGE_BYTES = 64 * 2**20
# Prediction writes: tries per batch, and the first wait between them (doubling, at most
# WRITE_BACKOFF_MAX_S): 0.5, 1, 2, 4 s. Only transient failures (`is_transient`) are retried.
WRITE_TRIES = 5
WRITE_BACKOFF_S = 0.5
WRITE_BACKOFF_MAX_S = 4.0


class LabelStudioError(RuntimeError):
    """Label Studio answered a plain-HTTP call with an error status (`status_code`)."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class ProjectNotFound(AmlsError, LookupError):
    """Label Studio has no project with the id asked for (or the token may not see it)."""


def is_transient(err: BaseException) -> bool:
    """True for failures worth retrying: no connection, a timeout, a 5xx or a 429."""
    if isinstance(err, (httpx.TransportError, requests.ConnectionError, requests.Timeout)):
        return True
    if isinstance(err, (ApiError, LabelStudioError)):
        status = err.status_code or 0
        return status >= 500 or status == 429
    return False


# What a failed call to Label Studio raises: refused (status + body) or unreachable.
API_FAILURES: tuple[type[BaseException], ...] = (ApiError, LabelStudioError, httpx.HTTPError,
                                                 requests.RequestException)


def describe_failure(err: BaseException) -> str:
    """One line for a failure in API_FAILURES: its HTTP status and body, or its kind."""
    status = getattr(err, "status_code", None)
    if isinstance(err, ApiError) and status is not None:
        return f"HTTP {status}: {err.body}"
    if status is not None:
        return str(err)
    return f"{type(err).__name__}: {err}"


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _read_capped(response: requests.Response, url: str) -> bytes:
    """The body, or ValueError as soon as it passes MAX_IMAGE_BYTES."""
    chunks, size = [], 0
    with response:
        for chunk in response.iter_content(1 << 16):
            size += len(chunk)
            if size > MAX_IMAGE_BYTES:
                raise ValueError(f"image {url!r} is larger than {MAX_IMAGE_BYTES} bytes")
            chunks.append(chunk)
    return b"".join(chunks)


def same_origin(url: str, other: str) -> bool:
    """True when both URLs have the same scheme, host and port (default ports filled in)."""
    def origin(u: str) -> tuple[str, str, int | None]:
        parts = urlparse(u)
        scheme = parts.scheme.lower()
        try:
            port = parts.port or _DEFAULT_PORTS.get(scheme)
        except ValueError:  # a port that is not a number
            return ("", "", None)
        return (scheme, (parts.hostname or "").lower(), port)

    first = origin(url)
    return bool(first[0] and first[1]) and first == origin(other)


def _write_timeout(n_predictions: int) -> int:
    """Seconds to wait for one prediction import of that size (about 1,000 a second here)."""
    return int(HTTP_TIMEOUT_S + WRITE_S_PER_PREDICTION * n_predictions)


class LabelStudioClient:
    """The few Label Studio operations a training job needs."""

    def __init__(self, url: str, api_key: str, timeout_s: float = HTTP_TIMEOUT_S) -> None:
        if not url or not api_key:
            raise ValueError("LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are required to talk "
                             "to Label Studio")
        self.url = url.rstrip("/")
        self._api_key = api_key
        self.sdk = LabelStudio(base_url=self.url, api_key=api_key, timeout=timeout_s)

    def state(self) -> str:
        """"ok" when Label Studio answers and accepts the API key; else why, without secrets."""
        try:
            self.sdk.users.whoami()
        except ApiError as err:
            if err.status_code in (401, 403):
                return f"Label Studio at {self.url} refuses the API key ({err.status_code})"
            return f"Label Studio at {self.url} answered {err.status_code}"
        except Exception as err:  # noqa: BLE001 - any failure to connect is the answer
            return f"Label Studio at {self.url} is unreachable ({type(err).__name__})"
        return "ok"

    def label_config(self, project_id: int) -> str:
        """The project's label config; ProjectNotFound when Label Studio has no such project."""
        try:
            project = self.sdk.projects.get(id=project_id)
        except ApiError as err:
            if err.status_code == 404:
                raise ProjectNotFound(f"Label Studio at {self.url} has no project "
                                      f"{project_id}") from None
            raise
        return str(project.label_config)

    def iter_tasks(self, project_id: int, page_size: int = 500, *, annotated_only: bool = False,
                   ids: Sequence[int] | None = None) -> Iterator[dict[str, Any]]:
        """Every task of the project as a dict with `data` and `annotations`; only those with
        a submitted annotation (`annotated_only`), or only the tasks `ids` (none if empty)."""
        if ids is not None and not ids:
            return
        query = task_query(annotated_only=annotated_only, ids=ids)
        pager = self.sdk.tasks.list(project=project_id, fields="all", page_size=page_size,
                                    query=json.dumps(query) if query else None)
        for task in pager:
            yield task.dict() if hasattr(task, "dict") else dict(task)

    def write_predictions(self, project_id: int, schema: ChoiceSchema,
                          scores: Sequence[tuple[int, float]], model_version: str,
                          batch_size: int, tries: int = WRITE_TRIES,
                          backoff_s: float = WRITE_BACKOFF_S) -> int:
        """Bulk-import one prediction per (task id, P(anomaly)); returns the number written.

        `model_version` must be new (no predictions in Label Studio yet), as a training job's
        version is. Batches are sent in order; a batch that fails transiently is retried up to
        `tries` times with exponential backoff (`backoff_s`, doubling, at most
        WRITE_BACKOFF_MAX_S). Batches already written are never re-sent, and a retried batch
        is sent again only if it did not land: before each retry the version's prediction
        count is read, and since only this call writes the version, count = written + batch
        means the failed attempt actually succeeded server-side. Any other count raises.
        """
        written = 0
        for start in range(0, len(scores), batch_size):
            batch = [PredictionRequest(task=task_id, **schema.prediction(score, model_version))
                     for task_id, score in scores[start:start + batch_size]]
            self._import_batch(project_id, batch, model_version, written, tries, backoff_s)
            written += len(batch)
        return written

    def _import_batch(self, project_id: int, batch: list[Any], model_version: str,
                      written: int, tries: int, backoff_s: float) -> None:
        """One batch of `write_predictions`, retried without duplicates."""
        for attempt in range(tries):
            try:
                if attempt > 0:
                    landed = self.prediction_versions(project_id).get(model_version, 0)
                    if landed == written + len(batch):
                        logger.info("project %d: batch of %d predictions had landed despite "
                                    "the error; not re-sent", project_id, len(batch))
                        return
                    if landed != written:
                        raise RuntimeError(
                            f"version {model_version} has {landed} predictions in Label "
                            f"Studio; expected {written} or {written + len(batch)}")
                # The SDK's own retries would re-send blindly; ours check first.
                self.sdk.projects.import_predictions(id=project_id, request=batch,
                                                     request_options={
                                                         "max_retries": 0,
                                                         "timeout_in_seconds": _write_timeout(
                                                             len(batch))})
                return
            except API_FAILURES as err:
                if not is_transient(err) or attempt == tries - 1:
                    raise
                delay = min(backoff_s * 2 ** attempt, WRITE_BACKOFF_MAX_S)
                logger.warning("project %d: writing predictions failed (%s); try %d of %d "
                               "in %.1f s", project_id, err, attempt + 2, tries, delay)
                time.sleep(delay)

    def current_model_version(self, project_id: int) -> str:
        """The project's current model version ("" when none is set)."""
        return str(self.sdk.projects.get(id=project_id).model_version or "")

    def set_model_version(self, project_id: int, model_version: str) -> None:
        """Make `model_version` the project's current version (used for ordering by score)."""
        self.sdk.projects.update(id=project_id, model_version=model_version)

    def prediction_versions(self, project_id: int) -> dict[str, int]:
        """Model version -> number of predictions in the project."""
        response = self._http("GET", f"api/projects/{project_id}/model-versions/")
        data = response.json()
        return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def delete_predictions(self, project_id: int, model_version: str, count: int = 0) -> None:
        """Delete every prediction of `model_version` in the project. Label Studio deletes
        them one at a time (about 10 ms each on SQLite, benchmarks/RESULTS.md), so the wait
        grows with `count`, the number it holds."""
        self._http("DELETE", f"api/projects/{project_id}/model-versions/",
                   json={"model_version": model_version},
                   timeout=HTTP_TIMEOUT_S + DELETE_S_PER_PREDICTION * count)

    def ensure_views(self, project_id: int) -> dict[str, int]:
        """Create the Data Manager tabs of `VIEWS` that are missing, and put back the ordering
        and filters of ours where they differ (the columns an annotator chose are kept; a
        tab without any column choice gets ours); title -> view id."""
        existing = {}
        for view in self.sdk.views.list(project=project_id):
            data = view.data if isinstance(view.data, dict) else {}
            existing.setdefault(base_title(data.get("title")), (view, data))
        ids = {}
        for wanted in VIEWS:
            title = wanted["title"]
            if title in existing:
                view, data = existing[title]
                repair = {k: v for k, v in wanted.items()
                          if data.get(k) != v and (k != "hiddenColumns" or k not in data)}
                if repair:
                    self.sdk.views.update(id=str(view.id), project=project_id,
                                          data={**data, **repair})
                ids[title] = int(view.id)
            else:
                view = self.sdk.views.create(project=project_id, data=wanted)
                logger.info("project %d: created view %r (id %s)", project_id, title, view.id)
                ids[title] = int(view.id)
        return ids

    def set_queue_status(self, project_id: int, status: str | None) -> bool:
        """Show `status` in the queue tab's title (None: the plain title); whether the tab
        exists (`ensure_views` makes it)."""
        for view in self.sdk.views.list(project=project_id):
            data = view.data if isinstance(view.data, dict) else {}
            if base_title(data.get("title")) == VIEW_TITLE:
                title = queue_title(status)
                if data.get("title") != title:
                    self.sdk.views.update(id=str(view.id), project=project_id,
                                          data={**data, "title": title})
                return True
        return False

    def put_view(self, project_id: int, data: dict[str, Any]) -> int:
        """Create the Data Manager tab titled `data["title"]`, or replace that tab's data;
        its id."""
        for view in self.sdk.views.list(project=project_id):
            if isinstance(view.data, dict) and view.data.get("title") == data["title"]:
                self.sdk.views.update(id=str(view.id), project=project_id, data=data)
                return int(view.id)
        return int(self.sdk.views.create(project=project_id, data=data).id)

    def fetch_image(self, url: str, allowed_hosts: frozenset[str]) -> bytes:
        """Download a task image; relative URLs resolve against Label Studio.

        Only http(s) URLs on hosts in `allowed_hosts` are contacted, and the API key is sent
        only to Label Studio itself: the same scheme, host and port as its URL, checked on
        every hop (so never over http when Label Studio is https). Redirects (e.g. Label
        Studio's presigned cloud-storage URLs) are followed by hand, at most MAX_REDIRECTS,
        each hop checked again.
        Raises PermissionError for a host or redirect that is not allowed.
        """
        target = urljoin(self.url + "/", url)
        for _hop in range(MAX_REDIRECTS + 1):
            host = urlparse(target).netloc
            if urlparse(target).scheme not in ("http", "https") or host not in allowed_hosts:
                raise PermissionError(f"image host {host!r} of {target!r} (task URL {url!r}) "
                                      "is not allowed (set AMLS_ALLOWED_IMAGE_HOSTS)")
            headers = {}
            if same_origin(target, self.url):
                headers["Authorization"] = f"Token {self._api_key}"
            response = requests.get(target, headers=headers, timeout=HTTP_TIMEOUT_S,
                                    allow_redirects=False, stream=True)
            if not 300 <= response.status_code < 400:
                response.raise_for_status()
                return _read_capped(response, target)
            location = response.headers.get("Location")
            if not location:
                raise ValueError(f"image {target!r} answered {response.status_code} "
                                 "without a Location")
            target = urljoin(target, location)
        raise PermissionError(f"image {url!r} redirects more than {MAX_REDIRECTS} times")

    # ---- tasks and local files (import tools and survey pushes) ----------------------------

    def import_tasks(self, project_id: int, tasks: Sequence[dict[str, Any]]) -> None:
        """Create tasks (``{"data": ..., "predictions": [...]}``) in one request."""
        self.sdk.projects.import_tasks(id=project_id, request=list(tasks))

    def create_annotation(self, task_id: int, result: list[dict[str, Any]]) -> None:
        """Submit an annotation of the task (as the API token's user)."""
        self.sdk.annotations.create(id=task_id, result=result)

    def cutout_ids(self, project_id: int, page_size: int = 1000) -> set[str]:
        """``data.cutout_id`` of every task already in the project."""
        ids: set[str] = set()
        for task in self.sdk.tasks.list(project=project_id, page_size=page_size):
            data = task.data if hasattr(task, "data") else task.get("data", {})
            if data and data.get("cutout_id") is not None:
                ids.add(str(data["cutout_id"]))
        return ids

    def ensure_local_storage(self, project_id: int, folder: Path) -> bool:
        """Register ``folder`` as a local-files import storage unless one already covers it.

        Label Studio serves ``/data/local-files/?d=...`` only below a registered storage
        path. The storage is not synced: tasks come from our pushes, not from scanning the
        folder. Returns True when a storage was created.
        """
        for storage in self.sdk.import_storage.local.list(project=project_id):
            path = getattr(storage, "path", None)
            if path and (folder == Path(path).resolve()
                         or Path(path).resolve() in folder.parents):
                return False
        self.sdk.import_storage.local.create(project=project_id, path=str(folder),
                                             title="amls previews", use_blob_urls=False)
        logger.info("registered local-files storage %s for project %d", folder, project_id)
        return True

    # ---- project set-up (`amls setup-project`): SDK objects in and out ---------------------

    def project(self, project_id: int) -> Any:
        return self.sdk.projects.get(id=project_id)

    def projects_titled(self, title: str) -> list[Any]:
        """Projects whose title is exactly `title`."""
        return [p for p in self.sdk.projects.list(title=title) if p.title == title]

    def create_project(self, **fields: Any) -> Any:
        return self.sdk.projects.create(**fields)

    def update_project(self, project_id: int, **fields: Any) -> Any:
        return self.sdk.projects.update(id=project_id, **fields)

    def ml_backends(self, project_id: int) -> list[Any]:
        return list(self.sdk.ml.list(project=project_id))

    def create_ml_backend(self, project_id: int, **fields: Any) -> Any:
        """Connect an ML backend; Label Studio checks its /health and /setup meanwhile."""
        return self.sdk.ml.create(project=project_id, **fields)

    def update_ml_backend(self, backend_id: int, project_id: int, **fields: Any) -> Any:
        # `project` must be sent again: Label Studio 1.23 re-runs /setup on update, needing it.
        return self.sdk.ml.update(id=backend_id, project=project_id, **fields)

    def webhooks(self, project_id: int) -> list[Any]:
        return list(self.sdk.webhooks.list(project=str(project_id)))

    def create_webhook(self, project_id: int, **fields: Any) -> Any:
        return self.sdk.webhooks.create(project=project_id, **fields)

    def update_webhook(self, hook_id: int, **fields: Any) -> Any:
        return self.sdk.webhooks.update(id=hook_id, **fields)

    def view_ids(self, project_id: int) -> set[int]:
        """Ids of the project's Data Manager tabs."""
        return {int(v.id) for v in self.sdk.views.list(project=project_id)}

    def _http(self, method: str, path: str, timeout: float = HTTP_TIMEOUT_S,
              **kwargs: Any) -> requests.Response:
        response = requests.request(method, f"{self.url}/{path}",
                                    headers={"Authorization": f"Token {self._api_key}"},
                                    timeout=timeout, **kwargs)
        if not response.ok:
            raise LabelStudioError(f"Label Studio {method} /{path} answered "
                                   f"{response.status_code}: {response.text[:300]}",
                                   response.status_code)
        return response
