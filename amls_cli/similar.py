"""`amls similar`: "more like this" from a project's cached embeddings."""

from __future__ import annotations

import argparse

from ml_backend.config import Config
from ml_backend.labelstudio import LabelStudioClient
from ml_backend.registry import ModelRegistry
from ml_backend.rerank import similar_tab, similar_tasks


def register(sub: argparse._SubParsersAction) -> None:
    """Add `amls similar` to the `amls` parser."""
    parser = sub.add_parser(
        "similar", help="tasks that look like the given ones (cached embeddings)",
        description="Ranks a project's tasks by the cosine similarity of their embeddings "
        "(cached by the last training cycle under MODEL_DIR) to the given tasks', and prints "
        "`task_id<TAB>similarity`, most similar first; the given tasks are left out.")
    parser.add_argument("--project", type=int, required=True, help="Label Studio project id")
    parser.add_argument("tasks", type=int, nargs="+", metavar="TASK_ID",
                        help="Label Studio task ids to find more of")
    parser.add_argument("--top", type=int, default=20, help="how many to print (default 20)")
    parser.add_argument("--tab", action="store_true",
                        help="also show them in Label Studio as a Data Manager tab "
                        "\"More like <ids>\" (needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY)")
    parser.set_defaults(func=_similar)


def _similar(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    cfg = Config.from_env()
    registry = ModelRegistry(cfg.model_dir)
    if args.tab:
        client = LabelStudioClient(cfg.label_studio_url, cfg.label_studio_api_key)
        view, ranked = similar_tab(registry, client, args.project, args.tasks, args.top)
    else:
        ranked = similar_tasks(registry, args.project, args.tasks, args.top)
    for task_id, similarity in ranked:
        print(f"{task_id}\t{similarity:.4f}")
    if args.tab:
        print(f"Data Manager tab: {cfg.label_studio_url}/projects/{args.project}/data?tab={view}")
    return 0
