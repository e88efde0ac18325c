"""The fused ReLU -> depthwise 3x3 conv -> GELU kernel (matcher/conv_triton.py) against the PyTorch path.

Compiled on a GPU; without one it runs in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import matcher.conv_triton as ct
from matcher.transformer import QuadtreeMLP

needs_triton = pytest.mark.skipif(ct.triton is None, reason="triton is not installed")


@pytest.fixture
def device(kernel_device: torch.device) -> torch.device:
    return kernel_device


def _reference(x, hw, weight, bias, mask):
    """The PyTorch path written out: padded tokens read as zero, zero padding at the borders."""
    b, n, c = x.shape
    x = F.relu(x)
    if mask is not None:
        x = x * mask[..., None].to(x.dtype)
    grid = x.transpose(1, 2).reshape(b, c, *hw)
    return F.gelu(F.conv2d(grid, weight, bias, padding=1, groups=c)).flatten(2).transpose(1, 2)


@needs_triton
@pytest.mark.parametrize(
    "b,hw,c,masked",
    [
        (2, (5, 7), 96, False),  # a row shorter than a block, channels not a multiple of the channel block
        (1, (3, 37), 64, True),  # a row longer than a block; padded tokens
        (2, (1, 1), 8, False),  # one token: every neighbour is padding
    ],
)
def test_fused_mlp_kernel_equals_torch(device, b, hw, c, masked):
    g = torch.Generator().manual_seed(sum(hw) + c)
    x = torch.randn(b, hw[0] * hw[1], c, generator=g)
    weight, bias = torch.randn(c, 1, 3, 3, generator=g), torch.randn(c, generator=g)
    mask = None
    if masked:
        mask = torch.ones(b, *hw, dtype=torch.bool)
        mask[:, -1, :], mask[:, :, -5:] = False, False
        mask = mask.flatten(1)
    expected = _reference(x, hw, weight, bias, mask)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    out = ct.relu_dwconv_gelu(to(x), hw, to(weight), to(bias), to(mask))
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)


@needs_triton
def test_fused_mlp_kernel_half_precision(device):
    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(1, 24, 32, generator=g), torch.randn(32, 1, 3, 3, generator=g), torch.randn(32, generator=g)
    expected = _reference(x, (4, 6), weight, bias, None)
    out = ct.relu_dwconv_gelu(x.bfloat16().to(device), (4, 6), weight.to(device), bias.to(device))
    assert out.dtype == torch.bfloat16
    assert ((out.float().cpu() - expected).norm() / expected.norm()) < 2e-2


@needs_triton
def test_quadtree_mlp_takes_the_kernel_only_where_it_may(device):
    torch.manual_seed(0)
    mlp = QuadtreeMLP(16, 64, kernel="triton").to(device)
    x = torch.randn(2, 12, 16, device=device)
    mask = torch.rand(2, 12, device=device) > 0.3
    with torch.no_grad():
        fused = mlp(x, (3, 4), mask)
        mlp.kernel = "torch"
        torch.testing.assert_close(fused, mlp(x, (3, 4), mask), rtol=1e-5, atol=1e-5)
    mlp.kernel = "triton"
    with pytest.raises(ValueError, match="Triton MLP kernel needs no gradient"):
        mlp(x, (3, 4), mask)  # training: the parameters need gradients
    mlp.kernel = "auto"
    out = mlp(x, (3, 4), mask)  # auto with gradients: the PyTorch path, which has a backward pass
    out.sum().backward()
    assert mlp.dwconv.dwconv.weight.grad is not None


def test_bad_inputs_and_kernel_choice(monkeypatch):
    with pytest.raises(ValueError, match="kernel must be one of"):
        QuadtreeMLP(8, 16, kernel="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    mlp = QuadtreeMLP(8, 16).eval()
    with torch.no_grad():
        assert not mlp._use_fused_kernel(torch.zeros(1, 4, 16))  # CPU: the PyTorch path
    if ct.triton is not None:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        with pytest.raises(ValueError, match="do not fit"):
            ct.relu_dwconv_gelu(torch.zeros(1, 6, 8), (2, 2), torch.zeros(8, 1, 3, 3), torch.zeros(8))
