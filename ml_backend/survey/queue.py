"""Enqueueing shard jobs on RQ (workers: `amls worker` on the same Redis and queue)."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

from ml_backend.survey.layout import MANIFEST, read_manifest, shard_path
from ml_backend.survey.results import survey_state
from ml_backend.survey.shard import score_shard

logger = logging.getLogger(__name__)

JOB_PREFIX = "amls-survey"


def enqueue_pending(survey_dir: str | Path, redis_url: str, queue_name: str, *,
                    job_timeout_s: int = 86400) -> list[int]:
    """Enqueue every shard without a result that is not already waiting in the queue.

    Shards whose job is running (or whose worker died mid-shard) are enqueued again: the
    result is written atomically and a finished shard is skipped, so a shard scored twice
    still appears once. Clears `.error` files of the shards it enqueues. Returns them.
    """
    from redis import Redis
    from rq import Queue

    survey_dir = Path(survey_dir).resolve()
    manifest = read_manifest(survey_dir / MANIFEST)
    state = survey_state(survey_dir)
    queue = Queue(queue_name, connection=Redis.from_url(redis_url))
    prefix = f"{JOB_PREFIX}-{manifest['survey_id']}-"
    waiting = {_shard_of(job_id, prefix) for job_id in queue.get_job_ids()
               if job_id.startswith(prefix)}
    todo = [i for i in sorted(state.pending + list(state.failed)) if i not in waiting]
    for i in todo:
        shard_path(survey_dir, i, ".error").unlink(missing_ok=True)
        queue.enqueue(score_shard, str(survey_dir / MANIFEST), i, job_timeout=job_timeout_s,
                      result_ttl=86400, failure_ttl=7 * 86400,
                      job_id=f"{prefix}{i}-{secrets.token_hex(3)}",
                      description=f"survey {survey_dir} shard {i}")
    logger.info("enqueued %d shard(s) of %s on queue %r", len(todo), survey_dir, queue_name)
    return todo


def _shard_of(job_id: str, prefix: str) -> int:
    return int(job_id[len(prefix):].split("-", 1)[0])
