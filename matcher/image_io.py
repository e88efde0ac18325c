"""Turning user images (paths, numpy arrays, tensors) into the model's grayscale [0, 1] input."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import cv2
import numpy as np
import torch

ImageLike = Union[str, Path, np.ndarray, torch.Tensor]

#: Smallest side, in pixels, of an image the matcher accepts: one coarse cell.
MIN_SIDE = 8

_GRAY_WEIGHTS_RGB = np.array([0.299, 0.587, 0.114], np.float32)


def read_image_gray(path: str | Path) -> np.ndarray:
    """Read an image file as float32 grayscale ``(H, W)`` in [0, 1] (8- or 16-bit files), turned upright by
    its EXIF orientation as ``cv2.imread``'s defaults, the datasets and hloc's own reader do (phone photos are
    stored sideways with an orientation tag)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image not found: {path}")
    # ANYDEPTH keeps 16-bit files; unlike IMREAD_UNCHANGED, these flags apply the EXIF orientation
    img = cv2.imread(str(path), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if img is None:
        raise ValueError(f"cannot read image (not an image, or corrupt): {path}")
    return to_gray_float(img, name=str(path), bgr=True)


def _unit_range(img: np.ndarray, name: str) -> np.ndarray:
    """Values of an integer or float array as float32 in [0, 1]."""
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    if img.dtype == np.uint16:
        return img.astype(np.float32) / 65535.0
    if img.dtype == np.bool_ or not np.issubdtype(img.dtype, np.number) or np.issubdtype(img.dtype, np.complexfloating):
        raise ValueError(f"{name}: unsupported dtype {img.dtype}")
    if not np.issubdtype(img.dtype, np.floating):  # int8/16/32/64, uint32...: no agreed value range
        raise ValueError(f"{name}: unsupported integer dtype {img.dtype}; give uint8 (0-255), uint16 (0-65535) "
                         "or float in [0, 1]")
    img = img.astype(np.float32)
    if not np.isfinite(img).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if np.issubdtype(img.dtype, np.floating) and (img.min() < 0.0 or img.max() > 1.0):
        raise ValueError(
            f"{name}: float images must lie in [0, 1], got [{img.min():g}, {img.max():g}] (divide by 255?)"
        )
    return img


def to_gray_float(img: np.ndarray, name: str = "image", bgr: bool = False) -> np.ndarray:
    """Array ``(H, W)`` or ``(H, W, C)``, C in 1, 3, 4 (RGB[A], or BGR[A] with ``bgr``), uint8, uint16 or
    float in [0, 1] -> float32 grayscale ``(H, W)`` in [0, 1]."""
    img = np.asarray(img)
    if img.size == 0:
        raise ValueError(f"{name} is empty (shape {img.shape})")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 3 and img.shape[2] in (3, 4):
        weights = _GRAY_WEIGHTS_RGB[::-1] if bgr else _GRAY_WEIGHTS_RGB
        return _unit_range(img[..., :3], name) @ weights
    if img.ndim != 2:
        raise ValueError(f"{name} must be (H, W) or (H, W, 1|3|4), got shape {img.shape}")
    return _unit_range(img, name)


def tensor_to_numpy_hwc(t: torch.Tensor, name: str) -> np.ndarray:
    """Channels-first tensor ``(H, W)``, ``(C, H, W)`` or ``(1, C, H, W)`` -> numpy ``(H, W[, C])``."""
    shape = tuple(t.shape)
    t = t.detach().cpu()
    if t.dtype in (torch.float16, torch.bfloat16):  # numpy has no bfloat16
        t = t.float()
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim == 3:
        if t.shape[0] not in (1, 3, 4):
            hint = " (channels last? use .permute(2, 0, 1))" if t.shape[2] in (1, 3, 4) else ""
            raise ValueError(f"{name}: tensors are channels-first, (C, H, W) with C in 1, 3, 4; got {shape}{hint}")
        t = t.permute(1, 2, 0)
    elif t.ndim != 2:
        raise ValueError(f"{name}: tensor must be (H, W), (C, H, W) or (1, C, H, W), got {tuple(t.shape)}")
    return t.numpy()


def load_gray(image: ImageLike, name: str = "image") -> np.ndarray:
    """Any supported image -> float32 grayscale ``(H, W)`` in [0, 1], checked for size and values."""
    if isinstance(image, (str, Path)):
        gray = read_image_gray(image)
    elif isinstance(image, torch.Tensor):
        gray = to_gray_float(tensor_to_numpy_hwc(image, name), name)
    elif isinstance(image, np.ndarray):
        gray = to_gray_float(image, name)
    else:
        raise ValueError(f"{name}: expected a path, numpy array or tensor, got {type(image).__name__}")
    if min(gray.shape) < MIN_SIDE:
        raise ValueError(f"{name} is too small: {gray.shape[1]}x{gray.shape[0]} px, need at least {MIN_SIDE} px a side")
    return gray


def check_long_side(long_side: object) -> None:
    """A ValueError unless ``long_side`` is None or an integer of at least :data:`MIN_SIDE` pixels."""
    if long_side is None:
        return
    if not isinstance(long_side, (int, np.integer)) or isinstance(long_side, bool):
        raise ValueError(f"resize must be an integer number of pixels or None, got {long_side!r}")
    if long_side < MIN_SIDE:
        raise ValueError(f"resize must be at least {MIN_SIDE} px (one coarse cell), got {long_side}")


def resize_long_side(gray: np.ndarray, long_side: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Resize so the long side is ``long_side`` (None keeps the size).

    Returns the image and the scale ``[sx, sy]`` (input pixels per resized pixel); :func:`to_input_pixels`
    maps the resized image's pixel coordinates back to the input's with it.
    """
    check_long_side(long_side)
    h, w = gray.shape
    if long_side is None or max(h, w) == long_side:
        return gray, np.ones(2, np.float32)
    ratio = long_side / max(h, w)
    new_w, new_h = max(MIN_SIDE, round(w * ratio)), max(MIN_SIDE, round(h * ratio))
    interp = cv2.INTER_AREA if ratio < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(gray, (new_w, new_h), interpolation=interp)
    return resized, np.array([w / new_w, h / new_h], np.float32)


def to_input_pixels(points: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Pixel coordinates ``(N, 2)`` (x, y) in an image resized by :func:`resize_long_side` -> those of the
    image it was resized from, with pixel centres at integers on both sides (``cv2.resize``'s convention:
    resized pixel ``x'`` covers input pixels around ``(x' + 0.5) * s - 0.5``). Scaling alone (``x' * s``)
    would shift every point by ``(s - 1) / 2`` pixels: 2.6 px for a 4,000 px photo matched at 640."""
    return (points + 0.5) * scale - 0.5
