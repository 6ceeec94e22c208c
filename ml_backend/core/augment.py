"""Weak and strong views of a batch for FixMatch, with per-sample random parameters.

Both views work on float tensors ``(B, C, H, W)`` in [0, 1] with any channel count C
(1 for single-band FITS, 3 for RGB, N for multi-band), so colour ops such as equalize and
posterize act on each channel separately. All randomness comes from a CPU
``torch.Generator`` (reproducible on CPU and GPU alike); the input is never modified.

Weak view: integer shifts of up to ``translate_fraction`` of the size with reflect padding,
then the symmetries of ``invariance``: "dihedral" = random horizontal / vertical flips and 90°
rotations (the sky has no "up"), "flip" = random horizontal flips only (upright photographs);
with ``weak_rotation`` each image is then also turned by a random angle in [-45°, 45°).
These are label-preserving: a weak view holds the same pixels as the input, moved (and,
turned, resampled).

Strong view: an independent weak view, then ``randaug_ops`` RandAugment ops per image (drawn
from ``randaug_pool``), each with a random magnitude in [0, ``randaug_magnitude``], then a
cutout square filled with 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ml_backend.core.config import TrainConfig, check_invariance

# An op maps (x (n,C,H,W) in [0,1], magnitude m (n,) in [0,1], sign s (n,) of ±1,
# horizontal (n,) bool: the axis of shear / translate) to a new batch in [0, 1].
Op = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Op ranges at magnitude 1 (RandAugment's usual maxima).
MAX_ROTATE_DEG = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE = 0.3  # fraction of the image size
MAX_ENHANCE = 0.9  # brightness / contrast / sharpness factor 1 ± this
MAX_POSTERIZE_DROP = 4  # bits dropped out of 8
CUTOUT_FILL = 0.5


def _uniform(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen).to(device)


def _randint(high: int, n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randint(0, high, (n,), generator=gen).to(device)


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    """(n,) -> (n, 1, 1, 1) for broadcasting against a batch."""
    return v.view(-1, 1, 1, 1)


# ---------------------------------------------------------------- weak (label-preserving) ops

def random_dihedral(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random flips and 90° rotations (180° only when the image is not square)."""
    n, dev = x.shape[0], x.device
    x = torch.where(_per_sample(_uniform(n, gen, dev) < 0.5), x.flip(-1), x)
    x = torch.where(_per_sample(_uniform(n, gen, dev) < 0.5), x.flip(-2), x)
    if x.shape[-1] == x.shape[-2]:
        x = torch.where(_per_sample(_uniform(n, gen, dev) < 0.5), x.transpose(-1, -2), x)
    return x


def random_hflip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random horizontal (left-right) flips."""
    return torch.where(_per_sample(_uniform(x.shape[0], gen, x.device) < 0.5), x.flip(-1), x)


def random_rotation(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image turned by its own random angle in [-45°, 45°) about its centre (bilinear,
    reflected at the edges); after random quarter turns, every angle is equally likely."""
    angle = (_uniform(x.shape[0], gen, x.device) - 0.5) * (math.pi / 2)
    return _rotated(x, angle.to(x.dtype), padding="reflection")


SYMMETRIES: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "dihedral": random_dihedral,
    "flip": random_hflip,
}


