"""Ground truth for training: coarse matches from depth + pose + K (or a homography), fine offsets.

Conventions: coarse cell (x, y) of an image sits on pixel (8x, 8y) of the (resized) image; ``scale0/1``
([sx, sy]) map resized pixels to the frame of ``depth`` and ``K`` (the original image for MegaDepth).
"""

from __future__ import annotations

from typing import Any

import torch

#: Relative depth difference above which :func:`warp_points_depth` counts a warped point as occluded. The
#: coarse ground truth does not apply it: LoFTR leaves it out there ("no depth consistency check, since it
#: leads to worse results experimentally") and relies on the round trip alone.
DEPTH_CONSISTENCY = 0.2


def coarse_grid(h: int, w: int, stride: int, device=None) -> torch.Tensor:
    """Pixel positions ``(h*w, 2)`` (x, y) of a coarse grid, row-major."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([xs, ys], -1).reshape(-1, 2).float() * stride


def _lookup(depth: torch.Tensor, pts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth ``(B, H, W)`` at the rounded points ``(B, N, 2)``; also whether each point is inside."""
    b, h, w = depth.shape
    px, py = pts[..., 0].round().long(), pts[..., 1].round().long()
    inside = (px >= 0) & (px < w) & (py >= 0) & (py < h)
    flat = (py.clamp(0, h - 1) * w + px.clamp(0, w - 1))
    values = torch.gather(depth.reshape(b, -1), 1, flat)
    return torch.where(inside, values, torch.zeros_like(values)), inside


