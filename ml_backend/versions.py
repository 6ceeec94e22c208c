"""A project's model versions: what each one is, and rolling back to a kept one.

The registry (MODEL_DIR) is the truth; Label Studio is asked how many predictions of each
version it still holds, since a rollback can only show predictions that are still there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ml_backend.labelstudio import LabelStudioClient
from ml_backend.registry import ModelRegistry


@dataclass(frozen=True)
class VersionRow:
    """One published version of a project, as `amls versions list` shows it."""

    version: str
    created: str
    parent: str | None
    label_counts: dict[str, int]
    metrics: dict[str, Any]  # the cycle's training summary and held-out evaluation, if any
    current: bool  # the version the backend serves (LATEST)
    predictions: int | None  # predictions in Label Studio; None when it was not asked


def version_rows(registry: ModelRegistry, project_id: int,
                 prediction_counts: dict[str, int] | None = None) -> list[VersionRow]:
    """Every published version of the project, oldest first."""
    latest = registry.latest(project_id)
    rows = []
    for version in registry.versions(project_id):
        meta = registry.read_meta(project_id, version)
        rows.append(VersionRow(
            version=version, created=str(meta.get("created", "")), parent=meta.get("parent"),
            label_counts=dict(meta.get("label_counts") or {}),
            metrics=dict(meta.get("metrics") or {}), current=version == latest,
            predictions=None if prediction_counts is None
            else int(prediction_counts.get(version, 0))))
    return rows


def rollback(registry: ModelRegistry, client: LabelStudioClient, project_id: int,
             version: str) -> None:
    """Make a kept `version` current, here first and then in Label Studio (whose queue then
    orders by that version's predictions again). Newer versions are kept. ValueError when the
    version is unknown or Label Studio no longer holds its predictions (older versions' are
    deleted when they are pruned: train again instead)."""
    if version not in registry.versions(project_id):
        known = ", ".join(registry.versions(project_id)) or "none"
        raise ValueError(f"project {project_id} has no model version {version!r} (kept: "
                         f"{known})")
    held = client.prediction_versions(project_id).get(version, 0)
    if held == 0:
        raise ValueError(f"Label Studio holds no predictions of {version} for project "
                         f"{project_id}; the queue could not be ordered by it. Train again "
                         "instead.")
    registry.set_latest(project_id, version)
    client.set_model_version(project_id, version)
