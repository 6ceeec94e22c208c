"""`amls survey score / resume / status / merge / push-top`: survey-scale scoring on RQ.

Workers are the backend's `amls worker` (same Redis, same queue AMLS_QUEUE) on any machine
that sees the stores, the model directory and the survey directory at the same paths. RQ runs
a queue's jobs in order, so give a survey its own queue (`--queue` here, AMLS_QUEUE for its
workers) unless Label Studio training jobs may wait for it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ml_backend import survey
from ml_backend.config import Config

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `amls survey ...` to the `amls` parser."""
    parser = sub.add_parser("survey", help="score whole surveys in shards on RQ workers",
                            description="Score 10^7-10^8 cutouts: shards on RQ workers "
                                        "(`amls worker`), then a merged ranking.")
    commands = parser.add_subparsers(dest="survey_command", required=True, metavar="ACTION")

    score = commands.add_parser("score", help="plan shards and enqueue them (re-run resumes)")
    score.add_argument("stores", nargs="+", type=Path, metavar="STORE", help="cutout stores")
    score.add_argument("--model", type=Path, required=True, metavar="MODEL_DIR",
                       help="model directory (meta.json + model.safetensors)")
    score.add_argument("--shards", type=int, required=True,
                       help="number of shards (>= 1); 10^5-10^6 images per shard keeps the "
                            "per-job model load negligible and a lost shard cheap to redo")
    score.add_argument("--out", type=Path, required=True, metavar="DIR",
                       help="survey directory (manifest, shard results, merged output)")
    score.add_argument("--batch-size", type=int, default=None,
                       help="images per forward pass (default AMLS_SCORE_BATCH_SIZE, 256)")
    _queue_options(score)
    score.set_defaults(func=_score)

    resume = commands.add_parser("resume", help="enqueue again every shard without a result")
    resume.add_argument("dir", type=Path, metavar="DIR")
    _queue_options(resume)
    resume.set_defaults(func=_resume)

    status = commands.add_parser("status", help="shards done / pending / failed, images/s "
                                                       "(exit status 1 if a shard failed)")
    status.add_argument("dir", type=Path, metavar="DIR")
    status.set_defaults(func=_status)

    merge = commands.add_parser("merge", help="write scores.csv (all) and top.csv (top N)")
    merge.add_argument("dir", type=Path, metavar="DIR")
    merge.add_argument("--top", type=int, default=1000, help="rows in top.csv (default 1000)")
    merge.set_defaults(func=_merge)

    push = commands.add_parser("push-top", help="import the K best cutouts not yet tasks into "
                                                "a Label Studio project, with predictions")
    push.add_argument("dir", type=Path, metavar="DIR")
    push.add_argument("k", type=int, metavar="K")
    push.add_argument("--project", type=int, required=True, help="Label Studio project id")
    push.add_argument("--document-root", type=Path,
                      help="Label Studio's local-files document root, to register the preview "
                           "folder as local-files storage")
    push.set_defaults(func=_push_top)


def _queue_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", help="Redis of the workers (default REDIS_URL)")
    parser.add_argument("--queue", help="RQ queue (default AMLS_QUEUE); a queue of its own keeps a "
                                        "long survey from delaying Label Studio training jobs")
    parser.add_argument("--job-timeout", type=int, default=86400,
                        help="seconds one shard may run before RQ kills it (default 86400)")


def _redis_url(args: argparse.Namespace, cfg: Config) -> str:
    url = args.redis_url or cfg.redis_url
    if not url:
        raise ValueError("no Redis: pass --redis-url or set REDIS_URL (the workers' Redis)")
    return url


def _score(args: argparse.Namespace) -> int:
    cfg = Config.from_env()
    url = _redis_url(args, cfg)
    batch = args.batch_size or cfg.train.score_batch_size
    manifest = survey.plan_survey(args.stores, args.model, args.shards, args.out,
                                  batch_size=batch)
    queue = args.queue or cfg.queue_name
    queued = survey.enqueue_pending(manifest.parent, url, queue, job_timeout_s=args.job_timeout)
    print(f"{args.out}: enqueued {len(queued)} shard(s) on queue {queue!r}; run "
          f"`AMLS_QUEUE={queue} amls worker` (same REDIS_URL) on any machine to score them")
    return 0


def _resume(args: argparse.Namespace) -> int:
    cfg = Config.from_env()
    queued = survey.enqueue_pending(args.dir, _redis_url(args, cfg), args.queue or cfg.queue_name,
                                    job_timeout_s=args.job_timeout)
    print(f"{args.dir}: enqueued {len(queued)} shard(s) again: {queued}")
    return 0


def _status(args: argparse.Namespace) -> int:
    state = survey.survey_state(args.dir)
    total = len(state.done) + len(state.pending) + len(state.failed)
    print(f"shards: {len(state.done)}/{total} done, {len(state.pending)} pending, "
          f"{len(state.failed)} failed")
    print(f"images scored: {state.images_done}; {state.images_per_s:.1f} images/s overall, "
          f"{state.images_per_s_per_worker:.1f} images/s per worker")
    for index, message in sorted(state.failed.items()):
        print(f"failed shard {index}: {message}")
    return 1 if state.failed else 0


def _merge(args: argparse.Namespace) -> int:
    scores, top, n = survey.merge(args.dir, top=args.top)
    print(f"wrote {n} rows to {scores} and the top {min(n, args.top)} to {top}")
    return 0


def _push_top(args: argparse.Namespace) -> int:
    from ml_backend.labelstudio import LabelStudioClient

    cfg = Config.from_env()
    if not cfg.label_studio_url or not cfg.label_studio_api_key:
        raise ValueError("push-top needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
    client = LabelStudioClient(cfg.label_studio_url, cfg.label_studio_api_key)
    counts = survey.push_top(client, args.dir, args.k, args.project,
                             anomaly_label=cfg.anomaly_label, document_root=args.document_root,
                             batch_size=cfg.prediction_write_batch, prelabel=cfg.prelabel)
    print(f"created {counts['created']} tasks; skipped {counts['already_in_project']} already "
          f"in the project and {counts['without_task_row']} without a task row")
    return 0
