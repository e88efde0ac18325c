"""The QuadTree MLP's middle for CUDA GPUs, fused in Triton (optional: needs the ``triton`` package).

In PyTorch ``gelu(dwconv3x3(relu(h)) + bias)`` over the hidden tokens (4 x d_model channels) is four passes
over the largest tensor of the coarse transformer: the ReLU, cuDNN's convolution, its bias (added apart) and
the GELU (at 1152x1152 each pass moves about 340 MB per layer). Here one kernel reads the hidden map once
(its 3x3 neighbourhoods come from L2) and writes the result once. The PyTorch path
(:class:`matcher.transformer.QuadtreeMLP`) stays the reference and the fallback.
"""

from __future__ import annotations

import torch

from .triton_support import constexpr, jit_kernel, kernel_device, triton, tl


def _relu_dwconv_gelu(
    x_ptr, weight_ptr, bias_ptr, valid_ptr, out_ptr, h, w, channels,
    BLOCK_W: constexpr, BLOCK_C: constexpr, HAS_MASK: constexpr,
):
    """One program = BLOCK_W pixels of one grid row x BLOCK_C channels.

    x, out ``(B, h * w, C)`` contiguous (a channels-last grid); weight ``(9, C)`` (tap-major, so that a
    tap's channels load as vectors); bias ``(C,)``; valid
    ``(B, h * w)`` int8 (0 = padded token, read as zero). Zero padding at the grid's borders.
    """
    row = tl.program_id(0).to(tl.int64)  # b * h + y
    y = row % h
    xs = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_row, in_channels = xs < w, cs < channels
    acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    for dy in tl.static_range(3):
        yy = y + dy - 1
        row_ok = (yy >= 0) & (yy < h)
        for dx in tl.static_range(3):
            xx = xs + dx - 1
            ok = tl.where(row_ok, (xx >= 0) & (xx < w), False)  # (not `& row_ok`: the interpreter cannot)
            tokens = (row + dy - 1) * w + xx  # the neighbours' flat token indices (b * h * w + yy * w + xx)
            if HAS_MASK:
                ok = ok & (tl.load(valid_ptr + tokens, mask=ok, other=0) != 0)
            x = tl.load(x_ptr + tokens[:, None] * channels + cs[None, :], mask=ok[:, None] & in_channels[None, :],
                        other=0.0).to(tl.float32)
            tap = tl.load(weight_ptr + (dy * 3 + dx) * channels + cs, mask=in_channels, other=0.0).to(tl.float32)
            acc += tl.maximum(x, 0.0) * tap[None, :]
    acc += tl.load(bias_ptr + cs, mask=in_channels, other=0.0).to(tl.float32)[None, :]
    out = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))  # exact GELU, as F.gelu's default
    here = row * w + xs
    tl.store(out_ptr + here[:, None] * channels + cs[None, :], out.to(out_ptr.dtype.element_ty),
             mask=in_row[:, None] & in_channels[None, :])


#: Pixels and channels per program, and warps per program.
BLOCK_W = 16
BLOCK_C = 64
NUM_WARPS = 4


def relu_dwconv_gelu(
    x: torch.Tensor, hw: tuple[int, int], weight: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``gelu(depthwise_conv3x3(relu(x) * mask) + bias)`` over tokens on a grid, fused.

    Args:
        x: ``(B, h * w, C)`` tokens in row-major grid order; hw: the grid ``(h, w)``.
        weight: ``(C, 1, 3, 3)`` depthwise kernel; bias: ``(C,)`` (zero padding, stride 1).
        mask: ``(B, h * w)`` bool, False = padded token (read as zero), or None.
    Returns:
        ``(B, h * w, C)`` in ``x``'s dtype (computed in float32).
    """
    if not kernel_device(x):
        raise ValueError("the fused MLP kernel needs triton, a CUDA device (or TRITON_INTERPRET=1) and float32 / "
                         "float16 / bfloat16 tokens")
    b, n, c = x.shape
    h, w = hw
    if n != h * w or weight.shape != (c, 1, 3, 3) or bias.shape != (c,):
        raise ValueError(f"tokens {tuple(x.shape)} on a {h}x{w} grid do not fit weight {tuple(weight.shape)} and bias "
                         f"{tuple(bias.shape)}")
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    valid = x if mask is None else mask.contiguous().view(torch.int8)  # x: an unused pointer
    grid = (b * h, triton.cdiv(w, BLOCK_W), triton.cdiv(c, BLOCK_C))
    jit_kernel(_relu_dwconv_gelu)[grid](
        x, weight.reshape(c, 9).t().contiguous(), bias.contiguous(), valid, out, h, w, c,
        BLOCK_W=BLOCK_W, BLOCK_C=BLOCK_C, HAS_MASK=mask is not None, num_warps=NUM_WARPS,
    )
    return out
