"""Linear maps and convolutions with their activation applied inside oneDNN's primitive, and the coarse
matcher's feature similarities, for CPU inference.

``torch.ops.mkldnn._linear_pointwise`` / ``_convolution_pointwise`` (the ops torch.compile's CPU backend
fuses into) run the product and then the activation on each block while it is in cache: no extra pass over
the output (the QuadTree MLP's hidden map is 4 x 256 channels per token), and oneDNN's own kernels, which on
AMD CPUs run float32 products 1.2-1.5x faster than MKL's that ``F.linear`` calls. Where they do not apply
(autograd, tracing for export, compilation, GPUs, float64, a torch built without oneDNN) the same result
comes from the plain torch ops.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F

from .chunking import cpu_inference

#: Activations these functions take, as oneDNN post-op names (None: no activation).
ACTIVATIONS = {None: "none", "relu": "relu", "gelu": "gelu"}

#: Compute dtypes that take the oneDNN path. bfloat16 (autocast on CPUs with native bf16) already runs
#: through oneDNN, and there the fused activations gained nothing in the QuadTree transformer (its fused
#: depthwise conv + GELU ran slower than the two ops on an AMD EPYC), so it keeps the torch ops.
ONEDNN_DTYPES = (torch.float32,)


@functools.lru_cache(maxsize=1)
def onednn_available() -> bool:
    """Whether this torch has oneDNN and its fused pointwise ops."""
    ops = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and ops is not None
            and hasattr(ops, "_linear_pointwise") and hasattr(ops, "_convolution_pointwise"))


def _linear_op(*args):
    return torch.ops.mkldnn._linear_pointwise(*args)


def _conv_op(*args):
    return torch.ops.mkldnn._convolution_pointwise(*args)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype torch's linear / conv2d would compute in: the CPU autocast dtype when autocast is on."""
    if torch.is_autocast_enabled("cpu") and x.is_floating_point():
        return torch.get_autocast_dtype("cpu")
    return x.dtype


def _applies(x: torch.Tensor, params: tuple[torch.Tensor | None, ...], dtype: torch.dtype) -> bool:
    # outside autocast the torch op refuses mixed dtypes: leave it to say so rather than cast
    same_dtype = torch.is_autocast_enabled("cpu") or all(p is None or p.dtype == x.dtype for p in params)
    return same_dtype and dtype in ONEDNN_DTYPES and onednn_available() and cpu_inference(x, *params)


def _cast(dtype: torch.dtype, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.to(dtype) for t in tensors]


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation == "relu":
        return F.relu(y, inplace=True)
    return F.gelu(y) if activation == "gelu" else y


def _algorithm(activation: str | None) -> str | None:
    """oneDNN's variant of the activation: GELU as erf ("none"; "tanh" would be the approximation)."""
    return "none" if activation == "gelu" else None


def _check(activation: str | None) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None) -> torch.Tensor:
    """``activation(F.linear(x, weight, bias))``; ``activation`` None, "relu" or "gelu" (exact, erf).

    Args:
        x: ``(..., in)``; weight: ``(out, in)``; bias: ``(out,)`` or None.
    Returns:
        ``(..., out)``, in the dtype ``F.linear`` would give (autocast's included). On the oneDNN path the
        fused ReLU maps NaN to 0 where ``F.relu`` keeps it (checkpoints with NaN are refused at loading).
    """
    _check(activation)
    dtype = _compute_dtype(x)
    if not _applies(x, (weight, bias), dtype):
        return _activate(F.linear(x, weight, bias), activation)
    return _linear_op(*_cast(dtype, x, weight, bias), ACTIVATIONS[activation], [], _algorithm(activation))


def products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.transpose(-1, -2)``: every row of ``a`` against every row of ``b`` (feature similarities).

    Args:
        a: ``(r, C)`` or ``(B, r, C)``; b: ``(L, C)`` or ``(B, L, C)``.
    Returns:
        ``(r, L)`` or ``(B, r, L)``. Through oneDNN's linear with ``b`` as the weight where :func:`linear`
        would use it (1.6-1.8x MKL's float32 rate for these shapes on an AMD EPYC), else torch's matmul.
    """
    batched_alike = a.dim() == b.dim() and (a.dim() == 2 or len(a) == len(b))
    if not (batched_alike and _applies(a, (b,), _compute_dtype(a))):
        return a @ b.transpose(-1, -2)  # broadcasts, or says why the shapes do not fit
    if a.dim() == 2:
        return _linear_op(a, b, None, "none", [], None)
    return torch.stack([_linear_op(x, y, None, "none", [], None) for x, y in zip(a, b)])


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, groups: int,
           activation: str | None = None) -> torch.Tensor:
    """``activation(F.conv2d(x, weight, bias, stride=1, padding=padding, groups=groups))``.

    Args:
        x: ``(B, C_in, H, W)`` (channels-last memory gives channels-last output); weight
            ``(C_out, C_in / groups, k, k)``; bias ``(C_out,)`` or None.
    Returns:
        ``(B, C_out, H', W')``, in the dtype ``F.conv2d`` would give (the fused ReLU maps NaN to 0, as in
        :func:`linear`).
    """
    _check(activation)
    dtype = _compute_dtype(x)
    if not _applies(x, (weight, bias), dtype):
        return _activate(F.conv2d(x, weight, bias, padding=padding, groups=groups), activation)
    return _conv_op(
        *_cast(dtype, x, weight, bias), [padding, padding], [1, 1], [1, 1], groups, ACTIVATIONS[activation], [],
        _algorithm(activation),
    )


def flop_formulas() -> dict[object, Callable[..., int]]:
    """FLOP counts of the fused ops, for ``torch.utils.flop_counter.FlopCounterMode(custom_mapping=...)``,
    which knows ``mm`` and ``convolution`` but not these: 2 FLOPs per multiply-add, as it counts."""
    if not onednn_available():
        return {}
    from torch.utils.flop_counter import conv_flop_count

    def linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]

    def conv_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return conv_flop_count(list(x_shape), list(w_shape), list(out_shape), transposed=False)

    return {torch.ops.mkldnn._linear_pointwise: linear_flops, torch.ops.mkldnn._convolution_pointwise: conv_flops}
