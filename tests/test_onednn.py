"""oneDNN's fused linear / convolution + activation (matcher.onednn) against float64 references, and the
cases that must keep the plain torch ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from matcher import onednn
from matcher.transformer import LocalFeatureTransformer, QuadtreeMLP

ACTS = {None: lambda y: y, "relu": F.relu, "gelu": F.gelu}

needs_onednn = pytest.mark.skipif(not onednn.onednn_available(), reason="this torch has no oneDNN")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _took_onednn(monkeypatch) -> list[str]:
    """Records which fused oneDNN op each call ran (the plain path records nothing)."""
    calls: list[str] = []
    for name in ("_linear_op", "_conv_op"):
        op = getattr(onednn, name)
        monkeypatch.setattr(onednn, name, lambda *a, _n=name, _op=op: calls.append(_n) or _op(*a))
    return calls


@needs_onednn
@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
@pytest.mark.parametrize("shape,bias", [((37, 64), True), ((2, 50, 64), False), ((0, 64), True)])
def test_linear_matches_float64_reference(activation, shape, bias, monkeypatch):
    g = _gen(len(shape))
    x, w = torch.randn(shape, generator=g), torch.randn(48, 64, generator=g) / 8
    b = torch.randn(48, generator=g) if bias else None
    expected = ACTS[activation](F.linear(x.double(), w.double(), None if b is None else b.double()))
    calls = _took_onednn(monkeypatch)
    with torch.inference_mode():
        out = onednn.linear(x, w, b, activation)
    assert calls == ["_linear_op"]
    assert out.dtype == torch.float32 and out.shape == (*shape[:-1], 48)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_linear_reads_strided_input():
    x = torch.randn(3, 20, 128, generator=_gen(1))[..., ::2]  # a non-contiguous view
    w = torch.randn(32, 64, generator=_gen(2))
    with torch.no_grad():
        torch.testing.assert_close(onednn.linear(x, w, None, "relu"), F.relu(F.linear(x, w)), rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("groups", [1, 16])
def test_conv2d_matches_float64_reference_and_keeps_channels_last(activation, groups, monkeypatch):
    g = _gen(groups)
    x = torch.randn(2, 16, 9, 13, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(16, 16 // groups, 3, 3, generator=g) / 4, torch.randn(16, generator=g)
    expected = ACTS[activation](F.conv2d(x.double(), w.double(), b.double(), padding=1, groups=groups))
    calls = _took_onednn(monkeypatch)
    with torch.inference_mode():
        out = onednn.conv2d(x, w, b, 1, groups, activation)
    assert calls == ["_conv_op"]
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_plain_ops_where_onednn_does_not_apply(monkeypatch):
    """Gradients, float64, bf16 autocast and tracing run the torch ops: same values, gradients flow."""
    g = _gen(3)
    x, w, b = torch.randn(5, 8, generator=g), torch.randn(4, 8, generator=g), torch.randn(4, generator=g)
    calls = _took_onednn(monkeypatch)
    leaf = w.clone().requires_grad_()
    onednn.linear(x, leaf, b, "gelu").sum().backward()
    expected = w.clone().requires_grad_()
    F.gelu(F.linear(x, expected, b)).sum().backward()
    assert torch.equal(leaf.grad, expected.grad)
    with torch.no_grad():
        assert torch.equal(onednn.linear(x.double(), w.double(), None, "relu"), F.relu(F.linear(x.double(), w.double())))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, ref = onednn.linear(x, w, b, "relu"), F.relu(F.linear(x, w, b))
        assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
        monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
        assert torch.equal(onednn.linear(x, w, b), F.linear(x, w, b))
    assert calls == []


def test_unknown_activation_is_an_error():
    with pytest.raises(ValueError, match="activation must be one of"):
        onednn.linear(torch.zeros(1, 2), torch.zeros(3, 2), None, "silu")


@needs_onednn
def test_quadtree_mlp_and_loftr_layers_match_their_autograd_path():
    """The inference path (oneDNN, fused activations) gives the training path's values (plain torch ops)."""
    torch.manual_seed(0)
    mlp = QuadtreeMLP(32, 128, kernel="torch")
    x, mask = torch.randn(2, 6 * 10, 32), torch.ones(2, 60, dtype=torch.bool)
    mask[1, 50:] = False
    with torch.inference_mode():
        fast = mlp(x, (6, 10), mask)
    torch.testing.assert_close(fast, mlp(x, (6, 10), mask), rtol=1e-5, atol=1e-5)
    loftr = LocalFeatureTransformer(32, 4, ["self", "cross"], "linear")
    f0, f1 = torch.randn(3, 25, 32), torch.randn(3, 25, 32)
    with torch.inference_mode():
        fast = loftr(f0, f1)
    for a, b in zip(fast, loftr(f0, f1)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_flop_formulas_count_as_torch_counts_the_plain_ops():
    from torch.utils.flop_counter import FlopCounterMode

    def flops(fn, mapping=None):
        counter = FlopCounterMode(display=False, custom_mapping=mapping or {})
        with counter:
            fn()
        return counter.get_total_flops()

    g = _gen(4)
    x, w, b = torch.randn(3, 7, 24, generator=g), torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    img, kernel = torch.randn(2, 8, 9, 11, generator=g), torch.randn(8, 1, 3, 3, generator=g)
    with torch.inference_mode():
        fused = flops(lambda: (onednn.linear(x, w, b, "relu"), onednn.conv2d(img, kernel, None, 1, 8, "gelu")),
                      onednn.flop_formulas())
    plain = flops(lambda: (F.linear(x, w, b), F.conv2d(img, kernel, padding=1, groups=8)))
    assert fused == plain == 2 * 21 * 40 * 24 + 2 * 2 * 8 * 9 * 11 * 9


@needs_onednn
@pytest.mark.parametrize("batch", [None, 1, 3])
def test_products_match_float64_reference(batch, monkeypatch):
    g = _gen(5)
    lead = () if batch is None else (batch,)
    a, b = torch.randn(*lead, 33, 20, generator=g), torch.randn(*lead, 47, 20, generator=g)
    expected = a.double() @ b.double().transpose(-1, -2)
    calls = _took_onednn(monkeypatch)
    with torch.inference_mode():
        out = onednn.products(a, b)
    assert calls == ["_linear_op"] * (1 if batch is None else batch)
    assert out.shape == expected.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    leaf = a.clone().requires_grad_()  # autograd: torch's matmul, and its gradient
    onednn.products(leaf, b).sum().backward()
    torch.testing.assert_close(leaf.grad, b.sum(-2, keepdim=True).expand_as(a))
    assert len(calls) == (1 if batch is None else batch)


@needs_onednn
def test_shapes_and_dtypes_the_plain_ops_refuse_or_broadcast_keep_their_behaviour(monkeypatch):
    # the fast path must not drop batch entries (zip) or cast a weight the plain op would refuse
    g = _gen(6)
    calls = _took_onednn(monkeypatch)
    with torch.inference_mode():
        a = torch.randn(2, 12, 16, generator=g)
        for b in (torch.randn(1, 20, 16, generator=g), torch.randn(20, 16, generator=g)):
            torch.testing.assert_close(onednn.products(a, b), a @ b.transpose(-1, -2))
        with pytest.raises(RuntimeError):
            onednn.products(a, torch.randn(3, 20, 16, generator=g))
        x = torch.randn(5, 16, generator=g)
        for dtype in (torch.float64, torch.float16):
            with pytest.raises(RuntimeError, match="dtype"):
                onednn.linear(x, torch.randn(8, 16, generator=g, dtype=dtype), None, "relu")
    assert calls == []
