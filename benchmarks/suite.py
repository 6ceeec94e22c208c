"""The detection-quality suite: every class as the rare one, several seeds, named settings.

    python -m benchmarks.suite run --suite animal first --settings default ref-fix --seeds 3
    python -m benchmarks.suite run --protocol screen --datasets animal:Cat first:FRI \\
        --settings default flip --set "lr-half:lr=0.00375"
    python -m benchmarks.suite report benchmarks/results/suite.jsonl --baseline default

`run` appends one JSON line per finished (dataset, seed, setting, protocol) run to one log
(`--log`, default benchmarks/results/suite.jsonl, kept in git) and skips every run the log
already holds, so an interrupted grid resumes where it stopped and a grid can be spread over
several sessions.
Runs go seed by seed (all datasets and settings of seed 0 first), so a partial grid still
holds complete pairs. `--workers 2` runs two at a time, each on `--threads` torch threads.

Protocols: "full" is the paper's (5 anomalies + 495 normals, 3 cycles of 100 iterations,
oracle adds 10 + 10 per cycle, pool 10,000); "screen" is a quick look for ideas (1 cycle,
pool 4,000) and never decides a default; "smoke" (2 cycles of 5 iterations) only checks that
a grid runs. `report` prints the per-class table, the suite
means and paired comparisons (`benchmarks.paired`) against a baseline setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from benchmarks.datasets import ANIMAL_CLASSES, FIRST_CLASSES
from benchmarks.detection_quality import dataset_paths, run_one
from ml_backend.core.config import TrainConfig
from ml_backend.core.simulate import IMAGENET_UNCUT, METHODS, SimulationPlan

log = logging.getLogger(__name__)

DEFAULT_LOG = Path("benchmarks/results/suite.jsonl")  # committed: grids span sessions


@dataclass(frozen=True)
class DatasetSpec:
    """One rare class of one data set, at a rare share, with the crop its suite uses."""

    name: str  # "animal:Cat", "first:Bent"
    rare_fraction: float
    center_crop: float = 1.0


SUITES: dict[str, tuple[DatasetSpec, ...]] = {
    # Everyday grey silhouettes, 28 px: each class rare at 1 % among the nine others.
    "animal": tuple(DatasetSpec(f"animal:{c}", 0.01) for c in ANIMAL_CLASSES),
    # FIRST radio galaxies: each class rare at 5 %, the central half of each cutout (the demo's).
    "first": tuple(DatasetSpec(f"first:{c}", 0.05, 0.5) for c in FIRST_CLASSES),
}


@dataclass(frozen=True)
class Setting:
    """A named candidate: a method plus TrainConfig overrides."""

    name: str
    method: str = "fixmatch"
    overrides: dict[str, Any] = field(default_factory=dict)
    # Also measure the instant re-ranking (SimulationPlan.fast_head: head_*, interim_* ...).
    fast_head: bool = False
    # What the oracle picks from (SimulationPlan.picks_from); a blend implies fast_head.
    picks_from: str = "model"
    # Also measure the three-term blend with the ImageNet term framed (crop, size) its own
    # way (SimulationPlan.imagenet_framing: fprobe_*, fblend_*); implies fast_head.
    imagenet_framing: tuple[float, int] | None = None
    # Likewise with the ImageNet term pooled after this stage of the backbone
    # (SimulationPlan.imagenet_block); implies fast_head.
    imagenet_block: int | None = None
    # Also score each cycle's model with this test-time shift (SimulationPlan.compare_shift:
    # shift_*, and with the fast head shift_zblend_*), the oracle picking from its own scoring.
    compare_shift: float | None = None


# What every setting's overrides apply to: the defaults the log's first runs had, so that a
# setting keeps meaning what it meant when its runs were logged (and their keys stay valid)
# when a TrainConfig default changes. Today's product defaults (`kind_defaults`) are the
# settings "dist-align+tta+stage-4+zoom-0.7" (dihedral, sky cutouts; sessions 11, 23 and 37) and
# "flip+tta+stage-4+iter-200+u2+shift-4" (flip, photographs; sessions 24, 27 and 34).
SUITE_BASE: dict[str, Any] = {"distribution_alignment": False, "test_time_augmentation": False}
REFERENCE_FIX = {"bn_momentum": 0.01, "drop_path_rate": 0.2, "drop_rate": 0.2}
# Each kind of data's product default before the backbone was cut (session 23), by the
# name its runs are logged under; the base of each kind's other settings.
SETTINGS_BY_KIND = {"dist-align+tta": {"distribution_alignment": True,
                                       "test_time_augmentation": True},
                    "flip+tta": {"invariance": "flip", "test_time_augmentation": True}}
# Each kind's product default today (the backbone cut after stage 4), by its base's name.
CUT_BY_KIND = {name: {**overrides, "backbone_stage": 4}
               for name, overrides in SETTINGS_BY_KIND.items()}
SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("default"),  # the session-8 defaults (SUITE_BASE), not today's
    Setting("supervised", method="supervised"),
    Setting("isolation-forest", method="isolation-forest"),
    # The instant re-ranking's head on frozen ImageNet features, its own picks every cycle.
    Setting("linear-probe", method="linear-probe"),
    # The same with each kind's test-time views averaged into the embeddings, as the
    # backend's first ranking embeds (sky: eight, photographs: two).
    Setting("linear-probe+tta", method="linear-probe",
            overrides={"test_time_augmentation": True}),
    Setting("linear-probe+flip+tta", method="linear-probe",
            overrides={"invariance": "flip", "test_time_augmentation": True}),
    # esa/AnomalyMatch's fix of the same backbone (REGRESSION_INVESTIGATION.md), and its parts.
    Setting("ref-fix", overrides=REFERENCE_FIX),
    Setting("bn-0.01", overrides={"bn_momentum": 0.01}),
    Setting("drop-0.2", overrides={"drop_path_rate": 0.2, "drop_rate": 0.2}),
    Setting("bn-frozen", overrides={"bn_momentum": 0.0}),
    Setting("flip+bn-frozen", overrides={"invariance": "flip", "bn_momentum": 0.0}),
    # Weak views: horizontal flips only instead of the dihedral group.
    Setting("flip", overrides={"invariance": "flip"}),
    Setting("ref-fix+flip", overrides={**REFERENCE_FIX, "invariance": "flip"}),
    # The pretrained backbone at a tenth of the head's learning rate (closer to a linear probe).
    Setting("backbone-lr-0.1", overrides={"backbone_lr_scale": 0.1}),
    Setting("flip+backbone-lr-0.1", overrides={"invariance": "flip", "backbone_lr_scale": 0.1}),
    # Pseudo-labels aligned to the labelled class distribution (ReMixMatch).
    Setting("dist-align", overrides={"distribution_alignment": True}),
    Setting("flip+dist-align", overrides={"invariance": "flip", "distribution_alignment": True}),
    # The default, with the instant re-ranking measured beside it (same FixMatch numbers).
    Setting("default+fast", fast_head=True),
    # Scoring: the mean over the invariance's symmetry views (test-time augmentation).
    Setting("tta", overrides={"test_time_augmentation": True}),
    Setting("flip+tta", overrides={"invariance": "flip", "test_time_augmentation": True}),
    # The same setting again after scoring moved from mean probabilities to mean logits over
    # the views (session 11): cycle 1 trains the identical model, so it pairs the two rules.
    Setting("flip+tta@logits", overrides={"invariance": "flip", "test_time_augmentation": True}),
    Setting("flip+dist-align+tta", overrides={"invariance": "flip", "distribution_alignment": True,
                                              "test_time_augmentation": True}),
    Setting("dist-align+tta", overrides={"distribution_alignment": True,
                                         "test_time_augmentation": True}),
    # The sky default again, seed 0 having run before the mean-logit rule (session 11).
    Setting("dist-align+tta@logits", overrides={"distribution_alignment": True,
                                                "test_time_augmentation": True}),
    # The pseudo-label threshold, lowered: more unlabelled images teach at 1-5 % imbalance.
    Setting("thr-0.8", overrides={"threshold": 0.8}),
    Setting("flip+thr-0.8", overrides={"invariance": "flip", "threshold": 0.8}),
    Setting("flip+tta+thr-0.8", overrides={"invariance": "flip", "test_time_augmentation": True,
                                           "threshold": 0.8}),
    Setting("dist-align+tta+thr-0.8", overrides={"distribution_alignment": True,
                                                 "test_time_augmentation": True,
                                                 "threshold": 0.8}),
    # Half of the normals' draws in proportion to the model's score (corrected false positives).
    Setting("flip+tta+hardneg-0.5", overrides={"invariance": "flip", "test_time_augmentation": True,
                                               "hard_normal_share": 0.5}),
    Setting("dist-align+tta+hardneg-0.5", overrides={"distribution_alignment": True,
                                                     "test_time_augmentation": True,
                                                     "hard_normal_share": 0.5}),
    # 50 iterations per cycle (the paper's Table 5 has 50 best).
    Setting("iter-50", overrides={"iterations": 50}),
    Setting("flip+iter-50", overrides={"invariance": "flip", "iterations": 50}),
    # A quarter of each labelled batch anomalous instead of half.
    Setting("afrac-0.25", overrides={"anomaly_fraction": 0.25}),
    Setting("flip+afrac-0.25", overrides={"invariance": "flip", "anomaly_fraction": 0.25}),
    # Score with the student (EMA decay 0: the "EMA" is the student itself).
    Setting("ema-off", overrides={"ema_decay": 0.0}),
    Setting("flip+ema-off", overrides={"invariance": "flip", "ema_decay": 0.0}),
    # Milder strong views: RandAugment magnitude 0.3, cutout a quarter of the side.
    Setting("strong-light", overrides={"randaug_magnitude": 0.3, "cutout_fraction": 0.25}),
    Setting("flip+strong-light", overrides={"invariance": "flip", "randaug_magnitude": 0.3,
                                            "cutout_fraction": 0.25}),
    # The head of a fresh model starts from a linear probe of the labelled images (LP-FT).
    Setting("dist-align+tta+probe-head", overrides={"distribution_alignment": True,
                                                    "test_time_augmentation": True,
                                                    "probe_head_init": True}),
    Setting("flip+tta+probe-head", overrides={"invariance": "flip", "test_time_augmentation": True,
                                              "probe_head_init": True}),
    # No "normal" pseudo-label for the fifth of each unlabelled batch scored most anomalous.
    Setting("dist-align+tta+protect-0.2", overrides={"distribution_alignment": True,
                                                     "test_time_augmentation": True,
                                                     "protect_top_share": 0.2}),
    # Pseudo-labels aligned to a fixed anomaly share instead of the labelled share (1 %: a
    # prior for rare objects; 5 %: FIRST's true share).
    *(Setting(f"dist-align+tta+share-{share}", overrides={"distribution_alignment": True,
                                                          "test_time_augmentation": True,
                                                          "alignment_share": share})
      for share in (0.01, 0.05)),
    # 96 px with 2 unlabelled images per labelled one: about the training cost of 64 px at 5.
    Setting("dist-align+tta+size-96+u2", overrides={"distribution_alignment": True,
                                                    "test_time_augmentation": True,
                                                    "image_size": 96, "uratio": 2}),
    # Each kind's default of session 20 (the whole backbone) with the oracle picking from a
    # blend, as annotators of the product's queue do: the two-term blend (published until
    # session 20) or the three-term one (until session 30).
    *(Setting(f"{name}@{blend}-picks", overrides=dict(SETTINGS_BY_KIND[name]), picks_from=blend)
      for name in SETTINGS_BY_KIND for blend in ("zblend", "lblend")),
    # Today's default (cut after stage 4) picking from the four-term blend (session 30) or
    # that without the model's own logit (sky cutouts' published ranking since session 31).
    *(Setting(f"{name}+stage-4@{blend}-picks", overrides=dict(CUT_BY_KIND[name]),
              picks_from=blend)
      for name in CUT_BY_KIND for blend in ("blend4", "blend3")),
    # The sky default with the blend's ImageNet term also framed tighter, at more pixels or
    # at the model's (crop 0.35 at 96 px: the best linear probe of FIRST; 0.35 at 64 px: most
    # of its gain at no extra pixels; `benchmarks.framing_probe`).
    *(Setting(f"dist-align+tta@imagenet-0.35x{size}",
              overrides=dict(SETTINGS_BY_KIND["dist-align+tta"]), imagenet_framing=(0.35, size))
      for size in (96, 64)),
    # Each kind's default with the ImageNet term also uncut (its last stage, 1,280 channels:
    # the backend's before session 22) beside today's, pooled after stage 4 (0-based, 112
    # channels). The log's "dist-align+tta@imagenet-b4" runs (session 22, when the uncut
    # term was the backend's) measured the same pair the other way round.
    *(Setting(f"{name}@imagenet-last", overrides=dict(SETTINGS_BY_KIND[name]),
              imagenet_block=IMAGENET_UNCUT) for name in SETTINGS_BY_KIND),
    # Each kind's default trained with the backbone cut after stage 3, 4 or 5
    # (TrainConfig.backbone_stage; 80, 112 or 192 channels), the fast head measured as in the
    # "@imagenet-last" runs they pair with.
    *(Setting(f"{name}+stage-{stage}",
              overrides={**SETTINGS_BY_KIND[name], "backbone_stage": stage}, fast_head=True)
      for name in SETTINGS_BY_KIND for stage in (3, 4, 5)),
    # Each kind's default trained on the labels alone (no unlabelled images), cut and blended
    # as the product is: what FixMatch's unlabelled half earns today.
    *(Setting(f"supervised+{name}+stage-4", method="supervised", overrides=CUT_BY_KIND[name],
              fast_head=True)
      for name in SETTINGS_BY_KIND),
    # Photographs' cut default at 96 px with 2 unlabelled images per labelled one instead of
    # 5: about the same pixels per training step.
    Setting("flip+tta+stage-4+size-96+u2",
            overrides={**CUT_BY_KIND["flip+tta"], "image_size": 96, "uratio": 2}, fast_head=True),
    # Photographs' cut default with no "normal" pseudo-label for the most anomalous fifth or
    # half of each unlabelled batch: its pseudo-labels call about half the pool's anomalies
    # "normal" (anomaly share 0.2-0.9 % against the true 1 %, mask rate 0.96-1.00; session 26).
    *(Setting(f"flip+tta+stage-4+protect-{share}",
              overrides={**CUT_BY_KIND["flip+tta"], "protect_top_share": share}, fast_head=True)
      for share in (0.2, 0.5)),
    # Photographs' cut default trained harder in a cycle: twice the learning rate, or twice
    # the iterations (50 instead of 100 lost 0.14 AP, session 8).
    Setting("flip+tta+stage-4+lr-2x", overrides={**CUT_BY_KIND["flip+tta"], "lr": 0.015},
            fast_head=True),
    Setting("flip+tta+stage-4+iter-200", overrides={**CUT_BY_KIND["flip+tta"], "iterations": 200},
            fast_head=True),
    # Each kind's cut default with the same iterations at today's training cost (2 unlabelled
    # images per labelled one instead of 5), and more iterations on the labels alone (a
    # tenth of FixMatch's step).
    *(Setting(f"{name}+stage-4+iter-200+u2",
              overrides={**CUT_BY_KIND[name], "iterations": 200, "uratio": 2}, fast_head=True)
      for name in CUT_BY_KIND),
    *(Setting(f"supervised+{name}+stage-4+iter-{n}", method="supervised",
              overrides={**CUT_BY_KIND[name], "iterations": n}, fast_head=True)
      for name in CUT_BY_KIND for n in (200, 400)),
    # Each kind's cut default taking pseudo-labels from the frozen ImageNet terms of the blend
    # (probe head + neighbours, `simulate.frozen_ranking`): their top share "anomaly", and
    # their bottom share "normal" where given (`TrainConfig.teacher_top_share`).
    *(Setting(f"{name}+stage-4+teacher-{top}-{bottom}",
              overrides={**CUT_BY_KIND[name], "teacher_top_share": top,
                         "teacher_normal_share": bottom}, fast_head=True)
      for name in CUT_BY_KIND for top, bottom in ((0.01, 0.0), (0.01, 0.9))),
    # Photographs' default scoring its views also shifted diagonally by +/- 4 px of 64
    # (`TrainConfig.test_time_shift`): 3x the forward passes at scoring; photographs'
    # product default since session 34.
    Setting("flip+tta+stage-4+iter-200+u2+shift-4",
            overrides={**CUT_BY_KIND["flip+tta"], "iterations": 200, "uratio": 2,
                       "test_time_shift": 0.0625}, fast_head=True),
    # Photographs' default trading unlabelled images for labelled steps at the same cost:
    # 300 iterations with 1 unlabelled image per labelled one (300 x 2 = 200 x 3 batches).
    Setting("flip+tta+stage-4+iter-300+u1",
            overrides={**CUT_BY_KIND["flip+tta"], "iterations": 300, "uratio": 1}, fast_head=True),
    # Photographs' default, each cycle's model also scored with those shifts: both scorings
    # on the same picks (the oracle picks from the default's).
    Setting("flip+tta+stage-4+iter-200+u2@compare-shift-4",
            overrides={**CUT_BY_KIND["flip+tta"], "iterations": 200, "uratio": 2},
            fast_head=True, compare_shift=0.0625),
    # The sky's cut default with each weak view also turned by a random angle in [-45°, 45°)
    # (`TrainConfig.weak_rotation`): every angle, not only quarter turns.
    Setting("dist-align+tta+stage-4+rotate",
            overrides={**CUT_BY_KIND["dist-align+tta"], "weak_rotation": True}, fast_head=True),
    # The sky's cut default with its frozen ImageNet embeddings also read on each view's
    # central 0.7, enlarged back (`TrainConfig.imagenet_zoom`): sky cutouts' product default
    # since session 37.
    Setting("dist-align+tta+stage-4+zoom-0.7",
            overrides={**CUT_BY_KIND["dist-align+tta"], "imagenet_zoom": 0.7}, fast_head=True),
    # 96 px model input instead of 64 (2.25x the pixels).
    Setting("size-96", overrides={"image_size": 96}),
    Setting("flip+size-96", overrides={"invariance": "flip", "image_size": 96}),
)}


PROTOCOLS: dict[str, dict[str, int]] = {
    "full": {"initial_anomalies": 5, "initial_normals": 495, "cycles": 3, "per_cycle": 10,
             "pool": 10_000, "iterations": 100},
    "screen": {"initial_anomalies": 5, "initial_normals": 495, "cycles": 1, "per_cycle": 10,
               "pool": 4_000, "iterations": 100},
    # The full protocol's first cycle only: what a change of scoring or blending does to the
    # same models as the full runs' cycle 1 (runs are deterministic on the CPU).
    "cycle1": {"initial_anomalies": 5, "initial_normals": 495, "cycles": 1, "per_cycle": 10,
               "pool": 10_000, "iterations": 100},
    # The full protocol from a start like a Label Studio project's: 5 anomalies and only
    # 20 normals labelled, so the labelled anomaly share (20 %) is far above the pool's.
    "sparse": {"initial_anomalies": 5, "initial_normals": 20, "cycles": 3, "per_cycle": 10,
               "pool": 10_000, "iterations": 100},
    # Seconds per run: checks that a grid runs at all (a new machine, a new setting).
    "smoke": {"initial_anomalies": 5, "initial_normals": 50, "cycles": 2, "per_cycle": 5,
              "pool": 1_000, "iterations": 5},
}

PROTOCOLS["sparse-cycle1"] = {**PROTOCOLS["sparse"], "cycles": 1}  # the sparse start's first cycle


@dataclass(frozen=True)
class Job:
    """One simulate run of the grid."""

    dataset: DatasetSpec
    seed: int
    setting: Setting
    protocol: str
    device: str = "cpu"  # "cpu" or "cuda": the two give different numbers, never paired
    fast_head: bool = False  # measure the instant re-ranking too (`--fast-head`)
    compare_tta: bool = False  # score the other way round too (`--compare-tta`)

    @property
    def measures_fast_head(self) -> bool:
        return (self.fast_head or self.setting.fast_head or self.setting.picks_from != "model"
                or self.setting.imagenet_framing is not None
                or self.setting.imagenet_block is not None)

    def key(self) -> str:
        """What makes a run the same run: data, seed, method, overrides, protocol, device."""
        parts: list[Any] = [self.dataset.name, self.dataset.rare_fraction,
                            self.dataset.center_crop, self.seed, self.setting.name,
                            self.setting.method, self.setting.overrides,
                            PROTOCOLS[self.protocol]]
        if self.measures_fast_head:  # only then, so that older runs keep their keys
            parts.append("fast_head")
        if self.device != "cpu":  # likewise
            parts.append(self.device)
        if self.compare_tta:
            parts.append("compare_tta")
        if self.setting.picks_from != "model":
            parts.append(f"picks:{self.setting.picks_from}")
        if self.setting.imagenet_framing is not None:
            parts.append("imagenet:{}x{}".format(*self.setting.imagenet_framing))
        if self.setting.imagenet_block is not None:
            parts.append(f"imagenet:b{self.setting.imagenet_block}")
        if self.setting.compare_shift is not None:
            parts.append(f"compare_shift:{self.setting.compare_shift}")
        return json.dumps(parts, sort_keys=True)


def parse_key_values(items: Iterable[str]) -> dict[str, Any]:
    """"key=value" items -> dict, values parsed as JSON where they parse (else the bare word,
    such as flip); ValueError naming an item that is not key=value."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{item!r} is not key=value")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs of TrainConfig fields (`parse_key_values`); ValueError naming an
    item that is not one or a key that is no field."""
    out = parse_key_values(items)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in out:
        if key not in fields:
            raise ValueError(f"{key!r} is not a TrainConfig field")
    return out


def parse_setting(text: str) -> Setting:
    """"name:key=value,key=value[,method=supervised]" -> Setting (values parsed as JSON)."""
    name, sep, body = text.partition(":")
    if not sep or not name or not body:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected NAME:key=value,...")
    try:
        overrides = parse_key_values(body.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--set {text!r}: {err}") from None
    method = overrides.pop("method", "fixmatch")
    if method not in METHODS:
        raise argparse.ArgumentTypeError(f"--set {text!r}: unknown method {method!r}")
    try:
        TrainConfig(**overrides)
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"--set {text!r}: {err}") from None
    return Setting(name, method, overrides)


def plan_jobs(datasets: Sequence[DatasetSpec], settings: Sequence[Setting], seeds: Sequence[int],
              protocol: str, *, device: str = "cpu", fast_head: bool = False,
              compare_tta: bool = False) -> list[Job]:
    """Seed-major order: every (dataset, setting) of one seed before the next seed."""
    return [Job(d, seed, s, protocol, device, fast_head, compare_tta)
            for seed in seeds for d in datasets for s in settings]


def done_keys(log_path: Path, commits: Collection[str] | None = None) -> set[str]:
    """Keys of the runs a log already holds (a torn last line is ignored); with `commits`,
    only of those logged at one of these commits."""
    if not log_path.exists():
        return set()
    keys = set()
    for line in log_path.read_text().splitlines():
        try:
            row = json.loads(line)
            if commits is None or row.get("commit") in commits:
                keys.add(row["key"])
        except (json.JSONDecodeError, KeyError):
            log.warning("%s: skipping an unreadable line", log_path)
    return keys


def job_config(job: Job) -> TrainConfig:
    """The TrainConfig a job trains with: SUITE_BASE, the protocol's iterations, the setting."""
    iterations = PROTOCOLS[job.protocol]["iterations"]
    return TrainConfig(center_crop=job.dataset.center_crop, device=job.device,
                       **(SUITE_BASE | {"iterations": iterations} | job.setting.overrides))


