"""Display stretches: science pixels (any float) -> uint8 the store and the previews hold.

A stretch is described by a JSON-able spec ``{"name": ..., <params>}`` that the store records
in its ``stretch`` attribute. ``make_stretch(spec)`` validates the spec (``ValueError`` naming
the bad field) and returns a :class:`Stretch`, a pure callable built on
``astropy.visualization``: it never modifies its input.

Each channel (last axis of an ``(H, W, C)`` array; a 2-D array is one channel) is handled
independently:

1. non-finite pixels (NaN, +-inf) are replaced by the channel's finite minimum, so that blank
   or saturated-mask regions show as background, and counted;
2. limits ``(vmin, vmax)`` come from the interval (min-max, percentiles or zscale) computed on
   the finite pixels;
3. ``v = clip((x - vmin) / (vmax - vmin), 0, 1)`` goes through the astropy stretch (linear,
   log, asinh), giving [0, 1]; a constant channel (``vmax == vmin``) maps to 0;
4. the result is ``round(255 * v)`` as uint8.

A channel with no finite pixel raises ``ValueError``. ``{"name": "none"}`` means the pixels are
already display values in [0, 255]: they are rounded and clipped, nothing else.
``{"name": "unit"}`` means display values in [0, 1] (e.g. Cutana's normalised float cutouts):
scaled by 255, rounded and clipped.

The ``fitsbolt-*`` stretches hand step 2-4 of each channel to ESA's fitsbolt library
(``fitsbolt.normalise_images``, the normalisation esa/AnomalyMatch uses), so cutouts can be
stretched exactly as that tool does; they need ``pip install 'anomalymatch-labelstudio[esa]'``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy.visualization import (
    AsinhStretch,
    AsymmetricPercentileInterval,
    BaseInterval,
    BaseStretch,
    LinearStretch,
    LogStretch,
    ZScaleInterval,
)

# Defaults per stretch name; a spec may override any of these and nothing else.
DEFAULTS: dict[str, dict[str, float]] = {
    "none": {},
    "unit": {},
    "linear": {"lower_percentile": 0.0, "upper_percentile": 100.0},
    "log": {"a": 1000.0, "lower_percentile": 0.0, "upper_percentile": 100.0},
    "asinh": {"a": 0.1, "lower_percentile": 0.5, "upper_percentile": 99.5},
    "zscale": {"contrast": 0.25, "n_samples": 1000.0},
    # fitsbolt's methods and defaults (fitsbolt.normalise_images' norm_* arguments)
    "fitsbolt-linear": {},
    "fitsbolt-log": {"a": 1000.0},
    "fitsbolt-asinh": {"scale": 0.7, "clip": 99.8},
    "fitsbolt-zscale": {"contrast": 0.25, "n_samples": 1000.0},
    "fitsbolt-midtones": {"percentile": 99.8, "desired_mean": 0.2},
}
FITSBOLT_PREFIX = "fitsbolt-"


@dataclass(frozen=True)
class StretchResult:
    """uint8 pixels with the same shape as the input, and how many were non-finite."""

    pixels: np.ndarray
    n_nonfinite: int


@dataclass(frozen=True)
class _Parts:
    interval: Callable[[], BaseInterval] | None
    stretch: BaseStretch | None
    external: Callable[[np.ndarray], np.ndarray] | None = None  # finite plane -> uint8
    scale: float = 1.0  # display values times this are [0, 255] (no interval only)


def _check_percentiles(name: str, params: Mapping[str, float]) -> None:
    lo, hi = params["lower_percentile"], params["upper_percentile"]
    if not 0.0 <= lo < hi <= 100.0:
        raise ValueError(
            f"stretch {name!r}: need 0 <= lower_percentile < upper_percentile <= 100, "
            f"got {lo} and {hi}")


def _fitsbolt_parts(name: str, params: Mapping[str, float]) -> _Parts:
    """One channel through fitsbolt's normalisation of that name, with these parameters."""
    try:
        from fitsbolt import NormalisationMethod, normalise_images
    except ImportError as err:
        raise ValueError(f"stretch {name!r} needs ESA's fitsbolt package: pip install "
                         "'anomalymatch-labelstudio[esa]'") from err
    method = name[len(FITSBOLT_PREFIX):]
    kwargs: dict[str, Any] = {
        "linear": {},
        "log": {"norm_log_scale_a": params.get("a")},
        "asinh": {"norm_asinh_scale": [params.get("scale")],
                  "norm_asinh_clip": [params.get("clip")]},
        "zscale": {"norm_zscale_contrast": params.get("contrast"),
                   "norm_zscale_n_samples": int(params.get("n_samples", 0))},
        "midtones": {"norm_midtones_percentile": [params.get("percentile")],
                     "norm_midtones_desired_mean": [params.get("desired_mean")]},
    }[method]
    for key, value in params.items():
        if not value > 0:
            raise ValueError(f"stretch {name!r}: {key} must be > 0, got {value}")
    for key in ("clip", "percentile"):
        if key in params and not params[key] <= 100.0:
            raise ValueError(f"stretch {name!r}: {key} is a percentile, got {params[key]}")
    enum = NormalisationMethod[method.upper()]

    def run(plane: np.ndarray) -> np.ndarray:
        (out,) = normalise_images([plane], output_dtype=np.uint8, normalisation_method=enum,
                                  num_workers=1, show_progress=False, log_level="ERROR",
                                  **kwargs)
        return np.asarray(out, dtype=np.uint8).reshape(plane.shape)

    return _Parts(interval=None, stretch=None, external=run)


