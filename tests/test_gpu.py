"""The matcher on a CUDA GPU against the CPU reference (skipped where there is none: CI never has one).

Run on a GPU machine with ``python -m pytest -q tests/test_gpu.py`` (``make gpu-check`` adds the benchmark).
They were written without a GPU and first ran, all passing unchanged, on an H100 (torch 2.11.0+cu130). Where a
bound turns out wrong on another GPU, say so on the speed issue rather than loosening it silently.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from matcher import Matcher
from matcher.attention import quadtree_attention
from matcher.metrics import matches_kept

from .test_attention import _pyramids
from .test_matching import _features

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ASSETS = Path(__file__).resolve().parents[1] / "demo" / "assets"
CUDA = torch.device("cuda")


def _kept_within_1px(ref: dict, new: dict) -> float:
    """Share of ``ref``'s matches that ``new`` has too, both keypoints within 1 px."""
    return matches_kept(ref["keypoints0"], ref["keypoints1"], new["keypoints0"], new["keypoints1"])


@pytest.fixture(scope="module")
def shipped() -> Matcher:
    return Matcher.from_pretrained("default").eval()


def _demo_pair() -> tuple[np.ndarray, np.ndarray]:
    import cv2

    return tuple(cv2.imread(str(ASSETS / name), cv2.IMREAD_GRAYSCALE) for name in ("pair_a.png", "pair_b.png"))


@pytest.mark.parametrize("variant", ["A", "B"])
def test_quadtree_attention_on_cuda_equals_cpu(variant):
    """float64, padded keys, cross grids: the GPU path (large chunks, torch.topk) gives the CPU's messages
    and the same selected keys (compared as sets: the top-k is unordered)."""
    qs, ks, vs, kmasks = _pyramids(2, 2, 8, (16, 24), (24, 16), 3, seed=5, masked=True)
    weights = torch.tensor([0.2, 0.1, -0.4], dtype=torch.float64)
    cpu_out, cpu_sel = quadtree_attention(qs, ks, vs, [4, 3, 3], variant, weights, kmasks, return_selection=True)
    to = lambda xs: [x.to(CUDA) for x in xs]  # noqa: E731
    gpu_out, gpu_sel = quadtree_attention(to(qs), to(ks), to(vs), [4, 3, 3], variant, weights.to(CUDA), to(kmasks),
                                          return_selection=True)
    torch.testing.assert_close(gpu_out.cpu(), cpu_out, rtol=1e-9, atol=1e-9)
    for a, b in zip(gpu_sel, cpu_sel):
        assert torch.equal(a.cpu().sort(-1).values, b.sort(-1).values)


def test_matcher_on_cuda_keeps_the_cpu_matches(shipped):
    """fp32 on the GPU (TF32 convolutions are cuDNN's default) keeps >= 95% of the CPU's matches within 1 px."""
    img0, img1 = _demo_pair()
    cpu = shipped.match(img0, img1)
    gpu_model = Matcher.from_pretrained("default").eval().to(CUDA)
    gpu = gpu_model.match(img0, img1)
    assert len(cpu["keypoints0"]) > 100
    assert _kept_within_1px(cpu, gpu) >= 0.95
    assert abs(len(gpu["keypoints0"]) - len(cpu["keypoints0"])) <= 0.05 * len(cpu["keypoints0"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_cuda_gives_finite_matches_close_to_fp32(dtype):
    """Half-precision autocast runs, returns finite float32 keypoints inside the images and keeps the fp32
    matches (keypoints, fine expectation and coarse matching stay float32 under autocast: bf16 keeps 98.6% on
    the CPU; fp16 has 3 more mantissa bits)."""
    img0, img1 = _demo_pair()
    model = Matcher.from_pretrained("default").eval().to(CUDA)
    ref = model.match(img0, img1)
    with torch.autocast("cuda", dtype=dtype):
        new = model.match(img0, img1)
    for key, img in (("keypoints0", img0), ("keypoints1", img1)):
        pts = new[key]
        assert pts.dtype == np.float32 and np.isfinite(pts).all() and (pts >= 0).all()
        assert (pts[:, 0] < img.shape[1] + 4).all() and (pts[:, 1] < img.shape[0] + 4).all()
    assert _kept_within_1px(ref, new) >= 0.95


def test_restricted_coarse_matching_on_cuda_equals_cpu():
    """The PyTorch coarse matcher with its second pass restricted to what can match (thr > 0), in several
    chunks, on the GPU: the CPU's matches."""
    from matcher.matching import chunked_mutual_nearest_matches

    f0, f1 = _features(4)
    args = (0.1, 0.2, 1, (8, 12), (10, 12), None, None, 2 * 120 * 7, "torch")
    cpu = chunked_mutual_nearest_matches(f0, f1, *args)
    gpu = chunked_mutual_nearest_matches(f0.to(CUDA), f1.to(CUDA), *args)
    assert len(cpu[0]) > 20
    for a, b in zip(cpu[:3], gpu[:3]):
        assert torch.equal(a, b.cpu())
    torch.testing.assert_close(gpu[3].cpu(), cpu[3], rtol=1e-4, atol=1e-6)


def test_images_of_different_sizes_on_cuda(shipped):
    """Padded masks on the GPU: two sizes (one not divisible by 32) match as on the CPU."""
    img0, img1 = _demo_pair()
    img1 = img1[: img1.shape[0] - 37, : img1.shape[1] - 50]
    cpu = shipped.match(img0, img1)
    gpu = Matcher.from_pretrained("default").eval().to(CUDA).match(img0, img1)
    assert len(cpu["keypoints0"]) > 50
    assert _kept_within_1px(cpu, gpu) >= 0.95
