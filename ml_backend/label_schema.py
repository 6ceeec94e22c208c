"""Label Studio's data shapes, with no I/O: label config, labels, predictions, views.

Which tags a prediction answers (the label config), which label a task has (its annotations),
the prediction JSON we write, the Data Manager view that sorts the queue by our score, and
where local-files URLs point. The client that sends and receives these is `labelstudio`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from label_studio_sdk.label_interface import LabelInterface

# Label Studio serves files below LOCAL_FILES_DOCUMENT_ROOT at this URL prefix + relative path.
LOCAL_FILES_PREFIX = "/data/local-files/?d="
# ---- Data Manager tabs ------------------------------------------------------------------------
# Label Studio 1.23 view data: a title, an ordering, filters and, per mode ("explore" = the
# task list / grid, "labeling" = the list beside the labelling page), the columns to hide.
# Column ids are "tasks:<Label Studio column>" and "tasks:data.<task data key>".
VIEW_TITLE = "Most anomalous first"  # the queue: unlabelled tasks, highest score first
LABELLED_TITLE = "Labelled"           # one's own work, most recently labelled first
UNSURE_TITLE = "Model unsure"         # unlabelled tasks near the decision boundary
ALL_TITLE = "All tasks"
# "training 40/100 · Most anomalous first" while a job runs: first, because Label Studio
# cuts tab titles after about 17 characters.
QUEUE_STATUS_SEP = " · "


def queue_title(status: str | None = None) -> str:
    """The queue tab's title, led by what the model is doing when it is doing something."""
    return VIEW_TITLE if not status else f"{status}{QUEUE_STATUS_SEP}{VIEW_TITLE}"


def base_title(title: Any) -> Any:
    """A tab's title without the queue's status (other titles unchanged)."""
    if isinstance(title, str) and title.endswith(QUEUE_STATUS_SEP + VIEW_TITLE):
        return VIEW_TITLE
    return title


# The scores "Model unsure" shows. Both the FixMatch model (labelled batches half anomalies)
# and the re-ranking head (class-balanced) put the boundary between the classes at 0.5.
UNSURE_SCORES = {"min": 0.25, "max": 0.75}

# Label Studio's bookkeeping columns, which say nothing to someone judging images.
_BOOKKEEPING = ("inner_id", "completed_at", "cancelled_annotations", "total_predictions",
                "annotators", "annotations_ids", "predictions_model_versions",
                "predictions_results", "file_upload", "storage_filename", "created_at",
                "updated_at", "updated_by", "avg_lead_time", "draft_exists")
# Task data for machines, not eyes: the server path of the cutout store, the FITS HDU, and
# the labelling page's HTML links (the `sky` URL column stays).
_MACHINE_DATA = ("store", "hdu", "sky_link", "full_link")
HIDDEN_COLUMNS: dict[str, list[str]] = {
    "explore": [f"tasks:{c}" for c in _BOOKKEEPING] + [f"tasks:data.{k}" for k in _MACHINE_DATA],
    # Beside the labelling page only the id, the score and the image stay.
    "labeling": ([f"tasks:{c}" for c in (*_BOOKKEEPING, "total_annotations",
                                          "annotations_results")]
                 + [f"tasks:data.{k}" for k in (*_MACHINE_DATA, "cutout_id", "source", "ra",
                                                 "dec")]),
}


def _annotations(operator: str, *more: dict[str, Any]) -> dict[str, Any]:
    return {"conjunction": "and",
            "items": [{"filter": "filter:tasks:total_annotations", "operator": operator,
                       "type": "Number", "value": 0}, *more]}


