"""Coarse / fine ground truth on cases with known answers, and the losses against direct formulas."""

from __future__ import annotations

import math

import pytest
import torch

from matcher.losses import coarse_focal_loss, fine_l2_loss
from matcher.supervision import coarse_grid, coarse_supervision, fine_supervision, warp_points_depth, warp_points_homography

K = torch.tensor([[200.0, 0, 80], [0, 200.0, 60], [0, 0, 1]])


def _batch(T_0to1: torch.Tensor, depth: float = 4.0, hw=(120, 160)) -> dict:
    d = torch.full((1, *hw), depth)
    return {
        "image0": torch.zeros(1, 1, *hw), "image1": torch.zeros(1, 1, *hw), "depth0": d, "depth1": d.clone(),
        "K0": K[None], "K1": K[None], "T_0to1": T_0to1[None], "T_1to0": torch.linalg.inv(T_0to1)[None],
    }


def test_identity_pose_maps_every_cell_to_itself():
    batch = _batch(torch.eye(4))
    spv = coarse_supervision(batch, (15, 20), (15, 20))
    gt = spv["conf_matrix_gt"][0]
    expected = torch.eye(300)
    expected[0, 0] = 0  # cell 0 is never positive
    torch.testing.assert_close(gt, expected)
    assert set(batch) == {"image0", "image1", "depth0", "depth1", "K0", "K1", "T_0to1", "T_1to0"}


def test_translation_of_a_fronto_parallel_plane_shifts_by_known_pixels():
    # camera 1 moves 0.32 m along -x relative to the scene: points move +f*t/z = 200*0.32/4 = 16 px = 2 cells
    T = torch.eye(4)
    T[0, 3] = 0.32
    spv = coarse_supervision(_batch(T), (15, 20), (15, 20))
    b, i, j = spv["spv_b_ids"], spv["spv_i_ids"], spv["spv_j_ids"]
    assert len(i) > 200
    assert torch.equal(j, i + 2)
    assert torch.all(i % 20 < 18)  # the last two columns leave the image
    torch.testing.assert_close(spv["spv_w_pt0_i"][0, 21], torch.tensor([8.0 + 16.0, 8.0]))
    fine = fine_supervision(spv, b, i, j)
    torch.testing.assert_close(fine, torch.zeros_like(fine), atol=1e-4, rtol=0)


def test_half_cell_shift_gives_known_fine_offset():
    T = torch.eye(4)
    T[0, 3] = 0.06  # 3 px: rounds to the same cell, fine offset 3 / (2 * 2) = 0.75 window units
    spv = coarse_supervision(_batch(T), (15, 20), (15, 20))
    fine = fine_supervision(spv, spv["spv_b_ids"], spv["spv_i_ids"], spv["spv_j_ids"])
    torch.testing.assert_close(fine[:, 0], torch.full_like(fine[:, 0], 0.75), atol=1e-4, rtol=0)
    torch.testing.assert_close(fine[:, 1], torch.zeros_like(fine[:, 1]), atol=1e-4, rtol=0)


def test_depth_and_homography_paths_agree_on_a_plane():
    # plane z = 4 seen by a camera translated along x and z: the induced homography is K (R + t n^T / d) K^-1
    T = torch.eye(4)
    T[:3, 3] = torch.tensor([0.2, 0.0, 0.3])
    n, d = torch.tensor([0.0, 0.0, 1.0]), 4.0
    H = K @ (T[:3, :3] + T[:3, 3:] @ n[None] / d) @ torch.linalg.inv(K)
    pts = (torch.rand(1, 50, 2, generator=torch.Generator().manual_seed(0)) * torch.tensor([150.0, 110.0])).round()
    depth0 = torch.full((1, 120, 160), 4.0)
    depth1 = torch.full((1, 120, 160), 4.3)  # R = I: every point of the plane is 0.3 m further from camera 1
    valid_d, w_d = warp_points_depth(pts, depth0, depth1, T[None], K[None], K[None])
    valid_h, w_h = warp_points_homography(pts, H[None], (120, 160))
    assert valid_d.sum() > 20 and torch.equal(valid_d, valid_h)
    torch.testing.assert_close(w_d[valid_d], w_h[valid_h], atol=1e-3, rtol=1e-4)
    hbatch = {"image0": torch.zeros(1, 1, 120, 160), "image1": torch.zeros(1, 1, 120, 160), "H_0to1": torch.eye(3)[None]}
    spv = coarse_supervision(hbatch, (15, 20), (15, 20))
    assert spv["conf_matrix_gt"][0].diagonal()[1:].all()


