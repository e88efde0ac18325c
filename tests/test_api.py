"""Matcher.match: input kinds, coordinate frames, bad input."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from matcher import Matcher, load_config

from .conftest import textured_image


@pytest.fixture(scope="module")
def model() -> Matcher:
    torch.manual_seed(0)
    return Matcher(load_config("lite", match_coarse={"thr": 0.0})).eval()


def _on_coarse_grid(kpts: np.ndarray, scale: tuple[float, float]) -> bool:
    cells = kpts / np.asarray(scale, np.float32) / 8.0
    return bool(np.allclose(cells, np.round(cells), atol=1e-3))


def test_keypoints_come_back_in_original_pixels(model):
    img0 = (textured_image(750, 1000, seed=1) * 255).astype(np.uint8)  # resized to 640 x 480
    img1 = (textured_image(300, 200, seed=2) * 255).astype(np.uint8)  # resized to 427 x 640
    out = model.match(img0, img1, resize=640)
    assert out["keypoints0"].shape[0] > 0 and out["keypoints0"].dtype == np.float32
    assert _on_coarse_grid(out["keypoints0"], (1000 / 640, 750 / 480))
    assert out["keypoints0"][:, 0].max() < 1000 and out["keypoints0"][:, 1].max() < 750
    assert out["keypoints1"][:, 0].max() < 200 + 4 * 200 / 427 and out["keypoints1"][:, 1].max() < 300 + 4 * 300 / 640
    unresized = model.match(img0[:240, :320], img1[:200, :160], resize=None)
    assert _on_coarse_grid(unresized["keypoints0"], (1.0, 1.0))


def test_input_kinds_give_the_same_matches(model, tmp_path):
    gray = (textured_image(120, 160, seed=3) * 255).astype(np.uint8)
    other = (textured_image(120, 160, seed=4) * 255).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    rgba = np.concatenate([rgb, np.full_like(gray[..., None], 255)], axis=2)
    cv2.imwrite(str(tmp_path / "a.png"), gray)
    cv2.imwrite(str(tmp_path / "b.jpg"), other, [cv2.IMWRITE_JPEG_QUALITY, 100])
    ref = model.match(gray, other, resize=None)
    variants = [
        (rgb, other),
        (rgba, other),
        (gray.astype(np.uint16) * 257, other),
        (gray.astype(np.float32) / 255.0, other),
        (torch.from_numpy(gray), other),
        (torch.from_numpy(rgb).permute(2, 0, 1)[None], other),
        (str(tmp_path / "a.png"), other),
    ]
    for a, b in variants:
        out = model.match(a, b, resize=None)
        np.testing.assert_allclose(out["keypoints0"], ref["keypoints0"], atol=1e-3)
        np.testing.assert_allclose(out["confidence"], ref["confidence"], rtol=1e-3, atol=1e-6)
    assert model.match(tmp_path / "a.png", tmp_path / "b.jpg", resize=None)["keypoints0"].shape[1] == 2


def test_bad_inputs_raise_value_errors(model, tmp_path):
    good = np.zeros((64, 64), np.uint8)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    nan = np.full((64, 64), np.nan, np.float32)
    cases = [
        (tmp_path / "missing.png", "image not found"),
        (tmp_path / "junk.png", "cannot read image"),
        (np.zeros((0, 10), np.uint8), "empty"),
        (nan, "NaN"),
        (np.zeros((5, 64), np.uint8), "too small"),
        (np.full((64, 64), 3.0, np.float32), r"\[0, 1\]"),
        (np.zeros((64, 64, 2), np.uint8), "shape"),
        ([[0, 1]], "expected a path"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            model.match(bad, good)


def test_blank_image_gives_zero_matches():
    model = Matcher(load_config("lite")).eval()
    out = model.match(np.full((240, 320), 128, np.uint8), np.full((240, 320), 128, np.uint8))
    assert out["keypoints0"].shape == (0, 2) and out["keypoints1"].shape == (0, 2) and out["confidence"].shape == (0,)