def run_job(job: Job, store: Path, truth: Path, threads: int,
            start_before: float | None = None,
            scores_root: Path | None = None) -> dict[str, Any] | None:
    """Run one job (in a worker process) and return its log row; None, without running it,
    once the wall-clock time `start_before` (epoch seconds) has passed. With `scores_root`
    (and the fast head measured), its logits per cycle go to a folder there named by the
    job's key (`SimulationPlan.scores_dir`), recorded in the row."""
    if start_before is not None and time.time() > start_before:
        return None
    import torch

    torch.set_num_threads(threads)
    if job.device == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels
    protocol = dict(PROTOCOLS[job.protocol])
    protocol.pop("iterations")
    cfg = job_config(job)
    plan = SimulationPlan(method=job.setting.method, seed=job.seed,
                          fast_head=job.measures_fast_head, compare_tta=job.compare_tta,
                          picks_from=job.setting.picks_from,
                          imagenet_framing=job.setting.imagenet_framing,
                          imagenet_block=job.setting.imagenet_block,
                          compare_shift=job.setting.compare_shift, **protocol)
    saved: dict[str, str] = {}
    if scores_root is not None and plan.fast_head:
        folder = Path(scores_root) / hashlib.sha1(job.key().encode()).hexdigest()[:16]
        plan = dataclasses.replace(plan, scores_dir=folder)
        saved["scores_dir"] = str(folder)
    started = time.perf_counter()
    cycles = run_one(store, truth, plan, cfg)
    return saved | {
        "key": job.key(), "dataset": job.dataset.name, "rare_fraction": job.dataset.rare_fraction,
        "center_crop": job.dataset.center_crop, "seed": job.seed, "setting": job.setting.name,
        "method": job.setting.method, "overrides": job.setting.overrides,
        "protocol": job.protocol, "cycles": cycles, **cycles[-1],
        "wall_seconds": round(time.perf_counter() - started, 1), "threads": threads,
        "device": job.device,
    }


