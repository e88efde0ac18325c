"""Per-pair pose metrics of a batch and their summary; shared by training validation and evaluation."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .metrics import epipolar_precision, estimate_pose, pose_auc, relative_pose_error


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy()


def pair_pose_metrics(
    kpts0: np.ndarray, kpts1: np.ndarray, K0: np.ndarray, K1: np.ndarray, T_0to1: np.ndarray, ransac_thr: float, ransac_conf: float
) -> dict[str, Any]:
    """LoFTR's protocol for one pair, keypoints in the K frames: ``pose_error`` (max of the rotation and
    translation angles ``err_R``, ``err_t``; inf on failure), RANSAC ``inliers``, epipolar ``precision`` and
    per-match ``correct``."""
    precision, correct = epipolar_precision(kpts0, kpts1, T_0to1, K0, K1)
    pose = estimate_pose(kpts0, kpts1, K0, K1, ransac_thr, ransac_conf)
    err_t, err_r = relative_pose_error(T_0to1, pose[0], pose[1]) if pose is not None else (float("inf"), float("inf"))
    return {
        "num_matches": len(kpts0), "precision": precision, "correct": correct, "pose_error": max(err_t, err_r),
        "err_t": err_t, "err_R": err_r, "inliers": int(pose[2].sum()) if pose is not None else 0,
    }


def evaluate_batch(batch: dict[str, Any], out: dict[str, torch.Tensor], ransac_thr: float, ransac_conf: float) -> list[dict[str, Any]]:
    """Pose metrics for every pair of a batch (keypoints scaled by ``scale0/1`` into the K frames)."""
    results = []
    for b in range(batch["image0"].shape[0]):
        sel = out["batch_indexes"] == b
        k0, k1 = _np(out["keypoints0"][sel]), _np(out["keypoints1"][sel])
        if "scale0" in batch:
            k0, k1 = k0 * _np(batch["scale0"][b]), k1 * _np(batch["scale1"][b])
        results.append(
            pair_pose_metrics(k0, k1, _np(batch["K0"][b]), _np(batch["K1"][b]), _np(batch["T_0to1"][b]), ransac_thr, ransac_conf)
        )
    return results


def summarize(results: list[dict[str, Any]]) -> dict[str, float]:
    """AUC@5/10/20 (percent), mean precision (percent), mean matches over pairs."""
    if not results:
        return {}
    aucs = pose_auc([r["pose_error"] for r in results], (5, 10, 20))
    summary = {k: 100.0 * v for k, v in aucs.items()}
    summary["precision"] = 100.0 * float(np.nanmean([r["precision"] for r in results]))
    summary["num_matches"] = float(np.mean([r["num_matches"] for r in results]))
    summary["num_pairs"] = float(len(results))
    return summary
