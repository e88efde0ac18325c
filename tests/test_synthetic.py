"""The built-in synthetic data: determinism, splits, and ground truth that agrees with the pixels."""

from __future__ import annotations

import cv2
import numpy as np
import torch

from matcher.data.synthetic import SyntheticDataset, covisible_share, render_pair
from matcher.supervision import warp_points_depth


def test_sample_dict_contract_and_determinism():
    ds = SyntheticDataset("test", length=3, image_size=(96, 128), seed=0)
    a, b = ds[1], ds[1]
    for key in ("image0", "image1", "depth0", "depth1", "K0", "K1", "T_0to1", "T_1to0"):
        assert torch.equal(a[key], b[key]), key
    assert a["image0"].shape == (1, 96, 128) and a["image0"].dtype == torch.float32
    assert 0.0 <= a["image0"].min() and a["image0"].max() <= 1.0
    assert a["depth0"].shape == (96, 128) and (a["depth0"] > 0).float().mean() > 0.99
    torch.testing.assert_close(a["T_0to1"] @ a["T_1to0"], torch.eye(4), atol=1e-5, rtol=0)
    assert a["mask0"].all() and torch.equal(a["scale0"], torch.ones(2))
    assert a["dataset_name"] == "synthetic" and a["pair_names"][0] != a["pair_names"][1]
    other = SyntheticDataset("val", length=3, image_size=(96, 128), seed=0)[1]
    assert not torch.equal(other["image0"], a["image0"])  # disjoint split streams


def _bilinear(image: np.ndarray, pts: np.ndarray) -> np.ndarray:
    x = pts[:, 0].astype(np.float32)[None]
    y = pts[:, 1].astype(np.float32)[None]
    return cv2.remap(image, x, y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)[0]


def test_depth_and_pose_explain_the_pixels():
    """Without photometric changes, image0's pixels warped by depth + pose land on the same intensity in
    image1 (up to texture interpolation): the renderer's ground truth is exact."""
    pair = render_pair(7, (120, 160), photometric=False)
    assert covisible_share(pair["depth0"], pair["depth1"], pair["K0"], pair["K1"], pair["T_0to1"]) >= 0.3
    ys, xs = np.mgrid[4:116:3, 4:156:3]
    pts = torch.tensor(np.stack([xs.ravel(), ys.ravel()], -1), dtype=torch.float32)[None]
    t = lambda k: torch.from_numpy(pair[k])[None]  # noqa: E731
    valid, warped = warp_points_depth(pts, t("depth0"), t("depth1"), t("T_0to1"), t("K0"), t("K1"))
    assert valid.float().mean() > 0.2
    p0 = pts[0][valid[0]].numpy().astype(int)
    p1 = warped[0][valid[0]].numpy()
    v0 = pair["image0"][p0[:, 1], p0[:, 0]]
    close = np.abs(v0 - _bilinear(pair["image1"], p1)) < 0.03
    assert close.mean() > 0.85, close.mean()
    # a wrong pose does not explain them
    shifted = t("T_0to1").clone()
    shifted[0, 0, 3] += 0.3
    valid_s, warped_s = warp_points_depth(pts, t("depth0"), t("depth1"), shifted, t("K0"), t("K1"))
    q1 = warped_s[0][valid_s[0]].numpy()
    q0 = pts[0][valid_s[0]].numpy().astype(int)
    wrong = np.abs(pair["image0"][q0[:, 1], q0[:, 0]] - _bilinear(pair["image1"], q1)) < 0.03
    assert wrong.mean() < close.mean() - 0.2
