"""Model versions per project on disk: `MODEL_DIR/<project_id>/<version>/` plus a LATEST pointer.

Layout of one project directory::

    MODEL_DIR/7/
        amls-20261125T114500123Z-3f9a/   model directory (meta.json + safetensors, core.checkpoint)
        amls-20261125T115012456Z-07c1/   version names sort by creation time
        LATEST                    text file holding the serving version name
        status.json               last job outcome (duration, error) for /metrics
        rerank.json               last instant re-ranking's outcome
        cache.h5                  images fetched from Label Studio (plain LS projects)

A new version is built in a hidden staging directory, renamed into place, and only then does
LATEST change (write to a temp file + `os.replace`), so a reader sees either the old or the new
version, never half of one, and a job that fails before `publish` leaves LATEST untouched.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ml_backend.core.atomic import atomic_write_text

logger = logging.getLogger(__name__)

VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
META = "meta.json"
LATEST = "LATEST"
STATUS = "status.json"
RERANK_STATUS = "rerank.json"
PROGRESS = "progress.json"
PUBLISH_LOCK = ".publish.lock"


class ModelRegistry:
    """Versioned model directories for each Label Studio project under one root."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def project_dir(self, project_id: int) -> Path:
        if project_id < 1:
            raise ValueError(f"project id must be a positive integer, got {project_id}")
        return self.root / str(project_id)

    def cache_path(self, project_id: int) -> Path:
        """Per-project CutoutStore of images downloaded from Label Studio."""
        return self.project_dir(project_id) / "cache.h5"

    def versions(self, project_id: int) -> list[str]:
        """Published version names (directories holding a meta.json), oldest first."""
        pdir = self.project_dir(project_id)
        if not pdir.is_dir():
            return []
        return sorted(p.name for p in pdir.iterdir()
                      if VERSION_RE.match(p.name) and (p / META).is_file())

    def latest(self, project_id: int) -> str | None:
        """The serving version, or None before the first successful training job."""
        pointer = self.project_dir(project_id) / LATEST
        try:
            name = pointer.read_text().strip()
        except FileNotFoundError:
            return None
        if not VERSION_RE.match(name) or not (self.project_dir(project_id) / name).is_dir():
            raise RuntimeError(f"{pointer} names {name!r}, which is not a model directory "
                               f"under {self.project_dir(project_id)}")
        return name

    def version_dir(self, project_id: int, version: str) -> Path:
        if not VERSION_RE.match(version):
            raise ValueError(f"not a model version name: {version!r}")
        return self.project_dir(project_id) / version

    def latest_dir(self, project_id: int) -> Path | None:
        version = self.latest(project_id)
        return None if version is None else self.version_dir(project_id, version)

    def staging_dir(self, project_id: int) -> Path:
        """An empty hidden directory in the project dir for building the next version."""
        pdir = self.project_dir(project_id)
        pdir.mkdir(parents=True, exist_ok=True)
        return pdir / f".staging-{secrets.token_hex(4)}"

    def publish(self, project_id: int, staging: Path, version: str) -> Path:
        """Move a finished model dir `staging` to `<version>/` and point LATEST at it."""
        final = self.version_dir(project_id, version)
        if final.exists():
            raise FileExistsError(f"model version {final} already exists")
        if not (staging / META).is_file():
            raise FileNotFoundError(f"{staging} holds no {META}; refusing to publish it")
        os.replace(staging, final)
        atomic_write_text(self.project_dir(project_id) / LATEST, version + "\n")
        logger.info("project %d: serving model version %s", project_id, version)
        return final

    def set_latest(self, project_id: int, version: str) -> None:
        """Serve an already published `version` again (a rollback); nothing is deleted."""
        if version not in self.versions(project_id):
            raise ValueError(f"project {project_id} has no model version {version!r}; it has "
                             f"{', '.join(self.versions(project_id)) or 'none'}")
        atomic_write_text(self.project_dir(project_id) / LATEST, version + "\n")
        logger.info("project %d: serving model version %s again", project_id, version)

    @contextlib.contextmanager
    def publish_lock(self, project_id: int) -> Iterator[None]:
        """Hold the project's publish lock while a job decides on and publishes a version.

        A `flock` on a file opened here: each holder has its own open file, so RQ workers in
        other processes and job threads of this one exclude each other alike."""
        pdir = self.project_dir(project_id)
        pdir.mkdir(parents=True, exist_ok=True)
        with open(pdir / PUBLISH_LOCK, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def discard(self, staging: Path) -> None:
        """Remove an unfinished staging dir (a failed job)."""
        shutil.rmtree(staging, ignore_errors=True)

    def prune(self, project_id: int, keep: int, stale_after_s: float = 86_400.0) -> list[str]:
        """Delete all but the newest `keep` versions (never LATEST); return the removed names.

        Also removes what killed jobs leave behind: staging folders and version-named folders
        without a meta.json, once untouched for `stale_after_s` (a running job's are younger).
        """
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        latest = self.latest(project_id)
        versions = self.versions(project_id)
        # A fast version serves its parent's backbone embeddings: keep that parent too.
        meta = self.read_meta(project_id, latest) if latest else {}
        base = meta.get("parent") if meta.get("kind") == "fast" else None
        doomed = [v for v in versions[:-keep] if v not in (latest, base)]
        for version in doomed:
            shutil.rmtree(self.version_dir(project_id, version))
            logger.info("project %d: pruned model version %s", project_id, version)
        self._remove_leftovers(project_id, stale_after_s)
        return doomed

    def _remove_leftovers(self, project_id: int, stale_after_s: float) -> None:
        cutoff = time.time() - stale_after_s
        for path in self.project_dir(project_id).iterdir():
            unfinished = path.name.startswith(".staging-") or (
                VERSION_RE.match(path.name) is not None and not (path / META).is_file())
            if path.is_dir() and unfinished and path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)
                logger.info("project %d: removed %s left by an unfinished job", project_id,
                            path.name)

    def read_meta(self, project_id: int, version: str) -> dict[str, Any]:
        """A version's meta.json as a dict ({} if it has none)."""
        path = self.version_dir(project_id, version) / META
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return {}

    def write_status(self, project_id: int, status: dict[str, Any], name: str = STATUS) -> None:
        """Record the outcome of the last job (JSON-serialisable dict); `name` RERANK_STATUS
        for the instant re-ranking's."""
        self.project_dir(project_id).mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.project_dir(project_id) / name, json.dumps(status, indent=1))

    def read_status(self, project_id: int, name: str = STATUS) -> dict[str, Any]:
        try:
            return json.loads((self.project_dir(project_id) / name).read_text())
        except FileNotFoundError:
            return {}

    def write_progress(self, project_id: int, progress: dict[str, Any] | None) -> None:
        """Record how far the running job is (None: no job running)."""
        path = self.project_dir(project_id) / PROGRESS
        if progress is None:
            path.unlink(missing_ok=True)
            return
        self.project_dir(project_id).mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(progress))

    def read_progress(self, project_id: int) -> dict[str, Any] | None:
        try:
            return json.loads((self.project_dir(project_id) / PROGRESS).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def projects(self) -> list[int]:
        """Project ids that have a directory under the root."""
        if not self.root.is_dir():
            return []
        return sorted(int(p.name) for p in self.root.iterdir() if p.is_dir() and p.name.isdigit())

