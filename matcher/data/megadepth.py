"""MegaDepth pairs in LoFTR's layout (one dataset per scene-info file).

Scene-info files (``index/scene_info_0.1_0.7/*.npz``, ``index/scene_info_val_1500/*.npz``) are named ``.npz``
but LoFTR's are pickled Python dicts, which ``np.load(path, allow_pickle=True)`` returns as they are. Also
accepted: a real npz archive of (object) arrays with the same keys (``np.savez``), and a ``.npy`` holding a
0-d object array with the dict (``np.save(path, info)``). Either way these files are unpickled: load only
scene-info files from a source you trust. Keys, one entry per image of the scene:

- ``image_paths``: image file, relative to ``root_dir`` (``None`` for images without data: pairs using them
  are dropped when the dataset is built);
- ``depth_paths``: h5 depth map (dataset ``depth``, metres, 0 = unknown, the original image size);
- ``intrinsics``: 3x3, for the original image pixels; ``poses``: 4x4 world-to-camera;
- ``pair_infos``: entries ``((i, j), overlap_score, central_matches)``.

Sample layout (as LoFTR with ``img_padding`` and ``depth_padding``): the grayscale image is resized so its long
side is ``img_resize`` (sides rounded), each side floored to a multiple of ``df``, then zero-padded at the
bottom-right to a square of its long side (= ``img_resize`` when that is a multiple of ``df``); ``mask0/1``
are True on the real pixels. ``scale0/1`` = [W / W', H / H'] (original over resized size) maps resized pixels to
the original pixels in which ``K`` and the depth map are expressed. Depth maps keep their original size and are
zero-padded at the bottom-right to ``depth_padding`` x ``depth_padding`` (LoFTR: 2000, the largest MegaDepth
image side, so that batches collate); a depth map whose size differs from its image's is treated as corrupt.

Train mode keeps pairs with ``min_overlap_score < overlap <= max_overlap_score``; val and test keep every
pair. Depth is read in train and val, not in test (zeros of the padded size, or the original image size
without padding). ``T_0to1 = P1 @ inv(P0)``. Bad files: see :mod:`matcher.data.common`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from .common import CorruptFileError, SkipCorrupt, pad_bottom_right, read_gray_uint8, require_file, to_unit_float

#: Depth maps are padded to this square by default (LoFTR's upper bound of MegaDepth image sides).
DEPTH_PAD_SIZE = 2000

SCENE_INFO_KEYS = ("image_paths", "depth_paths", "intrinsics", "poses", "pair_infos")


def load_scene_info(path: str | Path) -> dict[str, Any]:
    """A MegaDepth scene-info file (pickled dict, npz archive or npy, see the module docstring) as a dict."""
    path = require_file(path, "MegaDepth scene info")
    try:
        obj = np.load(path, allow_pickle=True)
        if isinstance(obj, np.lib.npyio.NpzFile):
            with obj:
                info = {k: obj[k] for k in obj.files}
        elif isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
            info = obj.item()
        else:
            info = obj
    except Exception as err:
        raise ValueError(f"cannot read MegaDepth scene info {path}: {err}") from None
    if not isinstance(info, dict):
        raise ValueError(f"MegaDepth scene info {path} holds {type(info).__name__}, expected a dict")
    missing = [k for k in SCENE_INFO_KEYS if k not in info]
    if missing:
        raise ValueError(f"MegaDepth scene info {path} lacks keys {missing}")
    return info


def resized_size(w: int, h: int, resize: int | None, df: int | None) -> tuple[int, int]:
    """LoFTR's size rule: long side -> ``resize`` (sides rounded), then each side floored to a multiple of ``df``."""
    if resize is not None:
        s = resize / max(h, w)
        w, h = int(round(w * s)), int(round(h * s))
    if df:
        w, h = w // df * df, h // df * df
    if w < 1 or h < 1:
        raise ValueError(f"image too small for img_resize={resize}, df={df}")
    return w, h


def read_depth_h5(path: str | Path) -> np.ndarray:
    """Depth ``(H, W)`` float32 from an h5 file's ``depth`` dataset; CorruptFileError when unreadable."""
    import h5py

    path = require_file(path, "depth map")
    try:
        with h5py.File(path, "r") as f:
            depth = np.asarray(f["depth"], np.float32)
    except Exception as err:  # OSError (broken file), KeyError (no 'depth') ...
        raise CorruptFileError(f"cannot read depth map {path}: {err}") from None
    if depth.ndim != 2:
        raise CorruptFileError(f"depth map {path} has shape {depth.shape}, expected (H, W)")
    return depth


def _pair_entries(pair_infos: Any) -> list[tuple[int, int, float]]:
    out = []
    for entry in pair_infos:
        (i, j), overlap = entry[0], entry[1]
        out.append((int(i), int(j), float(overlap)))
    return out


