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
    """Whether input-pixel keypoints are coarse cell centres (8 x, 8 y) of the resized image, mapped back with
    pixel centres at integers."""
    cells = ((kpts + 0.5) / np.asarray(scale, np.float32) - 0.5) / 8.0
    return bool(np.allclose(cells, np.round(cells), atol=1e-3))


def test_resized_pixels_map_back_to_the_input_with_pixel_centres_at_integers():
    """A Gaussian blob at a known sub-pixel spot, found (intensity centroid) in the image resized down and up
    by ``resize_long_side``, maps back onto the spot; scaling alone misses it by (s - 1) / 2 px."""
    from matcher.image_io import resize_long_side, to_input_pixels

    h, w, spot = 300, 400, np.array([123.3, 77.6])
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.exp(-((xx - spot[0]) ** 2 + (yy - spot[1]) ** 2) / (2 * 6.0**2)).astype(np.float32)
    for long_side in (160, 250, 1000):
        resized, scale = resize_long_side(blob, long_side)
        ry, rx = np.mgrid[0 : resized.shape[0], 0 : resized.shape[1]]
        centroid = np.array([(resized * rx).sum(), (resized * ry).sum()]) / resized.sum()
        np.testing.assert_allclose(to_input_pixels(centroid[None], scale)[0], spot, atol=2e-3)
        assert np.abs(centroid * scale - spot).min() > 0.1  # the plain scaling would not pass
    with pytest.raises(ValueError, match="resize must be at least 8"):
        resize_long_side(blob, 4)
    for bad in ("auto", 640.0, True):  # a TypeError from deep inside before
        with pytest.raises(ValueError, match="resize must be an integer number of pixels"):
            resize_long_side(blob, bad)


