"""Homography pairs from any folder of images: generation (shared with ``eval/homography.py``) and the
training / validation dataset.

A training pair is made from one image of the folder: a random crop (aspect ratio of ``image_size``, 50-100%
of the largest such crop) resized to ``image_size`` is image0; image1 is the SAME source image seen through a
random homography ``H_0to1`` composed of a scale (0.8-1.25) and a rotation (up to 25 degrees) about the image
centre, a shift, and an independent perspective jitter of each corner (up to 12% of the side); it is rendered
from the full source image, so image1 pixels outside image0's crop show real content and only pixels outside
the source image are black. Both images get independent photometric changes. ``mask0/1`` are all True (no
padding); the supervision reads validity from the homography and image bounds, so image1 pixels that come from
outside image0 are never positives.

Samples carry ``H_0to1`` (3, 3) mapping image0 pixels to image1 pixels INSTEAD of depth / K / T, plus
``image0/1``, ``mask0/1``, ``scale0/1`` (ones), ``dataset_name`` = "homography", ``scene_id`` (the image
file name), ``pair_id`` and ``pair_names``. Pair ``i`` of a split depends only on (seed, split, i) and the file
list.

Splits: without a separate validation folder (``val_fraction > 0``), the sorted image list is split into
train (the first 90%) and val (the last 10%, at least one image); with ``val_fraction = 0`` a split uses every
image of its folder (``build_datasets`` does this when ``val_image_dir`` is set).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ..metrics import image_corners
from .common import CorruptFileError, SkipCorrupt, read_gray_uint8, require_file, to_unit_float

#: Image file suffixes picked up from an image folder.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")

SPLITS = {"train": 0, "val": 1}


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name. Raises FileNotFoundError when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return images


# ----------------------------------------------------------------------------------------------- generation
def random_homography(hw: tuple[int, int], max_shift: float, rng: np.random.Generator) -> np.ndarray:
    """Random perspective warp of an ``(H, W)`` image: each corner moves independently by up to
    ``max_shift * W`` in x and ``max_shift * H`` in y (uniform). ``max_shift`` must be in [0, 0.25] so the
    corner quadrilateral stays convex. Returns ``H (3, 3)`` mapping image pixels to warped pixels,
    ``H[2, 2] = 1``."""
    if not 0.0 <= max_shift <= 0.25:
        raise ValueError(f"max_shift must be in [0, 0.25], got {max_shift}")
    h, w = hw
    corners = image_corners(hw)
    moved = corners + rng.uniform(-1.0, 1.0, (4, 2)) * max_shift * np.array([w, h])
    H = cv2.getPerspectiveTransform(corners.astype(np.float32), moved.astype(np.float32))
    return H / H[2, 2]


def photometric_change(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random gain (0.7..1.3), bias (-0.1..0.1), gamma (0.7..1.4) and Gaussian noise (sigma up to 0.02) on a
    float image ``(H, W)`` in [0, 1]; returns float32 ``(H, W)`` in [0, 1]."""
    gain, bias = rng.uniform(0.7, 1.3), rng.uniform(-0.1, 0.1)
    gamma, sigma = rng.uniform(0.7, 1.4), rng.uniform(0.0, 0.02)
    out = np.clip(gray, 0.0, 1.0) ** gamma * gain + bias + rng.normal(0.0, sigma, gray.shape)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def generate_homography_pair(
    gray: np.ndarray, seed: int | Sequence[int], max_shift: float = 0.15, photometric: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic synthetic pair from one image (the homography benchmark's generator).

    Args:
        gray: float image ``(H, W)`` in [0, 1].
        seed: int or sequence of ints for ``np.random.SeedSequence``; equal seeds give equal pairs.
        max_shift: corner displacement bound, fraction of the image side (see :func:`random_homography`).
        photometric: apply :func:`photometric_change` to the warped image.
    Returns:
        ``image0`` (the input, float32), ``image1`` (warped, same size, zero outside the source) and the
        true homography ``H (3, 3)`` mapping image0 pixels to image1 pixels.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    image0 = np.asarray(gray, np.float32)
    h, w = image0.shape
    H = random_homography((h, w), max_shift, rng)
    image1 = cv2.warpPerspective(image0, H, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if photometric:
        image1 = photometric_change(image1, rng)
    return image0, image1, H


def is_convex_quad(pts: np.ndarray) -> bool:
    """Whether four points ``(4, 2)`` in order form a strictly convex quadrilateral."""
    edges = np.roll(pts, -1, 0) - pts
    cross = edges[:, 0] * np.roll(edges, -1, 0)[:, 1] - edges[:, 1] * np.roll(edges, -1, 0)[:, 0]
    return bool((cross > 0).all() or (cross < 0).all())


def sample_homography(
    hw: tuple[int, int],
    rng: np.random.Generator,
    max_angle: float = 25.0,
    scale_range: tuple[float, float] = (0.8, 1.25),
    max_translation: float = 0.1,
    max_shift: float = 0.12,
) -> np.ndarray:
    """Random ``H (3, 3)`` (``H[2, 2] = 1``) for an ``(H, W)`` image: image0's corners are scaled (log-uniform in
    ``scale_range``) and rotated (uniform within +-``max_angle`` degrees) about the centre, shifted by up to
    ``max_translation`` of the side, and each moved independently by up to ``max_shift`` of the side. Redrawn
    until the corner quadrilateral is convex and keeps its centre inside the image (at most 50 draws)."""
    h, w = hw
    corners = image_corners(hw)
    centre = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    side = np.array([w, h], np.float64)
    for _ in range(50):
        scale = math.exp(rng.uniform(math.log(scale_range[0]), math.log(scale_range[1])))
        angle = math.radians(rng.uniform(-max_angle, max_angle))
        c, s = math.cos(angle), math.sin(angle)
        R = np.array([[c, -s], [s, c]]) * scale
        moved = (corners - centre) @ R.T + centre
        moved = moved + rng.uniform(-1, 1, 2) * max_translation * side + rng.uniform(-1, 1, (4, 2)) * max_shift * side
        middle = moved.mean(0)
        if is_convex_quad(moved) and 0 <= middle[0] <= w - 1 and 0 <= middle[1] <= h - 1:
            break
    H = cv2.getPerspectiveTransform(corners.astype(np.float32), moved.astype(np.float32))
    return H / H[2, 2]


def crop_transform(src_hw: tuple[int, int], out_hw: tuple[int, int], rng: np.random.Generator, min_crop: float = 0.5) -> np.ndarray:
    """Affine ``A (3, 3)`` mapping source pixels to the pixels of a random crop resized to ``out_hw``: the crop
    has ``out_hw``'s aspect ratio and ``min_crop``-100% of the side of the largest such crop, anywhere inside."""
    sh, sw = src_hw
    oh, ow = out_hw
    fit = min(sh / oh, sw / ow)  # the largest crop is (oh * fit, ow * fit) source pixels
    size = fit * rng.uniform(min_crop, 1.0)  # source pixels per output pixel
    y0 = rng.uniform(0.0, max(sh - oh * size, 0.0))
    x0 = rng.uniform(0.0, max(sw - ow * size, 0.0))
    # output pixel centre p maps to source x0 + (p + 0.5) * size - 0.5
    return np.array([[1 / size, 0, (0.5 - x0) / size - 0.5], [0, 1 / size, (0.5 - y0) / size - 0.5], [0, 0, 1.0]])


def render_homography_pair(
    source: np.ndarray,
    out_hw: tuple[int, int],
    rng: np.random.Generator,
    photometric: bool = True,
    min_crop: float = 0.5,
    **homography_kwargs: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """image0 (random crop of ``source`` resized to ``out_hw``), image1 (the source seen through the crop and a
    random homography) as float32 ``(H, W)`` in [0, 1], and ``H_0to1 (3, 3)``. ``source`` is uint8 or float."""
    src = np.asarray(source)
    src = to_unit_float(src) if src.dtype == np.uint8 else src.astype(np.float32)
    A = crop_transform(src.shape, out_hw, rng, min_crop)
    zoom = A[0, 0]
    if zoom < 0.8:  # downsample with area averaging first (to about 1:1), so that the warps do not alias
        f = zoom
        small = cv2.resize(src, (max(1, round(src.shape[1] * f)), max(1, round(src.shape[0] * f))), interpolation=cv2.INTER_AREA)
        fx, fy = small.shape[1] / src.shape[1], small.shape[0] / src.shape[0]
        # source pixel centres map to small ones by p' = (p + 0.5) * f - 0.5
        S = np.array([[fx, 0, 0.5 * fx - 0.5], [0, fy, 0.5 * fy - 0.5], [0, 0, 1.0]])
        A, src = A @ np.linalg.inv(S), small
    H = sample_homography(out_hw, rng, **homography_kwargs)
    h, w = out_hw
    flags = dict(flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    image0 = cv2.warpPerspective(src, A, (w, h), **flags)
    image1 = cv2.warpPerspective(src, H @ A, (w, h), **flags)
    if photometric:
        image0, image1 = photometric_change(image0, rng), photometric_change(image1, rng)
    return image0.astype(np.float32), image1.astype(np.float32), H


# ----------------------------------------------------------------------------------------------- dataset
class HomographyDataset(SkipCorrupt, Dataset):
    """Random homography pairs from a folder of images (see the module docstring).

    Args:
        image_dir: folder of jpg / png / ppm / ... images (not recursive).
        length: number of pairs (pair ``i`` uses a random image of the split, drawn from (seed, split, i)).
        image_size: ``(H, W)`` of both images.
        seed: seed of the pair stream.
        split: ``train`` or ``val``.
        val_fraction: share of the sorted files held out for val (0: both splits use all files).
        photometric: independent photometric changes of both images.
        min_crop, max_angle, scale_range, max_translation, max_shift: see :func:`crop_transform`,
            :func:`sample_homography`.
        skip_corrupt, max_skip: undecodable images are skipped (see :mod:`matcher.data.common`).
    """

    def __init__(
        self,
        image_dir: str | Path,
        length: int,
        image_size: tuple[int, int] = (240, 320),
        seed: int = 0,
        split: str = "train",
        *,
        val_fraction: float = 0.1,
        photometric: bool = True,
        min_crop: float = 0.5,
        max_angle: float = 25.0,
        scale_range: tuple[float, float] = (0.8, 1.25),
        max_translation: float = 0.1,
        max_shift: float = 0.12,
        skip_corrupt: bool = True,
        max_skip: int = 10,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        files = list_images(image_dir)
        if val_fraction > 0:
            n_val = max(1, int(round(len(files) * val_fraction)))
            if n_val >= len(files):
                raise ValueError(
                    f"{image_dir} has {len(files)} image(s): too few to hold out {val_fraction:.0%} for validation "
                    "(add images or give a separate val_image_dir)"
                )
            files = files[: len(files) - n_val] if split == "train" else files[len(files) - n_val :]
        self.files, self.split, self.length = files, split, int(length)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.seed, self.photometric, self.min_crop = int(seed), bool(photometric), float(min_crop)
        self.homography_kwargs = dict(
            max_angle=float(max_angle), scale_range=tuple(float(s) for s in scale_range),
            max_translation=float(max_translation), max_shift=float(max_shift),
        )
        self.skip_corrupt, self.max_skip, self.skipped = bool(skip_corrupt), int(max_skip), 0

    def __len__(self) -> int:
        return self.length

    def _load(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, SPLITS[self.split], index]))
        path = self.files[int(rng.integers(len(self.files)))]
        require_file(path, "image")
        source = read_gray_uint8(path)
        if min(source.shape) < 2:
            raise CorruptFileError(f"image too small ({source.shape[0]}x{source.shape[1]}): {path}")
        image0, image1, H = render_homography_pair(source, self.image_size, rng, self.photometric, self.min_crop, **self.homography_kwargs)
        mask = torch.ones(self.image_size, dtype=torch.bool)
        name = f"{self.split}-{self.seed}-{index}"
        return {
            "image0": torch.from_numpy(image0)[None],
            "image1": torch.from_numpy(image1)[None],
            "H_0to1": torch.from_numpy(H.astype(np.float32)),
            "mask0": mask,
            "mask1": mask.clone(),
            "scale0": torch.ones(2),
            "scale1": torch.ones(2),
            "dataset_name": "homography",
            "scene_id": path.name,
            "pair_id": index,
            "pair_names": (f"{path.name}#{name}-0", f"{path.name}#{name}-1"),
        }
