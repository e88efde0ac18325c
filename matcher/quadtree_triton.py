"""A fused QuadTree-B refine level for CUDA GPUs, written in Triton (optional: needs the ``triton`` package).

The PyTorch path (:func:`matcher.attention._refine_level`) gathers every query group's candidate keys and
values into fresh tensors, multiplies them, softmaxes and takes a top-k: on a GPU the gathered copies
(hundreds of MB per layer at 1152x1152) dominate. Here one program per query group (the 4 children of a
parent query, one head) reads its candidates straight from the key / value tables, which stay in L2, and
writes only the message and the selected keys. The PyTorch path stays the reference and the fallback.
"""

from __future__ import annotations

import torch

from .triton_support import constexpr, jit_kernel, kernel_device, triton, tl


def fused_refine_available(x: torch.Tensor) -> bool:
    """Whether :func:`fused_refine_b` can run on tokens like ``x (..., D)``: triton installed, a CUDA tensor
    (or the interpreter), a float32 / float16 / bfloat16 dtype and a power-of-two head width D >= 4."""
    head_dim = x.shape[-1]
    return kernel_device(x) and head_dim >= 4 and not head_dim & (head_dim - 1)


def _refine_b(
    q_ptr, k_ptr, v_ptr, valid_ptr, rows_ptr, parents_ptr, msg_ptr, chosen_ptr,
    scale, parent_w, num_keys,
    D: constexpr, DC: constexpr, KP: constexpr, KSEL: constexpr, SELECT: constexpr, HAS_MASK: constexpr,
):
    """One program = one query group: 4 child queries x (4 children of each of ``num_keys`` parent keys).

    q ``(G, 4, D)``; k, v ``(R, 4, D)`` tables; valid ``(R, 4)`` int8; rows, parents ``(G, num_keys)``
    (table rows / parent-grid indices of the selected keys); msg ``(G, 4, D)``; chosen ``(G, 4, KSEL)``.
    Candidate ``j`` in ``[0, 4 * KP)`` is child ``j % 4`` of key slot ``j // 4`` (slots >= num_keys pad).
    """
    group = tl.program_id(0).to(tl.int64)
    cand = tl.arange(0, 4 * KP)
    slot, child = cand // 4, cand % 4
    real = slot < num_keys
    rows = tl.load(rows_ptr + group * num_keys + slot, mask=real, other=0).to(tl.int64)
    query = tl.arange(0, 4)
    dims = tl.arange(0, DC)
    key_base = rows * (4 * D) + child * D  # (4KP,) start of each candidate's key / value row
    q_base = q_ptr + group * (4 * D) + query * D  # (4,) pointers

    # logits (4, 4KP), accumulated over DC-wide slices of the head so intermediates stay small
    logits = tl.zeros((4, 4 * KP), dtype=tl.float32)
    for d0 in tl.static_range(0, D, DC):
        qd = tl.load(q_base[:, None] + d0 + dims[None, :]).to(tl.float32)  # (4, DC)
        kd = tl.load(k_ptr + key_base[:, None] + d0 + dims[None, :], mask=real[:, None], other=0.0).to(tl.float32)
        logits += tl.sum(qd[:, None, :] * kd[None, :, :], axis=2)
    logits = logits * scale
    if HAS_MASK:  # padded keys: the finite stand-in for -inf of the PyTorch path
        valid = tl.load(valid_ptr + rows * 4 + child, mask=real, other=0)
        logits = tl.where(valid[None, :] != 0, logits, -3.4028234663852886e38)
    logits = tl.where(real[None, :], logits, float("-inf"))  # pad slots take no weight at all
    weights = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    attn = weights / tl.sum(weights, axis=1)[:, None]

    out_base = msg_ptr + group * (4 * D) + query * D
    for d0 in tl.static_range(0, D, DC):
        vd = tl.load(v_ptr + key_base[:, None] + d0 + dims[None, :], mask=real[:, None], other=0.0).to(tl.float32)
        part = tl.sum(attn[:, :, None] * vd[None, :, :], axis=1)  # (4, DC)
        tl.store(out_base[:, None] + d0 + dims[None, :], part.to(msg_ptr.dtype.element_ty))

    if SELECT:  # top-KSEL candidates per query by repeated arg-max (weights >= 0; -1 marks taken / pad)
        work = tl.where(real[None, :], attn, -1.0)
        chosen_base = chosen_ptr + group * (4 * KSEL) + query * KSEL
        for t in tl.static_range(KSEL):
            best = tl.max(work, axis=1)
            pos = tl.min(tl.where(work == best[:, None], cand[None, :], 4 * KP), axis=1)  # (4,)
            key = tl.load(parents_ptr + group * num_keys + pos // 4).to(tl.int64)
            c = pos % 4
            fine = (2 * (key // parent_w) + c // 2) * (2 * parent_w) + 2 * (key % parent_w) + c % 2
            tl.store(chosen_base + t, fine)
            work = tl.where(cand[None, :] == pos[:, None], -2.0, work)


#: Head channels per step of the fused kernel's products (bounds its register use) and warps per program:
#: the fastest on an H100 at 144x144 tokens (2.72 ms per layer call vs 2.89-3.08 for 4/16 channels or 2 warps).
HEAD_SLICE = 8
NUM_WARPS = 1


def fused_refine_b(
    qc: torch.Tensor,
    k_table: torch.Tensor,
    v_table: torch.Tensor,
    valid_table: torch.Tensor | None,
    table_rows: torch.Tensor,
    parent_idx: torch.Tensor,
    parent_w: int,
    topk: int,
    scale: float,
    select: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """QuadTree-B attention of one refine level, fused (same result as the PyTorch path of
    :func:`matcher.attention._refine_level`, up to float rounding and the order of the selection).

    Args:
        qc: ``(G, 4, D)`` queries, grouped by parent query (G = B * heads * parents).
        k_table, v_table: ``(R, 4 * D)`` keys / values, row = a parent key's 4 children (R = B * heads * M).
        valid_table: ``(R, 4)`` bool (False = padded key) or None.
        table_rows: ``(G, K)`` rows of the tables each group attends to; parent_idx: ``(G, K)`` the same
            keys as indices into the parent key grid, whose width is ``parent_w``.
        topk: keys to select per query for the next level (used when ``select``); scale: logit scale.
    Returns:
        message ``(G, 4, D)`` in the queries' dtype, and selected key indices ``(G, 4, min(topk, 4K))``
        into this level's key grid (int64, no particular order), or None unless ``select``.
    """
    if not fused_refine_available(qc):
        raise ValueError("the fused QuadTree kernel needs triton, a CUDA device (or TRITON_INTERPRET=1), float32 / "
                         "float16 / bfloat16 tokens and a power-of-two head width")
    groups, _, d = qc.shape
    k = table_rows.shape[1]
    ksel = min(topk, 4 * k) if select else 1
    message = torch.empty_like(qc, memory_format=torch.contiguous_format)
    chosen = torch.empty(groups, 4, ksel, dtype=torch.int64, device=qc.device)
    if groups == 0:
        return message, chosen if select else None
    valid = qc if valid_table is None else valid_table.contiguous().view(torch.int8)  # qc: an unused pointer
    jit_kernel(_refine_b)[(groups,)](
        qc.contiguous(), k_table.contiguous(), v_table.contiguous(), valid, table_rows.contiguous(),
        parent_idx.contiguous(), message, chosen, float(scale), int(parent_w), int(k),
        D=d, DC=min(HEAD_SLICE, d), KP=triton.next_power_of_2(k), KSEL=ksel, SELECT=select,
        HAS_MASK=valid_table is not None, num_warps=NUM_WARPS,
    )
    return message, chosen if select else None
