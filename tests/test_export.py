"""ONNX export runs in onnxruntime and gives the same matches as PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from matcher import Matcher, load_config
from matcher.export import export_onnx

from .conftest import textured_image

ort = pytest.importorskip("onnxruntime")


def random_lite(max_coarsest_tokens: int | None = None) -> Matcher:
    """Random `lite` weights, every mutual nearest neighbour a match, and one self / cross pair of coarse
    layers (the ops of all eight, a quarter of the graph to trace)."""
    torch.manual_seed(0)
    coarse = {"layer_names": ["self", "cross"], "max_coarsest_tokens": max_coarsest_tokens}
    return Matcher(load_config("lite", match_coarse={"thr": 0.0}, coarse=coarse)).eval()


@pytest.mark.parametrize("variant", ["plain", "chunked_matching", "bounded_coarsest_level"])
def test_onnx_export_matches_pytorch(tmp_path, monkeypatch, variant):
    if variant == "chunked_matching":  # the row-chunked coarse matcher of large pairs, traced into the graph
        import matcher.matching as matching

        monkeypatch.setattr(matching, "CPU_DENSE_MATCHING_MAX_ENTRIES", 0)
        monkeypatch.setattr(matching, "MATCHING_CHUNK_ENTRIES", 192 * 64)  # 5 chunks of query rows
    # bounded: coarse grids 15 x 20 and 12 x 16 get 5 QuadTree levels instead of 3 (coarsest 1 x 2), padded to 16
    model = random_lite(4 if variant == "bounded_coarsest_level" else None)
    path = export_onnx(model, tmp_path / "lite.onnx", size0=(120, 160), size1=(96, 128))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seed in (1, 2):
        image0 = torch.from_numpy(textured_image(120, 160, seed))[None, None]
        image1 = torch.from_numpy(textured_image(96, 128, seed + 10))[None, None]
        got = session.run(None, {"image0": image0.numpy(), "image1": image1.numpy()})
        with torch.inference_mode():
            ref = model({"image0": image0, "image1": image1})
        assert len(ref["keypoints0"]) > 0 and got[0].shape == tuple(ref["keypoints0"].shape)
        np.testing.assert_allclose(got[0], ref["keypoints0"].numpy(), atol=1e-4)
        # fine offsets: the two runtimes' float32 rounding through the window softmax (up to 1.5e-3 px seen)
        np.testing.assert_allclose(got[1], ref["keypoints1"].numpy(), atol=5e-3)
        np.testing.assert_allclose(got[2], ref["confidence"].numpy(), rtol=1e-3, atol=1e-6)


@pytest.mark.native_bf16
def test_onnx_export_of_auto_precision_traces_float32(tmp_path):
    """``feature_dtype: auto`` (the default) exports on a CPU with native bf16 too: the graph is traced in
    float32 and gives the float32 model's matches, not bf16 ones."""
    model = random_lite()
    assert model.feature_dtype() == "bfloat16"
    path = export_onnx(model, tmp_path / "lite.onnx", size0=(96, 128))
    image0, image1 = (torch.from_numpy(textured_image(96, 128, seed))[None, None] for seed in (1, 2))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"image0": image0.numpy(), "image1": image1.numpy()})
    model.config.inference.feature_dtype = "float32"
    with torch.inference_mode():
        ref = model({"image0": image0, "image1": image1})
    assert len(ref["keypoints0"]) > 0 and got[0].shape == tuple(ref["keypoints0"].shape)
    # fine offsets: the two runtimes' float32 rounding through the window softmax (as above); bf16 features
    # would move them by far more
    np.testing.assert_allclose(got[1], ref["keypoints1"].numpy(), atol=5e-3)


def test_export_refuses_training_mode_and_bf16_features(tmp_path):
    model = Matcher(load_config("lite"))
    with pytest.raises(ValueError, match="eval mode"):
        export_onnx(model, tmp_path / "m.onnx", (64, 64))
    model = Matcher(load_config("lite", inference={"feature_dtype": "bfloat16"})).eval()
    with pytest.raises(ValueError, match="feature_dtype"):
        export_onnx(model, tmp_path / "m.onnx", (64, 64))
    model = Matcher(load_config("lite")).eval()
    for size in ((7, 64), (64,), (64.0, 64)):  # the tracer's own error named tensor(7)
        with pytest.raises(ValueError, match=r"size0 must be \(H, W\), integers of at least 8 px"):
            export_onnx(model, tmp_path / "m.onnx", size)
    assert not (tmp_path / "m.onnx").exists()


def test_onnx_export_traced_without_matches_keeps_the_fine_stage(tmp_path, monkeypatch):
    """Traced on a black pair (no match), the graph still refines matches: the sample pair gives PyTorch's
    keypoints, and a black image0 gives no match instead of an onnxruntime error on empty fine windows."""
    import cv2

    from matcher.image_io import read_image_gray

    model = Matcher.from_pretrained("default")
    with monkeypatch.context() as patch:  # the exporter's example input: black images
        patch.setattr(torch, "rand", lambda *shape: torch.zeros(*shape))
        path = export_onnx(model, tmp_path / "default.onnx", size0=(240, 320))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assets = Path(__file__).resolve().parents[1] / "demo" / "assets"
    pair = [cv2.resize(read_image_gray(assets / n), (320, 240), interpolation=cv2.INTER_AREA)[None, None]
            for n in ("pair_a.png", "pair_b.png")]
    counts = []
    for image0, image1 in (pair, (np.zeros_like(pair[0]), pair[1])):
        got = session.run(None, {"image0": image0, "image1": image1})
        with torch.inference_mode():
            ref = model({"image0": torch.from_numpy(image0), "image1": torch.from_numpy(image1)})
        assert got[0].shape == tuple(ref["keypoints0"].shape)
        np.testing.assert_allclose(got[0], ref["keypoints0"].numpy(), atol=1e-4)
        np.testing.assert_allclose(got[1], ref["keypoints1"].numpy(), atol=1e-2)
        counts.append(len(got[0]))
    assert counts[0] > 100 and counts[1] == 0
