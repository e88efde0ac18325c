"""Relative-pose and homography metrics, following LoFTR's evaluation protocol.

Pose (DESIGN.md section 10): keypoints normalised with K, essential matrix by RANSAC with a threshold of
``thresh_px / mean focal`` and confidence 0.99999, ``recoverPose`` on every candidate E, keep the one with
the most cheirality inliers. Errors are the rotation angle of ``R_est^T R_gt`` and the angle between the
translation directions, up to sign; the pose error of a pair is the larger of the two (inf on failure).
AUC at 5/10/20 degrees is the area under the recall-vs-error curve up to the threshold, divided by it.
Precision is the share of matches whose squared symmetric epipolar distance in normalised coordinates is
below a threshold: 5e-4 for ScanNet and by default, 1e-4 for MegaDepth (LoFTR's config: "5e-4 for ScanNet,
1e-4 for MegaDepth (from SuperGlue)").

Homography: corner error = mean distance between image0's four corners mapped by the estimated and by
the true homography; AUC at 3/5/10 px with the same AUC definition.

Conventions: keypoints are ``(N, 2)`` arrays of (x, y) pixel coordinates; ``T_0to1`` is the 4x4 rigid
transform taking points from camera 0's frame to camera 1's (``X1 = R X0 + t``); all functions are pure
and return float64 numpy values.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

def opencv_pose_warning() -> str | None:
    """Why this OpenCV's relative poses are not LoFTR's protocol, or None. OpenCV 5.1's five-point solver
    asserts (``solvePoly``) on degenerate minimal samples, such as two matches sharing a keypoint in one
    image, and the assertion ends the whole ``findEssentialMat`` call: on the synthetic test split 36 of 200
    SIFT pairs (and 1 of the default matcher's) fail that OpenCV 4 estimates, most of them well."""
    if int(cv2.__version__.split(".")[0]) < 5:
        return None
    return (f"OpenCV {cv2.__version__}'s findEssentialMat raises on degenerate RANSAC samples, so pairs OpenCV 4 "
            f"estimates count as failures here; install opencv-python-headless<5 for LoFTR's protocol")


#: Squared symmetric epipolar distance (normalised coordinates) below which a match counts as correct.
EPIPOLAR_PRECISION_THR = 5e-4

#: Datasets whose precision threshold differs from :data:`EPIPOLAR_PRECISION_THR` (LoFTR's recommendation).
EPIPOLAR_PRECISION_THR_BY_DATASET = {"megadepth": 1e-4}


def epipolar_precision_threshold(dataset: str) -> float:
    """The epipolar precision threshold of a dataset name (``scannet``, ``megadepth`` ...)."""
    return EPIPOLAR_PRECISION_THR_BY_DATASET.get(dataset.lower(), EPIPOLAR_PRECISION_THR)

#: RANSAC confidence of LoFTR's essential-matrix estimation.
POSE_RANSAC_CONF = 0.99999

#: AUC thresholds of the published pose (degrees) and homography (pixels) benchmarks.
POSE_AUC_THRESHOLDS = (5, 10, 20)
HOMOGRAPHY_AUC_THRESHOLDS = (3, 5, 10)

PoseEstimate = tuple[np.ndarray, np.ndarray, np.ndarray]


# ----------------------------------------------------------------------------------------------- helpers
def _as_points(pts: np.ndarray) -> np.ndarray:
    """Any ``(N, 2)``-shaped array (or empty) -> float64 ``(N, 2)``."""
    pts = np.asarray(pts, dtype=np.float64)
    if pts.size == 0:
        return np.zeros((0, 2))
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"keypoints must be (N, 2), got shape {pts.shape}")
    return pts


