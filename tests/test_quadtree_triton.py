"""The fused Triton refine level (matcher/quadtree_triton.py) against the PyTorch path.

On a GPU the kernel is compiled; without one it runs in Triton's CPU interpreter, which executes the same
kernel source program by program (tests/conftest.py sets ``TRITON_INTERPRET=1`` before triton is imported).
"""

from __future__ import annotations

import pytest
import torch

import matcher.quadtree_triton as qt
import matcher.triton_support
from matcher import Matcher, load_config
from matcher.attention import _use_fused_kernel, quadtree_attention

from .test_attention import _pyramids

needs_triton = pytest.mark.skipif(qt.triton is None, reason="triton is not installed")


@pytest.fixture
def device(kernel_device: torch.device) -> torch.device:
    return kernel_device


def _float32(device, *pyramids):
    cast = lambda x: None if x is None else (x.float() if x.is_floating_point() else x).to(device)  # noqa: E731
    return [[cast(x) for x in p] for p in pyramids]


@needs_triton
@pytest.mark.parametrize(
    "hw_q,hw_k,topks,masked",
    [
        ((8, 8), (8, 8), [32, 16, 16], False),  # the shipped top-k: every coarse key kept
        ((8, 12), (12, 8), [3, 5, 2], False),  # cross grids; 3 keys per parent: padded key slots
        ((8, 8), (12, 12), [4, 3, 3], True),  # padded keys
        ((16, 16), (16, 16), [5, 7, 3], True),  # padded keys and a selection that is not a power of two
    ],
)
def test_fused_kernel_equals_torch_path(device, hw_q, hw_k, topks, masked):
    qs, ks, vs, kmasks = _float32(device, *_pyramids(2, 2, 8, hw_q, hw_k, 3, seed=11, masked=masked))
    weights = torch.tensor([0.3, -0.2, 0.1], device=device)
    ref, ref_sel = quadtree_attention(qs, ks, vs, topks, "B", weights, kmasks, True, kernel="torch")
    out, sel = quadtree_attention(qs, ks, vs, topks, "B", weights, kmasks, True, kernel="triton")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(sel, ref_sel):  # unordered top-k: compare as sets
        assert a.dtype == torch.int64 and a.shape == b.shape
        assert torch.equal(a.sort(-1).values, b.sort(-1).values)


@needs_triton
def test_fused_kernel_with_selection_only_levels(device):
    """Levels added above the trained ones (``coarse.max_coarsest_tokens``): a fused refine level that only
    selects weights its message 0, as the PyTorch path does."""
    qs, ks, vs, kmasks = _float32(device, *_pyramids(1, 2, 8, (16, 16), (16, 16), 4, seed=12, masked=True))
    weights = torch.tensor([0.3, -0.2], device=device)  # the 2 trained levels; the 2 coarsest only select
    args = (qs, ks, vs, [3, 3, 3, 2], "B", weights, kmasks)
    ref = quadtree_attention(*args, kernel="torch", selection_only_levels=2)
    out = quadtree_attention(*args, kernel="triton", selection_only_levels=2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@needs_triton
def test_fused_kernel_half_precision_computes_in_float32(device):
    """bf16 tokens: the kernel accumulates in float32 and returns bf16, close to the float32 result."""
    qs, ks, vs, _ = _float32(device, *_pyramids(1, 2, 8, (8, 8), (8, 8), 3, seed=2))
    weights = torch.tensor([0.3, -0.2, 0.1], device=device)
    ref = quadtree_attention(qs, ks, vs, [4, 3, 3], "B", weights, kernel="torch")
    half = lambda xs: [x.bfloat16() for x in xs]  # noqa: E731
    out = quadtree_attention(half(qs), half(ks), half(vs), [4, 3, 3], "B", weights, kernel="triton")
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()) < 2e-2