def _build_parts(name: str, params: Mapping[str, float]) -> _Parts:
    if name.startswith(FITSBOLT_PREFIX):
        return _fitsbolt_parts(name, params)
    if name in ("none", "unit"):
        return _Parts(interval=None, stretch=None, scale=255.0 if name == "unit" else 1.0)
    if name == "zscale":
        if not 0.0 < params["contrast"] <= 1.0:
            raise ValueError(f"stretch 'zscale': contrast must be in (0, 1], "
                             f"got {params['contrast']}")
        n = params["n_samples"]
        if n < 10 or n != int(n):
            raise ValueError(f"stretch 'zscale': n_samples must be an integer >= 10, got {n}")
        contrast = params["contrast"]
        return _Parts(interval=lambda: ZScaleInterval(n_samples=int(n), contrast=contrast),
                      stretch=LinearStretch())
    _check_percentiles(name, params)
    lo, hi = params["lower_percentile"], params["upper_percentile"]

    def interval() -> BaseInterval:
        return AsymmetricPercentileInterval(lo, hi)

    if name == "linear":
        return _Parts(interval=interval, stretch=LinearStretch())
    a = params["a"]
    if name == "log":
        if not a > 0:
            raise ValueError(f"stretch 'log': a must be > 0, got {a}")
        return _Parts(interval=interval, stretch=LogStretch(a))
    if not 0 < a <= 1:
        raise ValueError(f"stretch 'asinh': a must be in (0, 1], got {a}")
    return _Parts(interval=interval, stretch=AsinhStretch(a))


class Stretch:
    """A validated stretch: ``stretch(x)`` -> uint8, ``stretch.apply(x)`` -> StretchResult."""

    def __init__(self, name: str, params: Mapping[str, float]) -> None:
        self.name = name
        self.params = dict(params)
        self._parts = _build_parts(name, self.params)

    @property
    def spec(self) -> dict[str, Any]:
        """The full JSON-able spec, defaults filled in (what the store records)."""
        return {"name": self.name, **self.params}

    def __repr__(self) -> str:
        return f"Stretch({self.spec})"

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.apply(image).pixels

    def apply(self, image: np.ndarray) -> StretchResult:
        """Stretch an ``(H, W)`` or ``(H, W, C)`` array of any real dtype to uint8.

        Raises ValueError for an empty array, a non-real dtype, other ranks, or a channel
        without a finite pixel.
        """
        array = np.asarray(image)
        if array.ndim not in (2, 3):
            raise ValueError(f"stretch expects an (H, W) or (H, W, C) array, got shape "
                             f"{array.shape}")
        if array.size == 0:
            raise ValueError(f"stretch got an empty image of shape {array.shape}")
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) \
                or np.iscomplexobj(array):
            raise ValueError(f"stretch expects real numbers, got dtype {array.dtype}")
        planes = array[..., None] if array.ndim == 2 else array
        out = np.empty(planes.shape, dtype=np.uint8)
        n_bad = 0
        for c in range(planes.shape[-1]):
            out[..., c], bad = self._channel(planes[..., c], c)
            n_bad += bad
        return StretchResult(pixels=out[..., 0] if array.ndim == 2 else out, n_nonfinite=n_bad)

    def _channel(self, plane: np.ndarray, index: int) -> tuple[np.ndarray, int]:
        x = plane.astype(np.float64)  # always a copy: the input is never modified
        finite = np.isfinite(x)
        n_bad = int(x.size - np.count_nonzero(finite))
        if n_bad == x.size:
            raise ValueError(f"channel {index} has no finite pixel (all NaN/inf)")
        if n_bad:
            x[~finite] = x[finite].min()
        if self._parts.external is not None:
            if not x.max() > x.min():
                return np.zeros(x.shape, dtype=np.uint8), n_bad
            return self._parts.external(x), n_bad
        if self._parts.interval is None:
            return np.clip(np.rint(x * self._parts.scale), 0, 255).astype(np.uint8), n_bad
        vmin, vmax = self._parts.interval().get_limits(x)
        if not vmax > vmin:
            return np.zeros(x.shape, dtype=np.uint8), n_bad
        v = np.clip((x - vmin) / (vmax - vmin), 0.0, 1.0)
        v = self._parts.stretch(v, clip=True)
        return np.rint(v * 255.0).astype(np.uint8), n_bad


def make_stretch(spec: Mapping[str, Any] | str) -> Stretch:
    """Validate a spec ``{"name": ..., params}`` (or a bare name) and build its Stretch.

    Raises ValueError for an unknown name, an unknown parameter, a non-numeric value or a
    value out of range; the message names the stretch and the field.
    """
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"stretch spec must be a mapping with a 'name', got {spec!r}")
    name = spec["name"]
    if name not in DEFAULTS:
        raise ValueError(f"unknown stretch {name!r}; choose one of {sorted(DEFAULTS)}")
    params = dict(DEFAULTS[name])
    for key, value in spec.items():
        if key == "name":
            continue
        if key not in params:
            allowed = sorted(params) or "none"
            raise ValueError(f"stretch {name!r} has no parameter {key!r} (allowed: {allowed})")
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value):
            raise ValueError(f"stretch {name!r}: {key} must be a finite number, got {value!r}")
        params[key] = float(value)
    return Stretch(name, params)


def parse_stretch_params(name: str, pairs: list[str] | None) -> dict[str, Any]:
    """Turn CLI ``key=value`` strings into a spec dict; ValueError on a malformed pair."""
    spec: dict[str, Any] = {"name": name}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"stretch parameter must look like key=value, got {pair!r}")
        try:
            spec[key.strip()] = float(value)
        except ValueError as err:
            raise ValueError(f"stretch parameter {key!r}: {value!r} is not a number") from err
    return spec
