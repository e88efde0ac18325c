"""End-to-end tests of eval/pose.py and eval/homography.py on tiny scenes rendered here (SIFT and ORB)."""

from __future__ import annotations

import collections
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
EVAL_DIR = REPO / "eval"
IMAGE_HW = (240, 320)
K_RENDER = np.array([[300.0, 0.0, 160.0], [0.0, 300.0, 120.0], [0.0, 0.0, 1.0]])


# ----------------------------------------------------------------------------------------------- fixtures
def blob_texture(size: int, seed: int) -> np.ndarray:
    """float32 ``(size, size)`` texture in [0, 1]: noise at three scales, contrast-stretched (blob-rich,
    so SIFT and ORB find many distinctive keypoints)."""
    rng = np.random.default_rng(seed)
    tex = np.zeros((size, size), np.float32)
    for cells, weight in ((size // 16, 1.0), (size // 48, 0.6)):
        noise = rng.random((cells, cells)).astype(np.float32)
        tex += weight * cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
    tex -= tex.min()
    return tex / tex.max()


def rotation(axis: str, degrees: float) -> np.ndarray:
    """Rotation matrix ``(3, 3)`` about the x, y or z axis."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    R = np.eye(3)
    R[i, i], R[i, j], R[j, i], R[j, j] = c, -s, s, c
    return R


# Planes of the scene in camera-0 coordinates (y down, z forward): a back wall at z = 6, a floor at
# y = 1 and a left wall at x = -1.2 -- three planes, so the essential matrix is well determined.
# Each: (point on plane, normal, in-plane axis a, in-plane axis b, texture seed).
SCENE_PLANES = (
    (np.array([0.0, 0.0, 6.0]), np.array([0.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), 1),
    (np.array([0.0, 1.0, 0.0]), np.array([0.0, 1.0, 0.0]), np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0]), 2),
    (np.array([-1.2, 0.0, 0.0]), np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, 0.0]), 3),
)


def render_scene(K: np.ndarray, R: np.ndarray, t: np.ndarray, hw: tuple[int, int], textures: list[np.ndarray]) -> np.ndarray:
    """Ray-cast the textured planes of SCENE_PLANES from a camera with ``X_cam = R X_world + t``.

    Returns uint8 ``(H, W)``; each pixel shows the nearest plane hit in front of the camera, textures
    sampled bilinearly at 120 texels per metre (mirrored beyond their edge)."""
    h, w = hw
    u, v = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    pix = np.stack([u, v, np.ones_like(u)], -1).reshape(-1, 3)
    dirs = pix @ np.linalg.inv(K).T @ R  # world ray directions R^T K^-1 p, as rows
    centre = -R.T @ t
    best_depth = np.full(len(pix), np.inf)
    image = np.zeros(len(pix), np.float32)
    texels_per_m = 120.0
    for (origin, normal, axis_a, axis_b, _), tex in zip(SCENE_PLANES, textures):
        with np.errstate(divide="ignore", invalid="ignore"):
            lam = ((origin - centre) @ normal) / (dirs @ normal)
        hit = np.isfinite(lam) & (lam > 1e-6) & (lam < best_depth)
        lam = np.where(hit, lam, 0.0)  # rays parallel to the plane: no hit, keep the arithmetic finite
        points = centre + lam[:, None] * dirs
        map_x = ((points - origin) @ axis_a * texels_per_m + tex.shape[1] / 2).astype(np.float32)
        map_y = ((points - origin) @ axis_b * texels_per_m + tex.shape[0] / 2).astype(np.float32)
        map_x[~hit], map_y[~hit] = 0.0, 0.0
        sampled = cv2.remap(tex, map_x.reshape(h, w), map_y.reshape(h, w), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        image[hit] = sampled.reshape(-1)[hit]
        best_depth[hit] = lam[hit]
    return np.clip(np.rint(image.reshape(h, w) * 255.0), 0, 255).astype(np.uint8)


def pose_matrix(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, t
    return T


#: Relative poses (camera 0 -> camera 1) of the rendered pairs.
SCENE_MOTIONS = (
    (rotation("y", 4.0), np.array([0.5, 0.05, 0.1])),
    (rotation("x", 3.0) @ rotation("y", -5.0), np.array([-0.4, 0.1, 0.3])),
)


def pairs_line(name0: str, name1: str, K0: np.ndarray, K1: np.ndarray, T: np.ndarray) -> str:
    values = np.concatenate([K0.ravel(), K1.ravel(), T.ravel()])
    return f"{name0} {name1} 0 0 " + " ".join(f"{v:.10g}" for v in values)


@pytest.fixture(scope="module")
def pose_scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A data root with the rendered pairs and a pairs-with-gt file listing them, plus one pair whose
    image is missing and one line without a pose (both must be skipped)."""
    root = tmp_path_factory.mktemp("pose_scene")
    textures = [blob_texture(1024, seed) for *_, seed in SCENE_PLANES]
    cv2.imwrite(str(root / "view0.png"), render_scene(K_RENDER, np.eye(3), np.zeros(3), IMAGE_HW, textures))
    lines = []
    for i, (R, t) in enumerate(SCENE_MOTIONS):
        cv2.imwrite(str(root / f"view{i + 1}.png"), render_scene(K_RENDER, R, t, IMAGE_HW, textures))
        lines.append(pairs_line("view0.png", f"view{i + 1}.png", K_RENDER, K_RENDER, pose_matrix(R, t)))
    lines.append(pairs_line("view0.png", "missing.png", K_RENDER, K_RENDER, pose_matrix(*SCENE_MOTIONS[0])))
    lines.append("view0.png view1.png 0 0 300 0 160")
    pairs_file = root / "pairs.txt"
    pairs_file.write_text("# rendered test pairs\n" + "\n".join(lines) + "\n")
    return root, pairs_file


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three random textured 240x320 images (one of them RGB)."""
    folder = tmp_path_factory.mktemp("images")
    for i in range(3):
        texture = cv2.resize(blob_texture(960, 10 + i), (320, 320), interpolation=cv2.INTER_AREA)
        gray = np.rint(texture[:240] * 255).astype(np.uint8)
        image = np.dstack([gray, 255 - gray, gray // 2]) if i == 1 else gray
        cv2.imwrite(str(folder / f"img{i}.png"), image)
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def scripts() -> dict[str, ModuleType]:
    """eval/pose.py and eval/homography.py loaded from their files, and the shared matcher.evaluation."""
    modules: dict[str, ModuleType] = {"common": importlib.import_module("matcher.evaluation")}
    for name in ("pose", "homography"):
        spec = importlib.util.spec_from_file_location(f"eval_{name}", EVAL_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules[name] = module
    return modules


# ----------------------------------------------------------------------------------------------- pose
def pose_args(root: Path, pairs_file: Path, out: Path, *extra: str) -> list[str]:
    return ["--dataset", "pairs", "--data-root", str(root), "--pairs-file", str(pairs_file), "--out", str(out), "--no-progress", *extra]


def test_rendered_scene_is_consistent_with_its_pose(pose_scene: tuple[Path, Path]) -> None:
    """Sanity check of the fixture itself: a world point projects where the renderer draws its texel."""
    root, _ = pose_scene
    assert (root / "view1.png").is_file() and (root / "view2.png").is_file()
    point = np.array([0.7, -0.4, 6.0])  # on the back wall
    R, t = SCENE_MOTIONS[0]
    p0 = K_RENDER @ point
    p1 = K_RENDER @ (R @ point + t)
    textures = [blob_texture(1024, seed) for *_, seed in SCENE_PLANES]
    img0 = render_scene(K_RENDER, np.eye(3), np.zeros(3), IMAGE_HW, textures).astype(float)
    img1 = render_scene(K_RENDER, R, t, IMAGE_HW, textures).astype(float)
    x0, y0 = np.rint(p0[:2] / p0[2]).astype(int)
    x1, y1 = np.rint(p1[:2] / p1[2]).astype(int)
    patch0, patch1 = img0[y0 - 3 : y0 + 4, x0 - 3 : x0 + 4], img1[y1 - 3 : y1 + 4, x1 - 3 : x1 + 4]
    assert np.corrcoef(patch0.ravel(), patch1.ravel())[0, 1] > 0.8


def test_pose_benchmark_end_to_end(scripts: dict[str, ModuleType], pose_scene: tuple[Path, Path], tmp_path: Path) -> None:
    root, pairs_file = pose_scene
    out = tmp_path / "out"
    result = scripts["pose"].main(pose_args(root, pairs_file, out))

    # Tables written, one row per matcher, SIFT and ORB by default.
    assert result["json_path"].is_file() and result["md_path"].is_file()
    table = json.loads(result["json_path"].read_text())
    assert [r["matcher"] for r in table["rows"]] == ["sift", "orb"]
    markdown = result["md_path"].read_text()
    assert "| sift |" in markdown and "| orb |" in markdown and "AUC@5" in markdown and "0.5 px" in markdown
    assert "320x240 (" in table["protocol"]["image sizes given to the matchers"]

    # The missing image and the line without a pose are skipped, not fatal.
    assert len(result["skipped"]) == 2
    reasons = " ".join(s["reason"] for s in result["skipped"])
    assert "missing.png" in reasons and "missing pose" in reasons

    sift = next(r for r in table["rows"] if r["matcher"] == "sift")
    assert sift["pairs"] == 2 and sift["skipped"] == 2 and sift["failed"] == 0
    assert sift["num_matches"] > 100
    # Exact synthetic geometry: SIFT recovers both poses within a few degrees, its matches are mostly
    # on the epipolar lines.
    for record in result["records"]["sift"]:
        assert record["pose_error"] < 3.0, record
    assert sift["auc@20"] > 80.0
    assert sift["precision"] > 70.0
    # The AUC in the table is the AUC of the per-pair errors (independent recomputation for AUC@20:
    # both errors e_i < 20, so area = sum over the two-step curve, see metrics.error_auc).
    e = sorted(r["pose_error"] for r in result["records"]["sift"])
    expected_auc20 = (e[0] * 0.5 / 2 + (e[1] - e[0]) * (0.5 + 1.0) / 2 + (20 - e[1]) * 1.0) / 20
    assert sift["auc@20"] == pytest.approx(100 * expected_auc20)
    assert result["computed"] == {"sift": 2, "orb": 2} and result["cached"] == {"sift": 0, "orb": 0}


def test_pose_cache_resumes_and_reuses_matches(scripts: dict[str, ModuleType], pose_scene: tuple[Path, Path], tmp_path: Path) -> None:
    root, pairs_file = pose_scene
    out = tmp_path / "out"
    # An "interrupted" first run: only the first pair, SIFT only.
    first = scripts["pose"].main(pose_args(root, pairs_file, out, "--max-pairs", "1"))
    assert first["computed"] == {"sift": 1, "orb": 1}
    # Resume: the first pair comes from the cache, the second is computed.
    second = scripts["pose"].main(pose_args(root, pairs_file, out))
    assert second["computed"] == {"sift": 1, "orb": 1} and second["cached"] == {"sift": 1, "orb": 1}
    # Another RANSAC threshold recomputes no match; the cached time per pair is reported unchanged.
    third = scripts["pose"].main(pose_args(root, pairs_file, out, "--ransac-thr", "1.0"))
    assert third["computed"] == {"sift": 0, "orb": 0} and third["cached"] == {"sift": 2, "orb": 2}
    time_second = {r["matcher"]: r["time_ms"] for r in second["rows"]}
    time_third = {r["matcher"]: r["time_ms"] for r in third["rows"]}
    assert time_third == pytest.approx(time_second)
    # Cached keypoints equal the freshly computed ones (same pose errors at the same threshold).
    fourth = scripts["pose"].main(pose_args(root, pairs_file, out))
    assert [r["pose_error"] for r in fourth["records"]["sift"]] == pytest.approx([r["pose_error"] for r in second["records"]["sift"]])
    assert "1.0 px" in third["markdown"]


def test_pose_cache_refuses_other_settings(scripts: dict[str, ModuleType], pose_scene: tuple[Path, Path], tmp_path: Path) -> None:
    root, pairs_file = pose_scene
    out = tmp_path / "out"
    scripts["pose"].main(pose_args(root, pairs_file, out, "--max-pairs", "1", "--no-baselines", "--matcher", "sift"))
    with pytest.raises(scripts["common"].CacheMismatchError, match="resize"):
        scripts["pose"].main(pose_args(root, pairs_file, out, "--max-pairs", "1", "--resize", "200"))
    # --overwrite-cache starts afresh with the new settings.
    redone = scripts["pose"].main(pose_args(root, pairs_file, out, "--max-pairs", "1", "--resize", "200", "--overwrite-cache"))
    assert redone["computed"]["sift"] == 1 and redone["cached"]["sift"] == 0


def test_dataset_samples_with_scale_and_padding(scripts: dict[str, ModuleType], pose_scene: tuple[Path, Path]) -> None:
    """The dataset contract of matcher.data (resized images, scale0/1 back to the K frame, bottom-right
    zero padding with masks): keypoints found on the resized, cropped images give the true pose after
    scaling, and invalid poses are refused."""
    import torch

    from matcher.baselines import SIFTMatcher

    pose_module = scripts["pose"]
    root, _ = pose_scene
    R, t = SCENE_MOTIONS[1]
    images = []
    for name in ("view0.png", "view2.png"):
        full = cv2.imread(str(root / name), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255
        small = cv2.resize(full, (256, 192), interpolation=cv2.INTER_AREA)  # scale [1.25, 1.25]
        padded = np.zeros((256, 256), np.float32)
        padded[:192, :256] = small
        images.append(torch.from_numpy(padded)[None])
    mask = torch.zeros(256, 256, dtype=torch.bool)
    mask[:192] = True
    sample = {
        "image0": images[0], "image1": images[1], "mask0": mask, "mask1": mask[::8, ::8],  # full-res and coarse
        "K0": torch.from_numpy(K_RENDER), "K1": torch.from_numpy(K_RENDER), "T_0to1": torch.from_numpy(pose_matrix(R, t)),
        "scale0": torch.tensor([1.25, 1.25]), "scale1": torch.tensor([1.25, 1.25]),
        "scene_id": "s0", "pair_id": torch.tensor(7), "pair_names": ("view0.png", "view2.png"),
    }
    pair = pose_module.load_sample_pair([sample], 0)
    assert pair.key == "s0|7|['view0.png', 'view2.png']"
    assert pair.image0.shape == (192, 256) and pair.image1.shape == (192, 256)
    prediction = SIFTMatcher().match(pair.image0, pair.image1, resize=None)
    result = pose_module.evaluate_pose_pair(prediction, pair.truth, 0.5, 0.99999, 5e-4)
    # OpenCV 4.12 / 4.14: 5.6 degrees (all 311 inliers correct); 5.1: 2.3. Unscaled (below): 23 / 69 degrees
    assert result["pose_error"] < 10.0 and result["precision"] > 0.7
    # The precision threshold is the one given: none of the keypoints lies exactly on its epipolar line.
    assert pose_module.evaluate_pose_pair(prediction, pair.truth, 0.5, 0.99999, 1e-30)["precision"] == 0.0
    # Without the scale the keypoints are in the wrong frame: the pose is far off.
    unscaled = pose_module.evaluate_pose_pair(prediction, {**pair.truth, "scale0": np.ones(2), "scale1": np.ones(2)}, 0.5, 0.99999, 5e-4)
    assert unscaled["precision"] < result["precision"] and unscaled["pose_error"] > 3 * result["pose_error"]
    bad = {**sample, "T_0to1": torch.full((4, 4), float("inf"))}
    with pytest.raises(ValueError, match="missing pose"):
        pose_module.load_sample_pair([bad], 0)


def test_pose_benchmark_on_the_synthetic_dataset(scripts: dict[str, ModuleType], tmp_path: Path) -> None:
    """Runs once matcher.data.synthetic exists (written in parallel): the script's call matches its contract."""
    pytest.importorskip("matcher.data.synthetic")
    result = scripts["pose"].main(["--dataset", "synthetic", "--max-pairs", "2", "--out", str(tmp_path), "--no-progress"])
    assert [r["matcher"] for r in result["rows"]] == ["sift", "orb"]
    assert all(r["pairs"] + r["skipped"] == 2 for r in result["rows"])
    assert result["computed"]["sift"] + len(result["skipped"]) == 2


def test_pose_script_runs_as_a_script(pose_scene: tuple[Path, Path], tmp_path: Path) -> None:
    """`python eval/pose.py ...` works from the repository root (finds eval/common.py and the package), and a
    refused cache exits with status 2 and a readable error instead of a traceback."""
    root, pairs_file = pose_scene
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    args = pose_args(root, pairs_file, tmp_path / "out", "--max-pairs", "1", "--no-baselines", "--matcher", "orb")
    done = subprocess.run([sys.executable, "eval/pose.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| orb |" in done.stdout
    done = subprocess.run(
        [sys.executable, "eval/pose.py", *args, "--resize", "100"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "error: prediction cache" in done.stderr and "Traceback" not in done.stderr


# ----------------------------------------------------------------------------------------------- homography
def test_generated_homography_pairs_are_deterministic_and_exact(scripts: dict[str, ModuleType], image_folder: Path) -> None:
    homography = scripts["homography"]
    gray = cv2.imread(str(image_folder / "img0.png"), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255
    a0, a1, Ha = homography.generate_homography_pair(gray, [5, 1], max_shift=0.1, photometric=False)
    b0, b1, Hb = homography.generate_homography_pair(gray, [5, 1], max_shift=0.1, photometric=False)
    _, _, Hc = homography.generate_homography_pair(gray, [5, 2], max_shift=0.1, photometric=False)
    assert np.array_equal(a1, b1) and np.array_equal(Ha, Hb) and not np.allclose(Ha, Hc)
    # Corners move by at most max_shift of the side.
    corners = np.array([[0, 0], [319, 0], [319, 239], [0, 239]], float)
    moved = cv2.perspectiveTransform(corners[None], Ha)[0]
    assert np.all(np.abs(moved - corners) <= [0.1 * 320 + 1e-6, 0.1 * 240 + 1e-6])
    # image1 is image0 seen through H: sample image1 at H(p) for interior pixels p.
    ys, xs = np.mgrid[60:180:7, 80:240:7]
    p = np.stack([xs.ravel(), ys.ravel()], 1).astype(float)
    q = cv2.perspectiveTransform(p[None], Ha)[0].astype(np.float32)
    sampled = cv2.remap(a1, q[:, 0].reshape(-1, 1), q[:, 1].reshape(-1, 1), cv2.INTER_LINEAR).ravel()
    assert np.abs(sampled - gray[ys.ravel(), xs.ravel()]).mean() < 0.02
    with pytest.raises(ValueError):
        homography.random_homography((240, 320), 0.4, np.random.default_rng(0))


def test_homography_benchmark_end_to_end(scripts: dict[str, ModuleType], image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--image-dir", str(image_folder), "--num-pairs", "3", "--seed", "7", "--out", str(out), "--no-progress"]
    result = scripts["homography"].main(args)
    table = json.loads(result["json_path"].read_text())
    assert [r["matcher"] for r in table["rows"]] == ["sift", "orb"]
    assert "AUC@3px" in result["md_path"].read_text()
    sift = table["rows"][0]
    assert sift["pairs"] == 3 and sift["failed"] == 0 and sift["skipped"] == 0
    # Mild warps of a sharp texture: SIFT's homographies are within a pixel or two.
    assert all(r["corner_error"] < 2.0 for r in result["records"]["sift"]), result["records"]["sift"]
    assert sift["auc@10"] > 80.0 and sift["accuracy"] > 80.0
    for row in table["rows"]:
        assert 0.0 <= row["auc@3"] <= row["auc@5"] <= row["auc@10"] <= 100.0
    # Re-run: everything from the cache, same numbers.
    again = scripts["homography"].main(args)
    assert again["computed"] == {"sift": 0, "orb": 0} and again["cached"] == {"sift": 3, "orb": 3}
    assert again["rows"] == result["rows"]
    # Another seed is another data setting: the cache refuses it.
    with pytest.raises(scripts["common"].CacheMismatchError, match="seed"):
        scripts["homography"].main([*args[:4], "--seed", "8", *args[6:]])


def as_bgr(gray: np.ndarray) -> np.ndarray:
    """float gray (H, W) in [0, 1] -> uint8 BGR (H, W, 3) (PPM files, as HPatches ships, are colour)."""
    return cv2.cvtColor(np.rint(gray * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)


def test_homography_hpatches_layout(scripts: dict[str, ModuleType], image_folder: Path, tmp_path: Path) -> None:
    """A two-sequence HPatches-like folder; one sequence lacks image 6 (that pair is skipped)."""
    root = tmp_path / "hpatches"
    gray = cv2.imread(str(image_folder / "img2.png"), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255
    for seq in ("v_one", "i_two"):
        (root / seq).mkdir(parents=True)
        cv2.imwrite(str(root / seq / "1.ppm"), as_bgr(gray))
        for k in range(2, 7):
            _, warped, H = scripts["homography"].generate_homography_pair(gray, [len(seq), k], 0.08, photometric=False)
            if not (seq == "i_two" and k == 6):
                cv2.imwrite(str(root / seq / f"{k}.ppm"), as_bgr(warped))
            np.savetxt(root / seq / f"H_1_{k}", H)
    result = scripts["homography"].main(
        ["--hpatches", str(root), "--out", str(tmp_path / "out"), "--no-progress", "--no-baselines", "--matcher", "sift"]
    )
    (row,) = result["rows"]
    assert row["pairs"] == 9 and row["skipped"] == 1 and "6.ppm" in result["skipped"][0]["reason"]
    assert row["auc@10"] > 75.0


def test_homography_protocol_counts_pairs_like_pose(scripts: dict[str, ModuleType], image_folder: Path, tmp_path: Path) -> None:
    """With --max-pairs the protocol says how many pairs were listed and how many requested (as eval/pose.py
    does), not the listed count alone beside a table of fewer pairs."""
    args = ["--image-dir", str(image_folder), "--num-pairs", "3", "--out", str(tmp_path), "--no-progress",
            "--no-baselines", "--matcher", "orb"]
    result = scripts["homography"].main([*args, "--max-pairs", "1"])
    protocol = json.loads(result["json_path"].read_text())["protocol"]
    assert protocol["pairs"] == "3 listed (first 1 requested)" and result["rows"][0]["pairs"] == 1
    assert "source=generated" in protocol["data"] and "3 listed (first 1 requested)" in result["markdown"]
    assert json.loads(scripts["homography"].main(args)["json_path"].read_text())["protocol"]["pairs"] == "3 listed"
    assert scripts["common"].pairs_summary(1500, 5) == "1500 listed (first 5 requested)"
    assert scripts["common"].pairs_summary(1500, 0) == "1500 listed (first 0 requested)"


# ----------------------------------------------------------------------------------------------- baselines
def shifted_pair() -> tuple[np.ndarray, np.ndarray]:
    """A sharp 240x320 uint8 texture and the same texture shifted by (+16, +8) px (x, y)."""
    texture = cv2.resize(blob_texture(960, 21), (320, 320), interpolation=cv2.INTER_AREA)[:240]
    image0 = np.rint(texture * 255).astype(np.uint8)
    return image0, np.roll(image0, (8, 16), (0, 1))


@pytest.mark.parametrize("name", ["sift", "orb"])
def test_baseline_finds_a_known_shift_in_original_coordinates(name: str) -> None:
    from matcher.baselines import build_matcher

    image0, image1 = shifted_pair()
    matcher = build_matcher(name)
    for resize in (None, 200):
        res = matcher.match(image0, image1, resize=resize)
        assert set(res) == {"keypoints0", "keypoints1", "confidence"}
        m = len(res["confidence"])
        assert m > 50 and res["keypoints0"].shape == (m, 2) and res["keypoints1"].shape == (m, 2)
        assert res["keypoints0"].dtype == np.float32 and ((res["confidence"] >= 0) & (res["confidence"] <= 1)).all()
        shift = res["keypoints1"] - res["keypoints0"]
        # Keypoints of the resized images are mapped back: the shift is (16, 8) original pixels.
        # ORB reports keypoints of its coarser pyramid levels on that level's grid (up to ~2 px off).
        tolerance = (0.5 if name == "sift" else 3.0) * (1.0 if resize is None else 2.0)
        close = np.linalg.norm(shift - [16.0, 8.0], axis=1) < tolerance
        assert close.mean() > 0.9, (resize, np.median(shift, axis=0))
        assert res["keypoints0"].max(axis=0).tolist() <= [319.5, 239.5]


def test_baseline_accepts_paths_colour_float_and_tensors(tmp_path: Path) -> None:
    import torch

    from matcher.baselines import SIFTMatcher

    image0, image1 = shifted_pair()
    cv2.imwrite(str(tmp_path / "a.png"), image0)
    cv2.imwrite(str(tmp_path / "b.png"), image1)
    matcher = SIFTMatcher(max_keypoints=500)
    reference = matcher.match(image0, image1)
    variants = [
        (str(tmp_path / "a.png"), tmp_path / "b.png"),
        (np.dstack([image0] * 3), np.dstack([image1] * 3)),  # RGB, equal channels = same gray
        (image0.astype(np.float32) / 255, image1.astype(np.float64) / 255),
        (torch.from_numpy(image0)[None], torch.from_numpy(image1)[None, None]),
    ]
    for a, b in variants:
        res = matcher.match(a, b)
        np.testing.assert_allclose(res["keypoints0"], reference["keypoints0"])
        np.testing.assert_allclose(res["keypoints1"], reference["keypoints1"])
    with pytest.raises(ValueError, match="not found"):
        matcher.match(tmp_path / "missing.png", image1)


@pytest.mark.parametrize("name", ["sift", "orb"])
def test_baseline_without_features_returns_empty_arrays(name: str) -> None:
    from matcher.baselines import build_matcher

    flat = np.full((64, 80), 128, np.uint8)
    for matcher in (build_matcher(name), build_matcher(name, cross_check=True)):
        res = matcher.match(flat, flat)
        assert res["keypoints0"].shape == (0, 2) and res["keypoints1"].shape == (0, 2) and res["confidence"].shape == (0,)


def test_cross_check_matching_and_settings() -> None:
    from matcher.baselines import ORBMatcher, SIFTMatcher

    image0, image1 = shifted_pair()
    res = ORBMatcher(nfeatures=500, cross_check=True).match(image0, image1)
    shift = res["keypoints1"] - res["keypoints0"]
    assert len(shift) > 50 and (np.linalg.norm(shift - [16.0, 8.0], axis=1) < 3.0).mean() > 0.9
    assert SIFTMatcher(max_keypoints=100).describe()["max_keypoints"] == 100
    assert SIFTMatcher(max_keypoints=100).describe() != SIFTMatcher(max_keypoints=200).describe()
    with pytest.raises(ValueError):
        SIFTMatcher(ratio=1.5)


def test_sift_cross_check_confidence_spans_the_descriptor_distances() -> None:
    """SIFT descriptors are non-negative with norm 512: the farthest two (orthogonal) lie 512 sqrt 2 apart and
    get confidence 0, equal ones 1, and a distance above 512 (41% of real pairs) still a positive one."""
    import cv2

    from matcher.baselines import SIFTMatcher, cross_check_matches

    desc0 = np.zeros((2, 128), np.float32)
    desc0[0, 0], desc0[1, 1] = 512.0, 512.0
    desc1 = desc0[[1, 0]].copy()
    desc1[0] = 0.0
    desc1[0, 2] = 512.0  # orthogonal to every desc0 row
    idx0, idx1, conf = cross_check_matches(desc0[:2], desc1[1:], cv2.NORM_L2, SIFTMatcher.max_distance)
    assert idx0.tolist() == [0] and conf.tolist() == [1.0]
    _, _, far = cross_check_matches(desc0[:1], desc1[:1], cv2.NORM_L2, SIFTMatcher.max_distance)
    np.testing.assert_allclose(far, [0.0], atol=1e-6)
    angle = np.radians(75)  # 1024 sin(37.5 deg) = 623 apart
    wide0, wide1 = np.zeros((1, 128), np.float32), np.zeros((1, 128), np.float32)
    wide0[0, 0], wide1[0, :2] = 512.0, (512.0 * np.cos(angle), 512.0 * np.sin(angle))
    _, _, wide = cross_check_matches(wide0, wide1, cv2.NORM_L2, SIFTMatcher.max_distance)
    np.testing.assert_allclose(wide, [1 - 1024 * np.sin(angle / 2) / (512 * 2**0.5)], rtol=1e-5)
    assert wide[0] > 0.1


def test_build_matcher_dispatch(tmp_path: Path) -> None:
    from matcher.baselines import ORBMatcher, SIFTMatcher, build_matcher

    sift = build_matcher("SIFT", max_keypoints=123, ratio=0.7)
    assert isinstance(sift, SIFTMatcher) and sift.max_keypoints == 123 and sift.ratio == 0.7
    assert isinstance(build_matcher("orb", nfeatures=50), ORBMatcher)
    with pytest.raises(FileNotFoundError):
        build_matcher(tmp_path / "nope.ckpt")
    with pytest.raises(ValueError, match="unknown model config"):
        build_matcher("no_such_config")
    learned = build_matcher("lite")
    assert type(learned).__name__ == "Matcher" and not learned.training


def test_build_matchers_sets_the_feature_dtype_of_learned_matchers() -> None:
    from matcher.evaluation import build_matchers, matcher_fingerprint

    fp32 = build_matchers(["lite", "sift"], "cpu", feature_dtype="float32")
    bf16 = build_matchers(["lite", "sift"], "cpu", feature_dtype="bfloat16")
    assert bf16["lite"].config.inference.feature_dtype == "bfloat16" and fp32["lite"].config.inference.feature_dtype == "float32"
    assert matcher_fingerprint(bf16["lite"], "lite") != matcher_fingerprint(fp32["lite"], "lite")  # caches stay apart
    assert matcher_fingerprint(bf16["sift"], "sift") == matcher_fingerprint(fp32["sift"], "sift")
    assert build_matchers(["lite"], "cpu")["lite"].config.inference.feature_dtype == "auto"  # None: the config's


def test_build_matchers_bounds_the_coarsest_level_of_learned_matchers() -> None:
    """``--max-coarsest-tokens``: set on learned matchers (their fingerprint changes, so caches stay apart),
    named in the protocol, refused below 1 by the parser."""
    import argparse

    from matcher.evaluation import add_common_arguments, build_matchers, matcher_fingerprint, numerics_protocol

    bounded = build_matchers(["lite", "sift"], "cpu", max_coarsest_tokens=300)
    plain = build_matchers(["lite", "sift"], "cpu")
    assert bounded["lite"].config.coarse.max_coarsest_tokens == 300 and plain["lite"].config.coarse.max_coarsest_tokens is None
    assert all(layer.attn.max_coarsest_tokens == 300 for layer in bounded["lite"].loftr_coarse.layers)
    assert matcher_fingerprint(bounded["lite"], "lite") != matcher_fingerprint(plain["lite"], "lite")
    assert matcher_fingerprint(bounded["sift"], "sift") == matcher_fingerprint(plain["sift"], "sift")
    parser = argparse.ArgumentParser()
    add_common_arguments(parser)
    assert "bounded to 300 tokens" in numerics_protocol(parser.parse_args(["--max-coarsest-tokens", "300"]))
    assert "bounded" not in numerics_protocol(parser.parse_args([]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-coarsest-tokens", "0"])


def test_fingerprint_of_auto_precision_records_what_the_machine_chose(monkeypatch) -> None:
    """With ``feature_dtype: auto`` the CPU decides the precision: a cache written where auto meant bf16 is
    refused where it means float32, and vice versa."""
    from matcher import model as model_module
    from matcher.evaluation import build_matchers, matcher_fingerprint

    auto = build_matchers(["lite"], "cpu")["lite"]
    without = matcher_fingerprint(auto, "lite")
    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: True)
    with_native = matcher_fingerprint(auto, "lite")
    assert without["feature_dtype_resolved"] == "float32" and with_native["feature_dtype_resolved"] == "bfloat16"
    pinned = build_matchers(["lite"], "cpu", feature_dtype="float32")["lite"]
    assert "feature_dtype_resolved" not in matcher_fingerprint(pinned, "lite")  # pinned: the config says it all


def test_precision_flags_of_the_evaluation_scripts_and_the_tools() -> None:
    """Evaluation protocols run float32 unless --bf16 (numbers independent of the CPU); the demo and
    match_pairs keep the config's precision (auto) unless --bf16 / --fp32; the two flags exclude each other."""
    import argparse

    from matcher.evaluation import add_precision_arguments, feature_dtype_argument, numerics_protocol

    for default, expected in (("float32", "float32"), (None, None)):
        parser = argparse.ArgumentParser()
        add_precision_arguments(parser, default)
        assert feature_dtype_argument(parser.parse_args([])) == expected
        assert "coarse transformer in bfloat16" in numerics_protocol(parser.parse_args(["--bf16"]))
        if default == "float32":  # what the evaluation tables print with their protocol
            assert "coarse transformer in float32" in numerics_protocol(parser.parse_args([]))
        assert feature_dtype_argument(parser.parse_args(["--bf16"])) == "bfloat16"
        assert feature_dtype_argument(parser.parse_args(["--fp32"])) == "float32"
        with pytest.raises(SystemExit):
            parser.parse_args(["--bf16", "--fp32"])


# ----------------------------------------------------------------------------------------------- common
def _no_cuda(monkeypatch: pytest.MonkeyPatch, built: bool) -> None:
    import torch

    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: built)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_device_argument_refuses_a_device_this_torch_cannot_use(
    scripts: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--device cuda without CUDA is one usage error (exit status 2) naming the problem, not the AssertionError
    that ``model.to('cuda')`` raises on a CPU build of PyTorch."""
    import argparse

    device_argument = scripts["common"].device_argument
    assert device_argument("cpu") == "cpu"
    for bad in ("gpu", "mps", "cuda:x"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected cpu, cuda or cuda:N"):
            device_argument(bad)
    _no_cuda(monkeypatch, built=False)
    with pytest.raises(argparse.ArgumentTypeError, match="no CUDA support"):
        device_argument("cuda")
    _no_cuda(monkeypatch, built=True)
    with pytest.raises(argparse.ArgumentTypeError, match="sees no CUDA GPU"):
        device_argument("cuda:0")
    for script, source in (("pose", ["--dataset", "synthetic"]), ("homography", ["--image-dir", "x"])):
        with pytest.raises(SystemExit) as exit_info:
            scripts[script].build_parser().parse_args([*source, "--device", "cuda"])
        assert exit_info.value.code == 2 and "argument --device: cuda: PyTorch" in capsys.readouterr().err


def test_matcher_names_labels_and_tables(scripts: dict[str, ModuleType]) -> None:
    common = scripts["common"]
    assert common.matcher_names(["lite", "SIFT", "lite"]) == ["sift", "orb", "lite"]
    assert common.matcher_names(["x.ckpt"], include_baselines=False) == ["x.ckpt"]
    with pytest.raises(ValueError):
        common.matcher_names([], include_baselines=False)
    assert common.unique_labels(["runs/a/last.ckpt", "runs/b/last.ckpt", "sift"]) == ["last", "last-2", "sift"]
    columns = [common.Column("matcher", "Matcher", ""), common.Column("auc", "AUC", ".1f"), common.Column("n", "N", "d")]
    table = common.markdown_table([{"matcher": "sift", "auc": 12.345, "n": 3}, {"matcher": "orb", "auc": float("nan"), "n": 0}], columns)
    assert table.splitlines() == ["| Matcher | AUC | N |", "|:---|---:|---:|", "| sift | 12.3 | 3 |", "| orb | - | 0 |"]
    assert common.json_safe({"a": [np.float32(1.5), float("inf")], "b": np.arange(2)}) == {"a": [1.5, None], "b": [0, 1]}


def test_prediction_cache_roundtrip_and_refusal(scripts: dict[str, ModuleType], tmp_path: Path) -> None:
    common = scripts["common"]
    path = tmp_path / "c.h5"
    pred = {"keypoints0": np.ones((3, 2)), "keypoints1": np.zeros((3, 2)), "confidence": np.array([0.1, 0.2, 0.3])}
    with common.PredictionCache(path, {"matcher": {"k": 1}, "data": {"resize": None}}) as cache:
        assert cache.get("scene/a|b") is None
        cache.put("scene/a|b", pred, 0.25)
        cache.put("empty", {k: v[:0] for k, v in pred.items()}, 0.5)
    with common.PredictionCache(path, {"data": {"resize": None}, "matcher": {"k": 1}}) as cache:  # key order irrelevant
        got = cache.get("scene/a|b")
        assert got.seconds == 0.25 and len(cache) == 2 and "scene/a|b" in cache
        np.testing.assert_allclose(got.prediction["confidence"], [0.1, 0.2, 0.3])
        assert cache.get("empty").prediction["keypoints0"].shape == (0, 2)
    with pytest.raises(common.CacheMismatchError, match=r"matcher\.k: 1 -> 2"):
        common.PredictionCache(path, {"matcher": {"k": 2}, "data": {"resize": None}})
    with common.PredictionCache(path, {"matcher": {"k": 2}, "data": {"resize": None}}, overwrite=True) as cache:
        assert len(cache) == 0
    path.write_bytes(b"not an hdf5 file")
    with pytest.raises(common.CacheMismatchError, match="overwrite-cache"):
        common.PredictionCache(path, {"matcher": {}})


def test_pose_precision_threshold_by_dataset(scripts: dict[str, ModuleType]) -> None:
    """5e-4 for ScanNet and the rest, 1e-4 for MegaDepth (LoFTR's recommendation), --epi-thr over both; the
    protocol block prints the one used."""
    pose = scripts["pose"]
    parse = pose.build_parser().parse_args
    assert pose.precision_threshold(parse(["--dataset", "scannet"])) == 5e-4
    assert pose.precision_threshold(parse(["--dataset", "synthetic"])) == 5e-4
    assert pose.precision_threshold(parse(["--dataset", "megadepth"])) == 1e-4
    args = parse(["--dataset", "megadepth", "--epi-thr", "2e-4"])
    assert pose.precision_threshold(args) == 2e-4
    assert "< 0.0002," in pose.pose_protocol(args, {}, collections.Counter(), 3)["precision"]


def test_pose_protocol_names_pairs_the_dataset_left_out(scripts: dict[str, ModuleType]) -> None:
    """MegaDepth scenes drop pairs whose image, K or pose is missing when built: the protocol says how many."""
    from types import SimpleNamespace

    pose = scripts["pose"]
    scenes = SimpleNamespace(datasets=[SimpleNamespace(dropped_incomplete=2), SimpleNamespace(dropped_incomplete=1), object()])
    assert pose.dropped_pairs(scenes) == 3 and pose.dropped_pairs(object()) == 0
    args = pose.build_parser().parse_args(["--dataset", "megadepth"])
    protocol = pose.pose_protocol(args, {}, collections.Counter(), 1497, pose.dropped_pairs(scenes))
    assert protocol["pairs"] == "1497 listed; 3 more left out by the dataset (image, K or pose missing in its index)"
    assert pose.pose_protocol(args, {}, collections.Counter(), 1500)["pairs"] == "1500 listed"
