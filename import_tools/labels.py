"""`amls import labels`: an `id,label` CSV (what esa/AnomalyMatch writes) becomes annotations.

Each id is matched to the project's task whose ``data.cutout_id`` it is. A task without a
label gets an annotation with the CSV's label; a task that already has the same label is
left alone (so a second run creates nothing); a task whose latest label differs is left
alone too and counted as a conflict, since an annotator's decision is never overwritten.
Ids with no task are listed in the report.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from ml_backend.core.csvio import LABEL_NAMES, read_labels_csv
from ml_backend.core.progress import progress
from ml_backend.label_schema import latest_labels, parse_label_config
from ml_backend.labelstudio import LabelStudioClient


@dataclass
class LabelImport:
    """What one run did."""

    created: int = 0
    already: int = 0
    conflicts: list[str] = field(default_factory=list)  # ids labelled otherwise in the project
    unmatched: list[str] = field(default_factory=list)  # ids no task has
    asked: dict[str, int] = field(default_factory=dict, repr=False)  # the CSV's labels

    def line(self) -> str:
        return (f"created {self.created} annotations; {self.already} tasks already had that "
                f"label; {len(self.conflicts)} kept a different label; {len(self.unmatched)} "
                "ids match no task")


def import_labels(client: LabelStudioClient, project_id: int, labels_csv: Path, *,
                  anomaly_label: str = "anomaly") -> LabelImport:
    """Annotate the project's tasks from `labels_csv`; see the module docstring."""
    wanted = read_labels_csv(labels_csv)
    schema = parse_label_config(client.label_config(project_id), anomaly_label)
    tasks = list(client.iter_tasks(project_id))
    by_cutout = {str(t["data"]["cutout_id"]): t for t in tasks
                 if isinstance(t.get("data"), dict) and t["data"].get("cutout_id") is not None}
    current = latest_labels(tasks, schema)
    outcome = LabelImport(asked=wanted)
    with progress(total=len(wanted), desc="labels", unit="label") as bar:
        for cutout_id, label in wanted.items():
            bar.update(1)
            task = by_cutout.get(cutout_id)
            if task is None:
                outcome.unmatched.append(cutout_id)
                continue
            have = current.get(int(task["id"]))
            if have == label:
                outcome.already += 1
            elif have is not None:
                outcome.conflicts.append(cutout_id)
            else:
                client.create_annotation(int(task["id"]), schema.label_result(label))
                outcome.created += 1
    return outcome


def write_label_report(path: Path, outcome: LabelImport) -> None:
    """`id,label,problem` rows for every id not imported (unmatched or conflicting)."""
    rows = [(cid, "no task with this cutout_id") for cid in outcome.unmatched]
    rows += [(cid, "the task has another label; kept") for cid in outcome.conflicts]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "label", "problem"])
        writer.writerows((cid, LABEL_NAMES[outcome.asked[cid]], problem) for cid, problem in rows)
