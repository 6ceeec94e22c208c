"""Model directories: safetensors weights + a JSON description, written atomically.

    MODEL_DIR/
      meta.json               ModelMeta fields + "files": {name: {"sha256", "bytes"}}
      model.safetensors       EMA weights (scoring uses these)
      student.safetensors     student weights (the next training cycle continues from them)
      optimizer.safetensors   optional: optimiser buffers (e.g. SGD momentum), flat names

A directory is written into a temporary sibling, flushed to disk, then renamed into place,
so readers see either the old complete directory or the new complete one. Loading checks
every file against the sizes and SHA-256 digests in meta.json, so a truncated or edited
file is refused instead of half-loaded. Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ml_backend.core.config import TrainConfig
from ml_backend.core.errors import AmlsError
from ml_backend.core.model import (
    SideBySide,
    WithZoom,
    build_model,
    resolve_device,
    truncate_after_block,
)

logger = logging.getLogger(__name__)

META = "meta.json"
EMA_WEIGHTS = "model.safetensors"
STUDENT_WEIGHTS = "student.safetensors"
OPTIMIZER_STATE = "optimizer.safetensors"
FORMAT_VERSION = 1
# Every model version this package writes starts with this; the backend deletes from Label
# Studio only predictions whose version has it.
VERSION_PREFIX = "amls-"
# The kind of an untrained model: the ImageNet backbone with a fresh head (a first ranking).
IMAGENET_KIND = "imagenet"
# The ImageNet backbone's features are pooled after this stage (of 7; 112 channels), not its
# last: on both benchmark suites they rank rare objects better from a few labels
# (benchmarks/RESULTS.md, "Session 22").
IMAGENET_STAGE = 4
_FILE_MODE = 0o644


class CheckpointError(AmlsError, RuntimeError):
    """A model directory is missing, incomplete or corrupt."""


@dataclass
class ModelMeta:
    """What a model directory describes: lineage, training config and the data it expects."""

    version: str                      # e.g. "amls-20261125T120301042Z-3f9a"; sorts by time
    parent: str | None                # version this one continued from, None for a fresh model
    created: str                      # ISO 8601 UTC time of saving
    config: dict[str, Any]            # TrainConfig.to_dict()
    image_size: int                   # model input side in pixels
    channels: int                     # image channels the model takes
    stretch: dict[str, Any]           # store stretch the model was trained on
    label_counts: dict[str, int] = field(default_factory=dict)  # e.g. {"anomaly": 5, ...}
    metrics: dict[str, Any] = field(default_factory=dict)       # last cycle's statistics
    iterations_total: int = 0         # training iterations over the whole lineage
    center_crop: float = 1.0          # fraction of each cutout side kept before resizing
    kind: str = "fixmatch"            # "fast": `parent`'s backbone with a refit head (rerank)
    # The classifier also reads the ImageNet backbone's pooled features, set beside the
    # model's own (`model.SideBySide`: a three-term blend, `fast_head.blend_with_model`).
    imagenet_branch: bool = False
    # Stage the version's ImageNet backbone is pooled after (`IMAGENET_STAGE`): its branch,
    # or without one the model itself (a first ranking and the bursts on it); None: no
    # ImageNet backbone, or its last stage (versions before session 22).
    imagenet_stage: int | None = None
    # The branch's classifier also holds a nearest-neighbour term over the ImageNet features
    # (`fast_head.NeighbourClassifier`: a four-term blend, `fast_head.blend_with_model`).
    neighbour_term: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelMeta:
        """Build from meta.json content; raises CheckpointError if a field is missing."""
        names = [f.name for f in dataclasses.fields(cls)]
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise CheckpointError(f"meta.json lacks field(s) {missing}")
        return cls(**{n: data[n] for n in names if n in data})


@dataclass
class TrainingState:
    """Everything a training cycle needs to continue: weights (CPU tensors) and meta."""

    student: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor] | None
    meta: ModelMeta


def new_version(now: datetime | None = None) -> str:
    """A new, time-sortable model version: "amls-YYYYMMDDTHHMMSSmmmZ-xxxx" (UTC to the
    millisecond, 4 hex): a cycle and the blend published after it often share a second."""
    now = datetime.now(UTC) if now is None else now.astimezone(UTC)
    return (f"{VERSION_PREFIX}{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z-"
            f"{secrets.token_hex(2)}")


def utc_now_iso() -> str:
    """Current UTC time, ISO 8601 to the second, e.g. "2026-11-25T12:03:01+00:00"."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def imagenet_model(cfg: TrainConfig, channels: int, stretch: dict[str, Any], *,
                   stage: int | None = IMAGENET_STAGE) -> tuple[nn.Module, ModelMeta]:
    """The ImageNet backbone under `cfg`, pooled after `stage` (None: uncut, its last), with
    a fresh head, and a meta describing it, so that `scoring.score_store` embeds with it
    exactly as it would with a trained cycle of `cfg` (size, crop, and the views of
    test-time augmentation, and `imagenet_zoom`). A cut the config asks of a trained model is
    not applied."""
    cfg = cfg.replace(backbone_stage=None)
    model = _imagenet_backbone(cfg, channels, stage)
    meta = ModelMeta(version=IMAGENET_KIND, parent=None, created=utc_now_iso(),
                     config=cfg.to_dict(), image_size=cfg.image_size, channels=channels,
                     stretch=dict(stretch), center_crop=cfg.center_crop, kind=IMAGENET_KIND,
                     imagenet_stage=stage)
    return model, meta