def symmetry_views(x: torch.Tensor, invariance: str) -> list[torch.Tensor]:
    """Every deterministic view of a square batch under `invariance`, the input first.

    "dihedral": the 8 flips and 90° rotations; "flip": the input and its left-right mirror.
    Test-time augmentation averages the model over these (`TrainConfig.test_time_augmentation`).
    """
    check_invariance(invariance)
    if invariance == "flip":
        return [x, x.flip(-1)]
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"dihedral views need square images, got {tuple(x.shape[-2:])}")
    turns = [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    return turns + [t.flip(-1) for t in turns]


def scoring_views(x: torch.Tensor, invariance: str | None, shift: int) -> list[torch.Tensor]:
    """The views scoring averages over, the input first: the symmetry views of `invariance`
    (the input alone for None), then each of them shifted by (+shift, +shift) and by (-shift,
    -shift) pixels when `shift` > 0 (`shifted`)."""
    views = [x] if invariance is None else symmetry_views(x, invariance)
    if shift <= 0:
        return views
    return views + [shifted(v, d, d) for d in (shift, -shift) for v in views]


def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """A batch moved `dy` pixels down and `dx` right, the edges reflect-padded (each shift
    smaller than the image)."""
    h, w = x.shape[-2:]
    s = max(abs(dy), abs(dx))
    if s == 0:
        return x
    if s >= min(h, w):
        raise ValueError(f"a shift of {s} pixels needs images larger than {h}x{w}")
    padded = F.pad(x, (s, s, s, s), mode="reflect")
    return padded[..., s - dy:s - dy + h, s - dx:s - dx + w]


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Per-sample integer shifts in [-max_shift, max_shift] pixels, reflect-padded."""
    n, _, h, w = x.shape
    max_shift = min(max_shift, h - 1, w - 1)
    if max_shift <= 0:
        return x
    dev = x.device
    dy = _randint(2 * max_shift + 1, n, gen, dev)  # offset into the padded image
    dx = _randint(2 * max_shift + 1, n, gen, dev)
    padded = F.pad(x, (max_shift,) * 4, mode="reflect")
    rows = dy[:, None] + torch.arange(h, device=dev)  # (n, h)
    cols = dx[:, None] + torch.arange(w, device=dev)  # (n, w)
    batch = torch.arange(n, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (n, h, w, C)
    return out.permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------- RandAugment ops

def _affine(x: torch.Tensor, theta: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """Apply per-sample 2x3 affine matrices (normalised coordinates), bilinear; outside the
    image `padding` ("zeros" or "reflection", as `F.grid_sample` names them)."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def _eye(n: int, x: torch.Tensor) -> torch.Tensor:
    return torch.eye(2, 3, dtype=x.dtype, device=x.device).repeat(n, 1, 1)


def op_rotate(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor,
              horizontal: torch.Tensor) -> torch.Tensor:
    return _rotated(x, torch.deg2rad(s * m * MAX_ROTATE_DEG).to(x.dtype))


def _rotated(x: torch.Tensor, angle: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """Each image turned about its centre by its own `angle` (n,) in radians (`_affine`)."""
    theta = _eye(len(x), x)
    theta[:, 0, 0], theta[:, 0, 1] = angle.cos(), -angle.sin()
    theta[:, 1, 0], theta[:, 1, 1] = angle.sin(), angle.cos()
    return _affine(x, theta, padding)


def op_shear(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor,
             horizontal: torch.Tensor) -> torch.Tensor:
    theta = _eye(len(x), x)
    shear = (s * m * MAX_SHEAR).to(x.dtype)
    theta[:, 0, 1] = torch.where(horizontal, shear, 0.0)
    theta[:, 1, 0] = torch.where(horizontal, 0.0, shear)
    return _affine(x, theta)


def op_translate(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor,
                 horizontal: torch.Tensor) -> torch.Tensor:
    theta = _eye(len(x), x)
    shift = (2 * s * m * MAX_TRANSLATE).to(x.dtype)  # normalised coordinates span 2
    theta[:, 0, 2] = torch.where(horizontal, shift, 0.0)
    theta[:, 1, 2] = torch.where(horizontal, 0.0, shift)
    return _affine(x, theta)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 1] (PIL ImageEnhance semantics)."""
    f = _per_sample(factor).to(x.dtype)
    return (f * x + (1 - f) * other).clamp(0, 1)


def op_brightness(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor,
                  horizontal: torch.Tensor) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x), 1 + s * m * MAX_ENHANCE)


def op_contrast(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor,
                horizontal: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # over all channels: works for any C
    return _blend(x, mean.expand_as(x), 1 + s * m * MAX_ENHANCE)


def op_sharpness(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor,
                 horizontal: torch.Tensor) -> torch.Tensor:
    if min(x.shape[-2:]) < 3:
        return x
    # PIL's smoothing kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 = (9 * box3x3 + 4 * centre) / 13
    smooth = (9 * F.avg_pool2d(x, 3, stride=1) + 4 * x[..., 1:-1, 1:-1]) / 13
    blurred = x.clone()  # PIL keeps the border pixels unchanged
    blurred[..., 1:-1, 1:-1] = smooth
    return _blend(x, blurred, 1 + s * m * MAX_ENHANCE)


def op_solarize(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor,
                horizontal: torch.Tensor) -> torch.Tensor:
    threshold = _per_sample(1 - m).to(x.dtype)  # magnitude 0 leaves the image unchanged
    return torch.where(x >= threshold, 1 - x, x)


def _to_levels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> integer levels 0..255 (as in the uint8 store)."""
    return (x * 255).round().clamp(0, 255).long()


def op_posterize(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor,
                 horizontal: torch.Tensor) -> torch.Tensor:
    drop = _per_sample((m * MAX_POSTERIZE_DROP).round().long())
    step = 2**drop
    return ((_to_levels(x) // step) * step).to(x.dtype) / 255


def op_equalize(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor,
                horizontal: torch.Tensor) -> torch.Tensor:
    """Histogram-equalise each channel of each image over 256 levels; flat channels unchanged."""
    n, c, h, w = x.shape
    levels = _to_levels(x).reshape(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.float64, device=x.device)
    hist.scatter_add_(1, levels, torch.ones_like(levels, dtype=torch.float64))
    cdf = hist.cumsum(1)
    cdf_min = torch.where(hist > 0, cdf, torch.inf).amin(1, keepdim=True)
    span = (h * w) - cdf_min
    lut = ((cdf - cdf_min) / span.clamp(min=1) * 255).round().clamp(0, 255)
    out = lut.gather(1, levels).to(x.dtype) / 255
    flat = (span <= 0).expand_as(out)
    return torch.where(flat, x.reshape(n * c, h * w), out).view(n, c, h, w)


def op_autocontrast(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor,
                    horizontal: torch.Tensor) -> torch.Tensor:
    """Stretch each channel of each image to span [0, 1]; flat channels unchanged."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / span.clamp(min=1e-12), x)


RANDAUGMENT_OPS: dict[str, Op] = {
    "rotate": op_rotate,
    "shear": op_shear,
    "translate": op_translate,
    "brightness": op_brightness,
    "contrast": op_contrast,
    "sharpness": op_sharpness,
    "solarize": op_solarize,
    "posterize": op_posterize,
    "equalize": op_equalize,
    "autocontrast": op_autocontrast,
}
# The ops a strong view draws from (`TrainConfig.randaug_pool`). "linear" keeps the geometric
# ops and those that change pixel values by a linear map per image (brightness, contrast,
# sharpness, autocontrast); it leaves out solarize, posterize and equalize, whose non-linear
# remaps can turn a bright core dark or wash out faint emission.
RANDAUGMENT_POOLS: dict[str, tuple[str, ...]] = {
    "all": tuple(RANDAUGMENT_OPS),
    "linear": ("rotate", "shear", "translate", "brightness", "contrast", "sharpness",
               "autocontrast"),
}


def rand_augment(x: torch.Tensor, num_ops: int, max_magnitude: float,
                 gen: torch.Generator, ops: Sequence[Op] = tuple(RANDAUGMENT_OPS.values())
                 ) -> torch.Tensor:
    """Apply num_ops random ops per image (of `ops`), each with magnitude ~ U(0, max_magnitude).

    Each op runs once on the sub-batch of images that drew it, so the cost is one pass of
    every op over at most the whole batch per round.
    """
    n, dev = x.shape[0], x.device
    for _ in range(num_ops):
        choice = _randint(len(ops), n, gen, dev)
        magnitude = _uniform(n, gen, dev) * max_magnitude
        sign = torch.where(_uniform(n, gen, dev) < 0.5, -1.0, 1.0)
        horizontal = _uniform(n, gen, dev) < 0.5
        out = x.clone()
        for k, op in enumerate(ops):
            idx = (choice == k).nonzero().flatten()
            if len(idx):
                out[idx] = op(x[idx], magnitude[idx], sign[idx], horizontal[idx])
        x = out
    return x


def cutout(x: torch.Tensor, side: int, gen: torch.Generator) -> torch.Tensor:
    """Fill one side x side square per image with 0.5; its centre is uniform, edges clipped."""
    n, _, h, w = x.shape
    if side <= 0:
        return x
    dev = x.device
    cy = (_uniform(n, gen, dev) * h).long()
    cx = (_uniform(n, gen, dev) * w).long()
    y0, x0 = (cy - side // 2)[:, None], (cx - side // 2)[:, None]
    ys = torch.arange(h, device=dev)[None, :]
    xs = torch.arange(w, device=dev)[None, :]
    in_y = (ys >= y0) & (ys < y0 + side)  # (n, h)
    in_x = (xs >= x0) & (xs < x0 + side)  # (n, w)
    box = (in_y[:, :, None] & in_x[:, None, :])[:, None]  # (n, 1, h, w)
    return torch.where(box, torch.full_like(x, CUTOUT_FILL), x)


class WeakStrong:
    """``WeakStrong(cfg)(x, gen) -> (weak, strong)``: two views of a batch for FixMatch.

    x: float tensor (B, C, H, W) with values in [0, 1], any C; left unchanged.
    Returns two new tensors of the same shape, dtype and device, values in [0, 1].
    NaNs are not checked for; they pass through flips and shifts and spread under resampling.
    Uses cfg.invariance, cfg.weak_rotation, cfg.translate_fraction, cfg.randaug_ops,
    cfg.randaug_magnitude, cfg.randaug_pool and cfg.cutout_fraction.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        if not 0 <= cfg.translate_fraction < 1:
            raise ValueError(f"translate_fraction must be in [0, 1), got {cfg.translate_fraction}")
        if not 0 <= cfg.randaug_magnitude <= 1:
            raise ValueError(f"randaug_magnitude must be in [0, 1], got {cfg.randaug_magnitude}")
        if cfg.randaug_ops < 0:
            raise ValueError(f"randaug_ops must be >= 0, got {cfg.randaug_ops}")
        if not 0 <= cfg.cutout_fraction <= 1:
            raise ValueError(f"cutout_fraction must be in [0, 1], got {cfg.cutout_fraction}")
        self.symmetry = SYMMETRIES[check_invariance(cfg.invariance)]
        self.rotation = cfg.weak_rotation
        self.translate_fraction = cfg.translate_fraction
        self.ops = tuple(RANDAUGMENT_OPS[name] for name in RANDAUGMENT_POOLS[cfg.randaug_pool])
        self.num_ops = cfg.randaug_ops
        self.magnitude = cfg.randaug_magnitude
        self.cutout_fraction = cfg.cutout_fraction

    def weak(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Reflect-padded integer shifts, then the invariance's flips / rotations (and, with
        `weak_rotation`, a random turn), per sample."""
        _check_batch(x)
        max_shift = math.floor(self.translate_fraction * min(x.shape[-2:]))
        x = self.symmetry(random_shift(x, max_shift, gen), gen)
        return random_rotation(x, gen) if self.rotation else x

    def strong(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """An independent weak view, then RandAugment, then cutout."""
        x = rand_augment(self.weak(x, gen), self.num_ops, self.magnitude, gen, self.ops)
        side = round(self.cutout_fraction * min(x.shape[-2:]))
        return cutout(x, side, gen)

    def __call__(self, x: torch.Tensor,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weak(x, gen), self.strong(x, gen)


def _check_batch(x: torch.Tensor) -> None:
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(
            f"expected a float tensor (B, C, H, W) in [0, 1], got {x.dtype} of shape "
            f"{tuple(x.shape)}"
        )
