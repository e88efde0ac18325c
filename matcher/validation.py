"""Per-pair metrics of a batch and their summary; shared by training validation and evaluation.

Pairs with a ground-truth pose (``K0/K1``, ``T_0to1``) get LoFTR's pose metrics; pairs of a homography dataset
(``H_0to1`` in the batch) get the homography benchmark's: the corner error of a RANSAC homography. For the
latter :func:`summarize` reports ``auc@3px/auc@5px/auc@10px`` (corner-error AUC, percent) and ALSO ``auc@10``
= ``auc@10px``, so that the best-checkpoint monitor ``val/auc@10`` works on homography data too (there it
means the corner-error AUC up to 10 px, not a pose AUC). In a mix of both kinds, ``auc@10`` is the pose AUC.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import cv2

from .metrics import (
    EPIPOLAR_PRECISION_THR,
    HOMOGRAPHY_AUC_THRESHOLDS,
    epipolar_precision,
    estimate_homography,
    estimate_pose,
    homography_auc,
    homography_corner_error,
    homography_match_accuracy,
    pose_auc,
    relative_pose_error,
    warp_points,
)

#: RANSAC threshold (px) of the homography estimate in validation, and the match accuracy threshold (px).
HOMOGRAPHY_RANSAC_THR = 3.0
HOMOGRAPHY_ACCURACY_THR = 3.0


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy()


def pair_pose_metrics(
    kpts0: np.ndarray, kpts1: np.ndarray, K0: np.ndarray, K1: np.ndarray, T_0to1: np.ndarray, ransac_thr: float, ransac_conf: float,
    epi_thr: float = EPIPOLAR_PRECISION_THR,
) -> dict[str, Any]:
    """LoFTR's protocol for one pair, keypoints in the K frames: ``pose_error`` (max of the rotation and
    translation angles ``err_R``, ``err_t``; inf on failure), RANSAC ``inliers``, epipolar ``precision``
    (squared symmetric epipolar distance below ``epi_thr``) and per-match ``correct``."""
    precision, correct = epipolar_precision(kpts0, kpts1, T_0to1, K0, K1, epi_thr)
    pose = estimate_pose(kpts0, kpts1, K0, K1, ransac_thr, ransac_conf)
    err_t, err_r = relative_pose_error(T_0to1, pose[0], pose[1]) if pose is not None else (float("inf"), float("inf"))
    return {
        "num_matches": len(kpts0), "precision": precision, "correct": correct, "pose_error": max(err_t, err_r),
        "err_t": err_t, "err_R": err_r, "inliers": int(pose[2].sum()) if pose is not None else 0,
    }


def pair_homography_metrics(
    kpts0: np.ndarray, kpts1: np.ndarray, H_0to1: np.ndarray, hw0: tuple[int, int], ransac_thr: float = HOMOGRAPHY_RANSAC_THR
) -> dict[str, Any]:
    """Homography metrics of one pair, keypoints in image pixels: ``corner_error`` (mean distance of image0's
    corners mapped by the RANSAC estimate and by the truth, px; inf on failure), RANSAC ``inliers``,
    ``precision`` (share of matches within 3 px of the true mapping) and per-match ``correct``."""
    precision, correct = homography_match_accuracy(kpts0, kpts1, H_0to1, HOMOGRAPHY_ACCURACY_THR)
    H_est = estimate_homography(kpts0, kpts1, cv2.RANSAC, ransac_thr)
    inliers = 0
    if H_est is not None:
        dist = np.linalg.norm(warp_points(H_est, kpts0) - kpts1, axis=1)
        inliers = int((np.nan_to_num(dist, nan=np.inf) < ransac_thr).sum())
    return {
        "num_matches": len(kpts0), "precision": precision, "correct": correct,
        "corner_error": homography_corner_error(H_est, H_0to1, hw0), "inliers": inliers,
    }


def evaluate_batch(
    batch: dict[str, Any], out: dict[str, torch.Tensor], ransac_thr: float, ransac_conf: float,
    h_ransac_thr: float = HOMOGRAPHY_RANSAC_THR, epi_thr: float = EPIPOLAR_PRECISION_THR,
) -> list[dict[str, Any]]:
    """Metrics for every pair of a batch: pose metrics (keypoints scaled by ``scale0/1`` into the K frames,
    RANSAC ``ransac_thr`` px / ``ransac_conf``, epipolar precision threshold ``epi_thr``), or homography
    metrics when the batch has ``H_0to1`` (keypoints in image pixels, RANSAC ``h_ransac_thr`` px)."""
    results = []
    for b in range(batch["image0"].shape[0]):
        sel = out["batch_indexes"] == b
        k0, k1 = _np(out["keypoints0"][sel]), _np(out["keypoints1"][sel])
        if "H_0to1" in batch:
            hw0 = tuple(int(s) for s in batch["image0"].shape[2:])
            results.append(pair_homography_metrics(k0, k1, _np(batch["H_0to1"][b]), hw0, h_ransac_thr))
            continue
        truth = [_np(batch[k][b]) for k in ("K0", "K1", "T_0to1", "scale0", "scale1") if k in batch]
        if not all(np.isfinite(t).all() for t in truth):  # e.g. ScanNet's invalid poses: nothing to compare with
            results.append({"skipped": "ground truth (K, T_0to1 or scale) not finite"})
            continue
        if "scale0" in batch:
            k0, k1 = k0 * _np(batch["scale0"][b]), k1 * _np(batch["scale1"][b])
        results.append(
            pair_pose_metrics(
                k0, k1, _np(batch["K0"][b]), _np(batch["K1"][b]), _np(batch["T_0to1"][b]), ransac_thr, ransac_conf, epi_thr
            )
        )
    return results


def summarize(results: list[dict[str, Any]]) -> dict[str, float]:
    """Pose pairs: AUC@5/10/20 (``auc@5`` ...). Homography pairs: corner-error AUC@3/5/10 px (``auc@3px`` ...)
    and ``auc@10`` = ``auc@10px`` unless pose pairs are present (see the module docstring). Both: mean
    precision and mean matches over all pairs (percent / count), ``num_pairs``. Pairs without a finite ground
    truth are left out of all of these and counted in ``num_skipped`` (as ``eval/pose.py`` skips them)."""
    skipped = sum("skipped" in r for r in results)
    results = [r for r in results if "skipped" not in r]
    if not results:
        return {"num_skipped": float(skipped)} if skipped else {}
    summary: dict[str, float] = {"num_skipped": float(skipped)}
    homography = [r for r in results if "corner_error" in r]
    pose = [r for r in results if "pose_error" in r]
    if homography:
        aucs = homography_auc([r["corner_error"] for r in homography], HOMOGRAPHY_AUC_THRESHOLDS)
        summary.update({f"{k}px": 100.0 * v for k, v in aucs.items()})
        summary["auc@10"] = summary["auc@10px"]
    if pose:
        aucs = pose_auc([r["pose_error"] for r in pose], (5, 10, 20))
        summary.update({k: 100.0 * v for k, v in aucs.items()})
    summary["precision"] = 100.0 * float(np.nanmean([r["precision"] for r in results]))
    summary["num_matches"] = float(np.mean([r["num_matches"] for r in results]))
    summary["num_pairs"] = float(len(results))
    return summary