def test_match_after_resizing_lands_on_the_same_content():
    """The shipped model on the sample pair, image1 given at twice its size and matched at 640: its keypoints
    are those of the unresized match mapped through the 2x enlargement (x -> 2 x + 0.5), on average."""
    from pathlib import Path

    assets = Path(__file__).resolve().parents[1] / "demo" / "assets"
    image0, image1 = (cv2.imread(str(assets / n), cv2.IMREAD_GRAYSCALE) for n in ("pair_a.png", "pair_b.png"))
    model = Matcher.from_pretrained("default")
    ref = model.match(image0, image1, resize=None)
    big = cv2.resize(image1, (2 * image1.shape[1], 2 * image1.shape[0]), interpolation=cv2.INTER_LINEAR)
    out = model.match(image0, big, resize=max(image1.shape))
    by_kp0 = {tuple(k): i for i, k in enumerate(np.round(ref["keypoints0"], 3))}
    pairs = [(by_kp0[tuple(k)], j) for j, k in enumerate(np.round(out["keypoints0"], 3)) if tuple(k) in by_kp0]
    assert len(pairs) > 0.8 * len(ref["keypoints0"])
    i, j = np.array(pairs).T
    offset = out["keypoints1"][j] - (2 * ref["keypoints1"][i] + 0.5)
    assert np.abs(np.median(offset, axis=0)).max() < 0.1, np.median(offset, axis=0)


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
        (np.zeros((64, 64), np.int64), "unsupported integer dtype int64"),
        (np.zeros((64, 64), np.complex64), "unsupported dtype complex64"),
        (torch.zeros(64, 80, 3), r"channels-first.*got \(64, 80, 3\) \(channels last\?"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            model.match(bad, good)
    half = model.match(torch.from_numpy(good).to(torch.bfloat16)[None], torch.from_numpy(good).half()[None], resize=None)
    assert half["keypoints0"].shape[1] == 2  # float16 / bfloat16 tensors are read like float32 ones
    for resize in (0, -5, 7):
        with pytest.raises(ValueError, match="resize must be at least 8"):
            model.match(good, good, resize=resize)


def test_forward_runs_float64_and_float16_images_in_the_weights_dtype(model):
    """A (B, 1, H, W) float64 batch (torch.from_numpy of img / 255.) gives the float32 batch's matches."""
    x0 = torch.from_numpy(textured_image(64, 80, seed=5)).float()[None, None]
    x1 = torch.from_numpy(textured_image(64, 80, seed=6)).float()[None, None]
    with torch.inference_mode():
        ref = model({"image0": x0, "image1": x1})
        for dtype in (torch.float64, torch.float16):
            out = model({"image0": x0.to(dtype), "image1": x1.to(dtype)})
            assert out["keypoints0"].dtype == torch.float32
            np.testing.assert_allclose(out["keypoints1"].numpy(), ref["keypoints1"].numpy(), atol=1e-2 if dtype == torch.float16 else 1e-5)


def test_from_pretrained_reads_an_existing_file_without_suffix(tmp_path):
    torch.manual_seed(1)
    source = Matcher(load_config("lite")).eval()
    torch.save(source.state_dict(), tmp_path / "weights_no_suffix")
    loaded = Matcher.from_pretrained(tmp_path / "weights_no_suffix", config="lite")
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    with pytest.raises(ValueError, match="no shipped weights named 'nonexistent'"):
        Matcher.from_pretrained("nonexistent")


def test_blank_image_gives_zero_matches():
    model = Matcher(load_config("lite")).eval()
    out = model.match(np.full((240, 320), 128, np.uint8), np.full((240, 320), 128, np.uint8), resize=None)
    assert out["keypoints0"].shape == (0, 2) and out["keypoints1"].shape == (0, 2) and out["confidence"].shape == (0,)


def test_config_without_weights_is_refused_unless_it_is_the_shipped_one(tmp_path, monkeypatch):
    """The command-line tools' ``--config`` alone would be ignored (the shipped weights bring their own
    config): an error, except for the shipped weights' own config (``lite``) or while none are shipped."""
    import matcher.model as model_module

    if not (model_module.WEIGHTS_DIR / "default.safetensors").is_file():
        pytest.skip("no shipped default weights")
    for config in (None, "lite", str(model_module.WEIGHTS_DIR / "default.yaml")):
        model, which = model_module.matcher_with_description(None, config)
        assert "shipped default weights" in which and model.config.coarse.attention == "quadtree"
    with pytest.raises(ValueError, match="--config lite_linear needs --weights"):
        model_module.matcher_with_description(None, "lite_linear")
    with pytest.raises(ValueError, match="unknown model config"):
        model_module.matcher_with_description(None, "no_such_config")
    monkeypatch.setattr(model_module, "WEIGHTS_DIR", tmp_path)  # nothing shipped: random weights of the config
    model, which = model_module.matcher_with_description(None, "lite_linear")
    assert "RANDOM" in which and model.config.coarse.attention == "linear"


def test_image_files_are_read_upright_in_their_bit_depth(tmp_path):
    """A JPEG with EXIF orientation 6 (stored sideways, as phones do) is read rotated upright, as cv2.imread's
    defaults and hloc read it; a 16-bit PNG keeps its 16 bits; RGBA ignores alpha."""
    from matcher.image_io import read_image_gray

    stored = np.zeros((40, 80), np.uint8)
    stored[:, :20] = 255  # a bright band on the stored image's left
    ok, jpeg = cv2.imencode(".jpg", stored, [cv2.IMWRITE_JPEG_QUALITY, 100])
    assert ok
    # an APP1 Exif segment (big-endian TIFF, one IFD entry): Orientation (0x0112), SHORT, 1, value 6
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + b"\x00\x01" + b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00" + b"\x00" * 4
    app1 = b"Exif\x00\x00" + tiff
    data = jpeg.tobytes()
    (tmp_path / "sideways.jpg").write_bytes(data[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + data[2:])
    upright = read_image_gray(tmp_path / "sideways.jpg")
    assert upright.shape == (80, 40)  # rotated 90 degrees clockwise: the band is now along the top
    assert upright[:15].mean() > 0.9 and upright[25:].mean() < 0.1

    deep = (np.arange(30 * 50).reshape(30, 50) * 40).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), deep)
    np.testing.assert_allclose(read_image_gray(tmp_path / "deep.png"), deep / 65535.0, atol=1e-7)
    bgra = np.dstack([np.full((20, 30, 3), 200, np.uint8), np.zeros((20, 30), np.uint8)])
    cv2.imwrite(str(tmp_path / "alpha.png"), bgra)
    np.testing.assert_allclose(read_image_gray(tmp_path / "alpha.png"), 200 / 255.0, atol=1e-6)


def test_match_runs_in_eval_mode_and_leaves_the_mode_as_it_was():
    """Matcher.match on a model left in training mode: batch norm neither uses nor updates batch statistics
    (the result is the eval-mode one) and the model stays in training mode."""
    torch.manual_seed(0)
    m = Matcher(load_config("lite", match_coarse={"thr": 0.0}))
    image0, image1 = textured_image(96, 128, seed=1), textured_image(96, 128, seed=2)
    reference = m.eval().match(image0, image1, resize=None)
    stats = [b.running_mean.clone() for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    m.train()
    result = m.match(image0, image1, resize=None)
    assert m.training
    np.testing.assert_array_equal(result["keypoints1"], reference["keypoints1"])
    after = [b.running_mean for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(stats, after))
    m.backbone.eval()  # fine-tuning with a frozen backbone: each module's own mode comes back
    m.match(image0, image1, resize=None)
    assert m.training and not any(module.training for module in m.backbone.modules())
    assert m.loftr_coarse.training
