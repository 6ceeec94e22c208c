"""Survey mode: score 10^7-10^8 cutouts in shards on any number of RQ workers.

A survey directory holds::

    manifest.json          stores (path, name, length), model dir + version, shard ranges
    shards/shard-00007.csv one finished shard: id,score,store rows sorted by descending score
    shards/shard-00007.json its statistics (images, seconds, host, finished time)
    shards/shard-00007.error the last failure of a shard that has no result yet

Shards are contiguous row ranges over the concatenation of the stores (in the order given),
so shard i covers global rows ``[start, stop)`` and may span two stores. `score_shard` is
the job: a plain function of picklable arguments that any worker sharing the filesystem
runs. It writes its result to a temporary file and renames it into place, and returns at
once if the result already exists, so a shard that finished is never redone and a shard
whose worker died is simply enqueued again (`resume`). `merge` streams the sorted shard
files through a k-way merge, so its memory does not grow with the survey.

Modules: `layout` (directory and file formats), `plan` (shards, manifest), `shard` (the job),
`results` (status, merge), `queue` (RQ), `push` (Label Studio).
"""

from ml_backend.survey.layout import COLUMNS, MANIFEST, SHARDS, read_manifest, shard_path
from ml_backend.survey.plan import plan_survey, shard_ranges
from ml_backend.survey.push import push_top
from ml_backend.survey.queue import JOB_PREFIX, enqueue_pending
from ml_backend.survey.results import (
    ShardState,
    iter_merged,
    merge,
    read_merged,
    survey_state,
)
from ml_backend.survey.shard import score_shard

__all__ = ["COLUMNS", "JOB_PREFIX", "MANIFEST", "SHARDS", "ShardState", "enqueue_pending",
           "iter_merged", "merge", "plan_survey", "push_top", "read_manifest", "read_merged",
           "score_shard", "shard_path", "shard_ranges", "survey_state"]