# The tabs `amls setup-project` and every training job keep in place, in this order: their
# title, ordering and filters are put back if changed; the hidden columns are a starting
# point that an annotator may change (`LabelStudioClient.ensure_views`).
VIEWS: tuple[dict[str, Any], ...] = (
    {"title": VIEW_TITLE, "ordering": ["-tasks:predictions_score"],
     "filters": _annotations("equal"), "hiddenColumns": HIDDEN_COLUMNS},
    {"title": LABELLED_TITLE, "ordering": ["-tasks:completed_at"],
     "filters": _annotations("greater"), "hiddenColumns": HIDDEN_COLUMNS},
    {"title": UNSURE_TITLE, "ordering": ["-tasks:predictions_score"],
     "filters": _annotations("equal", {"filter": "filter:tasks:predictions_score",
                                       "operator": "in", "type": "Number",
                                       "value": UNSURE_SCORES}),
     "hiddenColumns": HIDDEN_COLUMNS},
    {"title": ALL_TITLE, "ordering": ["-tasks:predictions_score"],
     "filters": {"conjunction": "and", "items": []}, "hiddenColumns": HIDDEN_COLUMNS},
)


SIMILAR_PREFIX = "More like "  # tabs made by "more like this"


def similar_view(query: Sequence[int], similar: Sequence[int]) -> dict[str, Any]:
    """A Data Manager tab of the given tasks and those that look most like them ("more like
    this"): Label Studio's filters cannot rank by our similarity, so it selects exactly those
    tasks (id equal to any of them) and orders them by the project's current score."""
    ids = list(dict.fromkeys([*map(int, query), *map(int, similar)]))
    if not query or not similar:
        raise ValueError("a 'more like this' tab needs given tasks and similar ones")
    return {"title": SIMILAR_PREFIX + ", ".join(map(str, query[:5]))
            + (" …" if len(query) > 5 else ""),
            "ordering": ["-tasks:predictions_score"],
            "filters": {"conjunction": "or", "items": [
                {"filter": "filter:tasks:id", "operator": "equal", "type": "Number", "value": t}
                for t in ids]},
            "hiddenColumns": HIDDEN_COLUMNS}


def task_query(*, annotated_only: bool = False,
               ids: Sequence[int] | None = None) -> dict[str, Any] | None:
    """The `query` of Label Studio's task list (Data Manager filters and selected items) for
    tasks with a submitted annotation and / or the given task ids; None for every task."""
    query: dict[str, Any] = {}
    if annotated_only:
        query["filters"] = _annotations("greater")
    if ids is not None:
        query["selectedItems"] = {"all": False, "included": [int(t) for t in ids]}
    return query or None


class LabelConfigError(ValueError):
    """The project's label config has no Image + Choices pair we can answer."""


@dataclass(frozen=True)
class ChoiceSchema:
    """The tags our predictions refer to, read from a project's label config."""

    from_name: str        # name of the <Choices> control
    to_name: str          # name of the <Image> object it labels
    image_key: str        # task data key holding the image URL ("$image" -> "image")
    anomaly_choice: str   # choice value meaning "anomaly" (ANOMALY_LABEL)
    normal_choice: str    # first other choice value, e.g. "normal"
    # Pre-select the more likely choice in each prediction. Off by default: a pre-filled
    # answer invites accepting it, and the score alone orders the queue (AMLS_PRELABEL).
    prelabel: bool = False

    def label_result(self, label: int) -> list[dict[str, Any]]:
        """The `result` list that answers our control with 1 = anomaly or 0 = normal."""
        choice = self.anomaly_choice if label == 1 else self.normal_choice
        return [{"from_name": self.from_name, "to_name": self.to_name, "type": "choices",
                 "value": {"choices": [choice]}}]

    def prediction_result(self, score: float) -> list[dict[str, Any]]:
        """The `result` list of a prediction: the more likely choice for P(anomaly) = score."""
        return self.label_result(int(score >= 0.5))

    def prediction(self, score: float | None, model_version: str) -> dict[str, Any]:
        """One Label Studio prediction of P(anomaly) = score: the score (which orders the
        queue) and, with `prelabel`, the more likely choice as its result. None gives an
        empty result and no score (nothing invented where the pixels are unavailable)."""
        if score is None:
            return {"result": [], "model_version": model_version}
        result = self.prediction_result(score) if self.prelabel else []
        return {"result": result, "score": float(score), "model_version": model_version}

    def label_of(self, result: Sequence[dict[str, Any]]) -> int | None:
        """1 for the anomaly choice, 0 for any other choice, None if our control is absent."""
        for region in result:
            if region.get("from_name") != self.from_name or region.get("type") != "choices":
                continue
            choices = (region.get("value") or {}).get("choices") or []
            if choices:
                return int(self.anomaly_choice in choices)
        return None