def warp_points_depth(
    pts0: torch.Tensor, depth0: torch.Tensor, depth1: torch.Tensor, T_0to1: torch.Tensor, K0: torch.Tensor, K1: torch.Tensor,
    depth_consistency: float | None = DEPTH_CONSISTENCY,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp pixels of image0 into image1 with depth and pose.

    Args:
        pts0: ``(B, N, 2)`` pixels in the frame of ``depth0`` / ``K0``; depth0, depth1 ``(B, H, W)`` metres
            (0 = unknown); T_0to1 ``(B, 4, 4)``; K0, K1 ``(B, 3, 3)``.
        depth_consistency: largest relative difference between the warped depth and ``depth1`` there for a
            point to count as seen by camera 1 (not occluded); None skips the test (and ``depth1`` is unused).
    Returns:
        ``valid (B, N)`` (known depth, in front of camera 1, inside image1 and, with ``depth_consistency``,
        not occluded there) and the warped points ``(B, N, 2)`` in the frame of ``depth1`` / ``K1``.
    """
    z0, _ = _lookup(depth0, pts0)
    ones = torch.ones_like(pts0[..., :1])
    rays = torch.cat([pts0, ones], -1) @ torch.linalg.inv(K0).transpose(1, 2)  # (B, N, 3)
    X0 = rays * z0[..., None]
    X1 = X0 @ T_0to1[:, :3, :3].transpose(1, 2) + T_0to1[:, None, :3, 3]
    z1 = X1[..., 2]
    proj = X1 @ K1.transpose(1, 2)
    pts1 = proj[..., :2] / proj[..., 2:].clamp_min(1e-6)
    z1_seen, inside = _lookup(depth1, pts1)
    valid = (z0 > 0) & (z1 > 1e-6) & inside
    if depth_consistency is not None:
        valid &= (z1_seen > 0) & ((z1 - z1_seen).abs() < depth_consistency * z1_seen)
    return valid, pts1


def warp_points_homography(pts0: torch.Tensor, H_0to1: torch.Tensor, hw1: tuple[int, int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp ``(B, N, 2)`` pixels with homographies ``(B, 3, 3)``; valid = in front and inside ``hw1``."""
    proj = torch.cat([pts0, torch.ones_like(pts0[..., :1])], -1) @ H_0to1.transpose(1, 2)
    pts1 = proj[..., :2] / proj[..., 2:].clamp_min(1e-9)
    h, w = hw1
    valid = (proj[..., 2] > 1e-9) & (pts1[..., 0] >= 0) & (pts1[..., 0] <= w - 1) & (pts1[..., 1] >= 0) & (pts1[..., 1] <= h - 1)
    return valid, pts1


def _nearest_cell(pts: torch.Tensor, hw: tuple[int, int], stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the coarse cell nearest to pixels ``(B, N, 2)``, and whether it lies in the grid."""
    cx, cy = (pts[..., 0] / stride).round().long(), (pts[..., 1] / stride).round().long()
    inside = (cx >= 0) & (cx < hw[1]) & (cy >= 0) & (cy < hw[0])
    return torch.where(inside, cy * hw[1] + cx, torch.zeros_like(cx)), inside


def _warp_both_ways(batch: dict[str, Any], pts0: torch.Tensor, pts1: torch.Tensor):
    """Warps 0->1 and 1->0, in the resized frames."""
    if "H_0to1" in batch:
        H = batch["H_0to1"].to(pts0)
        hw0, hw1 = batch["image0"].shape[2:], batch["image1"].shape[2:]
        valid01, w01 = warp_points_homography(pts0, H, hw1)
        valid10, w10 = warp_points_homography(pts1, torch.linalg.inv(H), hw0)
        return valid01, w01, valid10, w10
    b = pts0.shape[0]
    one = torch.ones(b, 2, device=pts0.device)
    s0 = batch.get("scale0", one).to(pts0)[:, None]
    s1 = batch.get("scale1", one).to(pts0)[:, None]
    d0, d1 = batch["depth0"].to(pts0), batch["depth1"].to(pts0)
    K0, K1 = batch["K0"].to(pts0), batch["K1"].to(pts0)
    # no depth-consistency test, as LoFTR: the round trip in coarse_supervision rejects occlusions
    valid01, w01 = warp_points_depth(pts0 * s0, d0, d1, batch["T_0to1"].to(pts0), K0, K1, depth_consistency=None)
    valid10, w10 = warp_points_depth(pts1 * s1, d1, d0, batch["T_1to0"].to(pts0), K1, K0, depth_consistency=None)
    return valid01, w01 / s1, valid10, w10 / s0


def coarse_supervision(
    batch: dict[str, Any], hw0_c: tuple[int, int], hw1_c: tuple[int, int], coarse_scale: int = 8
) -> dict[str, torch.Tensor]:
    """Coarse ground truth of a batch (LoFTR's cycle-consistent nearest-cell matches).

    Image0's grid points are warped into image1, rounded to image1's nearest cell, warped back; a pair
    (i, j) is positive when both warps are valid (known depth, in front of the other camera, inside the other
    image) and the round trip returns to cell i. As in LoFTR there is no depth-consistency test: a point
    hidden in image1 lands on a cell whose own depth sends it elsewhere, so the round trip rejects it, and
    LoFTR found the extra test worse for training. Cells in padding (``mask1``) are never targets; cell 0 of
    image0 (the index invalid points default to) is never positive.

    Returns a new dict: ``conf_matrix_gt`` ``(B, L0, L1)``, ``spv_b_ids``, ``spv_i_ids``, ``spv_j_ids``
    ``(M,)``, ``spv_w_pt0_i`` ``(B, L0, 2)`` image0's grid warped into image1's resized pixels and
    ``spv_pt1_i`` ``(B, L1, 2)`` image1's grid in its resized pixels.
    """
    image0 = batch["image0"]
    b, device = image0.shape[0], image0.device
    grid0 = coarse_grid(*hw0_c, coarse_scale, device)[None].expand(b, -1, -1)
    grid1 = coarse_grid(*hw1_c, coarse_scale, device)[None].expand(b, -1, -1)
    valid01, w_pt0, valid10, w_pt1 = _warp_both_ways(batch, grid0, grid1)
    near1, in1 = _nearest_cell(w_pt0, hw1_c, coarse_scale)
    near0, in0 = _nearest_cell(w_pt1, hw0_c, coarse_scale)
    ok01, ok10 = valid01 & in1, valid10 & in0
    if "mask1" in batch:
        mask1_c = batch["mask1"][:, ::coarse_scale, ::coarse_scale].reshape(b, -1).bool()
        ok01 &= torch.gather(mask1_c, 1, near1)
    near1 = torch.where(ok01, near1, torch.zeros_like(near1))
    near0 = torch.where(ok10, near0, torch.zeros_like(near0))
    back = torch.gather(near0, 1, near1)
    cells0 = torch.arange(grid0.shape[1], device=device)[None]
    correct = ok01 & torch.gather(ok10, 1, near1) & (back == cells0)
    correct[:, 0] = False
    b_ids, i_ids = torch.where(correct)
    j_ids = near1[b_ids, i_ids]
    conf_gt = torch.zeros(b, grid0.shape[1], grid1.shape[1], device=device)
    conf_gt[b_ids, i_ids, j_ids] = 1.0
    return {
        "conf_matrix_gt": conf_gt, "spv_b_ids": b_ids, "spv_i_ids": i_ids, "spv_j_ids": j_ids,
        "spv_w_pt0_i": w_pt0, "spv_pt1_i": grid1.clone(),
    }


def fine_supervision(
    coarse_spv: dict[str, torch.Tensor], b_ids: torch.Tensor, i_ids: torch.Tensor, j_ids: torch.Tensor,
    fine_scale: int = 2, window: int = 5,
) -> torch.Tensor:
    """Expected fine offset ``(M, 2)`` of each coarse match, in window units ([-1, 1] inside the window):
    where image0's cell lands in image1 minus the matched cell of image1, over ``fine_scale * (window // 2)``."""
    w_pt0 = coarse_spv["spv_w_pt0_i"][b_ids, i_ids]
    pt1 = coarse_spv["spv_pt1_i"][b_ids, j_ids]
    return (w_pt0 - pt1) / fine_scale / (window // 2)
