"""Backend settings: one frozen dataclass, read from the environment once at startup.

`Config.from_env()` is the only code in the project that reads `os.environ`. Every other
module receives a `Config` (or plain values taken from it) as an argument.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ml_backend.core.config import (
    TrainConfig,
    check_center_crop,
    check_imagenet_zoom,
    check_invariance,
    check_test_time_shift,
    kind_defaults,
)

# Longest a queued job waits for a burst of annotations to end (AMLS_DEBOUNCE_S's bound).
MAX_DEBOUNCE_S = 30.0


class ConfigError(ValueError):
    """An environment variable has a value the backend cannot use."""


@dataclass(frozen=True)
class Config:
    # Base URL of Label Studio, e.g. http://localhost:8080 (no trailing slash needed).
    label_studio_url: str = ""
    # Label Studio API token (legacy token or personal access token); never logged.
    label_studio_api_key: str = dataclasses.field(default="", repr=False)
    # Root of the model registry: MODEL_DIR/<project_id>/<version>/.
    model_dir: Path = Path("./models")
    # Redis URL for RQ jobs; empty means jobs run in a worker thread inside the server.
    redis_url: str = dataclasses.field(default="", repr=False)
    # HTTP basic auth that Label Studio must send; both empty means no auth.
    basic_auth_user: str = ""
    basic_auth_pass: str = dataclasses.field(default="", repr=False)
    # Choice value that means "anomaly" in the project's label config.
    anomaly_label: str = "anomaly"
    # Training and scoring hyperparameters of every job (input size, centre crop, batch
    # sizes, torch device "cpu" / "cuda" / "auto"); the rest of TrainConfig keeps its paper
    # defaults. The kind of data decides its `invariance`, `test_time_augmentation`,
    # `test_time_shift`, `imagenet_zoom`, `distribution_alignment`, `backbone_stage`,
    # `iterations` and `uratio` (the fields below override them): a `train` that sets any of them is
    # refused, not ignored.
    train: TrainConfig = TrainConfig()
    # FixMatch iterations per training job (AMLS_ITERATIONS): None ("auto") = the chosen
    # invariance's default (`kind_defaults`: 100 for sky cutouts, 200 for photographs).
    iterations: int | None = None
    # Symmetries the weak view teaches: "dihedral" (sky cutouts), "flip" (upright photos) or
    # "auto": what the task's cutout store records (`amls import --invariance`; else dihedral).
    invariance: str = "auto"
    # Test-time augmentation and distribution alignment (AMLS_TEST_TIME_AUGMENTATION,
    # AMLS_DISTRIBUTION_ALIGNMENT): None ("auto") = the default of the chosen invariance's
    # kind of data (`core.config.kind_defaults`), else on / off.
    test_time_augmentation: bool | None = None
    distribution_alignment: bool | None = None
    # Test-time shifts, a fraction of the input size (AMLS_TEST_TIME_SHIFT): None ("auto") =
    # the kind's default (`kind_defaults`: 0.0625 for photographs, 0 for sky cutouts).
    test_time_shift: float | None = None
    # The zoomed second reading of the frozen ImageNet embeddings, a share of the input
    # (AMLS_IMAGENET_ZOOM): None ("auto") = the kind's default (`kind_defaults`), 0 = off.
    imagenet_zoom: float | None = None
    # Stage the trained backbone is cut after (AMLS_BACKBONE_STAGE): "auto" = the chosen
    # invariance's default (`kind_defaults`: stage 4 for both kinds), "whole", or a stage
    # number. Changing it starts a new lineage.
    backbone_stage: str = "auto"
    # Model versions kept per project on disk and as predictions in Label Studio.
    versions_kept: int = 3
    # Predictions written to Label Studio per API request. Label Studio 1.23 recounts every
    # task of the project after each request, so one request per version is fastest
    # (benchmarks/RESULTS.md, "Label Studio's own costs").
    prediction_write_batch: int = 100_000
    # RQ queue name (training cycles; instant re-rankings use `fast_queue_name`).
    queue_name: str = "amls"
    # Seconds an RQ training job may run before RQ kills it.
    job_timeout_s: int = 3600
    # A queued job starts once no training request came for this many seconds (a burst of
    # annotations becomes one job); it waits at most 30 s in total.
    debounce_s: float = 2.0
    # Re-rank from cached embeddings (`ml_backend.rerank`) on every burst, within seconds,
    # before the training cycle finishes (AMLS_FAST_RERANK); it waits rerank_debounce_s of quiet
    # (AMLS_RERANK_DEBOUNCE_S). On RQ it runs from the queue "<queue_name>-fast".
    fast_rerank: bool = True
    rerank_debounce_s: float = 1.0
    # What a re-ranking ranks by (AMLS_RERANK_BLEND): the refit head blended with the
    # cycle's own classifier (`fast_head.blend_with_model`), or the head alone. When blending
    # (and fast_rerank), every training job also publishes its new cycle blended this way.
    rerank_blend: bool = True
    # The blend's third term (AMLS_RERANK_IMAGENET): a head on the project's ImageNet
    # embeddings beside the cycle's classifier and its refit head. None ("auto"): on for sky
    # cutouts ("dihedral": ahead on all three metrics on FIRST, benchmarks/RESULTS.md "Session
    # 19"), off for photographs ("flip": not yet measured over the suite).
    rerank_imagenet: bool | None = None
    # The blend's fourth term, beside the third (AMLS_RERANK_NEIGHBOURS): each task's
    # similarity to its nearest labelled anomalies minus that to its nearest labelled normals,
    # on the ImageNet embeddings (`fast_head.NeighbourTerm`; the version keeps the labelled
    # embeddings). None ("auto"): on wherever the third term is on for sky cutouts
    # ("dihedral": benchmarks/RESULTS.md "Session 30"), off for photographs (on frozen
    # features there it ranked worse than the linear head).
    rerank_neighbours: bool | None = None
    # Whether the blend's mean includes the cycle's own classifier logit
    # (AMLS_RERANK_MODEL_TERM; it always sets the scale the blend's scores read on). None
    # ("auto"): left out for sky cutouts ("dihedral": without it the blend ranks more
    # anomalies at the top of FIRST's queue, benchmarks/RESULTS.md "Session 31"), kept for
    # photographs (their refit head alone ranks a little below the head and model together).
    rerank_model_term: bool | None = None
    # The least a project needs before its first (and every) training job: this many
    # anomaly labels and this many other labels (AMLS_MIN_ANOMALIES, AMLS_MIN_NORMALS).
    # A job with fewer is skipped, with the reason in /metrics' last_result.
    min_anomalies: int = 1
    min_normals: int = 3
    # Predictions pre-select the more likely choice (AMLS_PRELABEL=true); default: score only.
    prelabel: bool = False
    # Extra hosts (besides LABEL_STUDIO_URL's) that task images may be downloaded from.
    allowed_image_hosts: tuple[str, ...] = ()
    # Label Studio's LOCAL_FILES_DOCUMENT_ROOT, for import tools that make previews servable
    # (the same variable Label Studio reads); None when unset.
    local_files_root: Path | None = None
    # Directories that task `data.store` paths must resolve into (symlinks followed);
    # AMLS_STORE_ROOTS, os.pathsep-separated. Empty means model_dir and the current working
    # directory (unless that is the filesystem root). See `store_root_dirs`.
    store_roots: tuple[Path, ...] = ()

    @property
    def fast_queue_name(self) -> str:
        """The RQ queue of instant re-rankings: `amls worker` takes them first."""
        return f"{self.queue_name}-fast"

    def __post_init__(self) -> None:
        for owner, names in ((self.train, ("image_size", "batch_size", "score_batch_size")),
                             (self, ("iterations", "versions_kept", "prediction_write_batch",
                                     "job_timeout_s", "min_anomalies", "min_normals"))):
            for name in names:
                value = getattr(owner, name)
                if value is not None and value < 1:
                    raise ConfigError(f"{name} must be >= 1, got {value}")
        for name in ("debounce_s", "rerank_debounce_s"):
            if not 0.0 <= getattr(self, name) <= MAX_DEBOUNCE_S:
                raise ConfigError(f"{name} must be in [0, {MAX_DEBOUNCE_S:g}] seconds, got "
                                  f"{getattr(self, name)}")
        _check_kind_fields_unset(self.train)
        if self.train.image_size < 32:
            raise ConfigError(f"image_size must be >= 32 pixels, got {self.train.image_size}")
        if self.invariance != "auto":
            try:
                check_invariance(self.invariance)
            except ValueError as err:
                raise ConfigError(f"AMLS_INVARIANCE: {err} (or auto)") from None
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise ConfigError("BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together")
        if self.label_studio_url:
            parsed = urlparse(self.label_studio_url)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise ConfigError(
                    f"LABEL_STUDIO_URL must be an http(s) URL, got {self.label_studio_url!r}")
        if self.redis_url and urlparse(self.redis_url).scheme not in ("redis", "rediss", "unix"):
            raise ConfigError("REDIS_URL must start with redis://, rediss:// or unix://")
        if not self.anomaly_label.strip():
            raise ConfigError("ANOMALY_LABEL must not be empty")
        if self.train.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"AMLS_DEVICE must be cpu, cuda or auto, got "
                              f"{self.train.device!r}")
        if not self.queue_name:
            raise ConfigError("AMLS_QUEUE must not be empty")

    @property
    def auth_enabled(self) -> bool:
        return bool(self.basic_auth_user)

    @property
    def image_hosts(self) -> frozenset[str]:
        """Host[:port] names that task images may be fetched from."""
        hosts = set(self.allowed_image_hosts)
        if self.label_studio_url:
            hosts.add(urlparse(self.label_studio_url).netloc)
        return frozenset(hosts)

    @property
    def store_root_dirs(self) -> tuple[Path, ...]:
        """Resolved directories that cutout stores named by task data may live in."""
        if self.store_roots:
            return tuple(Path(root).resolve() for root in self.store_roots)
        cwd = Path.cwd().resolve()
        defaults = [self.model_dir.resolve()] + ([cwd] if cwd != Path(cwd.anchor) else [])
        return tuple(defaults)

    def replace(self, **changes: object) -> Config:
        return dataclasses.replace(self, **changes)

    def for_jobs(self) -> Config:
        """These settings as a training job receives them: no secrets (RQ keeps job arguments
        in Redis; a worker reads the API key from its own environment) and the store roots
        resolved here, so a worker in another working directory allows the same stores."""
        return self.replace(label_studio_api_key="", redis_url="", basic_auth_pass="",
                            basic_auth_user="", store_roots=self.store_root_dirs)

    def imagenet_term(self, invariance: str) -> bool:
        """Whether blends of a cycle with this weak-view invariance get the ImageNet term."""
        return invariance == "dihedral" if self.rerank_imagenet is None else self.rerank_imagenet

    def neighbour_term(self, invariance: str) -> bool:
        """Whether blends that have the ImageNet term also get the nearest-neighbour term."""
        return (invariance == "dihedral" if self.rerank_neighbours is None
                else self.rerank_neighbours)

    def model_term(self, invariance: str) -> bool:
        """Whether blends of a cycle with this weak-view invariance average in its own logit."""
        return (invariance != "dihedral" if self.rerank_model_term is None
                else self.rerank_model_term)

    def train_config(self, store_invariance: str) -> TrainConfig:
        """The TrainConfig of a job on a store recording `store_invariance`: its invariance
        (unless AMLS_INVARIANCE says otherwise) and that kind's defaults (`kind_defaults`)
        for what AMLS_TEST_TIME_AUGMENTATION and the others leave on auto."""
        chosen = store_invariance if self.invariance == "auto" else self.invariance
        settings = kind_defaults(chosen)
        for name in ("test_time_augmentation", "distribution_alignment"):
            if getattr(self, name) is not None:
                settings[name] = getattr(self, name)
        for name in ("test_time_shift", "imagenet_zoom"):
            if getattr(self, name) is not None:
                settings[name] = getattr(self, name)
        if self.iterations is not None:
            settings["iterations"] = self.iterations
        if self.backbone_stage != "auto":
            settings["backbone_stage"] = (None if self.backbone_stage == "whole"
                                          else int(self.backbone_stage))
        return self.train.replace(**settings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Read settings from `environ` (default `os.environ`); raise ConfigError if invalid."""
        env = os.environ if environ is None else environ
        return cls(
            label_studio_url=env.get("LABEL_STUDIO_URL", "").rstrip("/"),
            label_studio_api_key=env.get("LABEL_STUDIO_API_KEY", ""),
            model_dir=Path(env.get("MODEL_DIR", "./models")),
            redis_url=env.get("REDIS_URL", ""),
            basic_auth_user=env.get("BASIC_AUTH_USER", ""),
            basic_auth_pass=env.get("BASIC_AUTH_PASS", ""),
            anomaly_label=env.get("ANOMALY_LABEL", "anomaly"),
            train=_train_config(env),
            iterations=_auto_int(env, "AMLS_ITERATIONS"),
            invariance=env.get("AMLS_INVARIANCE", "auto").strip() or "auto",
            test_time_augmentation=_auto_bool(env, "AMLS_TEST_TIME_AUGMENTATION"),
            distribution_alignment=_auto_bool(env, "AMLS_DISTRIBUTION_ALIGNMENT"),
            test_time_shift=_auto_fraction(env, "AMLS_TEST_TIME_SHIFT", check_test_time_shift),
            imagenet_zoom=_auto_fraction(env, "AMLS_IMAGENET_ZOOM", check_imagenet_zoom),
            backbone_stage=_backbone_stage(env),
            versions_kept=_int(env, "AMLS_VERSIONS_KEPT", 3),
            prediction_write_batch=_int(env, "AMLS_PREDICTION_WRITE_BATCH", 100_000),
            queue_name=env.get("AMLS_QUEUE", "amls"),
            job_timeout_s=_int(env, "AMLS_JOB_TIMEOUT_S", 3600),
            debounce_s=_float(env, "AMLS_DEBOUNCE_S", 2.0),
            fast_rerank=_bool(env, "AMLS_FAST_RERANK", True),
            rerank_debounce_s=_float(env, "AMLS_RERANK_DEBOUNCE_S", 1.0),
            rerank_blend=_bool(env, "AMLS_RERANK_BLEND", True),
            rerank_imagenet=_auto_bool(env, "AMLS_RERANK_IMAGENET"),
            rerank_neighbours=_auto_bool(env, "AMLS_RERANK_NEIGHBOURS"),
            rerank_model_term=_auto_bool(env, "AMLS_RERANK_MODEL_TERM"),
            min_anomalies=_int(env, "AMLS_MIN_ANOMALIES", 1),
            min_normals=_int(env, "AMLS_MIN_NORMALS", 3),
            prelabel=_bool(env, "AMLS_PRELABEL", False),
            allowed_image_hosts=tuple(
                h.strip() for h in env.get("AMLS_ALLOWED_IMAGE_HOSTS", "").split(",") if h.strip()),
            store_roots=tuple(Path(p) for p in env.get("AMLS_STORE_ROOTS", "").split(os.pathsep)
                              if p.strip()),
            local_files_root=Path(root) if (root := env.get(
                "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", "").strip()) else None,
        )


