"""File-backed datasets (matcher.data.scannet / megadepth / homography), build_datasets, the homography branch
of matcher.validation, eval/pose.py on ScanNet files and datasets/check_layout.py.

Fixtures are written here in the REAL on-disk formats (LoFTR's ScanNet export and index npz files,
MegaDepth's pickled scene-info dicts and h5 depth maps) from KNOWN geometry, so that the expected values are
computed independently of the code under test.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import h5py
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import ConcatDataset, DataLoader

from matcher.data.common import CorruptDataWarning, CorruptFileError
from matcher.data.homography import HomographyDataset
from matcher.data.megadepth import MegaDepthDataset, load_scene_info, resized_size
from matcher.data.scannet import ScanNetDataset
from matcher.data_factory import VIRTUAL_TRAIN_SCENES, build_datasets, rank_scenes
from matcher.training import DataError, MatcherDataModule

from .conftest import load_script

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "data"


def texture(h: int, w: int, seed: int, cell: int = 4) -> np.ndarray:
    """Smooth random texture, uint8 ``(h, w)``: noise on a ``cell``-pixel grid, cubic upsampling."""
    rng = np.random.default_rng(seed)
    noise = rng.random((h // cell + 2, w // cell + 2)).astype(np.float32)
    img = cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.rint(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


def rigid(rotvec: tuple[float, float, float], t: tuple[float, float, float]) -> np.ndarray:
    """4x4 rigid transform from an axis-angle rotation and a translation."""
    T = np.eye(4)
    T[:3, :3] = cv2.Rodrigues(np.asarray(rotvec, np.float64))[0]
    T[:3, 3] = t
    return T


def object_array(items: list[Any]) -> np.ndarray:
    """1-D object array of ``items`` (numpy would otherwise stack equal-shaped entries)."""
    out = np.empty(len(items), object)
    for i, item in enumerate(items):
        out[i] = item
    return out


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return next(iter(DataLoader(batch, batch_size=len(batch))))


# =============================================================================================== ScanNet fixture
# LoFTR's export: 640x480 colour jpg and uint16-millimetre depth png per frame, intrinsics for 640x480.
SCANNET_HW = (480, 640)
FOCAL = 320.0
K_SCANNET = np.array([[FOCAL, 0.0, 319.5], [0.0, FOCAL, 239.5], [0.0, 0.0, 1.0]])
K_OTHER_SCENE = np.array([[500.0, 0.0, 320.0], [0.0, 500.0, 240.0], [0.0, 0.0, 1.0]])
PLANE_MM = 2000  # frames 0 and 15 see a fronto-parallel plane at 2 m
BASELINE = 0.1  # frame 15 is frame 0 moved 0.1 m along +x: the plane shifts by FOCAL * 0.1 / 2 = 16 px left
SHIFT_PX = 16
CAMERA_TO_WORLD = {
    0: np.eye(4),
    15: rigid((0, 0, 0), (BASELINE, 0, 0)),
    30: rigid((0.1, -0.2, 0.05), (0.3, -0.1, 0.2)),
    45: np.full((4, 4), -np.inf),  # ScanNet's invalid poses
}
# Train index of scene0000_00: [scene, sub-scene, id0, id1] and overlap; train keeps score > 0.4 (rows 0, 2, 3, 4).
TRAIN_NAMES = np.array([[0, 0, 0, 15], [0, 0, 0, 30], [0, 0, 15, 30], [0, 0, 30, 45], [0, 0, 15, 0]], np.uint16)
TRAIN_SCORES = np.array([0.9, 0.2, 0.6, 0.5, 0.45], np.float16)
TRAIN_KEPT = [0, 2, 3, 4]
TEST_NAMES = np.array([[0, 0, 0, 15], [0, 0, 15, 30]], np.uint16)  # ScanNet-1500 style: no score


def scannet_depth_mm(frame: int) -> np.ndarray:
    """uint16 millimetres ``(480, 640)``: the plane for frames 0/15/45, varied values with holes for 30."""
    if frame != 30:
        return np.full(SCANNET_HW, PLANE_MM, np.uint16)
    depth = np.random.default_rng(30).integers(500, 6000, SCANNET_HW).astype(np.uint16)
    depth[:40, :60] = 0
    return depth


def write_scannet_scene(folder: Path, seed: int) -> None:
    """One scene folder: color/ID.jpg (3-channel), depth/ID.png (uint16 mm), pose/ID.txt (camera-to-world)."""
    for sub in ("color", "depth", "pose"):
        (folder / sub).mkdir(parents=True)
    plane = texture(SCANNET_HW[0], SCANNET_HW[1] + SHIFT_PX, seed)
    gray = {0: plane[:, : SCANNET_HW[1]], 15: plane[:, SHIFT_PX:], 30: texture(*SCANNET_HW, seed + 1), 45: texture(*SCANNET_HW, seed + 2)}
    for frame, image in gray.items():
        colour = np.dstack([image, image // 2 + image // 4, image // 2 + 127])  # BGR, gray keeps the contrast
        cv2.imwrite(str(folder / "color" / f"{frame}.jpg"), colour, [cv2.IMWRITE_JPEG_QUALITY, 95])
        cv2.imwrite(str(folder / "depth" / f"{frame}.png"), scannet_depth_mm(frame))
        np.savetxt(folder / "pose" / f"{frame}.txt", CAMERA_TO_WORLD[frame])


def make_scannet(base: Path) -> dict[str, Path]:
    """LoFTR's ScanNet layout under ``base/scannet``: train/ and test/ scene folders, per-scene train index
    npz files, train intrinsics, ScanNet-1500-style test.npz + intrinsics. Returns the paths by name."""
    root = base / "scannet"
    paths = {
        "root": root, "train": root / "train", "test": root / "test",
        "index_dir": root / "index" / "scene_data" / "train", "intrinsics": root / "index" / "intrinsics.npz",
        "test_npz": root / "index" / "scene_data" / "test" / "test.npz",
        "test_intrinsics": root / "index" / "scene_data" / "test" / "intrinsics.npz",
    }
    write_scannet_scene(paths["train"] / "scene0000_00", 0)
    write_scannet_scene(paths["train"] / "scene0001_00", 10)
    write_scannet_scene(paths["test"] / "scene0000_00", 0)
    paths["index_dir"].mkdir(parents=True)
    paths["test_npz"].parent.mkdir(parents=True)
    paths["npz"] = paths["index_dir"] / "scene0000_00.npz"
    np.savez(paths["npz"], name=TRAIN_NAMES, score=TRAIN_SCORES)
    np.savez(paths["index_dir"] / "scene0001_00.npz", name=np.array([[1, 0, 0, 15], [1, 0, 15, 30]], np.uint16),
             score=np.array([0.8, 0.3], np.float16))
    np.savez(paths["intrinsics"], scene0000_00=K_SCANNET, scene0001_00=K_OTHER_SCENE)
    np.savez(paths["test_npz"], name=TEST_NAMES)
    np.savez(paths["test_intrinsics"], scene0000_00=K_SCANNET)
    return paths


@pytest.fixture(scope="module")
def scannet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Read-only ScanNet fixture shared by the tests of this module (tests that break files make their own)."""
    return make_scannet(tmp_path_factory.mktemp("scannet"))


