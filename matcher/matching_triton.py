"""Coarse matching's two passes over a similarity block as Triton kernels (optional: needs ``triton``).

:func:`matcher.matching.chunked_mutual_nearest_matches` needs, of the similarity ``s (B, L0, L1)``, the
log-sum-exps ``R`` (rows) and ``C`` (columns), then the row maxima / arg-maxima and the column maxima of the
log-confidence ``2 s - R - C``. In PyTorch each of these is several passes over the block (and the second
pass a second matrix product); here each is one read of ``s``: a program walks a band of rows across the
columns, reducing its rows fully and writing per-band partials for the columns, which are combined over
the bands afterwards (a small tensor).
"""

from __future__ import annotations

import torch

from .triton_support import constexpr, jit_kernel, kernel_device, triton, tl, use_kernel

#: Rows per program and columns per step of both kernels.
BLOCK_ROWS = 32
BLOCK_COLS = 128
NUM_WARPS = 4

# what PyTorch fills masked similarities with (a constexpr: kernels may read no other globals)
_NEG_FLOAT_MIN = -3.4028234663852886e38 if tl is None else tl.constexpr(-3.4028234663852886e38)


def use_matching_kernels(x: torch.Tensor, kernel: str = "auto") -> bool:
    """Whether coarse matching of tokens like ``x`` runs through these kernels: ``auto`` on CUDA when triton
    is installed, ``triton`` wherever they can run (CPU under the interpreter), ``torch`` never."""
    requirements = ("the Triton matching kernels need triton, a CUDA device (or TRITON_INTERPRET=1), a float32 / "
                    f"float16 / bfloat16 input and no tracing; got {x.dtype} on {x.device.type}")
    return use_kernel(kernel, kernel_device(x), x.device, requirements)


def _lse_pass(sim_ptr, row_lse_ptr, col_max_ptr, col_sum_ptr, rows_total, cols_total, bands,
              BR: constexpr, BC: constexpr):
    """Row log-sum-exp of a band of BR rows; per-band column maxima and sums of exp(s - max)."""
    band, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rows = band * BR + tl.arange(0, BR)
    row_in = rows < rows_total
    base = sim_ptr + b * rows_total * cols_total + rows.to(tl.int64)[:, None] * cols_total
    run_max = tl.full((BR,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BR,), tl.float32)
    part_base = (b * bands + band) * cols_total
    c0 = 0
    while c0 < cols_total:  # (a while loop: Triton's interpreter cannot range() over a runtime bound)
        cols = c0 + tl.arange(0, BC)
        col_in = cols < cols_total
        # out of range reads as the masked value: it adds exp(min - max) = 0 next to any real entry
        x = tl.load(base + cols[None, :], mask=row_in[:, None] & col_in[None, :], other=_NEG_FLOAT_MIN)
        x = x.to(tl.float32)
        new_max = tl.maximum(run_max, tl.max(x, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), axis=1)
        run_max = new_max
        col_max = tl.max(x, axis=0)
        col_sum = tl.sum(tl.exp(x - col_max[None, :]), axis=0)
        tl.store(col_max_ptr + part_base + cols, col_max, mask=col_in)
        tl.store(col_sum_ptr + part_base + cols, col_sum, mask=col_in)
        c0 += BC
    tl.store(row_lse_ptr + b * rows_total + rows, run_max + tl.log(run_sum), mask=row_in)