class MegaDepthDataset(SkipCorrupt, Dataset):
    """Pairs of one MegaDepth scene-info file, as the project's sample dict (DESIGN.md section 7).

    Args:
        root_dir: folder the scene info's image and depth paths are relative to.
        scene_info_path: the scene-info file.
        mode: ``train`` (overlap filter, depth), ``val`` (depth, all pairs) or ``test`` (all pairs, no depth).
        min_overlap_score, max_overlap_score: train keeps pairs with overlap in (min, max].
        img_resize: long side of the resized images (None: original size).
        df: both sides are floored to a multiple of it (None or 0: no flooring).
        img_padding: zero-pad images to a square (bottom-right) and return masks of the real pixels.
        depth_padding: pad depth maps to this square: True = 2000 (LoFTR), an int, or False/None (no padding).
        load_depth: read depth maps (default: not in test mode).
        skip_corrupt: skip pairs with undecodable files (default: not in test mode); ``max_skip`` bounds it.
    """

    def __init__(
        self,
        root_dir: str | Path,
        scene_info_path: str | Path,
        mode: str = "train",
        min_overlap_score: float = 0.4,
        img_resize: int | None = None,
        *,
        max_overlap_score: float = 1.0,
        df: int | None = 8,
        img_padding: bool = True,
        depth_padding: bool | int | None = True,
        load_depth: bool | None = None,
        skip_corrupt: bool | None = None,
        max_skip: int = 10,
    ) -> None:
        self.root_dir = Path(root_dir)
        self._set_mode(mode, load_depth, skip_corrupt, max_skip)
        self.img_resize = None if img_resize is None else int(img_resize)
        self.df = int(df) if df else None
        self.img_padding = bool(img_padding)
        if depth_padding is True:
            depth_padding = DEPTH_PAD_SIZE
        self.depth_pad = int(depth_padding) if depth_padding else None
        self.scene_info_path = Path(scene_info_path)
        info = load_scene_info(self.scene_info_path)
        self.scene_id = self.scene_info_path.stem
        self.image_paths = list(info["image_paths"])
        self.depth_paths = list(info["depth_paths"])
        self.intrinsics = list(info["intrinsics"])
        self.poses = list(info["poses"])
        pairs = _pair_entries(info["pair_infos"])
        if mode == "train":
            pairs = [p for p in pairs if min_overlap_score < p[2] <= max_overlap_score]

        def usable(i: int) -> bool:
            ok = self.image_paths[i] is not None and self.intrinsics[i] is not None and self.poses[i] is not None
            return ok and (not self.load_depth or self.depth_paths[i] is not None)

        kept = [p for p in pairs if usable(p[0]) and usable(p[1])]
        #: Pairs dropped at construction because an image, depth path, K or pose is None.
        self.dropped_incomplete = len(pairs) - len(kept)
        self.pairs = kept

    def __len__(self) -> int:
        return len(self.pairs)

    def _image(self, path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Image ``(1, H', W')``, mask ``(H', W')``, scale [sx, sy] and the original size (h, w)."""
        gray = read_gray_uint8(path)
        h, w = gray.shape
        w_new, h_new = resized_size(w, h, self.img_resize, self.df)
        if (w_new, h_new) != (w, h):
            gray = cv2.resize(gray, (w_new, h_new), interpolation=cv2.INTER_LINEAR)
        image = to_unit_float(gray)
        mask = np.ones((h_new, w_new), bool)
        if self.img_padding:
            side = max(h_new, w_new)
            image, mask = pad_bottom_right(image, (side, side)), pad_bottom_right(mask, (side, side))
        scale = torch.tensor([w / w_new, h / h_new], dtype=torch.float32)
        return torch.from_numpy(image)[None], torch.from_numpy(mask), scale, (h, w)

    def _depth(self, path: Path | None, original_hw: tuple[int, int]) -> torch.Tensor:
        if not self.load_depth:
            size = (self.depth_pad, self.depth_pad) if self.depth_pad else original_hw
            return torch.zeros(size, dtype=torch.float32)
        depth = read_depth_h5(path)
        if depth.shape != original_hw:
            raise CorruptFileError(f"depth map {path} is {depth.shape[0]}x{depth.shape[1]}, its image {original_hw[0]}x{original_hw[1]}")
        if self.depth_pad:
            if max(depth.shape) > self.depth_pad:
                raise ValueError(f"depth map {path} ({depth.shape[0]}x{depth.shape[1]}) exceeds depth_padding={self.depth_pad}")
            depth = pad_bottom_right(depth, (self.depth_pad, self.depth_pad))
        return torch.from_numpy(depth)

    def _load(self, index: int) -> dict[str, Any]:
        i0, i1, _ = self.pairs[index]
        images = [self.root_dir / self.image_paths[i] for i in (i0, i1)]
        depths = [self.root_dir / self.depth_paths[i] for i in (i0, i1)] if self.load_depth else [None, None]
        for path in images:
            require_file(path, "image")
        for path in depths:
            if path is not None:
                require_file(path, "depth map")
        image0, mask0, scale0, hw0 = self._image(images[0])
        image1, mask1, scale1, hw1 = self._image(images[1])
        P0, P1 = (np.asarray(self.poses[i], np.float64).reshape(4, 4) for i in (i0, i1))
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            T_0to1 = P1 @ np.linalg.inv(P0)
            T_1to0 = P0 @ np.linalg.inv(P1)
        return {
            "image0": image0,
            "image1": image1,
            "depth0": self._depth(depths[0], hw0),
            "depth1": self._depth(depths[1], hw1),
            "K0": torch.from_numpy(np.asarray(self.intrinsics[i0], np.float32).reshape(3, 3).copy()),
            "K1": torch.from_numpy(np.asarray(self.intrinsics[i1], np.float32).reshape(3, 3).copy()),
            "T_0to1": torch.from_numpy(T_0to1.astype(np.float32)),
            "T_1to0": torch.from_numpy(T_1to0.astype(np.float32)),
            "mask0": mask0,
            "mask1": mask1,
            "scale0": scale0,
            "scale1": scale1,
            "dataset_name": "MegaDepth",
            "scene_id": self.scene_id,
            "pair_id": index,
            "pair_names": (str(self.image_paths[i0]), str(self.image_paths[i1])),
        }