def scannet_train(paths: dict[str, Path], **kwargs: Any) -> ScanNetDataset:
    kwargs = {"mode": "train", "image_size": (240, 320), **kwargs}
    return ScanNetDataset(paths["train"], paths["npz"], paths["intrinsics"], **kwargs)


# =============================================================================================== ScanNet tests
def test_scannet_overlap_filter_in_train_all_pairs_in_val_and_test(scannet: dict[str, Path]) -> None:
    train = scannet_train(scannet)
    assert len(train) == len(TRAIN_KEPT)
    np.testing.assert_array_equal(train.names, TRAIN_NAMES[TRAIN_KEPT].astype(np.int64))
    for mode in ("val", "test"):
        assert len(scannet_train(scannet, mode=mode)) == len(TRAIN_NAMES)
    assert len(scannet_train(scannet, min_overlap_score=0.55)) == 2  # 0.9 and 0.6
    test = ScanNetDataset(scannet["test"], scannet["test_npz"], scannet["test_intrinsics"], "train")
    assert len(test) == len(TEST_NAMES)  # no score: nothing to filter on


def test_scannet_sample_contract_geometry_and_resize(scannet: dict[str, Path]) -> None:
    """Keys / shapes / dtypes of DESIGN.md section 7; T_0to1 = inv(C1) C0 checked on world points; K; depth
    in metres; images resized to image_size with scale0/1 = intrinsics size / image size."""
    ds = scannet_train(scannet)
    sample = ds[1]  # pair (15, 30): general relative pose, varied depth
    assert sample["image0"].shape == (1, 240, 320) and sample["image0"].dtype == torch.float32
    assert sample["depth0"].shape == SCANNET_HW and sample["depth0"].dtype == torch.float32
    for key, shape in (("K0", (3, 3)), ("K1", (3, 3)), ("T_0to1", (4, 4)), ("T_1to0", (4, 4)), ("scale0", (2,)), ("scale1", (2,))):
        assert sample[key].shape == shape and sample[key].dtype == torch.float32, key
    assert sample["mask0"].shape == (240, 320) and sample["mask0"].dtype == torch.bool and bool(sample["mask0"].all())
    assert sample["dataset_name"] == "ScanNet" and sample["scene_id"] == "scene0000_00" and sample["pair_id"] == 1
    assert sample["pair_names"] == ("scene0000_00/color/15.jpg", "scene0000_00/color/30.jpg")
    # geometry: a world point seen by camera 0 lands where camera 1 sees it
    C0, C1 = CAMERA_TO_WORLD[15], CAMERA_TO_WORLD[30]
    world = np.array([[0.3, -0.2, 2.5, 1.0], [-1.0, 0.5, 4.0, 1.0]]).T
    X0, X1 = np.linalg.solve(C0, world), np.linalg.solve(C1, world)
    np.testing.assert_allclose(sample["T_0to1"].double().numpy() @ X0, X1, atol=1e-5)
    np.testing.assert_allclose(sample["T_1to0"].double().numpy() @ X1, X0, atol=1e-5)
    np.testing.assert_allclose(sample["K0"].numpy(), K_SCANNET, atol=1e-6)
    np.testing.assert_allclose(sample["K1"].numpy(), K_SCANNET, atol=1e-6)
    np.testing.assert_array_equal(sample["depth1"].numpy(), scannet_depth_mm(30).astype(np.float32) / 1000.0)
    assert float(sample["depth1"][0, 0]) == 0.0 and float(sample["depth0"].max()) == pytest.approx(PLANE_MM / 1000)
    np.testing.assert_allclose(sample["scale0"].numpy(), [2.0, 2.0])  # 640x480 intrinsics frame, 320x240 images
    gray = cv2.imread(str(scannet["train"] / "scene0000_00" / "color" / "30.jpg"), cv2.IMREAD_GRAYSCALE)
    expected = cv2.resize(gray, (320, 240), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255
    np.testing.assert_allclose(sample["image1"][0].numpy(), expected, atol=1e-6)
    # non-uniform resize: scale differs per axis
    odd = scannet_train(scannet, image_size=(120, 320))[0]
    assert odd["image0"].shape == (1, 120, 320)
    np.testing.assert_allclose(odd["scale0"].numpy(), [2.0, 4.0])


def test_scannet_intrinsics_file_is_read_once_per_version(scannet: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    """One dataset per scene shares one read of the intrinsics npz; a rewritten file is read again."""
    import matcher.data.scannet as scannet_module

    reads = []
    load = scannet_module.load_npz_arrays
    intrinsics = tmp_path / "intrinsics.npz"
    counted = lambda path, *a, **k: (Path(path).name == intrinsics.name and reads.append(path)) or load(path, *a, **k)  # noqa: E731
    monkeypatch.setattr(scannet_module, "load_npz_arrays", counted)
    np.savez(intrinsics, scene0000_00=K_SCANNET, scene0001_00=K_OTHER_SCENE)
    scenes = [ScanNetDataset(scannet["train"], scannet["index_dir"] / f"scene000{i}_00.npz", intrinsics, "val") for i in (0, 1)]
    assert len(reads) == 1
    np.testing.assert_allclose(scenes[1][0]["K0"].numpy(), K_OTHER_SCENE)
    np.savez(intrinsics, scene0000_00=K_SCANNET, scene0001_00=2 * K_OTHER_SCENE, extra=np.eye(3))
    rebuilt = ScanNetDataset(scannet["train"], scannet["index_dir"] / "scene0001_00.npz", intrinsics, "val")
    assert len(reads) == 2
    np.testing.assert_allclose(rebuilt[0]["K0"].numpy(), 2 * K_OTHER_SCENE)


def test_scannet_invalid_pose_gives_nan_and_test_mode_skips_depth(scannet: dict[str, Path]) -> None:
    ds = scannet_train(scannet)
    assert torch.isnan(ds[2]["T_0to1"]).all()  # pair (30, 45): frame 45 has an -inf pose
    test = ScanNetDataset(scannet["test"], scannet["test_npz"], scannet["test_intrinsics"], "test", image_size=(240, 320))
    sample = test[0]
    assert sample["depth0"].shape == SCANNET_HW and not bool(sample["depth0"].any())  # not read in test mode


def test_scannet_intrinsics_are_per_scene(scannet: dict[str, Path]) -> None:
    ds = ScanNetDataset(scannet["train"], scannet["index_dir"] / "scene0001_00.npz", scannet["intrinsics"], "val", image_size=(240, 320))
    np.testing.assert_allclose(ds[0]["K0"].numpy(), K_OTHER_SCENE)
    assert ds[0]["scene_id"] == "scene0001_00"
    with pytest.raises(ValueError, match="scene0001_00"):  # intrinsics file without the scene
        ScanNetDataset(scannet["train"], scannet["index_dir"] / "scene0001_00.npz", scannet["test_intrinsics"], "val")


def test_scannet_collates_in_a_dataloader(scannet: dict[str, Path]) -> None:
    batch = next(iter(DataLoader(scannet_train(scannet), batch_size=2, shuffle=False)))
    assert batch["image0"].shape == (2, 1, 240, 320) and batch["depth1"].shape == (2, *SCANNET_HW)
    assert batch["K0"].shape == (2, 3, 3) and batch["T_0to1"].shape == (2, 4, 4) and batch["scale1"].shape == (2, 2)
    assert batch["mask0"].shape == (2, 240, 320) and batch["mask0"].dtype == torch.bool
    assert batch["pair_id"].tolist() == [0, 1] and list(batch["scene_id"]) == ["scene0000_00"] * 2
    assert len(batch["pair_names"]) == 2


def test_scannet_supervision_of_a_translated_plane(scannet: dict[str, Path]) -> None:
    """Pair (0, 15): the plane shifts 16 px left in the 640x480 K frame = 8 px = one coarse cell at 320x240.
    Coarse cell (x, y) of image0 must match exactly cell (x - 1, y) of image1, for every x >= 1."""
    from matcher.supervision import coarse_supervision

    batch = collate([scannet_train(scannet)[0]])
    hw_c = (240 // 8, 320 // 8)
    spv = coarse_supervision(batch, hw_c, hw_c, 8)
    got = set(zip(spv["spv_i_ids"].tolist(), spv["spv_j_ids"].tolist()))
    expected = {(y * hw_c[1] + x, y * hw_c[1] + x - 1) for y in range(hw_c[0]) for x in range(1, hw_c[1])}
    assert got == expected
    assert spv["conf_matrix_gt"].sum().item() == len(expected)


# =============================================================================================== MegaDepth fixture
MD_SIZES = {"a": (60, 100), "b": (100, 70), "c": (64, 64)}  # (h, w) of the original images
MD_RESIZE, MD_DF, MD_DEPTH_PAD = 50, 8, 128
# hand-computed: long side -> 50 (rounded), then floored to multiples of 8; (w', h')
MD_RESIZED = {"a": (48, 24), "b": (32, 48), "c": (48, 48)}
MD_IMAGES = ["a", "b", None, "c"]  # index 2: an image without data (None paths, K and pose)
MD_PAIRS = [((0, 1), 0.5), ((0, 2), 0.6), ((1, 3), 0.05), ((0, 3), 0.9), ((3, 1), 0.3), ((1, 0), 0.7), ((3, 0), 0.1)]
MD_TRAIN_KEPT = [(0, 1), (3, 1), (1, 0)]  # overlap in (0.1, 0.7] and no None: (0, 2) is dropped as incomplete


def md_pose(i: int) -> np.ndarray:
    """World-to-camera pose of image ``i``."""
    return rigid((0.05 * i, -0.1 * i, 0.02), (0.2 * i, 0.1, -0.3 * i))


def md_depth(name: str) -> np.ndarray:
    h, w = MD_SIZES[name]
    return np.random.default_rng(ord(name)).uniform(1.0, 50.0, (h, w)).astype(np.float32)


def md_intrinsics(name: str) -> np.ndarray:
    h, w = MD_SIZES[name]
    return np.array([[1.2 * w, 0, w / 2], [0, 1.2 * w, h / 2], [0, 0, 1.0]])


def make_megadepth(base: Path) -> dict[str, Path]:
    """LoFTR's MegaDepth layout under ``base/megadepth``: images in Undistorted_SfM, depth h5 in phoenix/...,
    a pickled scene-info dict named .npz in index/scene_info_0.1_0.7 and in index/scene_info_val_1500."""
    root = base / "megadepth"
    image_dir = root / "Undistorted_SfM" / "0015" / "images"
    depth_dir = root / "phoenix" / "S6" / "zl548" / "MegaDepth_v1" / "0015" / "dense0" / "depths"
    image_dir.mkdir(parents=True)
    depth_dir.mkdir(parents=True)
    for name, (h, w) in MD_SIZES.items():
        cv2.imwrite(str(image_dir / f"{name}.jpg"), texture(h, w, ord(name)))
        with h5py.File(depth_dir / f"{name}.h5", "w") as f:
            f.create_dataset("depth", data=md_depth(name))
    known = [n is not None for n in MD_IMAGES]
    info = {
        "image_paths": object_array([f"Undistorted_SfM/0015/images/{n}.jpg" if n else None for n in MD_IMAGES]),
        "depth_paths": object_array([f"phoenix/S6/zl548/MegaDepth_v1/0015/dense0/depths/{n}.h5" if n else None for n in MD_IMAGES]),
        "intrinsics": object_array([md_intrinsics(n) if n else None for n in MD_IMAGES]),
        "poses": object_array([md_pose(i) if ok else None for i, ok in enumerate(known)]),
        "pair_infos": [(pair, overlap, np.zeros((3, 4))) for pair, overlap in MD_PAIRS],
    }
    paths = {"root": root, "train_dir": root / "index" / "scene_info_0.1_0.7", "val_dir": root / "index" / "scene_info_val_1500"}
    for key in ("train_dir", "val_dir"):
        paths[key].mkdir(parents=True)
        with open(paths[key] / "0015_0.1_0.3.npz", "wb") as f:  # as LoFTR ships them: a pickle named .npz
            pickle.dump(info, f)
    paths["scene_info"] = paths["train_dir"] / "0015_0.1_0.3.npz"
    paths["images"], paths["depths"] = image_dir, depth_dir
    return paths


@pytest.fixture(scope="module")
def megadepth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_megadepth(tmp_path_factory.mktemp("megadepth"))


def md_dataset(paths: dict[str, Path], mode: str = "train", **kwargs: Any) -> MegaDepthDataset:
    kwargs = {"min_overlap_score": 0.1, "max_overlap_score": 0.7, "df": MD_DF, "depth_padding": MD_DEPTH_PAD, **kwargs}
    return MegaDepthDataset(paths["root"], paths["scene_info"], mode, img_resize=MD_RESIZE, **kwargs)


# =============================================================================================== MegaDepth tests
def test_resized_size_rule() -> None:
    assert resized_size(100, 60, 50, 8) == (48, 24)
    assert resized_size(1600, 1063, 840, 8) == (840, 552)  # 1063 * 0.525 = 558.1 -> 558 -> 552
    assert resized_size(1063, 1600, 832, 8) == (552, 832)  # 1063 * 0.52 = 552.8 -> 553 -> 552
    assert resized_size(75, 100, 50, None) == (38, 50)  # 37.5 rounds to 38
    assert resized_size(100, 60, None, 16) == (96, 48)
    with pytest.raises(ValueError):
        resized_size(100, 6, 50, 8)


def test_scene_info_formats(megadepth: dict[str, Path], tmp_path: Path) -> None:
    """The pickled dict named .npz (LoFTR), a real npz archive of object arrays and a .npy holding the dict."""
    info = load_scene_info(megadepth["scene_info"])
    assert list(info["image_paths"]) == [f"Undistorted_SfM/0015/images/{n}.jpg" if n else None for n in MD_IMAGES]
    archive, npy = tmp_path / "archive.npz", tmp_path / "dict.npy"
    np.savez(archive, **{k: object_array(list(v)) for k, v in info.items()})
    np.save(npy, info, allow_pickle=True)
    for path in (archive, npy):
        other = load_scene_info(path)
        assert list(other["image_paths"]) == list(info["image_paths"])
        assert len(other["pair_infos"]) == len(MD_PAIRS)
    with pytest.raises(FileNotFoundError, match="nothing.npz"):
        load_scene_info(tmp_path / "nothing.npz")
    with open(tmp_path / "partial.npz", "wb") as f:
        pickle.dump({"image_paths": []}, f)
    with pytest.raises(ValueError, match="pair_infos"):
        load_scene_info(tmp_path / "partial.npz")


def test_megadepth_pair_filter_and_incomplete_pairs(megadepth: dict[str, Path]) -> None:
    train = md_dataset(megadepth)
    assert [(i, j) for i, j, _ in train.pairs] == MD_TRAIN_KEPT
    assert train.dropped_incomplete == 1
    val = md_dataset(megadepth, "val")
    assert len(val) == len(MD_PAIRS) - 1 and val.dropped_incomplete == 1
    # without the overlap window only the incomplete pair goes
    ds = md_dataset(megadepth, min_overlap_score=0.0, max_overlap_score=1.0)
    assert len(ds) == len(MD_PAIRS) - 1


def test_megadepth_sample_resize_padding_scale_depth_pose(megadepth: dict[str, Path]) -> None:
    ds = md_dataset(megadepth)
    sample = ds[0]  # pair (a, b)
    for k, name in (("0", "a"), ("1", "b")):
        (h, w), (w_new, h_new) = MD_SIZES[name], MD_RESIZED[name]
        image, mask = sample["image" + k], sample["mask" + k]
        assert image.shape == (1, 48, 48) and mask.shape == (48, 48) and mask.dtype == torch.bool
        assert bool(mask[:h_new, :w_new].all()) and int(mask.sum()) == h_new * w_new  # True exactly on real pixels
        assert not bool(image[0][~mask].any())  # zero padding
        gray = cv2.imread(str(megadepth["images"] / f"{name}.jpg"), cv2.IMREAD_GRAYSCALE)
        expected = cv2.resize(gray, (w_new, h_new), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255
        np.testing.assert_allclose(image[0, :h_new, :w_new].numpy(), expected, atol=1e-6)
        np.testing.assert_allclose(sample["scale" + k].numpy(), [w / w_new, h / h_new], rtol=1e-6)
        depth = sample["depth" + k]
        assert depth.shape == (MD_DEPTH_PAD, MD_DEPTH_PAD)
        np.testing.assert_array_equal(depth[:h, :w].numpy(), md_depth(name))
        assert float(depth.sum()) == pytest.approx(float(md_depth(name).sum()), rel=1e-5)  # zeros elsewhere
        np.testing.assert_allclose(sample["K" + k].numpy(), md_intrinsics(name), rtol=1e-6)
    world = np.array([[0.3, -0.2, 5.0, 1.0], [2.0, 1.0, 9.0, 1.0]]).T
    X0, X1 = md_pose(0) @ world, md_pose(1) @ world
    np.testing.assert_allclose(sample["T_0to1"].double().numpy() @ X0, X1, atol=1e-4)
    np.testing.assert_allclose(sample["T_1to0"].double().numpy() @ X1, X0, atol=1e-4)
    assert sample["dataset_name"] == "MegaDepth" and sample["scene_id"] == "0015_0.1_0.3"
    assert sample["pair_names"] == ("Undistorted_SfM/0015/images/a.jpg", "Undistorted_SfM/0015/images/b.jpg")
    batch = next(iter(DataLoader(ds, batch_size=2)))  # padded sizes collate
    assert batch["image1"].shape == (2, 1, 48, 48) and batch["depth0"].shape == (2, MD_DEPTH_PAD, MD_DEPTH_PAD)


def test_megadepth_without_padding_and_in_test_mode(megadepth: dict[str, Path]) -> None:
    sample = md_dataset(megadepth, img_padding=False, depth_padding=False)[0]
    assert sample["image0"].shape == (1, 24, 48) and sample["image1"].shape == (1, 48, 32)
    assert sample["depth0"].shape == MD_SIZES["a"] and bool(sample["mask1"].all())
    test = md_dataset(megadepth, "test")[0]
    assert test["depth0"].shape == (MD_DEPTH_PAD, MD_DEPTH_PAD) and not bool(test["depth0"].any())


# =============================================================================================== bad data
def test_missing_scannet_files_name_their_path(tmp_path: Path) -> None:
    paths = make_scannet(tmp_path)
    ds = scannet_train(paths)
    scene = paths["train"] / "scene0000_00"
    for missing in (scene / "color" / "15.jpg", scene / "depth" / "0.png", scene / "pose" / "15.txt"):
        backup = missing.read_bytes()
        missing.unlink()
        with pytest.raises(FileNotFoundError, match=str(missing)):
            ds[0]  # pair (0, 15): a missing file is never skipped, in train mode either
        missing.write_bytes(backup)
    assert ds.skipped == 0
    with pytest.raises(FileNotFoundError, match="nothing.npz"):
        ScanNetDataset(paths["train"], paths["index_dir"] / "nothing.npz", paths["intrinsics"])
    with pytest.raises(FileNotFoundError, match="no_intrinsics.npz"):
        ScanNetDataset(paths["train"], paths["npz"], tmp_path / "no_intrinsics.npz")


@pytest.mark.parametrize(
    "broken, returned", [("color/0.jpg", 1), ("pose/0.txt", 1), ("pose/15.txt", 2), ("depth/15.png", 2)]
)
def test_corrupt_scannet_file_is_skipped_in_train_and_raised_in_test(tmp_path: Path, broken: str, returned: int) -> None:
    """Train pairs: 0 = (0, 15), 1 = (15, 30), 2 = (30, 45). A corrupt file of frame 0 skips pair 0, one of
    frame 15 skips pairs 0 and 1; the first intact pair is returned and ``skipped`` counts the others."""
    paths = make_scannet(tmp_path)
    target = paths["train"] / "scene0000_00" / broken
    if broken == "pose/15.txt":
        target.write_text("1 0 0\n0 1 0\n0 0 1\n")  # a 3x3 matrix
    elif broken.startswith("pose"):
        target.write_text("not a pose\n")
    else:
        target.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    ds = scannet_train(paths)
    with pytest.warns(CorruptDataWarning, match=str(target)):
        sample = ds[0]
    assert ds.skipped == returned and sample["pair_id"] == returned
    assert sample["pair_names"][0] == f"scene0000_00/color/{[0, 15, 30][returned]}.jpg"
    assert ds[returned]["pair_id"] == returned and ds.skipped == returned  # an intact pair is not skipped
    strict = scannet_train(paths, mode="test", load_depth=True)
    with pytest.raises(CorruptFileError, match=str(target)):
        strict[0]
    assert strict.skipped == 0


def test_corrupt_pair_sequence_wraps_and_gives_up(tmp_path: Path) -> None:
    """Every pair corrupt: the dataset tries max_skip + 1 pairs, then raises (no endless loop)."""
    paths = make_scannet(tmp_path)
    for frame in (0, 15, 30, 45):
        (paths["train"] / "scene0000_00" / "pose" / f"{frame}.txt").write_text("x\n")
    ds = scannet_train(paths, max_skip=2)
    with pytest.warns(CorruptDataWarning), pytest.raises(RuntimeError, match="consecutive"):
        ds[3]
    assert ds.skipped == 3


def test_megadepth_bad_files(tmp_path: Path) -> None:
    paths = make_megadepth(tmp_path)
    depth_b = paths["depths"] / "b.h5"
    depth_b.write_bytes(b"\x89HDF broken" * 50)
    ds = md_dataset(paths)  # train pairs: (a, b), (c, b), (b, a) -> all use b
    ds.max_skip = 5
    with pytest.warns(CorruptDataWarning, match=str(depth_b)), pytest.raises(RuntimeError, match="consecutive"):
        ds[0]
    assert ds.skipped == 3
    val = md_dataset(paths, "val")
    pairs = [(i, j) for i, j, _ in val.pairs]
    with pytest.warns(CorruptDataWarning, match="b.h5"):
        sample = val[pairs.index((1, 3))]  # (b, c) corrupt -> the next listed pair (a, c)
    assert val.skipped == 1 and sample["pair_names"][0].endswith("a.jpg")
    with pytest.raises(CorruptFileError, match="b.h5"):
        md_dataset(paths, "test", load_depth=True)[0]
    image_a = paths["images"] / "a.jpg"
    image_a.write_bytes(b"garbage" * 100)
    with pytest.raises(CorruptFileError, match=str(image_a)):
        md_dataset(paths, "test")[0]
    image_a.unlink()
    with pytest.raises(FileNotFoundError, match=str(image_a)):
        md_dataset(paths, "val")[0]
    (paths["depths"] / "c.h5").unlink()
    with pytest.raises(FileNotFoundError, match="c.h5"):
        md_dataset(paths, "train")[1]  # (c, b): missing beats corrupt, never skipped


# =============================================================================================== homography
def make_image_folder(folder: Path, n: int, hw: tuple[int, int] = (120, 160)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cv2.imwrite(str(folder / f"img{i:02d}.png"), texture(*hw, 100 + i, cell=12))
    return folder


def test_homography_dataset_is_deterministic(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "images", 4)
    ds = HomographyDataset(folder, 5, (48, 64), seed=3, val_fraction=0.0)
    a, b = ds[1], HomographyDataset(folder, 5, (48, 64), seed=3, val_fraction=0.0)[1]
    for key in ("image0", "image1", "H_0to1"):
        assert torch.equal(a[key], b[key]), key
    assert a["image0"].shape == (1, 48, 64) and a["H_0to1"].shape == (3, 3) and a["dataset_name"] == "homography"
    assert not torch.equal(ds[2]["image0"], a["image0"]) and not torch.allclose(ds[2]["H_0to1"], a["H_0to1"])
    other_seed = HomographyDataset(folder, 5, (48, 64), seed=4, val_fraction=0.0)[1]
    assert not torch.allclose(other_seed["H_0to1"], a["H_0to1"])


def test_homography_maps_image0_onto_image1(tmp_path: Path) -> None:
    """Without photometric changes image1 = image0 warped by H_0to1 wherever H^-1 lands inside image0."""
    folder = make_image_folder(tmp_path / "images", 3)
    ds = HomographyDataset(folder, 6, (48, 64), seed=0, val_fraction=0.0, photometric=False)
    h, w = 48, 64
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    for i in range(6):
        s = ds[i]
        img0, img1, H = s["image0"][0].numpy(), s["image1"][0].numpy(), s["H_0to1"].double().numpy()
        back = np.stack([xs.ravel(), ys.ravel(), np.ones(h * w)]).T @ np.linalg.inv(H).T
        bx, by = back[:, 0] / back[:, 2], back[:, 1] / back[:, 2]
        valid = ((bx > 2) & (bx < w - 3) & (by > 2) & (by < h - 3)).reshape(h, w)
        assert valid.sum() > 0.2 * h * w
        err = np.abs(cv2.warpPerspective(img0, H, (w, h), flags=cv2.INTER_LINEAR) - img1)[valid].mean()
        off = np.array([[1, 0, 3], [0, 1, 0], [0, 0, 1.0]]) @ H  # the true warp followed by a 3 px shift
        err_off = np.abs(cv2.warpPerspective(img0, off, (w, h), flags=cv2.INTER_LINEAR) - img1)[valid].mean()
        assert err < 0.01 and err_off > 0.05, (i, err, err_off)


def test_homography_supervision(tmp_path: Path) -> None:
    """Coarse ground truth of homography batches: a shift by (8, 16) px moves cell (x, y) to (x + 1, y + 2);
    on dataset pairs every positive (i, j) has H(cell i) within half a cell of cell j."""
    from matcher.supervision import coarse_supervision

    hw_c = (48 // 8, 64 // 8)
    shift = torch.tensor([[1.0, 0, 8], [0, 1, 16], [0, 0, 1]])
    spv = coarse_supervision({"image0": torch.zeros(1, 1, 48, 64), "image1": torch.zeros(1, 1, 48, 64), "H_0to1": shift[None]}, hw_c, hw_c)
    got = set(zip(spv["spv_i_ids"].tolist(), spv["spv_j_ids"].tolist()))
    w = hw_c[1]
    assert got == {(y * w + x, (y + 2) * w + x + 1) for y in range(hw_c[0] - 2) for x in range(w - 1) if y or x}
    folder = make_image_folder(tmp_path / "images", 2, (60, 80))
    batch = collate([HomographyDataset(folder, 2, (48, 64), val_fraction=0.0)[i] for i in range(2)])
    spv = coarse_supervision(batch, hw_c, hw_c)
    b, i, j = spv["spv_b_ids"], spv["spv_i_ids"], spv["spv_j_ids"]
    assert len(i) > 10
    index = torch.arange(hw_c[0] * w)
    cells = torch.stack([index % w, index // w], -1).float() * 8  # (L, 2) pixel of each coarse cell
    ones = torch.ones(len(i), 1)
    warped = torch.einsum("nij,nj->ni", batch["H_0to1"][b], torch.cat([cells[i], ones], 1))
    assert ((warped[:, :2] / warped[:, 2:] - cells[j]).abs() <= 4.0 + 1e-4).all()


def test_homography_splits_and_errors(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "images", 10, (40, 50))
    train = HomographyDataset(folder, 50, (32, 40), split="train", val_fraction=0.2)
    val = HomographyDataset(folder, 20, (32, 40), split="val", val_fraction=0.2)
    names = sorted(p.name for p in folder.iterdir())
    assert [p.name for p in train.files] == names[:8] and [p.name for p in val.files] == names[8:]
    assert {train[i]["scene_id"] for i in range(50)} <= set(names[:8])
    assert {val[i]["scene_id"] for i in range(20)} <= set(names[8:])
    assert not torch.equal(train[0]["image0"], val[0]["image0"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image")
    with pytest.raises(FileNotFoundError, match="empty"):
        HomographyDataset(tmp_path / "empty", 3)
    with pytest.raises(FileNotFoundError, match="absent"):
        HomographyDataset(tmp_path / "absent", 3)
    single = make_image_folder(tmp_path / "single", 1, (40, 50))
    with pytest.raises(ValueError, match="too few"):
        HomographyDataset(single, 3, val_fraction=0.1)
    assert len(HomographyDataset(single, 3, (32, 40), val_fraction=0.0).files) == 1
    with pytest.raises(ValueError, match="split"):
        HomographyDataset(folder, 3, split="test")


def test_homography_corrupt_image_is_skipped(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "images", 2, (40, 50))
    (folder / "img00.png").write_bytes(b"not a png" * 20)
    ds = HomographyDataset(folder, 8, (32, 40), val_fraction=0.0)
    with pytest.warns(CorruptDataWarning, match="img00.png"):
        names = {ds[i]["scene_id"] for i in range(8)}
    assert names == {"img01.png"} and ds.skipped > 0


# =============================================================================================== build_datasets
def data_config(name: str, **overrides: Any):
    """configs/data/NAME.yaml with the fixture's paths merged in (as the training script composes it)."""
    return OmegaConf.merge(OmegaConf.load(CONFIGS / f"{name}.yaml"), OmegaConf.create(overrides))


def scannet_overrides(paths: dict[str, Path]) -> dict[str, Any]:
    return {
        "root": str(paths["root"]), "train_index_dir": str(paths["index_dir"]), "train_intrinsics": str(paths["intrinsics"]),
        "val_npz": str(paths["test_npz"]), "val_intrinsics": str(paths["test_intrinsics"]), "val_root": str(paths["test"]),
        "image_size": [240, 320], "samples_per_scene": 3,
    }


def megadepth_overrides(paths: dict[str, Path]) -> dict[str, Any]:
    return {
        "root": str(paths["root"]), "train_index_dir": str(paths["train_dir"]), "val_index_dir": str(paths["val_dir"]),
        "img_resize": MD_RESIZE, "depth_padding": MD_DEPTH_PAD, "min_overlap_score": 0.1, "max_overlap_score": 0.7,
    }


def test_build_scannet_datasets_and_train_list(scannet: dict[str, Path], tmp_path: Path) -> None:
    train, groups, per_group, val = build_datasets(data_config("scannet", **scannet_overrides(scannet)))
    assert isinstance(train, ConcatDataset) and len(train) == len(TRAIN_KEPT) + 1  # scene0001_00 keeps 1 pair
    assert groups == [list(range(4)), [4]] and per_group == 3
    assert len(val) == len(TEST_NAMES) and val.mode == "val" and not val.load_depth
    assert train[4]["scene_id"] == "scene0001_00" and train[0]["image0"].shape == (1, 240, 320)
    assert val[0]["T_0to1"].shape == (4, 4)
    # distributed: every rank gets the same number of scenes (3 ranks: the 2 scenes plus one repeated)
    cfg = data_config("scannet", **scannet_overrides(scannet))
    shares = [build_datasets(cfg, rank=r, world=3) for r in range(3)]
    assert [len(g) for _, g, _, _ in shares] == [1, 1, 1]
    assert {t[0]["scene_id"] for t, _, _, _ in shares} == {"scene0000_00", "scene0001_00"}
    # a scene left without pairs stays a group (empty), so the epoch length does not depend on it
    _, groups, _, _ = build_datasets(data_config("scannet", **{**scannet_overrides(scannet), "min_overlap_score": 0.85}))
    assert [len(g) for g in groups] == [1, 0]  # scores 0.9 | 0.8
    with pytest.raises(DataError, match="none of the 2 training scenes has a pair"):
        MatcherDataModule(data_config("scannet", **{**scannet_overrides(scannet), "min_overlap_score": 1.0}), 1, 0, 0).setup()
    listed = tmp_path / "scannet_all.txt"
    listed.write_text("# LoFTR-style scene list\nscene0001_00\n")
    train, groups, _, _ = build_datasets(data_config("scannet", **scannet_overrides(scannet), train_list=str(listed)))
    assert len(train) == 1 and train[0]["scene_id"] == "scene0001_00"
    listed.write_text("scene0001_00\nscene0099_00\n")
    with pytest.raises(FileNotFoundError, match="scene0099_00.npz"):
        build_datasets(data_config("scannet", **scannet_overrides(scannet), train_list=str(listed)))
    with pytest.raises(FileNotFoundError, match="absent_list.txt"):
        build_datasets(data_config("scannet", **scannet_overrides(scannet), train_list=str(tmp_path / "absent_list.txt")))
    with pytest.raises(FileNotFoundError, match="no_index"):
        build_datasets(data_config("scannet", **{**scannet_overrides(scannet), "train_index_dir": str(tmp_path / "no_index")}))


def test_rank_scenes_deals_every_rank_the_same_number_of_scenes() -> None:
    files = [Path(f"scene{i}.npz") for i in range(5)]
    assert rank_scenes(files, 0, 1) == files
    for world in (2, 3, 4, 8):
        shares = [rank_scenes(files, rank, world) for rank in range(world)]
        assert {len(share) for share in shares} == {-(-5 // world)}
        assert set().union(*shares) == set(files)  # every scene trained on, the padding repeats some
        assert shares == [rank_scenes(files, rank, world) for rank in range(world)]  # the same deal on every rank


def test_build_megadepth_datasets(megadepth: dict[str, Path], tmp_path: Path) -> None:
    cfg = data_config("megadepth", **megadepth_overrides(megadepth))
    train, groups, per_group, val = build_datasets(cfg)
    assert len(train) == len(MD_TRAIN_KEPT) and groups == [[0, 1, 2]] and per_group == cfg.samples_per_scene
    assert len(val) == len(MD_PAIRS) - 1
    sample = val[0]  # validation reads no depth and pads none
    assert sample["image0"].shape == (1, 48, 48) and sample["depth0"].shape == MD_SIZES["a"] and not bool(sample["depth0"].any())
    assert train[0]["depth0"].shape == (MD_DEPTH_PAD, MD_DEPTH_PAD)
    listed = tmp_path / "train_list.txt"
    listed.write_text("0015_0.1_0.3\n")
    assert len(build_datasets(data_config("megadepth", **megadepth_overrides(megadepth), train_list=str(listed)))[0]) == 3
    listed.write_text("0015_0.1_0.3\n0022_0.1_0.3\n")
    with pytest.raises(FileNotFoundError, match="0022_0.1_0.3.npz"):
        build_datasets(data_config("megadepth", **megadepth_overrides(megadepth), train_list=str(listed)))


def test_build_homography_datasets(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "images", 10, (40, 50))
    cfg = data_config("homography", image_dir=str(folder), image_size=[32, 40], val_length=4, train_length=6)
    train, groups, per_group, val = build_datasets(cfg)
    assert len(train) == VIRTUAL_TRAIN_SCENES and per_group == 6 and len(groups) == 1 and len(val) == 4
    assert set(train.files).isdisjoint(val.files) and len(train.files) + len(val.files) == 10
    held_out = make_image_folder(tmp_path / "held_out", 2, (40, 50))
    train, _, _, val = build_datasets(data_config("homography", image_dir=str(folder), val_image_dir=str(held_out), image_size=[32, 40]))
    assert len(train.files) == 10 and [p.parent for p in val.files] == [held_out, held_out]


# =============================================================================================== validation
def homography_batch(H: np.ndarray, hw: tuple[int, int] = (96, 128)) -> dict[str, Any]:
    return {"image0": torch.zeros(len(H), 1, *hw), "image1": torch.zeros(len(H), 1, *hw), "H_0to1": torch.from_numpy(H).float()}


def matches_output(kpts0: list[np.ndarray], kpts1: list[np.ndarray]) -> dict[str, torch.Tensor]:
    return {
        "keypoints0": torch.from_numpy(np.concatenate(kpts0)).float(),
        "keypoints1": torch.from_numpy(np.concatenate(kpts1)).float(),
        "batch_indexes": torch.cat([torch.full((len(k),), b) for b, k in enumerate(kpts0)]),
    }


def test_validation_on_homography_batches() -> None:
    from matcher.validation import evaluate_batch, summarize

    rng = np.random.default_rng(0)
    H = np.stack([
        np.array([[1.05, 0.02, 4.0], [-0.03, 0.97, -3.0], [1e-4, -5e-5, 1.0]]),
        np.array([[0.9, -0.1, 10.0], [0.1, 0.9, 2.0], [0.0, 2e-4, 1.0]]),
    ])
    pts = np.stack(np.meshgrid(np.arange(4, 124, 8.0), np.arange(4, 92, 8.0)), -1).reshape(-1, 2)
    mapped = [np.c_[pts, np.ones(len(pts))] @ h.T for h in H]
    kpts1 = [m[:, :2] / m[:, 2:] for m in mapped]
    batch = homography_batch(H)
    perfect = evaluate_batch(batch, matches_output([pts, pts], kpts1), 0.5, 0.99999)
    assert len(perfect) == 2 and all(r["corner_error"] < 0.05 and r["precision"] == 1.0 for r in perfect)
    summary = summarize(perfect)
    assert summary["auc@10px"] > 99 and summary["auc@3px"] > 98 and summary["auc@10"] == summary["auc@10px"]
    assert summary["num_pairs"] == 2 and summary["precision"] == 100.0 and "auc@20" not in summary
    random_pts = [rng.uniform(0, 120, (60, 2)) for _ in range(2)]
    noise = evaluate_batch(batch, matches_output(random_pts, [rng.uniform(0, 120, (60, 2)) for _ in range(2)]), 0.5, 0.99999)
    bad = summarize(noise)
    assert bad["auc@10px"] < 20 and bad["precision"] < 10
    few = evaluate_batch(batch, matches_output([pts[:3], pts[:2]], [kpts1[0][:3], kpts1[1][:2]]), 0.5, 0.99999)
    assert all(r["corner_error"] == float("inf") for r in few) and summarize(few)["auc@10px"] == 0.0


def test_validation_leaves_out_pairs_without_a_finite_pose() -> None:
    """A pair whose ground-truth pose is not finite (ScanNet's invalid poses) is left out of the AUC and the
    precision and counted, as eval/pose.py skips it, instead of counting as a failure."""
    from matcher.validation import evaluate_batch, summarize

    K = np.array([[300.0, 0, 160], [0, 300, 120], [0, 0, 1]])
    T = np.eye(4)
    T[:3, 3] = [0.3, 0.0, 0.0]
    rng = np.random.default_rng(1)
    X = np.c_[rng.uniform(-1, 1, (80, 2)), rng.uniform(3, 6, 80)]  # points in front of camera 0
    project = lambda P: (P[:, :2] / P[:, 2:]) * 300 + [160, 120]  # noqa: E731
    kpts0, kpts1 = project(X), project(X + T[:3, 3])
    invalid = np.full((4, 4), np.nan)
    batch = {"image0": torch.zeros(2, 1, 240, 320), "K0": torch.from_numpy(np.stack([K, K])),
             "K1": torch.from_numpy(np.stack([K, K])), "T_0to1": torch.from_numpy(np.stack([T, invalid]))}
    results = evaluate_batch(batch, matches_output([kpts0, kpts0], [kpts1, kpts1]), 0.5, 0.99999)
    assert results[0]["pose_error"] < 0.5 and "skipped" in results[1]
    summary = summarize(results)
    assert summary["num_pairs"] == 1 and summary["num_skipped"] == 1 and summary["auc@5"] > 90
    assert summary["precision"] == 100.0
    assert summarize(results[1:]) == {"num_skipped": 1.0}
    # the precision threshold is the one given: half a pixel off the epipolar lines is (0.5 / 300)^2 * 2 = 5.6e-6
    shifted = matches_output([kpts0, kpts0], [kpts1 + 0.5, kpts1 + 0.5])
    assert evaluate_batch(batch, shifted, 0.5, 0.99999)[0]["precision"] == 1.0
    assert evaluate_batch(batch, shifted, 0.5, 0.99999, epi_thr=1e-6)[0]["precision"] == 0.0


def test_validation_keypoints_of_a_dataset_batch(tmp_path: Path) -> None:
    """A HomographyDataset batch through evaluate_batch: points mapped by its own H_0to1 are exact."""
    from matcher.validation import evaluate_batch

    folder = make_image_folder(tmp_path / "images", 2, (60, 80))
    batch = collate([HomographyDataset(folder, 2, (48, 64), val_fraction=0.0)[i] for i in range(2)])
    pts = np.stack(np.meshgrid(np.arange(8, 56, 6.0), np.arange(8, 40, 6.0)), -1).reshape(-1, 2)
    kpts1 = []
    for H in batch["H_0to1"].double().numpy():
        m = np.c_[pts, np.ones(len(pts))] @ H.T
        kpts1.append(m[:, :2] / m[:, 2:])
    results = evaluate_batch(batch, matches_output([pts, pts], kpts1), 0.5, 0.99999)
    assert all(r["corner_error"] < 0.05 for r in results)


# =============================================================================================== eval/pose.py
def test_pose_benchmark_on_scannet_files(scannet: dict[str, Path], tmp_path: Path) -> None:
    pose = load_script(REPO / "eval" / "pose.py", "eval_pose_datasets")
    out = tmp_path / "out"
    result = pose.main([
        "--dataset", "scannet", "--data-root", str(scannet["test"]), "--npz", str(scannet["test_npz"]),
        "--intrinsics", str(scannet["test_intrinsics"]), "--matcher", "sift", "--no-baselines", "--out", str(out), "--no-progress",
    ])
    assert [r["matcher"] for r in result["rows"]] == ["sift"]
    assert result["rows"][0]["pairs"] == len(TEST_NAMES) and not result["skipped"]
    assert Path(result["json_path"]).is_file() and Path(result["md_path"]).is_file()
    assert json.loads(Path(result["json_path"]).read_text())
    first = result["records"]["sift"][0]  # the translated plane: SIFT matches obey the true epipolar geometry
    assert first["num_matches"] > 20 and first["precision"] > 0.8 and first["pose_error"] < 1.0


# =============================================================================================== check_layout.py
@pytest.fixture(scope="module")
def check_layout() -> ModuleType:
    return load_script(REPO / "datasets" / "check_layout.py", "check_layout")


def write_config(path: Path, name: str, overrides: dict[str, Any]) -> Path:
    OmegaConf.save(data_config(name, **overrides), path)
    return path


def test_check_layout_on_scannet(check_layout: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    paths = make_scannet(tmp_path)
    config = write_config(tmp_path / "scannet.yaml", "scannet", scannet_overrides(paths))
    assert check_layout.main([str(config)]) == 0
    out = capsys.readouterr().out
    assert "train: 2 dataset(s), 5 pair(s)" in out and "val: 1 dataset(s), 2 pair(s)" in out and "OK" in out
    missing = [paths["train"] / "scene0000_00" / "depth" / "30.png", paths["test"] / "scene0000_00" / "color" / "15.jpg"]
    for path in missing:
        path.unlink()
    (paths["test"] / "scene0000_00" / "depth" / "30.png").unlink()  # validation does not read depth: not reported
    assert check_layout.main([str(config)]) == 1
    out = capsys.readouterr().out
    assert all(f"missing: {p}" in out for p in missing) and out.count("missing: /") == 2
    assert check_layout.main([str(config), f"train_index_dir={tmp_path / 'nowhere'}", f"val_npz={tmp_path / 'no.npz'}"]) == 1
    out = capsys.readouterr().out
    assert f"missing: train_index_dir: {tmp_path / 'nowhere'}" in out and f"missing: val_npz: {tmp_path / 'no.npz'}" in out
    listed = tmp_path / "list.txt"
    listed.write_text("scene0042_00\n")  # the list exists, the index file it names does not: building fails
    assert check_layout.main([str(config), f"train_list={listed}"]) == 1
    assert "scene0042_00.npz" in capsys.readouterr().out
    # an overlap filter that leaves no training pair: training would refuse to start, so the check fails too
    assert check_layout.main([str(config), "min_overlap_score=0.99"]) == 1
    out = capsys.readouterr().out
    assert "train: 2 dataset(s), 0 pair(s)" in out and "2 of 2 training scene(s) have no pair" in out
    assert "no training pair is left" in out and "FAILED" in out and "OK" not in out


def test_check_layout_on_megadepth_and_homography(check_layout: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    paths = make_megadepth(tmp_path)
    config = write_config(tmp_path / "megadepth.yaml", "megadepth", megadepth_overrides(paths))
    assert check_layout.main([str(config)]) == 0
    out = capsys.readouterr().out
    assert "train: 1 dataset(s), 3 pair(s)" in out and "val: 1 dataset(s), 6 pair(s)" in out and "1 pair(s) without" in out
    (paths["depths"] / "b.h5").unlink()
    assert check_layout.main([str(config), "--show", "1"]) == 1
    assert f"missing: {paths['depths'] / 'b.h5'}" in capsys.readouterr().out
    folder = make_image_folder(tmp_path / "images", 3, (40, 50))
    config = write_config(tmp_path / "homography.yaml", "homography", {"image_dir": str(folder), "val_fraction": 0.34})
    assert check_layout.main([str(config)]) == 0
    assert "pairs generated from 2 image(s)" in capsys.readouterr().out
    shutil.rmtree(folder)
    assert check_layout.main([str(config)]) == 1
