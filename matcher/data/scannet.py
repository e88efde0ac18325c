"""ScanNet pairs in LoFTR's layout (one dataset per index file).

Files (``root_dir`` is e.g. ``data/scannet/train`` or ``data/scannet/test``)::

    root_dir/scene%04d_%02d/color/<id>.jpg     colour frame (read as grayscale, resized to ``image_size``)
    root_dir/scene%04d_%02d/depth/<id>.png     uint16 depth in millimetres (0 = unknown)
    root_dir/scene%04d_%02d/pose/<id>.txt      4x4 camera-to-world matrix (text)
    npz_path        ``name`` uint16 (N, 4) = [scene, sub-scene, id0, id1]; ``score`` float16 (N,) overlap (optional)
    intrinsics_path npz with one 3x3 matrix per scene name ``scene%04d_%02d``, for ``intrinsics_size`` pixels

``<id>`` is the plain integer (``15.jpg``, not zero-padded), as LoFTR's export. The intrinsics of LoFTR's index
files describe 640x480 frames (the exported colour and depth size), so ``intrinsics_size`` defaults to
(480, 640) and ``scale0/1`` = [640 / W, 480 / H] (ones at the default ``image_size``); depth is returned in the
intrinsics frame (resized with nearest neighbour only if the png has another size).

Relative pose: pose files hold camera-to-world matrices C; world-to-camera is inv(C), so
``T_0to1 = inv(C1) @ C0`` (X1 = T_0to1 X0) and ``T_1to0 = inv(C0) @ C1``. ScanNet has invalid poses (rows of
-inf / nan): they are kept as they are (T becomes nan); the evaluation leaves such a pair out and counts it
(``eval/pose.py``: the Skipped column; training validation: ``val/num_skipped``), and training supervision
finds no valid correspondence for it.

Train mode keeps pairs with ``score > min_overlap_score``; val and test keep every listed pair (ScanNet-1500's
``test.npz`` has no score). Depth is read in train and val; in test mode (LoFTR does not read it) the depth
maps are zeros (= unknown) unless ``load_depth=True``. Bad files: see :mod:`matcher.data.common`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from .common import CorruptFileError, SkipCorrupt, load_npz_arrays, read_gray_uint8, require_file, to_unit_float


def intrinsics_table(path: str | Path) -> dict[str, np.ndarray]:
    """``{scene name: K (3, 3) float32}`` of a ScanNet intrinsics npz, read once per file version: training
    builds one dataset per scene (about 1,500), and each would otherwise read the whole file (0.1 s for 2,121
    scenes). Callers get the shared dict and must not modify it."""
    path = require_file(path, "ScanNet intrinsics").resolve()
    stat = path.stat()
    return _read_intrinsics(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _read_intrinsics(path: str, mtime_ns: int, size: int) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float32).reshape(3, 3) for k, v in load_npz_arrays(path, "ScanNet intrinsics").items()}


def scene_name(scene: int, sub: int) -> str:
    return f"scene{int(scene):04d}_{int(sub):02d}"


def read_depth_png(path: str | Path) -> np.ndarray:
    """ScanNet depth png (uint16 millimetres) -> float32 metres ``(H, W)``."""
    path = require_file(path, "depth map")
    depth = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if depth is None or depth.ndim != 2:
        raise CorruptFileError(f"cannot decode depth map (corrupt or not a single-channel png): {path}")
    if depth.dtype != np.uint16:
        raise CorruptFileError(f"depth map is {depth.dtype}, expected uint16 millimetres: {path}")
    return depth.astype(np.float32) / 1000.0


def read_pose_txt(path: str | Path) -> np.ndarray:
    """4x4 camera-to-world matrix from a text file (inf / nan values are kept)."""
    path = require_file(path, "pose file")
    try:
        pose = np.loadtxt(path, dtype=np.float64)
    except ValueError as err:
        raise CorruptFileError(f"cannot parse pose file {path}: {err}") from None
    if pose.shape != (4, 4):
        raise CorruptFileError(f"pose file {path} holds shape {pose.shape}, expected 4x4")
    return pose


def relative_poses(c2w0: np.ndarray, c2w1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(T_0to1, T_1to0)`` from two camera-to-world matrices; nan where a pose is invalid."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        try:
            w2c0, w2c1 = np.linalg.inv(c2w0), np.linalg.inv(c2w1)
        except np.linalg.LinAlgError:  # singular (e.g. all zeros): as invalid as inf
            nan = np.full((4, 4), np.nan)
            return nan, nan.copy()
        return w2c1 @ c2w0, w2c0 @ c2w1


class ScanNetDataset(SkipCorrupt, Dataset):
    """Pairs of one ScanNet index file, as the project's sample dict (DESIGN.md section 7).

    Args:
        root_dir: folder holding the ``scene%04d_%02d`` folders.
        npz_path: index npz (``name``, optional ``score``).
        intrinsics_path: npz of 3x3 intrinsics keyed by scene name.
        mode: ``train`` (overlap filter, depth), ``val`` (depth, all pairs) or ``test`` (all pairs, no depth).
        min_overlap_score: train keeps pairs with ``score`` above it.
        image_size: ``(H, W)`` images are resized to.
        intrinsics_size: ``(H, W)`` of the pixel frame of the intrinsics and depth maps.
        load_depth: read depth maps (default: not in test mode).
        skip_corrupt: skip pairs with undecodable files (default: not in test mode); ``max_skip`` bounds it.
    """

    def __init__(
        self,
        root_dir: str | Path,
        npz_path: str | Path,
        intrinsics_path: str | Path,
        mode: str = "train",
        min_overlap_score: float = 0.4,
        image_size: tuple[int, int] = (480, 640),
        *,
        intrinsics_size: tuple[int, int] = (480, 640),
        load_depth: bool | None = None,
        skip_corrupt: bool | None = None,
        max_skip: int = 10,
    ) -> None:
        self.root_dir = Path(root_dir)
        self._set_mode(mode, load_depth, skip_corrupt, max_skip)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.intrinsics_size = (int(intrinsics_size[0]), int(intrinsics_size[1]))
        self.npz_path = Path(npz_path)
        data = load_npz_arrays(self.npz_path, "ScanNet index", ("name", "score"))
        if "name" not in data:
            raise ValueError(f"ScanNet index {self.npz_path} has no 'name' array")
        names = data["name"].astype(np.int64)
        score = data["score"].astype(np.float32) if "score" in data else None
        if names.ndim != 2 or names.shape[1] != 4:
            raise ValueError(f"ScanNet index {self.npz_path}: 'name' must be (N, 4), got {names.shape}")
        if mode == "train" and score is not None:
            names = names[score > min_overlap_score]
        self.names = names
        self.intrinsics_path = Path(intrinsics_path)
        intrinsics = intrinsics_table(self.intrinsics_path)
        needed = {scene_name(s, q) for s, q in names[:, :2]}
        missing = sorted(needed - set(intrinsics))
        if missing:
            raise ValueError(f"ScanNet intrinsics {self.intrinsics_path} lack scenes {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        self.intrinsics = {k: intrinsics[k] for k in needed}
        h, w = self.image_size
        hk, wk = self.intrinsics_size
        self._scale = torch.tensor([wk / w, hk / h], dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.names)

    def paths(self, index: int) -> dict[str, Path]:
        """The files of pair ``index``: ``color0/1``, ``depth0/1``, ``pose0/1``."""
        scene, sub, id0, id1 = (int(v) for v in self.names[index])
        folder = self.root_dir / scene_name(scene, sub)
        out = {}
        for k, stem in (("0", id0), ("1", id1)):
            out["color" + k] = folder / "color" / f"{stem}.jpg"
            out["depth" + k] = folder / "depth" / f"{stem}.png"
            out["pose" + k] = folder / "pose" / f"{stem}.txt"
        return out

    def _image(self, path: Path) -> torch.Tensor:
        gray = read_gray_uint8(path)
        h, w = self.image_size
        if gray.shape != (h, w):
            gray = cv2.resize(gray, (w, h), interpolation=cv2.INTER_LINEAR)
        return torch.from_numpy(to_unit_float(gray))[None]

    def _depth(self, path: Path) -> torch.Tensor:
        if not self.load_depth:
            return torch.zeros(self.intrinsics_size, dtype=torch.float32)
        depth = read_depth_png(path)
        hk, wk = self.intrinsics_size
        if depth.shape != (hk, wk):
            depth = cv2.resize(depth, (wk, hk), interpolation=cv2.INTER_NEAREST)
        return torch.from_numpy(depth)

    def _load(self, index: int) -> dict[str, Any]:
        paths = self.paths(index)
        needed = ["color0", "color1", "pose0", "pose1"] + (["depth0", "depth1"] if self.load_depth else [])
        for key in needed:  # every missing file is an error, before any decoding
            require_file(paths[key], {"c": "image", "p": "pose file", "d": "depth map"}[key[0]])
        scene = scene_name(*self.names[index][:2])
        T_0to1, T_1to0 = relative_poses(read_pose_txt(paths["pose0"]), read_pose_txt(paths["pose1"]))
        K = torch.from_numpy(self.intrinsics[scene].copy())
        mask = torch.ones(self.image_size, dtype=torch.bool)
        return {
            "image0": self._image(paths["color0"]),
            "image1": self._image(paths["color1"]),
            "depth0": self._depth(paths["depth0"]),
            "depth1": self._depth(paths["depth1"]),
            "K0": K,
            "K1": K.clone(),
            "T_0to1": torch.from_numpy(T_0to1.astype(np.float32)),
            "T_1to0": torch.from_numpy(T_1to0.astype(np.float32)),
            "mask0": mask,
            "mask1": mask.clone(),
            "scale0": self._scale.clone(),
            "scale1": self._scale.clone(),
            "dataset_name": "ScanNet",
            "scene_id": scene,
            "pair_id": index,
            "pair_names": (
                f"{scene}/color/{int(self.names[index][2])}.jpg",
                f"{scene}/color/{int(self.names[index][3])}.jpg",
            ),
        }