def run_grid(jobs: list[Job], log_path: Path, data_root: Path, workers: int,
             threads: int, stop_after: float | None = None,
             redo_since: str | None = None,
             scores_root: Path | None = None) -> Iterator[dict[str, Any]]:
    """Run the jobs the log lacks, appending each finished row to it; yields the rows.

    stop_after: seconds from now after which no further run starts (runs under way finish),
    so that a grid fits a fixed time slot; None: run them all. redo_since: run again those
    logged before this commit (the report reads a run's latest row), e.g. to log a new
    measurement; still resumable, since what it and later commits logged is skipped.
    scores_root: where fast-head runs save their logits (`run_job`).
    """
    done = done_keys(log_path, None if redo_since is None else _commits_since(redo_since))
    todo = [j for j in jobs if j.key() not in done]
    log.warning("%d of %d runs already in %s; %d to go", len(jobs) - len(todo), len(jobs),
                log_path, len(todo))
    paths = {d: dataset_paths(d.name, data_root, d.rare_fraction)
             for d in dict.fromkeys(j.dataset for j in todo)}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    context = {"workers": workers, "cpus": os.cpu_count(), "commit": _commit()}
    start_before = None if stop_after is None else time.time() + stop_after
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures: dict[Future, Job] = {
            pool.submit(run_job, j, *paths[j.dataset], threads, start_before,
                        scores_root): j for j in todo}
        for future in as_completed(futures):
            result = future.result()
            if result is None:
                continue
            row = result | context
            with log_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            yield row


