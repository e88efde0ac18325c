"""Coarse matching's Triton kernels (matcher/matching_triton.py) against PyTorch.

On a GPU the kernels are compiled; without one they run in Triton's CPU interpreter (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from matcher import matching_triton as mt
from matcher.matching import chunked_mutual_nearest_matches
from matcher.triton_support import triton

pytestmark = pytest.mark.skipif(triton is None, reason="triton is not installed")


@pytest.fixture
def device(kernel_device: torch.device) -> torch.device:
    return kernel_device


def _similarity(device, b=2, r=45, l1=300, seed=0):
    """Entries spread over +-40 (like trained similarities / temperature); some rows and columns masked."""
    g = torch.Generator().manual_seed(seed)
    sim = (torch.randn(b, r, l1, generator=g) * 12).to(device)
    row_valid = torch.rand(b, r, generator=g).to(device) > 0.2
    col_valid = torch.rand(b, l1, generator=g).to(device) > 0.2
    return sim, row_valid, col_valid


def test_log_sum_exps_are_one_pass_of_torch_logsumexp(device):
    sim, _, col_valid = _similarity(device)
    sim = sim.masked_fill(~col_valid[:, None, :], torch.finfo(torch.float32).min)  # as the matcher masks
    row_lse, col_max, col_sum = mt.similarity_log_sum_exps(sim)
    assert col_max.shape == (2, mt._bands(45), 300)
    torch.testing.assert_close(row_lse, sim.logsumexp(2), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mt.combine_column_lse(col_max, col_sum), sim.logsumexp(1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("masked", [False, True])
def test_log_confidence_maxima_equal_torch(device, masked):
    sim, row_valid, col_valid = _similarity(device, seed=1)
    if not masked:
        row_valid = col_valid = None
    row_lse, col_lse = sim.logsumexp(2), sim.logsumexp(1)
    log_conf = 2 * sim - row_lse[:, :, None] - col_lse[:, None, :]
    if masked:
        log_conf = log_conf.masked_fill(~row_valid[:, :, None] | ~col_valid[:, None, :], float("-inf"))
    row_best, row_arg, col_best = mt.log_confidence_maxima(sim, row_lse, col_lse, row_valid, col_valid)
    ref_best, ref_arg = log_conf.max(dim=2)
    torch.testing.assert_close(row_best, ref_best, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(col_best, log_conf.amax(dim=1), rtol=1e-5, atol=1e-4)
    assert row_arg.dtype == torch.int64
    real = torch.isfinite(ref_best)
    assert torch.equal(row_arg[real], ref_arg[real])


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("max_entries", [None, 2 * 24 * 96])  # one chunk (product kept) / several (recomputed)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16 features: both paths match in float32
def test_matches_equal_the_torch_path(device, masked, max_entries, dtype):
    g = torch.Generator().manual_seed(3)
    feat0, feat1 = (torch.randn(2, n, 32, generator=g).to(device) for n in (80, 96))
    feat1[:, :60] = feat0[:, :60] + 0.1 * torch.randn(2, 60, 32, generator=g).to(device)  # true matches
    feat0, feat1 = feat0.to(dtype), feat1.to(dtype)
    mask0 = mask1 = None
    if masked:  # bottom-right padding: 8x10 valid of 8x10 / 8x12 grids, second image padded
        mask0 = torch.ones(2, 80, dtype=torch.bool, device=device)
        mask1 = torch.ones(2, 8, 12, dtype=torch.bool, device=device)
        mask1[1, :, 9:] = False
        mask1 = mask1.flatten(1)
    args = (feat0, feat1, 0.1, 0.0, 1, (8, 10), (8, 12), mask0, mask1, max_entries)
    ref = chunked_mutual_nearest_matches(*args, kernel="torch")
    out = chunked_mutual_nearest_matches(*args, kernel="triton")
    assert len(ref[0]) > 20
    for a, b in zip(out[:3], ref[:3]):
        assert torch.equal(a, b)
    torch.testing.assert_close(out[3], ref[3], rtol=1e-4, atol=1e-6)


def test_kernel_choice(monkeypatch):
    x = torch.zeros(2, 3)
    assert not mt.use_matching_kernels(x)  # CPU: PyTorch
    assert not mt.use_matching_kernels(x, "torch")
    with pytest.raises(ValueError, match="kernel must be"):
        mt.use_matching_kernels(x, "fast")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="Triton matching kernels need"):
        mt.use_matching_kernels(x, "triton")


def test_no_kernels_while_tracing(device, monkeypatch):
    """An ONNX export traces the PyTorch paths: a Triton kernel cannot be part of the graph."""
    x = torch.zeros(2, 3, device=device)
    assert mt.use_matching_kernels(x, "triton")
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
    assert not mt.use_matching_kernels(x)
    with pytest.raises(ValueError, match="Triton matching kernels need"):
        mt.use_matching_kernels(x, "triton")