def test_different_image_sizes_and_padding_mask():
    batch = _batch(torch.eye(4), hw=(120, 160))
    batch["image1"] = torch.zeros(1, 1, 80, 96)
    batch["depth1"] = torch.full((1, 80, 96), 4.0)
    batch["K1"] = K[None]
    mask1 = torch.zeros(1, 80, 96, dtype=torch.bool)
    mask1[:, :64, :64] = True
    batch["mask1"] = mask1
    spv = coarse_supervision(batch, (15, 20), (10, 12))
    assert spv["conf_matrix_gt"].shape == (1, 300, 120)
    j = spv["spv_j_ids"]
    assert len(j) > 0 and torch.all(j % 12 < 8) and torch.all(j // 12 < 8)


def test_round_trip_rejects_points_hidden_by_a_closer_surface():
    # camera 1 moves 0.32 m: the plane at 4 m shifts by 2 cells; in view 1 a surface at 1 m covers x >= 80 px.
    # A cell of image0 landing there comes back 8 cells off (200 * 0.32 / 1 = 64 px), so it is no match.
    T = torch.eye(4)
    T[0, 3] = 0.32
    batch = _batch(T)
    batch["depth1"][:, :, 80:] = 1.0
    spv = coarse_supervision(batch, (15, 20), (15, 20))
    i, j = spv["spv_i_ids"], spv["spv_j_ids"]
    assert torch.equal(j, i + 2) and torch.all(i % 20 < 8)  # x + 16 px stays left of the closer surface
    assert len(i) == 15 * 8 - 1  # every such cell but cell 0


def test_depth_mismatch_alone_does_not_reject_a_round_trip():
    # LoFTR's coarse ground truth has no depth-consistency test: with the cameras at the same place every
    # cell comes back to itself, whatever depth image1 holds there; warp_points_depth's own test still flags it.
    batch = _batch(torch.eye(4))
    batch["depth1"][:, :, 80:] = 1.0
    spv = coarse_supervision(batch, (15, 20), (15, 20))
    assert torch.equal(spv["spv_i_ids"], spv["spv_j_ids"]) and len(spv["spv_i_ids"]) == 299
    pts = coarse_grid(15, 20, 8)[None]
    valid, _ = warp_points_depth(pts, batch["depth0"], batch["depth1"], torch.eye(4)[None], K[None], K[None])
    assert torch.equal(valid[0], pts[0, :, 0] < 80)
    unchecked, _ = warp_points_depth(pts, batch["depth0"], batch["depth1"], torch.eye(4)[None], K[None], K[None], depth_consistency=None)
    assert unchecked.all()


def test_focal_loss_matches_formula_and_masks():
    torch.manual_seed(0)
    conf = torch.rand(2, 4, 5) * 0.9 + 0.05
    gt = torch.zeros(2, 4, 5)
    gt[0, 1, 2] = gt[1, 3, 0] = 1
    loss = coarse_focal_loss(conf, gt, alpha=0.25, gamma=2.0)
    pos = [conf[0, 1, 2], conf[1, 3, 0]]
    pos_term = sum(-0.25 * (1 - p) ** 2 * math.log(p) for p in pos) / 2
    negs = [conf[b, i, j] for b in range(2) for i in range(4) for j in range(5) if gt[b, i, j] == 0]
    neg_term = sum(-0.25 * p**2 * math.log(1 - p) for p in negs) / len(negs)
    assert loss.item() == pytest.approx(float(pos_term + neg_term), rel=1e-5)
    mask1 = torch.ones(2, 5, dtype=torch.bool)
    mask1[:, 4] = False
    masked = coarse_focal_loss(conf, gt, mask1=mask1)
    # LoFTR weighs padded entries 0 but keeps them in the mean: the sum over valid negatives / all 38 negatives
    negs = [conf[b, i, j] for b in range(2) for i in range(4) for j in range(4) if gt[b, i, j] == 0]
    neg_term = sum(-0.25 * p**2 * math.log(1 - p) for p in negs) / 38
    assert masked.item() == pytest.approx(float(pos_term + neg_term), rel=1e-5)
    sparse = coarse_focal_loss(conf, gt, sparse=True)
    assert sparse.item() == pytest.approx(float(pos_term), rel=1e-5)


def test_focal_loss_gradient_signs_and_no_positive_case():
    conf = torch.full((1, 2, 2), 0.5, requires_grad=True)
    gt = torch.tensor([[[1.0, 0], [0, 0]]])
    coarse_focal_loss(conf, gt).backward()
    assert conf.grad[0, 0, 0] < 0 and conf.grad[0, 0, 1] > 0  # raise positives, lower negatives
    none = coarse_focal_loss(conf, torch.zeros(1, 2, 2))
    assert torch.isfinite(none) and none.requires_grad


def test_fine_loss_ignores_outside_and_weights_by_inverse_std():
    expec = torch.tensor([[0.1, 0.0, 0.5], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]], requires_grad=True)
    gt = torch.tensor([[0.0, 0.0], [0.2, 0.0], [1.5, 0.0]])  # the third lies outside the window
    inv = torch.tensor([2.0, 1.0, 1.0])
    w = inv / inv.mean()
    expected = (w[0] * 0.01 + w[1] * 0.04) / 2
    loss = fine_l2_loss(expec, gt)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert expec.grad[0, 0] > 0 and expec.grad[1, 0] < 0 and expec.grad[2].abs().sum() == 0
    assert fine_l2_loss(expec, torch.full((3, 2), 5.0)).item() == 0.0


@pytest.mark.parametrize("with_ground_truth", [False, True])
def test_every_parameter_gets_a_gradient_also_without_ground_truth_or_matches(with_ground_truth):
    """A batch without ground truth and without predicted matches (unknown depth, threshold 1) still runs the
    fine stage on one placeholder with no fine target, as LoFTR, so that every parameter takes part in the
    backward pass: DDP (find_unused_parameters=False) fails on the next step otherwise."""
    from omegaconf import OmegaConf

    from matcher import load_config
    from matcher.training import MatcherModule, load_train_config

    model_config = OmegaConf.to_container(load_config("lite"))
    model_config["match_coarse"]["thr"] = 1.0  # no prediction can pass
    config = {**OmegaConf.to_container(load_train_config(None)), "model_config": model_config}
    module = MatcherModule(config).train()
    torch.manual_seed(0)
    batch = _batch(torch.eye(4), depth=4.0 if with_ground_truth else 0.0, hw=(64, 96))
    batch["image0"], batch["image1"] = torch.rand(1, 1, 64, 96), torch.rand(1, 1, 64, 96)
    loss, stats = module.compute_loss(batch)
    assert (stats["num_gt"] > 0) == with_ground_truth
    if not with_ground_truth:
        assert stats["loss_fine"] == 0.0
    loss.backward()
    assert [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None] == []
