"""The one place where store pixels become model tensors (training and scoring both use it).

uint8 (n, H, W, C)  --to_unit_tensor-->  float32 (n, C, H, W) in [0, 1]
                    --fit: centre crop (optional), resize to S x S (bilinear, antialiased)-->
                    --normalise-->  float32 (n, C, S, S) in [-1, 1], channels_last.
Normalisation is (x - 0.5) / 0.5, the ImageNet weights' convention.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ml_backend.core.config import check_center_crop, crop_box
from ml_backend.core.pretrained import IMAGENET_MEAN, IMAGENET_STD


def to_unit_tensor(images: np.ndarray | torch.Tensor,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 (n, H, W, C) -> float32 (n, C, H, W) in [0, 1] on `device`; input unchanged.

    The uint8 array is moved to the device before the float conversion (4x less traffic).
    """
    pixels = _check_uint8_nhwc(images)
    tensor = torch.as_tensor(pixels).to(device, non_blocking=True)
    return tensor.permute(0, 3, 1, 2).float().div_(255.0)


def normalise(x01: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]: (x - 0.5) / 0.5. Returns a new tensor; NaNs stay NaN."""
    return (x01 - IMAGENET_MEAN) / IMAGENET_STD


def resize(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """(n, C, H, W) float -> (n, C, S, S) with antialiased bilinear interpolation.

    Returns `x` itself when it already has the size.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if x.shape[-2:] == (image_size, image_size):
        return x
    return F.interpolate(x, size=(image_size, image_size), mode="bilinear",
                         antialias=True, align_corners=False)


def center_crop(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """(n, C, H, W) -> the central round(fraction * H) x round(fraction * W) pixels (>= 1).

    fraction in (0, 1]; 1 returns `x` itself. Cutouts centred on a small source (FIRST radio
    galaxies keep most of their flux in the central sixth) gain resolution from it.
    """
    if check_center_crop(fraction) == 1:
        return x
    top, left, h, w = crop_box(*x.shape[-2:], fraction)
    return x[..., top:top + h, left:left + w]



def fit(x: torch.Tensor, image_size: int, crop: float = 1.0) -> torch.Tensor:
    """(n, C, H, W) in [0, 1] -> centre-cropped to `crop` of each side, resized to S x S."""
    return resize(center_crop(x, crop), image_size)


def to_model_input(images: np.ndarray | torch.Tensor, image_size: int,
                   device: str | torch.device = "cpu", crop: float = 1.0) -> torch.Tensor:
    """uint8 (n, H, W, C) -> normalised float32 (n, C, S, S), channels_last, on `device`.

    crop: fraction of each side kept around the centre before resizing (1 = whole cutout).
    """
    x = normalise(fit(to_unit_tensor(images, device), image_size, crop))
    return x.contiguous(memory_format=torch.channels_last)


def _check_uint8_nhwc(images: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    if isinstance(images, np.ndarray):
        ok_dtype = images.dtype == np.uint8
        if ok_dtype and not images.flags.writeable:
            # torch warns on read-only arrays (h5py/memmap); a copy keeps the caller's intact.
            images = images.copy()
    elif isinstance(images, torch.Tensor):
        ok_dtype = images.dtype == torch.uint8
    else:
        raise TypeError(f"images must be a numpy array or torch tensor, got {type(images)}")
    if not ok_dtype:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape (n, H, W, C), got {tuple(images.shape)}")
    if min(images.shape[1:]) < 1:
        raise ValueError(f"images have an empty dimension: shape {tuple(images.shape)}")
    return images