def save_model_dir(out_dir: str | Path, *, ema: nn.Module, student: nn.Module | None,
                   meta: ModelMeta,
                   optimizer_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a model directory atomically, replacing any existing one; returns its path.

    `student` None: a model that only scores (a re-ranking's version), which no training
    continues from; `load_training_state` refuses it.

    Files are written into a hidden temporary sibling and fsynced; then the old directory
    (if any) is renamed aside, the new one renamed into place and the old one deleted.
    On any error the temporary directory is removed and the old directory is left intact.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        files = {EMA_WEIGHTS: _state_of(ema)}
        if student is not None:
            files[STUDENT_WEIGHTS] = _state_of(student)
        if optimizer_state is not None:
            files[OPTIMIZER_STATE] = _contiguous_cpu(optimizer_state)
        manifest = {}
        for name, tensors in files.items():
            save_file(tensors, str(tmp / name), metadata={"version": meta.version})
            os.chmod(tmp / name, _FILE_MODE)  # safetensors creates 0600; readers may be others
            manifest[name] = _describe(tmp / name)
        # meta.json goes last: a directory with a complete meta.json has all its files.
        _write_json(tmp / META, {"format": FORMAT_VERSION, **meta.to_dict(), "files": manifest})
        for name in [*files, META]:
            _fsync(tmp / name)
        _fsync(tmp)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved model %s to %s", meta.version, out_dir)
    return out_dir


def load_model_dir(model_dir: str | Path,
                   device: str | torch.device = "cpu") -> tuple[nn.Module, ModelMeta]:
    """The EMA model (eval mode, on `device`, "auto" allowed) and its meta.

    Raises CheckpointError for a missing, incomplete or corrupt directory.
    """
    model_dir = Path(model_dir)
    meta, manifest = _read_meta(model_dir)
    weights = _load_tensors(model_dir, EMA_WEIGHTS, manifest)
    cfg = TrainConfig.from_dict(meta.config).replace(pretrained=False)
    # Building initialises weights from the global RNG; keep callers' random streams intact.
    with torch.random.fork_rng(devices=[]):
        # The ImageNet backbone is the branch when there is one, else (a first ranking and
        # the bursts on it) the model itself.
        if meta.imagenet_branch:
            model = SideBySide(build_model(cfg, meta.channels),
                               _imagenet_backbone(cfg, meta.channels, meta.imagenet_stage))
            if meta.neighbour_term:
                from ml_backend.core.fast_head import NeighbourClassifier

                model.classifier = NeighbourClassifier.shaped_like(weights, "classifier.")
        elif meta.imagenet_stage is not None:
            model = _imagenet_backbone(cfg, meta.channels, meta.imagenet_stage)
        else:
            model = build_model(cfg, meta.channels)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{model_dir / EMA_WEIGHTS} does not fit the model: {err}") from err
    return model.to(resolve_device(device)).eval(), meta


def _imagenet_backbone(cfg: TrainConfig, channels: int, stage: int | None) -> nn.Module:
    """The ImageNet backbone under `cfg`, always built whole (a cut `cfg` asks of a trained
    model does not apply to it), then pooled after its own `stage` (None: its last); with
    `cfg.imagenet_zoom`, read twice (`model.WithZoom`)."""
    model = build_model(cfg.replace(backbone_stage=None), channels)
    if stage is not None:
        model = truncate_after_block(model, stage)
    return WithZoom(model, cfg.imagenet_zoom) if cfg.imagenet_zoom else model


def load_training_state(model_dir: str | Path) -> TrainingState:
    """Student, EMA and optional optimiser tensors (CPU) plus meta, all checked."""
    model_dir = Path(model_dir)
    meta, manifest = _read_meta(model_dir)
    optimizer = (_load_tensors(model_dir, OPTIMIZER_STATE, manifest)
                 if OPTIMIZER_STATE in manifest else None)
    return TrainingState(student=_load_tensors(model_dir, STUDENT_WEIGHTS, manifest),
                         ema=_load_tensors(model_dir, EMA_WEIGHTS, manifest),
                         optimizer=optimizer, meta=meta)


def read_meta(model_dir: str | Path) -> ModelMeta:
    """Only the ModelMeta of a model directory (no weights are read or checked)."""
    return _read_meta(Path(model_dir))[0]


def lineage_mismatch(meta: ModelMeta, cfg: TrainConfig, channels: int,
                     stretch: dict[str, Any] | None = None) -> list[str]:
    """What a cycle with `cfg` on `channels`-channel images (of `stretch`, when given) would
    change of the model `meta` describes, among the things a continued model must keep: image
    size, centre crop, channels, weak-view invariance, backbone stage and stretch. Empty: it
    can continue.
    """
    had = TrainConfig.from_dict(meta.config)
    kept = {"image size": (meta.image_size, cfg.image_size),
            "centre crop": (meta.center_crop, cfg.center_crop),
            "channels": (meta.channels, channels),
            "invariance": (had.invariance, cfg.invariance),
            "backbone stage": (had.backbone_stage, cfg.backbone_stage)}
    if stretch is not None:
        kept["stretch"] = (meta.stretch, stretch)
    return [f"{name} {had} in the model, {wants} now"
            for name, (had, wants) in kept.items() if had != wants]


def _state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return _contiguous_cpu(module.state_dict())


def _contiguous_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors needs contiguous tensors; channels_last weights are not.
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _describe(path: Path) -> dict[str, Any]:
    return {"sha256": _sha256(path), "bytes": path.stat().st_size}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, default=_json_scalar)
    path.write_text(text + "\n", encoding="utf-8")


def _json_scalar(value: Any) -> Any:
    """NumPy / torch scalars in metrics become plain numbers; anything else is an error."""
    if isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        return value.item()
    raise TypeError(f"meta.json cannot hold {type(value).__name__}: {value!r}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        tmp.rename(out_dir)
    else:
        old = out_dir.parent / f".{out_dir.name}.old-{secrets.token_hex(4)}"
        out_dir.rename(old)
        try:
            tmp.rename(out_dir)
        except OSError:
            old.rename(out_dir)
            raise
        try:
            shutil.rmtree(old)
        except OSError as err:
            logger.warning("new model is in place but the old copy %s remains: %s", old, err)
    _fsync(out_dir.parent)


def _read_meta(model_dir: Path) -> tuple[ModelMeta, dict[str, Any]]:
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory not found: {model_dir}")
    path = model_dir / META
    if not path.is_file():
        raise CheckpointError(f"{model_dir} is not a complete model directory: no {META}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise CheckpointError(f"{path} is not a model description (no 'files' table)")
    if data.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported format {data.get('format')!r}")
    try:
        meta = ModelMeta.from_dict(data)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from err
    return meta, data["files"]


def _load_tensors(model_dir: Path, name: str,
                  manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = model_dir / name
    if name not in manifest:
        raise CheckpointError(f"{model_dir / META} does not list {name}")
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    expected = manifest[name]
    size = path.stat().st_size
    if size != expected.get("bytes") or _sha256(path) != expected.get("sha256"):
        raise CheckpointError(
            f"{path} is corrupt: {size} bytes / checksum differ from {model_dir / META}")
    try:
        return load_file(str(path), device="cpu")
    except SafetensorError as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err