@needs_triton
@pytest.mark.parametrize(
    "hw0,hw1,layer",
    [
        ((64, 80), (64, 80), "self"),  # both images in one batch, the kernel reading the channels-last projections
        ((40, 56), (56, 72), "cross"),  # coarse 5x7 and 7x9, padded to 8x8 and 8x12 with masks: cross grids, padded keys
    ],
)
def test_matcher_with_the_fused_kernel_gives_the_same_matches(device, hw0, hw1, layer):
    torch.manual_seed(0)
    cfg = load_config("lite")
    cfg.match_coarse.thr = 0.0
    cfg.coarse.kernel = "torch"
    cfg.coarse.nhead, cfg.coarse.layer_names = 4, [layer]  # few kernel programs: the interpreter is slow
    model = Matcher(cfg).eval().to(device)
    g = torch.Generator().manual_seed(1)
    batch = {k: torch.rand(1, 1, *hw, generator=g).to(device) for k, hw in (("image0", hw0), ("image1", hw1))}
    with torch.inference_mode():
        ref = model(batch)
        for layer in model.loftr_coarse.layers:  # the QuadTree and the MLP kernels
            layer.attn.kernel = layer.mlp.kernel = "triton"
        out = model(batch)
    assert len(ref["keypoints0"]) > 0
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], rtol=1e-4, atol=1e-3)


def test_kernel_choice(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(1, 1, 4, 4, 32)
    assert not _use_fused_kernel("auto", "B", [x])  # CPU: PyTorch, interpreter or not
    assert not _use_fused_kernel("torch", "B", [x])
    with pytest.raises(ValueError, match="kernel must be one of"):
        _use_fused_kernel("cuda", "B", [x])
    with pytest.raises(ValueError, match="Triton QuadTree kernel needs"):
        _use_fused_kernel("triton", "B", [x])  # CPU without the interpreter


@needs_triton
def test_kernel_choice_on_the_kernel_device(device):
    x = torch.zeros(1, 1, 4, 4, 32, device=device)
    assert _use_fused_kernel("triton", "B", [x])
    for bad in ([x.double()], [torch.zeros(1, 1, 4, 4, 24)], [x.clone().requires_grad_()]):
        with pytest.raises(ValueError, match="Triton QuadTree kernel needs"):
            _use_fused_kernel("triton", "B", bad)
    with pytest.raises(ValueError, match="Triton QuadTree kernel needs"):
        _use_fused_kernel("triton", "A", [x])
    with torch.no_grad():  # no gradient needed: the kernel may run
        assert _use_fused_kernel("triton", "B", [x.clone().requires_grad_()])


def test_without_triton_the_torch_path_runs(monkeypatch):
    monkeypatch.setattr(matcher.triton_support, "triton", None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not qt.fused_refine_available(torch.zeros(2, 4, 32))
    qs, ks, vs, _ = _float32("cpu", *_pyramids(1, 2, 8, (8, 8), (8, 8), 3, seed=3))
    out = quadtree_attention(qs, ks, vs, [4, 3, 3], "B", torch.zeros(3))  # auto
    assert torch.isfinite(out).all()


def test_fused_path_makes_no_copies_of_level_sized_tensors(monkeypatch):
    """Around the kernel (replaced here by one that only allocates its outputs) the fused path passes
    strided views: no regrouped copies of the queries, keys or values, no mixing or reordering passes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import matcher.attention as attention

    def outputs_only(q, k, v, key_mask, parent_idx, parent_message, mix, topk, scale, select):
        b, nh, hq, wq, d = q.shape
        msg = torch.empty(b, hq * wq, nh, d, dtype=q.dtype).transpose(1, 2)
        return msg, torch.zeros(b, nh, hq * wq, min(topk, 4 * parent_idx.shape[-1]), dtype=torch.int64) if select else None

    monkeypatch.setattr(attention, "fused_refine_b", outputs_only)
    monkeypatch.setattr(attention, "_use_fused_kernel", lambda kernel, variant, tensors: kernel == "triton")
    qs, ks, vs, _ = _float32("cpu", *_pyramids(2, 4, 8, (16, 16), (16, 16), 3, seed=5))
    level_size = qs[0].numel()

    class LargeOutputs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            first = out[0] if isinstance(out, (tuple, list)) else out
            inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            is_view = isinstance(first, torch.Tensor) and first.untyped_storage().data_ptr() in inputs
            if isinstance(first, torch.Tensor) and first.numel() >= level_size // 4 and not is_view:
                self.ops.add(func.overloadpacket.__name__)
            return out

    for kernel, expect_copies in (("torch", True), ("triton", False)):
        with LargeOutputs() as mode:
            quadtree_attention(qs, ks, vs, [4, 3, 3], "B", torch.zeros(3), kernel=kernel)
        fresh = mode.ops - {"empty", "empty_strided", "zeros"}
        assert bool(fresh) == expect_copies, (kernel, fresh)  # the PyTorch path does copy: the check can fail