def parse_label_config(label_config: str, anomaly_label: str, *,
                       prelabel: bool = False) -> ChoiceSchema:
    """Find the first <Choices> that labels an <Image> and offers `anomaly_label`."""
    try:
        interface = LabelInterface(label_config)
    except Exception as err:  # the SDK raises assorted XML / validation errors
        raise LabelConfigError(f"label config does not parse: {err}") from err
    images = {obj.name: obj for obj in interface.objects if obj.tag.lower() == "image"}
    for control in interface.controls:
        if control.tag.lower() != "choices":
            continue
        targets = [name for name in control.to_name if name in images]
        labels = list(getattr(control, "labels", []) or [])
        if not targets or anomaly_label not in labels:
            continue
        others = [c for c in labels if c != anomaly_label]
        if not others:
            raise LabelConfigError(f"<Choices name={control.name!r}> offers only "
                                   f"{anomaly_label!r}; it needs a second choice")
        return ChoiceSchema(from_name=control.name, to_name=targets[0],
                            image_key=images[targets[0]].value.lstrip("$"),
                            anomaly_choice=anomaly_label, normal_choice=others[0],
                            prelabel=prelabel)
    raise LabelConfigError(f"label config has no <Choices> with a {anomaly_label!r} choice "
                           "that labels an <Image>")


def latest_labels(tasks: Sequence[dict[str, Any]], schema: ChoiceSchema) -> dict[int, int]:
    """Task id -> label (1 anomaly, 0 normal) from each task's most recent valid annotation.

    Cancelled (skipped) annotations and annotations without our control are ignored;
    "most recent" is the latest `updated_at` (then `created_at`, then id).
    """
    labels: dict[int, int] = {}
    for task in tasks:
        valid = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        valid.sort(key=lambda a: (a.get("updated_at") or "", a.get("created_at") or "",
                                  a.get("id") or 0))
        for annotation in reversed(valid):
            label = schema.label_of(annotation.get("result") or [])
            if label is not None:
                labels[int(task["id"])] = label
                break
    return labels


def ground_truth_labels(tasks: Sequence[dict[str, Any]], schema: ChoiceSchema) -> dict[int, int]:
    """Task id -> label from the task's most recent annotation marked as ground truth.

    These form the held-out set: they are scored after each cycle, never trained on.
    """
    marked = [{**task, "annotations": [a for a in task.get("annotations") or []
                                       if a.get("ground_truth")]} for task in tasks]
    return latest_labels(marked, schema)


def local_files_dir(rows: Iterable[dict[str, Any]], document_root: Path) -> Path | None:
    """The deepest folder holding every local-files preview (None if no local-files URL)."""
    paths = [str(document_root / unquote(row["image"][len(LOCAL_FILES_PREFIX):]))
             for row in rows if str(row.get("image", "")).startswith(LOCAL_FILES_PREFIX)]
    if not paths:
        return None
    folder = Path(os.path.commonpath([os.path.dirname(p) for p in paths])).resolve()
    if not folder.is_dir():
        raise ValueError(f"previews folder {folder} (from the tasks' local-files URLs and "
                         f"document root {document_root}) does not exist: push with the "
                         "--document-root the import used")
    return folder


def training_labels(tasks: list[dict[str, Any]],
                    schema: ChoiceSchema) -> tuple[dict[int, int], dict[int, int]]:
    """(labels to train on, held-out ground-truth labels): task id -> 1 anomaly / 0 normal;
    a ground-truth task is never trained on."""
    held_out = ground_truth_labels(tasks, schema)
    labels = {t: y for t, y in latest_labels(tasks, schema).items() if t not in held_out}
    return labels, held_out