# How to set each TrainConfig field that `Config.train_config` takes from the kind of data.
KIND_FIELD_HINTS = {
    "invariance": "set Config.invariance (AMLS_INVARIANCE) instead",
    "test_time_augmentation": "set Config.test_time_augmentation "
                              "(AMLS_TEST_TIME_AUGMENTATION) instead",
    "distribution_alignment": "set Config.distribution_alignment "
                              "(AMLS_DISTRIBUTION_ALIGNMENT) instead",
    "backbone_stage": "set Config.backbone_stage (AMLS_BACKBONE_STAGE) instead",
    "test_time_shift": "set Config.test_time_shift (AMLS_TEST_TIME_SHIFT) instead",
    "imagenet_zoom": "set Config.imagenet_zoom (AMLS_IMAGENET_ZOOM) instead",
    "iterations": "set Config.iterations (AMLS_ITERATIONS) instead",
    "uratio": "the backend has no override for it (core.config.kind_defaults)",
}


def _check_kind_fields_unset(train: TrainConfig) -> None:
    """Raise ConfigError if `train` sets a field that every job takes from the kind of data
    instead: the value would be replaced without a word."""
    paper = TrainConfig()
    for name, hint in KIND_FIELD_HINTS.items():
        if getattr(train, name) != getattr(paper, name):
            raise ConfigError(f"Config.train.{name} is not used by jobs (the kind of data "
                              f"decides it); {hint}")


