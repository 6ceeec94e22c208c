"""`amls versions list | rollback`: a project's model versions, and going back to one."""

from __future__ import annotations

import argparse
import sys

from ml_backend.config import Config
from ml_backend.labelstudio import API_FAILURES, LabelStudioClient
from ml_backend.registry import ModelRegistry
from ml_backend.versions import VersionRow, rollback, version_rows


def register(sub: argparse._SubParsersAction) -> None:
    """Add `amls versions` to the `amls` parser."""
    parser = sub.add_parser(
        "versions", help="list a project's model versions, or roll back to a kept one",
        description="Versions live under MODEL_DIR/<project>/. `list` shows each with its "
        "labels, training summary and, when LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are "
        "set, how many predictions Label Studio holds. `rollback VERSION` makes a kept "
        "version current here and in Label Studio; newer versions are kept. Run it while no "
        "training job is running (a finishing job publishes its own version).")
    actions = parser.add_subparsers(dest="versions_action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="one line per version, the current one starred")
    listing.add_argument("--project", type=int, required=True, help="Label Studio project id")
    listing.set_defaults(func=_list)
    back = actions.add_parser("rollback", help="make a kept version current again")
    back.add_argument("--project", type=int, required=True, help="Label Studio project id")
    back.add_argument("version", help="the version to serve, as `list` shows it")
    back.set_defaults(func=_rollback)


def _client(cfg: Config) -> LabelStudioClient | None:
    if not cfg.label_studio_url or not cfg.label_studio_api_key:
        return None
    return LabelStudioClient(cfg.label_studio_url, cfg.label_studio_api_key)


def _list(args: argparse.Namespace) -> int:
    cfg = Config.from_env()
    registry = ModelRegistry(cfg.model_dir)
    client = _client(cfg)
    counts = None
    if client is not None:
        try:
            counts = client.prediction_versions(args.project)
        except API_FAILURES as err:
            print(f"(Label Studio not asked: {type(err).__name__}: {err})", file=sys.stderr)
    rows = version_rows(registry, args.project, counts)
    if not rows:
        print(f"project {args.project} has no model versions under {cfg.model_dir}")
        return 0
    for row in rows:
        print(_line(row))
    return 0


def _line(row: VersionRow) -> str:
    labels = ", ".join(f"{n} {name}" for name, n in sorted(row.label_counts.items()))
    loss = row.metrics.get("final_loss")
    held = "" if row.predictions is None else f"  {row.predictions} predictions in Label Studio"
    return (f"{'*' if row.current else ' '} {row.version}  {row.created}  "
            f"parent {row.parent or '-'}  labels: {labels or '-'}  "
            f"final loss {'-' if loss is None else f'{loss:.3f}'}{held}")


def _rollback(args: argparse.Namespace) -> int:
    cfg = Config.from_env()
    client = _client(cfg)
    if client is None:
        raise ValueError("rollback needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (Label "
                         "Studio must switch too)")
    rollback(ModelRegistry(cfg.model_dir), client, args.project, args.version)
    print(f"project {args.project}: serving {args.version} here and in Label Studio")
    return 0
