"""matcher.metrics against hand-computed answers and independent computations."""

from __future__ import annotations

import importlib.util

import cv2
import numpy as np
import pytest

from matcher.metrics import (
    error_auc,
    essential_from_pose,
    epipolar_precision,
    estimate_homography,
    estimate_pose,
    homography_auc,
    homography_corner_error,
    homography_match_accuracy,
    matches_kept,
    normalize_keypoints,
    pose_auc,
    pose_error,
    relative_pose_error,
    symmetric_epipolar_distance,
    warp_points,
)

K = np.array([[500.0, 0.0, 320.0], [0.0, 480.0, 240.0], [0.0, 0.0, 1.0]])


def rot_y(degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def rot_x(degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def pose(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, t
    return T


def two_view(R: np.ndarray, t: np.ndarray, n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Exact projections ``(n, 2)`` in both cameras of random points 3..8 m in front of camera 0."""
    rng = np.random.default_rng(seed)
    X0 = np.column_stack([rng.uniform(-2, 2, (n, 2)), rng.uniform(3, 8, n)])
    X1 = X0 @ R.T + t
    p0, p1 = X0 @ K.T, X1 @ K.T
    return p0[:, :2] / p0[:, 2:], p1[:, :2] / p1[:, 2:]


# ----------------------------------------------------------------------------------------------- errors
def test_identity_pose_has_zero_error() -> None:
    T = pose(np.eye(3), np.array([1.0, 0.0, 0.0]))
    assert relative_pose_error(T, np.eye(3), np.array([3.0, 0.0, 0.0])) == pytest.approx((0.0, 0.0), abs=1e-6)


def test_known_rotation_errors() -> None:
    T = pose(rot_y(10.0), np.array([0.0, 0.0, 1.0]))
    assert relative_pose_error(T, np.eye(3), np.array([0.0, 0.0, 1.0]))[1] == pytest.approx(10.0, abs=1e-9)
    assert relative_pose_error(T, rot_y(4.0), np.array([0.0, 0.0, 1.0]))[1] == pytest.approx(6.0, abs=1e-9)
    assert relative_pose_error(T, rot_y(-170.0), np.array([0.0, 0.0, 1.0]))[1] == pytest.approx(180.0, abs=1e-6)
    # Two rotations about different axes: independent answer from the Rodrigues vector's length.
    rvec, _ = cv2.Rodrigues(rot_x(10.0).T @ rot_y(10.0))
    expected = np.degrees(np.linalg.norm(rvec))
    assert relative_pose_error(T, rot_x(10.0), np.array([0.0, 0.0, 1.0]))[1] == pytest.approx(expected, abs=1e-6)
    assert 14.0 < expected < 14.2  # sqrt(10^2 + 10^2) to first order


@pytest.mark.parametrize(
    "t_est, expected",
    [
        ([1.0, 0.0, 0.0], 0.0),
        ([-2.0, 0.0, 0.0], 0.0),  # opposite direction: the essential matrix cannot tell, error 0
        ([0.0, 1.0, 0.0], 90.0),
        ([np.cos(np.radians(30)), np.sin(np.radians(30)), 0.0], 30.0),
        ([np.cos(np.radians(170)), np.sin(np.radians(170)), 0.0], 10.0),  # min(170, 180 - 170)
    ],
)
def test_translation_angle_with_sign_ambiguity(t_est: list[float], expected: float) -> None:
    T = pose(np.eye(3), np.array([5.0, 0.0, 0.0]))
    err_t, err_r = relative_pose_error(T, np.eye(3), np.array(t_est))
    assert err_t == pytest.approx(expected, abs=1e-6) and err_r == pytest.approx(0.0, abs=1e-6)


def test_pose_error_failures_are_infinite() -> None:
    T = pose(rot_y(5.0), np.array([1.0, 0.0, 0.0]))
    assert relative_pose_error(T, None, None) == (np.inf, np.inf)
    assert relative_pose_error(T, np.full((3, 3), np.nan), np.ones(3)) == (np.inf, np.inf)
    assert relative_pose_error(T, np.eye(3), np.zeros(3))[0] == np.inf  # no direction
    assert pose_error(T, None) == np.inf
    # max of the two errors
    assert pose_error(T, (np.eye(3), np.array([0.0, 1.0, 0.0]), np.ones(5, bool))) == pytest.approx(90.0)


def test_ignore_gt_translation_threshold() -> None:
    T = pose(np.eye(3), np.array([0.0, 0.0, 1e-4]))
    assert relative_pose_error(T, np.eye(3), np.array([1.0, 0.0, 0.0]))[0] == pytest.approx(90.0)
    assert relative_pose_error(T, np.eye(3), np.array([1.0, 0.0, 0.0]), ignore_gt_t_thr=1e-3)[0] == 0.0
    assert relative_pose_error(pose(np.eye(3), np.zeros(3)), np.eye(3), np.ones(3))[0] == np.inf


# ----------------------------------------------------------------------------------------------- estimation
def test_estimate_pose_recovers_exact_two_view_geometry() -> None:
    R, t = rot_y(10.0), np.array([1.0, 0.0, 0.2])
    p0, p1 = two_view(R, t)
    est = estimate_pose(p0, p1, K, K)
    assert est is not None
    R_est, t_est, inliers = est
    assert R_est.shape == (3, 3) and t_est.shape == (3,) and inliers.shape == (200,) and inliers.dtype == bool
    assert inliers.all()
    assert np.linalg.norm(t_est) == pytest.approx(1.0)
    err_t, err_r = relative_pose_error(pose(R, t), R_est, t_est)
    assert err_t < 1e-3 and err_r < 1e-3
    # Same direction as the truth (not only up to sign) once the cheirality check picked the candidate.
    assert t_est @ t / np.linalg.norm(t) == pytest.approx(1.0, abs=1e-6)


def test_estimate_pose_rejects_outliers() -> None:
    R, t = rot_x(-5.0) @ rot_y(8.0), np.array([-0.3, 0.1, 1.0])
    p0, p1 = two_view(R, t, n=150, seed=1)
    rng = np.random.default_rng(2)
    outliers = rng.choice(150, 30, replace=False)
    p1[outliers] = rng.uniform([0, 0], [640, 480], (30, 2))
    R_est, t_est, inliers = estimate_pose(p0, p1, K, K)
    assert max(relative_pose_error(pose(R, t), R_est, t_est)) < 0.05
    assert inliers.sum() >= 120 and inliers[outliers].sum() <= 3


def test_estimate_pose_threshold_is_scaled_by_the_mean_focal() -> None:
    """Noise of ~1 px: with 0.5 px / f most matches are rejected, with 3 px / f nearly all are kept."""
    R, t = rot_y(10.0), np.array([1.0, 0.0, 0.2])
    p0, p1 = two_view(R, t, n=200, seed=3)
    p1 = p1 + np.random.default_rng(4).normal(0.0, 1.0, p1.shape)
    tight = estimate_pose(p0, p1, K, K, thresh_px=0.5)[2].sum()
    loose = estimate_pose(p0, p1, K, K, thresh_px=3.0)[2].sum()
    assert tight < 150 and loose > 190


def _loftr_estimate_pose(kpts0, kpts1, K0, K1, thresh, conf=0.99999):
    """LoFTR's estimate_pose (src/utils/metrics.py) as published, written out here as the reference."""
    kpts0 = (kpts0 - K0[[0, 1], [2, 2]][None]) / K0[[0, 1], [0, 1]][None]
    kpts1 = (kpts1 - K1[[0, 1], [2, 2]][None]) / K1[[0, 1], [0, 1]][None]
    ransac_thr = thresh / np.mean([K0[0, 0], K1[1, 1], K0[0, 0], K1[1, 1]])
    E, mask = cv2.findEssentialMat(kpts0, kpts1, np.eye(3), threshold=ransac_thr, prob=conf, method=cv2.RANSAC)
    best, ret = 0, None
    for E_candidate in np.split(E, len(E) / 3):
        n, R, t, _ = cv2.recoverPose(E_candidate, kpts0, kpts1, np.eye(3), 1e9, mask=mask)
        if n > best:
            ret, best = (R, t[:, 0], mask.ravel() > 0), n
    return ret, len(E) // 3


def test_estimate_pose_follows_loftr_with_several_essential_candidates() -> None:
    """Noisy 5-point sets give several candidate E; LoFTR hands one mask, overwritten by each recoverPose, to
    all of them. Same poses and inliers as LoFTR's code, including trials where that sharing changes the pick.
    Focal lengths and principal point are powers of two (times small integers), so that LoFTR's (x - c) / f and
    our K^-1 give bit-identical normalised points."""
    K2 = np.array([[512.0, 0.0, 320.0], [0.0, 512.0, 256.0], [0.0, 0.0, 1.0]])
    rng = np.random.default_rng(7)
    multi = 0
    for trial in range(60):
        p0, p1 = two_view(rot_y(rng.uniform(-15, 15)), rng.normal(size=3), n=int(rng.integers(5, 9)), seed=trial)
        p1 = p1 + rng.normal(0.0, 2.0, p1.shape)
        cv2.setRNGSeed(trial)
        reference, candidates = _loftr_estimate_pose(p0, p1, K2, K2, 0.5)
        cv2.setRNGSeed(trial)
        ours = estimate_pose(p0, p1, K2, K2, thresh_px=0.5)
        multi += candidates > 1
        if reference is None:
            assert ours is None
            continue
        np.testing.assert_array_equal(ours[0], reference[0])
        np.testing.assert_array_equal(ours[1], reference[1])
        np.testing.assert_array_equal(ours[2], reference[2])
    assert multi >= 5


def test_estimate_pose_failures() -> None:
    p0, p1 = two_view(rot_y(10.0), np.array([1.0, 0.0, 0.2]), n=20)
    assert estimate_pose(p0[:4], p1[:4], K, K) is None  # fewer than 5 matches
    assert estimate_pose(np.zeros((0, 2)), np.zeros((0, 2)), K, K) is None
    same = np.tile([[100.0, 50.0]], (20, 1))
    assert estimate_pose(same, same, K, K) is None  # all points identical
    assert estimate_pose(np.full((20, 2), np.nan), p1, K, K) is None
    # NaN rows are dropped: never inliers, the rest still gives the pose.
    q0 = p0.copy()
    q0[[0, 5]] = np.nan
    R_est, t_est, inliers = estimate_pose(q0, p1, K, K)
    assert inliers.shape == (20,) and not inliers[[0, 5]].any() and inliers.sum() == 18
    with pytest.raises(ValueError):
        estimate_pose(p0, p1[:10], K, K)
    with pytest.raises(ValueError):
        estimate_pose(p0, p1, K, K, method="magic")


@pytest.mark.skipif(importlib.util.find_spec("poselib") is not None, reason="poselib is installed")
def test_poselib_without_the_package_is_a_clear_error() -> None:
    p0, p1 = two_view(rot_y(10.0), np.array([1.0, 0.0, 0.2]), n=20)
    with pytest.raises(ImportError, match="poselib"):
        estimate_pose(p0, p1, K, K, method="poselib")


# ----------------------------------------------------------------------------------------------- AUC
def test_auc_hand_computed() -> None:
    # Sorted errors 1, 3, 8, inf (N = 4): curve (0,0) (1,.25) (3,.5) (8,.75), flat after the last error
    # below the threshold.
    # @5:  .5*1*.25 + (.25+.5)/2*2 + .5*2             = 0.125 + 0.75 + 1.0         = 1.875 -> / 5  = 0.375
    # @10: 0.125 + 0.75 + (.5+.75)/2*5 + .75*2       = 0.875 + 3.125 + 1.5        = 5.5   -> / 10 = 0.55
    # @20: 0.875 + 3.125 + .75*12                    = 13.0                        -> / 20 = 0.65
    aucs = pose_auc([1.0, 3.0, np.inf, 8.0])
    assert list(aucs) == ["auc@5", "auc@10", "auc@20"]
    assert aucs["auc@5"] == pytest.approx(0.375)
    assert aucs["auc@10"] == pytest.approx(0.55)
    assert aucs["auc@20"] == pytest.approx(0.65)
    # NaN counts as a failure like inf.
    assert pose_auc([1.0, 3.0, np.nan, 8.0]) == pytest.approx(aucs)
    # One error of 2.5 at threshold 5: .5*2.5*1 + 1*2.5 = 3.75 -> 0.75.
    assert error_auc([2.5], [5])["auc@5"] == pytest.approx(0.75)


def test_auc_limits() -> None:
    assert pose_auc([0.0, 0.0, 0.0]) == pytest.approx({"auc@5": 1.0, "auc@10": 1.0, "auc@20": 1.0})
    assert pose_auc([np.inf, np.inf]) == {"auc@5": 0.0, "auc@10": 0.0, "auc@20": 0.0}
    assert pose_auc([]) == {"auc@5": 0.0, "auc@10": 0.0, "auc@20": 0.0}
    assert error_auc([30.0], [5])["auc@5"] == 0.0
    assert error_auc([5.0], [5])["auc@5"] == 0.0  # an error equal to the threshold does not count


def test_auc_matches_numerical_integration() -> None:
    """Independent computation: the recall curve as np.interp over (0, 0), (e_i, i/N), integrated on a
    fine grid (np.interp is flat beyond the last point, as the definition is)."""
    rng = np.random.default_rng(0)
    errors = np.concatenate([rng.exponential(6.0, 40), [np.inf] * 5])
    n = len(errors)
    aucs = pose_auc(errors)
    finite = np.sort(errors[np.isfinite(errors)])
    for thr in (5, 10, 20):
        below = finite[finite < thr]
        xs = np.linspace(0.0, thr, 200_001)
        recall = np.interp(xs, np.concatenate([[0.0], below]), np.arange(len(below) + 1) / n)
        expected = np.sum((recall[1:] + recall[:-1]) / 2 * np.diff(xs)) / thr
        assert aucs[f"auc@{thr}"] == pytest.approx(expected, abs=1e-6)


def test_homography_auc_keys_and_value() -> None:
    # Sorted 1, 2, 6, inf: @3 = (.5*1*.25 + (.25+.5)/2*1 + .5*1) / 3 = (0.125 + 0.375 + 0.5) / 3 = 1/3.
    aucs = homography_auc([6.0, 1.0, np.inf, 2.0])
    assert list(aucs) == ["auc@3", "auc@5", "auc@10"]
    assert aucs["auc@3"] == pytest.approx(1.0 / 3.0)


# ----------------------------------------------------------------------------------------------- epipolar
def test_essential_from_pose() -> None:
    E = essential_from_pose(pose(np.eye(3), np.array([1.0, 0.0, 0.0])))
    np.testing.assert_allclose(E, [[0, 0, 0], [0, 0, -1], [0, 1, 0]])
    R, t = rot_y(10.0), np.array([1.0, 0.0, 0.2])
    p0, p1 = two_view(R, t, n=30)
    x0 = np.column_stack([normalize_keypoints(p0, K), np.ones(30)])
    x1 = np.column_stack([normalize_keypoints(p1, K), np.ones(30)])
    np.testing.assert_allclose(np.sum(x1 * (x0 @ essential_from_pose(pose(R, t)).T), axis=1), 0.0, atol=1e-12)


def test_symmetric_epipolar_distance_hand_computed() -> None:
    # Pure x translation, K with f = 100, c = (50, 50): epipolar lines are horizontal. pts0 (50, 50) is
    # (0, 0) normalised, pts1 (100, 60) is (0.5, 0.1): 0.1 off the line in each image,
    # d = 0.1^2 * (1/1 + 1/1) = 0.02.
    Kh = np.array([[100.0, 0.0, 50.0], [0.0, 100.0, 50.0], [0.0, 0.0, 1.0]])
    E = essential_from_pose(pose(np.eye(3), np.array([1.0, 0.0, 0.0])))
    d = symmetric_epipolar_distance(np.array([[50.0, 50.0], [50.0, 50.0]]), np.array([[100.0, 60.0], [80.0, 50.0]]), E, Kh, Kh)
    np.testing.assert_allclose(d, [0.02, 0.0], atol=1e-15)
    assert symmetric_epipolar_distance(np.zeros((0, 2)), np.zeros((0, 2)), E, Kh, Kh).shape == (0,)


def test_epipolar_precision() -> None:
    Kh = np.array([[100.0, 0.0, 50.0], [0.0, 100.0, 50.0], [0.0, 0.0, 1.0]])
    T = pose(np.eye(3), np.array([1.0, 0.0, 0.0]))
    # distances 0, 0.02, (0.01)^2 * 2 = 2e-4 < 5e-4, NaN -> precision 2/4
    kpts0 = np.array([[50.0, 50.0], [50.0, 50.0], [50.0, 50.0], [np.nan, 50.0]])
    kpts1 = np.array([[80.0, 50.0], [100.0, 60.0], [70.0, 51.0], [70.0, 50.0]])
    precision, correct = epipolar_precision(kpts0, kpts1, T, Kh, Kh)
    assert precision == pytest.approx(0.5) and correct.tolist() == [True, False, True, False]
    precision, correct = epipolar_precision(np.zeros((0, 2)), np.zeros((0, 2)), T, Kh, Kh)
    assert precision == 0.0 and correct.shape == (0,)


# ----------------------------------------------------------------------------------------------- homography
def test_homography_corner_error_of_a_translation() -> None:
    H_shift = np.array([[1.0, 0.0, 3.0], [0.0, 1.0, 4.0], [0.0, 0.0, 1.0]])
    assert homography_corner_error(np.eye(3), H_shift, (240, 320)) == pytest.approx(5.0)
    assert homography_corner_error(H_shift, H_shift, (240, 320)) == 0.0
    assert homography_corner_error(None, H_shift, (240, 320)) == np.inf
    # Scale by 2 about the origin vs identity: corners (0,0) (319,0) (319,239) (0,239) move by
    # 0, 319, |(319, 239)|, 239.
    H_scale = np.diag([2.0, 2.0, 1.0])
    expected = (0 + 319 + np.hypot(319, 239) + 239) / 4
    assert homography_corner_error(H_scale, np.eye(3), (240, 320)) == pytest.approx(expected)


def test_estimate_homography() -> None:
    H = np.array([[1.1, 0.05, 10.0], [-0.03, 0.95, -5.0], [1e-4, -2e-4, 1.0]])
    rng = np.random.default_rng(0)
    k0 = rng.uniform([0, 0], [320, 240], (50, 2))
    k1 = warp_points(H, k0)
    np.testing.assert_allclose(cv2.perspectiveTransform(k0[None], H)[0], k1, atol=1e-9)
    H_est = estimate_homography(k0, k1)
    assert H_est is not None and H_est[2, 2] == pytest.approx(1.0)
    assert homography_corner_error(H_est, H, (240, 320)) < 1e-4  # OpenCV refines in float32
    assert estimate_homography(k0[:3], k1[:3]) is None
    assert estimate_homography(np.zeros((0, 2)), np.zeros((0, 2))) is None
    assert estimate_homography(np.ones((10, 2)), np.ones((10, 2))) is None


def test_homography_match_accuracy() -> None:
    H_shift = np.array([[1.0, 0.0, 3.0], [0.0, 1.0, 4.0], [0.0, 0.0, 1.0]])
    k0 = np.array([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0], [40.0, 40.0]])
    k1 = k0 + [3.0, 4.0] + np.array([[0.0, 0.0], [2.9, 0.0], [3.1, 0.0], [0.0, -2.0]])
    share, correct = homography_match_accuracy(k0, k1, H_shift, 3.0)
    assert correct.tolist() == [True, True, False, True] and share == pytest.approx(0.75)
    share, correct = homography_match_accuracy(np.zeros((0, 2)), np.zeros((0, 2)), H_shift)
    assert share == 0.0 and correct.shape == (0,)


def test_matches_kept_counts_reference_matches_found_within_tolerance():
    ref0 = np.array([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0], [40.0, 40.0]])
    ref1 = ref0 + 5.0
    new0 = np.array([[10.4, 9.7], [20.0, 20.0], [30.0, 30.0], [99.0, 99.0]])
    new1 = np.array([[15.3, 15.9], [26.5, 25.0], [35.0, 35.0], [45.0, 45.0]])
    # match 0: both within 1 px; match 1: image1 point 1.5 px off; match 2: exact; match 3: image0 point far
    assert matches_kept(ref0, ref1, new0, new1, tol=1.0) == pytest.approx(0.5)
    assert matches_kept(ref0, ref1, new0, new1, tol=2.0) == pytest.approx(0.75)
    assert matches_kept(ref0[:0], ref1[:0], new0, new1) == 1.0
    assert matches_kept(ref0, ref1, new0[:0], new1[:0]) == 0.0


def test_epipolar_precision_threshold_by_dataset() -> None:
    from matcher.metrics import EPIPOLAR_PRECISION_THR, epipolar_precision_threshold

    assert epipolar_precision_threshold("scannet") == 5e-4 == EPIPOLAR_PRECISION_THR
    assert epipolar_precision_threshold("MegaDepth") == 1e-4
    assert epipolar_precision_threshold("synthetic") == 5e-4


def test_pose_of_matches_sharing_keypoints_is_estimated():
    """SIFT's matches on synthetic test pair 23 (several image0 keypoints matched to one image1 keypoint):
    OpenCV 4 finds the pose within 1.2 degrees; OpenCV 5.1's findEssentialMat raises on a degenerate RANSAC
    sample and the pair would count as failed (why pyproject pins opencv below 5)."""
    from matcher.baselines import SIFTMatcher
    from matcher.data.synthetic import SyntheticDataset
    from matcher.metrics import estimate_pose, opencv_pose_warning, relative_pose_error

    sample = SyntheticDataset("test", 200, (240, 320), 0)[23]
    found = SIFTMatcher().match(sample["image0"][0].numpy(), sample["image1"][0].numpy())
    K0, K1 = sample["K0"].double().numpy(), sample["K1"].double().numpy()
    assert len(np.unique(found["keypoints1"], axis=0)) < len(found["keypoints1"])  # shared keypoints
    pose = estimate_pose(found["keypoints0"], found["keypoints1"], K0, K1, 0.5, 0.99999)
    assert pose is not None and opencv_pose_warning() is None
    err_t, err_R = relative_pose_error(sample["T_0to1"].double().numpy().reshape(4, 4), pose[0], pose[1])
    assert max(err_t, err_R) < 3.0
