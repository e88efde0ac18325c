"""2-D sine position encoding of the coarse feature map, computed for any grid size."""

from __future__ import annotations

import math

import torch


def sine_position_encoding(
    d_model: int, height: int, width: int, temp_bug_fix: bool = True, device=None, dtype=torch.float32
) -> torch.Tensor:
    """LoFTR's sine position encoding, ``(1, d_model, height, width)``.

    Channels cycle through sin(x f), cos(x f), sin(y f), cos(y f) with 1-based positions x, y and
    frequencies f_i = exp(i * a), i = 0, 2, 4, ... < d_model / 2. The corrected formula uses
    a = -ln(10000) / (d_model / 2); LoFTR's original code computed ``-ln(10000) / d_model // 2``, which
    floors to -1 (kept with ``temp_bug_fix=False`` because LoFTR's released weights were trained with it).
    """
    if d_model % 4:
        raise ValueError(f"d_model must be a multiple of 4, got {d_model}")
    if temp_bug_fix:
        exponent = -math.log(10000.0) / (d_model // 2)
    else:
        exponent = float(math.floor(-math.log(10000.0) / d_model / 2))
    freqs = torch.exp(torch.arange(0, d_model // 2, 2, dtype=torch.float32, device=device) * exponent)
    ys = torch.arange(1, height + 1, dtype=torch.float32, device=device)
    xs = torch.arange(1, width + 1, dtype=torch.float32, device=device)
    x_f = (xs[None, :] * freqs[:, None])[:, None, :].expand(-1, height, -1)  # (F, H, W)
    y_f = (ys[None, :] * freqs[:, None])[:, :, None].expand(-1, -1, width)
    pe = torch.stack([x_f.sin(), x_f.cos(), y_f.sin(), y_f.cos()], dim=1)  # (F, 4, H, W)
    return pe.reshape(1, d_model, height, width).to(dtype)