def _commits_since(commit: str) -> set[str]:
    """Short hashes of `commit` and the commits after it up to HEAD; SystemExit if unknown."""
    try:
        out = subprocess.run(["git", "log", "--format=%h", "HEAD", "--not", f"{commit}^@"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"--redo-since: cannot read commits since {commit!r}: {exc}") from exc
    return set(out.split())


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dataset_spec(name: str) -> DatasetSpec:
    """The suite dataset called `name` ('first:Bent', 'animal:Dog'); SystemExit if unknown."""
    by_name = {d.name: d for suite in SUITES.values() for d in suite}
    if name not in by_name:
        raise SystemExit(f"unknown dataset {name!r}; known: {', '.join(by_name)}")
    return by_name[name]


def _datasets(args: argparse.Namespace) -> list[DatasetSpec]:
    specs = [d for name in args.suite for d in SUITES[name]]
    specs += [dataset_spec(name) for name in args.datasets or ()]
    if not specs:
        raise SystemExit("choose --suite and/or --datasets")
    return list(dict.fromkeys(specs))


def _settings(args: argparse.Namespace) -> list[Setting]:
    unknown = [n for n in args.settings if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown setting(s) {unknown}; known: {', '.join(SETTINGS)} "
                         "(or define one with --set)")
    return [SETTINGS[n] for n in args.settings] + list(args.set)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) a grid")
    run.add_argument("--suite", nargs="*", choices=sorted(SUITES), default=[])
    run.add_argument("--datasets", nargs="*", help="extra datasets, e.g. animal:Cat first:FRI")
    run.add_argument("--settings", nargs="*", default=[], help=f"of {', '.join(SETTINGS)}")
    run.add_argument("--set", action="append", type=parse_setting, default=[],
                     metavar="NAME:key=value,...", help="an ad-hoc setting (repeatable)")
    run.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 (default 3)")
    run.add_argument("--protocol", choices=sorted(PROTOCOLS), default="full")
    run.add_argument("--log", type=Path, default=DEFAULT_LOG)
    run.add_argument("--data", type=Path, default=Path("runs/suite/data"),
                     help="where dataset stores are built (once)")
    run.add_argument("--workers", type=int, default=2, help="runs at a time (default 2)")
    run.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                     help="where runs train and score (default cpu); logged and kept apart")
    run.add_argument("--fast-head", action="store_true",
                     help="also measure the instant re-ranking in every run")
    run.add_argument("--compare-tta", action="store_true",
                     help="also score every cycle the other way round (tta_* metrics)")
    redo = run.add_mutually_exclusive_group()
    redo.add_argument("--redo", action="store_const", const="HEAD", dest="redo_since",
                      help="run again what the log holds from other commits (the report reads "
                           "the latest row)")
    redo.add_argument("--redo-since", metavar="COMMIT",
                      help="run again what the log holds from before COMMIT (resumes across "
                           "later commits)")
    run.add_argument("--save-scores", type=Path, metavar="DIR",
                     help="save each fast-head run's logits per cycle under DIR, to measure "
                          "other blends of the same runs afterwards (benchmarks.blend_weights)")
    run.add_argument("--stop-after", type=float, metavar="SECONDS",
                     help="start no run after this many seconds (runs under way finish)")
    report = sub.add_parser("report", help="per-class table, suite means, paired comparisons")
    report.add_argument("logs", type=Path, nargs="+")
    report.add_argument("--baseline", default="default")
    report.add_argument("--protocol", choices=sorted(PROTOCOLS), default="full")
    report.add_argument("--metrics", nargs="+", default=["auroc", "ap", "precision_top_1pct"])
    report.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="report the runs made on this device (default cpu)")
    report.add_argument("--only", nargs="+", default=[], metavar="SETTING",
                        help="report the baseline and these settings only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    if args.command == "report":
        from benchmarks.suite_report import print_report

        print_report(args.logs, args.baseline, args.protocol, args.metrics, args.device,
                     args.only)
        return 0
    settings = _settings(args)
    if not settings:
        raise SystemExit("choose --settings and/or --set")
    jobs = plan_jobs(_datasets(args), settings, range(args.seeds), args.protocol,
                     device=args.device, fast_head=args.fast_head,
                     compare_tta=args.compare_tta)
    for row in run_grid(jobs, args.log, args.data, args.workers, args.threads,
                        args.stop_after, args.redo_since, args.save_scores):
        print(json.dumps({k: row[k] for k in ("dataset", "seed", "setting", "auroc", "ap",
                                             "precision_top_1pct", "wall_seconds")}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

