"""Training options shared by `amls train`, `amls simulate` and the benchmarks.

Every option defaults to None ("not given"): `amls train --init` then keeps the parent's value
and `amls simulate` the `TrainConfig` default.
"""

from __future__ import annotations

import argparse
from typing import Any

from ml_backend.core.config import INVARIANCES, RANDAUG_POOLS, check_center_crop


def yes_no(text: str) -> bool:
    """argparse type of an on/off option: yes/no (also true/false, on/off, 1/0)."""
    value = text.strip().lower()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {text!r}")


# (option, TrainConfig field, type, help)
_OPTIONS: tuple[tuple[str, str, Any, str], ...] = (
    ("--invariance", "invariance", str,
     "symmetries the weak view teaches: dihedral (flips and 90° rotations, for sky cutouts) "
     "or flip (horizontal flips only, for upright photographs); default: what the store "
     "records (`amls import --invariance`), dihedral if it records nothing"),
    ("--weak-rotation", "weak_rotation", yes_no,
     "yes/no: also turn each weak view by a random angle in [-45°, 45°), so training sees "
     "every angle (dihedral data only; default no)"),
    ("--bn-momentum", "bn_momentum", float,
     "BatchNorm momentum, the weight of each new batch statistic (default 0.1)"),
    ("--drop-path-rate", "drop_path_rate", float,
     "stochastic depth in training, 0 to < 1 (default 0)"),
    ("--drop-rate", "drop_rate", float, "dropout before the head in training (default 0)"),
    ("--backbone-stage", "backbone_stage", int,
     "train the backbone cut after this stage (0-6; 4: 112 channels) instead of whole "
     "(default: whole)"),
    ("--backbone-lr-scale", "backbone_lr_scale", float,
     "learning rate of the pretrained backbone as a fraction of the head's, 0 to 1 (default 1)"),
    ("--hard-normal-share", "hard_normal_share", float,
     "share of the normals' draws given to the labelled normals the model scores highest, "
     "0 to < 1, in continued cycles (default 0: all normals alike)"),
    ("--distribution-alignment", "distribution_alignment", yes_no,
     "yes/no: align the pseudo-labels to the labelled anomaly share (default: yes for "
     "dihedral data, no for flip data)"),
    ("--alignment-share", "alignment_share", float,
     "the anomaly share alignment aims the pseudo-labels at, the share you expect among "
     "the unlabelled images, 0 to < 1 (default 0: the labelled share)"),
    ("--protect-top-share", "protect_top_share", float,
     "share of each unlabelled batch, the images scored most anomalous, that never gets a "
     "'normal' pseudo-label, 0 to < 1 (default 0)"),
    ("--randaug-pool", "randaug_pool", str,
     "ops the strong view draws from: all, or linear (no solarize, posterize or equalize; "
     "default all)"),
    ("--anomaly-threshold", "anomaly_threshold", float,
     "confidence an 'anomaly' pseudo-label needs, 0.5 to 1 (default: the threshold, 0.95)"),
    ("--probe-head-init", "probe_head_init", yes_no,
     "yes/no: start a new model's head from a linear probe of the labelled images' ImageNet "
     "features instead of near zero (default no)"),
    ("--test-time-augmentation", "test_time_augmentation", yes_no,
     "yes/no: score as the mean over the invariance's flips/rotations (default: yes; "
     "2 views for flip data, 8 for dihedral data)"),
    ("--test-time-shift", "test_time_shift", float,
     "also score each view shifted diagonally by +/- this fraction of the input size, 0 to "
     "< 0.5 (3x the forward passes; default: 0.0625 for flip data, 0 for dihedral data)"),
    ("--imagenet-zoom", "imagenet_zoom", float,
     "the frozen ImageNet embeddings (first ranking, blend terms) also read the central "
     "share of each view enlarged back, 0 to < 1 (2x their forward passes; default: "
     "0.7 for dihedral data, 0 for flip data)"),
)


def center_crop_arg(text: str) -> float:
    """argparse type of --center-crop: a fraction in (0, 1]."""
    try:
        return check_center_crop(float(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """Add the options above; values are checked by TrainConfig."""
    for option, field, kind, text in _OPTIONS:
        choices = {"invariance": INVARIANCES, "randaug_pool": RANDAUG_POOLS}.get(field)
        parser.add_argument(option, dest=field, type=kind, choices=choices, help=text)


def training_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The options the user gave, as TrainConfig field -> value."""
    given = {field: getattr(args, field) for _, field, _, _ in _OPTIONS}
    return {k: v for k, v in given.items() if v is not None}