def _train_config(env: Mapping[str, str]) -> TrainConfig:
    crop = _float(env, "AMLS_CENTER_CROP", 1.0)
    try:
        check_center_crop(crop)
    except ValueError as err:
        raise ConfigError(f"AMLS_CENTER_CROP: {err}") from None
    return TrainConfig(image_size=_int(env, "AMLS_IMAGE_SIZE", 64), center_crop=crop,
                       batch_size=_int(env, "AMLS_BATCH_SIZE", 16),
                       score_batch_size=_int(env, "AMLS_SCORE_BATCH_SIZE", 256),
                       device=env.get("AMLS_DEVICE", "auto"))


def _auto_fraction(env: Mapping[str, str], name: str,
                   check: Callable[[float], float]) -> float | None:
    """Environment variable `name`: None for unset or "auto", else a number `check` accepts."""
    raw = env.get(name, "").strip().lower()
    if raw in ("", "auto"):
        return None
    value = _float(env, name, 0.0)
    try:
        return check(value)
    except ValueError as err:
        raise ConfigError(f"{name}: {err}") from None


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _backbone_stage(env: Mapping[str, str]) -> str:
    """AMLS_BACKBONE_STAGE: "auto" (unset), "whole", or a stage number 0-6."""
    raw = env.get("AMLS_BACKBONE_STAGE", "").strip().lower() or "auto"
    if raw not in ("auto", "whole") and raw not in {str(i) for i in range(7)}:
        raise ConfigError(f"AMLS_BACKBONE_STAGE must be auto, whole or a stage number 0-6, "
                          f"got {raw!r}")
    return raw


def _auto_bool(env: Mapping[str, str], name: str) -> bool | None:
    """None for unset or "auto", else `_bool`."""
    if env.get(name, "").strip().lower() in ("", "auto"):
        return None
    return _bool(env, name, False)


def _auto_int(env: Mapping[str, str], name: str) -> int | None:
    """None for unset or "auto", else `_int`."""
    if env.get(name, "").strip().lower() in ("", "auto"):
        return None
    return _int(env, name, 0)


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value != value:  # NaN
        raise ConfigError(f"{name} must be a number, got NaN")
    return value