def _finite_rows(*arrays: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: rows that are finite in every ``(N, k)`` array."""
    return np.logical_and.reduce([np.isfinite(a).all(axis=1) for a in arrays])


def normalize_keypoints(pts: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Pixel keypoints ``(N, 2)`` -> normalised camera coordinates ``(N, 2)``, ``K^-1 [x, y, 1]`` (exact, skew
    included)."""
    pts = _as_points(pts)
    homog = np.concatenate([pts, np.ones((len(pts), 1))], axis=1)
    rays = homog @ np.linalg.inv(np.asarray(K, np.float64)).T
    return rays[:, :2] / rays[:, 2:]


def skew(v: np.ndarray) -> np.ndarray:
    """``(3,)`` vector -> ``(3, 3)`` cross-product matrix ``[v]_x`` (``[v]_x w = v x w``)."""
    x, y, z = np.asarray(v, np.float64).reshape(3)
    return np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])


def rotation_angle_deg(R: np.ndarray) -> float:
    """Angle (degrees, [0, 180]) of a rotation matrix ``(3, 3)``, from its trace (clipped against rounding)."""
    cos = (np.trace(np.asarray(R, np.float64)) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def angle_between_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle (degrees, [0, 180]) between two 3-vectors; inf when either is zero or non-finite."""
    a, b = np.asarray(a, np.float64).reshape(3), np.asarray(b, np.float64).reshape(3)
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    if not np.isfinite(norm) or norm == 0.0:
        return float("inf")
    return float(np.degrees(np.arccos(np.clip(a @ b / norm, -1.0, 1.0))))


# ----------------------------------------------------------------------------------------------- pose
def estimate_pose(
    kpts0: np.ndarray,
    kpts1: np.ndarray,
    K0: np.ndarray,
    K1: np.ndarray,
    thresh_px: float = 0.5,
    conf: float = POSE_RANSAC_CONF,
    method: str = "opencv",
) -> PoseEstimate | None:
    """Relative pose from matches, LoFTR's protocol.

    Args:
        kpts0, kpts1: ``(N, 2)`` matched pixel coordinates in the frames of ``K0`` and ``K1``.
        K0, K1: ``(3, 3)`` intrinsics.
        thresh_px: RANSAC threshold in pixels; OpenCV gets ``thresh_px / mean(fx0, fy1)`` in
            normalised coordinates (poselib gets pixels).
        conf: RANSAC confidence.
        method: "opencv" (findEssentialMat + recoverPose on each candidate E, the one with the most
            cheirality inliers wins) or "poselib" (needs the optional ``poselib`` package).
    Returns:
        ``(R (3, 3), t (3,) unit vector, inliers (N,) bool)`` with ``X1 = R X0 + t``, or None on failure:
        fewer than 5 finite matches, no essential matrix, or no candidate with a positive inlier count.
        OpenCV's inliers are the RANSAC inliers that passed the winning candidate's cheirality check (as
        LoFTR returns them). Rows with NaN / inf coordinates are never inliers.
    Raises:
        ValueError: keypoints not ``(N, 2)`` or of different lengths, or an unknown ``method``.
        ImportError: ``method="poselib"`` without poselib installed.
    """
    kpts0, kpts1 = _as_points(kpts0), _as_points(kpts1)
    if len(kpts0) != len(kpts1):
        raise ValueError(f"kpts0 and kpts1 differ in length: {len(kpts0)} vs {len(kpts1)}")
    if method not in ("opencv", "poselib"):
        raise ValueError(f"unknown pose estimation method {method!r}: opencv or poselib")
    finite = _finite_rows(kpts0, kpts1)
    if finite.sum() < 5:
        return None
    if method == "poselib":
        found = _estimate_pose_poselib(kpts0[finite], kpts1[finite], K0, K1, thresh_px, conf)
    else:
        found = _estimate_pose_opencv(kpts0[finite], kpts1[finite], K0, K1, thresh_px, conf)
    if found is None:
        return None
    R, t, inliers_finite = found
    inliers = np.zeros(len(kpts0), bool)
    inliers[finite] = inliers_finite
    return R, t, inliers


def _estimate_pose_opencv(
    kpts0: np.ndarray, kpts1: np.ndarray, K0: np.ndarray, K1: np.ndarray, thresh_px: float, conf: float
) -> PoseEstimate | None:
    """OpenCV path of :func:`estimate_pose` on finite keypoints."""
    K0, K1 = np.asarray(K0, np.float64), np.asarray(K1, np.float64)
    mean_focal = np.mean([K0[0, 0], K1[1, 1]])  # LoFTR's: image0's fx and image1's fy (equal focals: the mean focal)
    norm0, norm1 = normalize_keypoints(kpts0, K0), normalize_keypoints(kpts1, K1)
    if not (np.isfinite(norm0).all() and np.isfinite(norm1).all() and mean_focal > 0):
        return None
    try:
        E, mask = cv2.findEssentialMat(
            norm0, norm1, np.eye(3), method=cv2.RANSAC, prob=conf, threshold=thresh_px / mean_focal
        )
    except cv2.error:  # degenerate input (e.g. all points identical) can trip OpenCV's own checks
        return None
    if E is None or mask is None or E.shape[0] < 3 or E.shape[0] % 3 != 0:
        return None
    best, best_count = None, 0
    for candidate in np.split(E, E.shape[0] // 3):
        # As LoFTR's code: recoverPose writes its cheirality result into the mask it is given, and the same
        # mask goes to every candidate, so a later candidate is judged on the points that passed the earlier
        # ones' check; the inliers returned are the mask right after the winning call. (Only a 5-point
        # RANSAC gives several candidates.) This is the overload LoFTR's call resolves to (its extra
        # positional 1e9 lands in the R output slot, so OpenCV's default far-point cut-off of 50 baselines
        # applies).
        count, R, t, _ = cv2.recoverPose(candidate, norm0, norm1, np.eye(3), mask=mask)
        if count > best_count and np.isfinite(R).all() and np.isfinite(t).all():
            best, best_count = (R, t.ravel(), mask.ravel() > 0), count
    return best


def _estimate_pose_poselib(
    kpts0: np.ndarray, kpts1: np.ndarray, K0: np.ndarray, K1: np.ndarray, thresh_px: float, conf: float
) -> PoseEstimate | None:
    """poselib path of :func:`estimate_pose` (LO-RANSAC in pixels, with bundle adjustment)."""
    try:
        import poselib
    except ImportError as exc:
        raise ImportError("method='poselib' needs the optional package poselib (pip install poselib)") from exc

    def camera(K: np.ndarray) -> dict:
        K = np.asarray(K, np.float64)
        return {
            "model": "PINHOLE",
            "width": int(np.ceil(2 * K[0, 2])),
            "height": int(np.ceil(2 * K[1, 2])),
            "params": [K[0, 0], K[1, 1], K[0, 2], K[1, 2]],
        }

    pose, info = poselib.estimate_relative_pose(
        kpts0, kpts1, camera(K0), camera(K1), {"max_epipolar_error": thresh_px, "success_prob": conf}, {}
    )
    inliers = np.asarray(info.get("inliers", []), bool)
    if len(inliers) != len(kpts0) or inliers.sum() == 0:
        return None
    R, t = np.asarray(pose.R, np.float64), np.asarray(pose.t, np.float64)
    norm = np.linalg.norm(t)
    if not (np.isfinite(R).all() and np.isfinite(t).all()) or norm == 0:
        return None
    return R, t / norm, inliers


def relative_pose_error(
    T_0to1: np.ndarray, R: np.ndarray | None, t: np.ndarray | None, ignore_gt_t_thr: float = 0.0
) -> tuple[float, float]:
    """Angular errors of an estimated relative pose.

    Args:
        T_0to1: ``(4, 4)`` ground truth.
        R, t: estimate ``(3, 3)``, ``(3,)`` (t up to scale); None = failed estimate.
        ignore_gt_t_thr: when the true translation is shorter than this, its direction is meaningless and
            the translation error is reported as 0.
    Returns:
        ``(err_t_deg, err_R_deg)``: angle between the translation directions taken as ``min(e, 180 - e)``
        (the essential matrix fixes t only up to sign), and the rotation angle of ``R^T R_gt``. Both inf for
        a failed or non-finite estimate; ``err_t`` is inf when either translation is zero (undefined
        direction) unless ignored by ``ignore_gt_t_thr``.
    """
    if R is None or t is None:
        return float("inf"), float("inf")
    R, t = np.asarray(R, np.float64), np.asarray(t, np.float64).reshape(3)
    if not (np.isfinite(R).all() and np.isfinite(t).all()):
        return float("inf"), float("inf")
    T_0to1 = np.asarray(T_0to1, np.float64)
    R_gt, t_gt = T_0to1[:3, :3], T_0to1[:3, 3]
    if np.linalg.norm(t_gt) < ignore_gt_t_thr:
        err_t = 0.0
    else:
        err_t = angle_between_deg(t, t_gt)
        err_t = min(err_t, 180.0 - err_t) if np.isfinite(err_t) else err_t
    return float(err_t), rotation_angle_deg(R.T @ R_gt)


def pose_error(T_0to1: np.ndarray, estimate: PoseEstimate | None, ignore_gt_t_thr: float = 0.0) -> float:
    """Pose error of a pair in degrees: ``max(err_t, err_R)`` of :func:`relative_pose_error`, inf on failure."""
    if estimate is None:
        return float("inf")
    return max(relative_pose_error(T_0to1, estimate[0], estimate[1], ignore_gt_t_thr))


def error_auc(errors: Sequence[float], thresholds: Sequence[float], prefix: str = "auc@") -> dict[str, float]:
    """Area under the recall-vs-error curve up to each threshold, divided by it (LoFTR's definition).

    Errors are sorted; the curve starts at (0, 0) and goes through (e_i, i / N) for the i-th smallest error
    (1-based), linearly between consecutive errors that are below the threshold; after the last of those
    it stays flat at its recall up to the threshold. NaN counts as a failure (inf); failures count in N.

    Args:
        errors: ``(N,)`` non-negative errors, inf / NaN allowed.
        thresholds: positive thresholds, in the unit of the errors.
    Returns:
        ``{f"{prefix}{thr:g}": auc}`` with auc in [0, 1]; 0.0 for every threshold when ``errors`` is empty.
    """
    errs = np.asarray(errors, np.float64).reshape(-1)
    errs = np.sort(np.where(np.isnan(errs), np.inf, errs))
    n = len(errs)
    curve_x = np.concatenate([[0.0], errs])
    curve_y = np.arange(n + 1) / max(n, 1)
    aucs = {}
    for thr in thresholds:
        if n == 0:
            aucs[f"{prefix}{thr:g}"] = 0.0
            continue
        below = int(np.searchsorted(curve_x, thr))  # curve points with x < thr (always >= 1: the origin)
        x = np.concatenate([curve_x[:below], [thr]])
        y = np.concatenate([curve_y[:below], [curve_y[below - 1]]])
        area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))
        aucs[f"{prefix}{thr:g}"] = area / float(thr)
    return aucs


def pose_auc(errors: Sequence[float], thresholds: Sequence[float] = POSE_AUC_THRESHOLDS) -> dict[str, float]:
    """Pose AUC: :func:`error_auc` of pose errors in degrees -> ``{'auc@5': ..., 'auc@10': ..., 'auc@20': ...}``
    as fractions in [0, 1] (print them x100)."""
    return error_auc(errors, thresholds)


# ----------------------------------------------------------------------------------------------- epipolar
def essential_from_pose(T_0to1: np.ndarray) -> np.ndarray:
    """Essential matrix ``(3, 3)`` ``E = [t]_x R`` of a relative pose ``(4, 4)``, so that
    ``x1^T E x0 = 0`` for normalised homogeneous points."""
    T_0to1 = np.asarray(T_0to1, np.float64)
    return skew(T_0to1[:3, 3]) @ T_0to1[:3, :3]


def symmetric_epipolar_distance(
    pts0: np.ndarray, pts1: np.ndarray, E: np.ndarray, K0: np.ndarray, K1: np.ndarray
) -> np.ndarray:
    """Squared symmetric epipolar distance of matches, in normalised coordinates (LoFTR's definition).

    Points are normalised with ``(x - cx) / fx``, ``(y - cy) / fy`` (skew ignored, as LoFTR does), then
    ``d = (x1^T E x0)^2 * (1 / ((E x0)_1^2 + (E x0)_2^2) + 1 / ((E^T x1)_1^2 + (E^T x1)_2^2))``.

    Args:
        pts0, pts1: ``(N, 2)`` pixel coordinates; E: ``(3, 3)``; K0, K1: ``(3, 3)``.
    Returns:
        ``(N,)`` float64; inf where an epipolar line is undefined (e.g. a point on the epipole), NaN for
        non-finite input rows.
    """
    pts0, pts1 = _as_points(pts0), _as_points(pts1)
    K0, K1, E = (np.asarray(a, np.float64) for a in (K0, K1, E))
    x0 = np.concatenate([(pts0 - K0[[0, 1], [2, 2]]) / K0[[0, 1], [0, 1]], np.ones((len(pts0), 1))], axis=1)
    x1 = np.concatenate([(pts1 - K1[[0, 1], [2, 2]]) / K1[[0, 1], [0, 1]], np.ones((len(pts1), 1))], axis=1)
    line1 = x0 @ E.T  # epipolar lines of x0 in image 1
    line0 = x1 @ E  # epipolar lines of x1 in image 0
    algebraic = np.sum(x1 * line1, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        dist = algebraic**2 * (1.0 / (line1[:, 0] ** 2 + line1[:, 1] ** 2) + 1.0 / (line0[:, 0] ** 2 + line0[:, 1] ** 2))
    # 0 * inf (a point exactly on the line AND on the epipole) is NaN: the distance is unbounded there.
    return np.where(np.isnan(dist) & _finite_rows(pts0, pts1), np.inf, dist)


def epipolar_precision(
    kpts0: np.ndarray,
    kpts1: np.ndarray,
    T_0to1: np.ndarray,
    K0: np.ndarray,
    K1: np.ndarray,
    thr: float = EPIPOLAR_PRECISION_THR,
) -> tuple[float, np.ndarray]:
    """Share of matches whose squared symmetric epipolar distance under the true pose is below ``thr``.

    Returns ``(precision, correct (N,) bool)``; precision is 0.0 for no matches (LoFTR's convention), and
    NaN / inf distances are incorrect.
    """
    dist = symmetric_epipolar_distance(kpts0, kpts1, essential_from_pose(T_0to1), K0, K1)
    correct = np.nan_to_num(dist, nan=np.inf) < thr
    return (float(correct.mean()) if len(correct) else 0.0), correct


# ----------------------------------------------------------------------------------------------- homography
def warp_points(H: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply a homography ``(3, 3)`` to ``(N, 2)`` points -> ``(N, 2)`` (inf / NaN where w = 0)."""
    pts = _as_points(pts)
    homog = np.concatenate([pts, np.ones((len(pts), 1))], axis=1) @ np.asarray(H, np.float64).T
    with np.errstate(divide="ignore", invalid="ignore"):
        return homog[:, :2] / homog[:, 2:]


def estimate_homography(
    kpts0: np.ndarray, kpts1: np.ndarray, method: int = cv2.RANSAC, thresh_px: float = 3.0, conf: float = 0.995
) -> np.ndarray | None:
    """Homography ``(3, 3)`` mapping image0 pixels to image1 pixels (``H[2, 2] = 1``), or None when there are
    fewer than 4 finite matches or OpenCV finds none. ``method`` is an OpenCV flag (cv2.RANSAC,
    cv2.USAC_MAGSAC, 0 = least squares); ``thresh_px`` the reprojection threshold in pixels."""
    kpts0, kpts1 = _as_points(kpts0), _as_points(kpts1)
    if len(kpts0) != len(kpts1):
        raise ValueError(f"kpts0 and kpts1 differ in length: {len(kpts0)} vs {len(kpts1)}")
    finite = _finite_rows(kpts0, kpts1)
    if finite.sum() < 4:
        return None
    try:
        H, _ = cv2.findHomography(kpts0[finite], kpts1[finite], method, thresh_px, confidence=conf)
    except cv2.error:
        return None
    if H is None or H.shape != (3, 3) or not np.isfinite(H).all() or abs(H[2, 2]) < 1e-12:
        return None
    return H / H[2, 2]


def image_corners(hw: tuple[int, int]) -> np.ndarray:
    """The four corner pixel centres ``(4, 2)`` of an image of size ``(H, W)``: (0, 0), (W-1, 0),
    (W-1, H-1), (0, H-1)."""
    h, w = hw
    return np.array([[0.0, 0.0], [w - 1.0, 0.0], [w - 1.0, h - 1.0], [0.0, h - 1.0]])


def homography_corner_error(H_est: np.ndarray | None, H_gt: np.ndarray, hw0: tuple[int, int]) -> float:
    """Mean distance (pixels of image1) between image0's four corners mapped by ``H_est`` and by ``H_gt``;
    inf for a failed (None) or degenerate estimate."""
    if H_est is None:
        return float("inf")
    corners = image_corners(hw0)
    dist = np.linalg.norm(warp_points(H_est, corners) - warp_points(H_gt, corners), axis=1)
    err = float(np.mean(dist))
    return err if np.isfinite(err) else float("inf")


def homography_auc(errors: Sequence[float], thresholds: Sequence[float] = HOMOGRAPHY_AUC_THRESHOLDS) -> dict[str, float]:
    """Corner-error AUC (:func:`error_auc`, pixels) -> ``{'auc@3': ..., 'auc@5': ..., 'auc@10': ...}`` in [0, 1]."""
    return error_auc(errors, thresholds)


def homography_match_accuracy(
    kpts0: np.ndarray, kpts1: np.ndarray, H_gt: np.ndarray, thr_px: float = 3.0
) -> tuple[float, np.ndarray]:
    """Share of matches whose image1 point lies within ``thr_px`` of its image0 point mapped by ``H_gt``.

    Returns ``(share, correct (N,) bool)``; share is 0.0 for no matches.
    """
    kpts0, kpts1 = _as_points(kpts0), _as_points(kpts1)
    dist = np.linalg.norm(warp_points(H_gt, kpts0) - kpts1, axis=1)
    correct = np.nan_to_num(dist, nan=np.inf) < thr_px
    return (float(correct.mean()) if len(correct) else 0.0), correct


def matches_kept(ref0: np.ndarray, ref1: np.ndarray, new0: np.ndarray, new1: np.ndarray, tol: float = 1.0) -> float:
    """Share of reference matches (ref0[i], ref1[i]) that another run reproduces: some new match has both
    keypoints within ``tol`` px (max-norm). 1.0 when the reference has no matches. Used to compare a faster
    or lower-precision path (Winograd, autocast, a GPU) with the reference path."""
    if len(ref0) == 0:
        return 1.0
    if len(new0) == 0:
        return 0.0
    d0 = np.abs(ref0[:, None, :] - new0[None, :, :]).max(-1)
    d1 = np.abs(ref1[:, None, :] - new1[None, :, :]).max(-1)
    return float(((d0 <= tol) & (d1 <= tol)).any(1).mean())
