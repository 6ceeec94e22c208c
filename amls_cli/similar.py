"""`amls similar`: "more like this" from a project's cached embeddings."""

from __future__ import annotations

import argparse

from ml_backend.config import Config
from ml_backend.registry import ModelRegistry
from ml_backend.rerank import similar_tasks


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
    parser.set_defaults(func=_similar)


def _similar(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    registry = ModelRegistry(Config.from_env().model_dir)
    for task_id, similarity in similar_tasks(registry, args.project, args.tasks, args.top):
        print(f"{task_id}\t{similarity:.4f}")
    return 0