def _best_pass(sim_ptr, row_lse_ptr, col_lse_ptr, row_valid_ptr, col_valid_ptr, row_best_ptr, row_arg_ptr,
               col_best_ptr, rows_total, cols_total, bands,
               BR: constexpr, BC: constexpr, HAS_ROW_MASK: constexpr, HAS_COL_MASK: constexpr):
    """Row maxima / arg-maxima and per-band column maxima of ``2 s - R - C`` (-inf where masked)."""
    band, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rows = band * BR + tl.arange(0, BR)
    row_in = rows < rows_total
    if HAS_ROW_MASK:
        row_in_valid = row_in & (tl.load(row_valid_ptr + b * rows_total + rows, mask=row_in, other=0) != 0)
    else:
        row_in_valid = row_in
    r = tl.load(row_lse_ptr + b * rows_total + rows, mask=row_in, other=0.0)
    base = sim_ptr + b * rows_total * cols_total + rows.to(tl.int64)[:, None] * cols_total
    best = tl.full((BR,), float("-inf"), tl.float32)
    arg = tl.zeros((BR,), tl.int32)
    part_base = (b * bands + band) * cols_total
    c0 = 0
    while c0 < cols_total:
        cols = c0 + tl.arange(0, BC)
        col_in = cols < cols_total
        if HAS_COL_MASK:
            col_in_valid = col_in & (tl.load(col_valid_ptr + b * cols_total + cols, mask=col_in, other=0) != 0)
        else:
            col_in_valid = col_in
        c = tl.load(col_lse_ptr + b * cols_total + cols, mask=col_in, other=0.0)
        valid = row_in_valid[:, None] & col_in_valid[None, :]
        x = tl.load(base + cols[None, :], mask=valid, other=0.0).to(tl.float32)  # masked: the float minimum
        log_conf = tl.where(valid, 2.0 * x - r[:, None] - c[None, :], float("-inf"))
        tile_best = tl.max(log_conf, axis=1)
        tile_arg = tl.argmax(log_conf, axis=1).to(tl.int32) + c0
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        arg = tl.where(better, tile_arg, arg)
        tl.store(col_best_ptr + part_base + cols, tl.max(log_conf, axis=0), mask=col_in)
        c0 += BC
    tl.store(row_best_ptr + b * rows_total + rows, best, mask=row_in)
    tl.store(row_arg_ptr + b * rows_total + rows, arg, mask=row_in)


def _bands(rows: int) -> int:
    return triton.cdiv(rows, BLOCK_ROWS)


def similarity_log_sum_exps(sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One read of ``sim (B, r, L1)``: row log-sum-exps ``(B, r)`` (float32) and, per band of rows, the column
    maxima and sums of exp(s - max), ``(B, bands, L1)`` each; combine bands with :func:`combine_column_lse`."""
    b, r, l1 = sim.shape
    sim = sim.contiguous()
    bands = _bands(r)
    row_lse = torch.empty(b, r, dtype=torch.float32, device=sim.device)
    col_max = torch.empty(b, bands, l1, dtype=torch.float32, device=sim.device)
    col_sum = torch.empty_like(col_max)
    if r and l1:
        jit_kernel(_lse_pass)[(bands, b)](
            sim, row_lse, col_max, col_sum, r, l1, bands, BR=BLOCK_ROWS, BC=BLOCK_COLS, num_warps=NUM_WARPS
        )
    return row_lse, col_max, col_sum


def combine_column_lse(col_max: torch.Tensor, col_sum: torch.Tensor) -> torch.Tensor:
    """Column log-sum-exps ``(B, L1)`` from per-band maxima and sums ``(B, bands, L1)``."""
    top = col_max.amax(dim=1, keepdim=True)
    return top[:, 0] + torch.log((col_sum * torch.exp(col_max - top)).sum(dim=1))


def log_confidence_maxima(
    sim: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor,
    row_valid: torch.Tensor | None, col_valid: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One read of ``sim (B, r, L1)``: of ``2 s - R - C`` (-inf at masked rows / columns), the row maxima and
    arg-maxima ``(B, r)`` and the column maxima ``(B, L1)`` (float32, arg-maxima int64).

    ``row_lse (B, r)``, ``col_lse (B, L1)``; ``row_valid (B, r)`` / ``col_valid (B, L1)`` bool or None.
    """
    b, r, l1 = sim.shape
    sim = sim.contiguous()
    bands = _bands(r)
    row_best = torch.empty(b, r, dtype=torch.float32, device=sim.device)
    row_arg = torch.empty(b, r, dtype=torch.int32, device=sim.device)
    col_best = torch.full((b, bands, l1), float("-inf"), dtype=torch.float32, device=sim.device)
    if r and l1:
        flag = lambda m: sim if m is None else m.contiguous().view(torch.int8)  # noqa: E731  (sim: unused pointer)
        jit_kernel(_best_pass)[(bands, b)](
            sim, row_lse.float().contiguous(), col_lse.float().contiguous(), flag(row_valid), flag(col_valid),
            row_best, row_arg, col_best, r, l1, bands, BR=BLOCK_ROWS, BC=BLOCK_COLS,
            HAS_ROW_MASK=row_valid is not None, HAS_COL_MASK=col_valid is not None, num_warps=NUM_WARPS,
        )
    return row_best, row_arg.long(), col_best.amax(dim=1)
