"""A fused QuadTree-B refine level for CUDA GPUs, written in Triton (optional: needs the ``triton`` package).

The PyTorch path (:func:`matcher.attention._refine_level`) regroups queries, keys and values by parent,
gathers every query group's candidate keys and values into fresh tensors, multiplies them, softmaxes, takes
a top-k, then mixes the message with the coarser levels' and puts it back in grid order: on a GPU the
copies (hundreds of MB per layer at 1152x1152) dominate. Here one program per query group (the 4 children of
a parent query, one head) reads its queries and candidates in place from the level's maps (the keys stay in
L2), and writes only the finished message, already mixed and in the memory order of merged heads, and the
selected keys in grid order. The PyTorch path stays the reference and the fallback.
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
    q_ptr, q_b, q_h, q_y, q_x, q_d,
    k_ptr, k_b, k_h, k_y, k_x, k_d,
    v_ptr, v_b, v_h, v_y, v_x, v_d,
    valid_ptr, valid_b, valid_y, valid_x,
    parents_ptr, coarse_ptr, coarse_b, coarse_h, coarse_p, coarse_d, mix_ptr,
    msg_ptr, msg_b, msg_h, msg_n, msg_d, chosen_ptr,
    scale, heads, num_groups, query_pw, key_pw, num_keys,
    D: constexpr, DC: constexpr, KP: constexpr, KSEL: constexpr, SELECT: constexpr, HAS_MASK: constexpr,
):
    """One program = one query group: the 4 child queries of parent query ``p`` of head ``h`` of image
    ``b`` x (the 4 children of each of the ``num_keys`` keys that parent selected).

    Tensors are read in place through their strides (``*_b``, ``*_h``, ``*_y``, ``*_x``, ``*_d``): queries
    ``(B, H, hq, wq, D)``, keys / values ``(B, H, hk, wk, D)``, valid ``(B, hk, wk)`` int8. parents
    ``(B, H, P, num_keys)`` (contiguous): selected keys in the parent key grid (width ``key_pw``);
    coarse ``(B, H, P, D)``: the message so far of the parent queries (grid width ``query_pw``); mix: the
    level's weight. Writes msg ``(B, H, hq * wq, D)`` = this level's message x mix + the parent's, and
    chosen ``(B, H, hq * wq, KSEL)`` (contiguous): each query's top-KSEL keys in this level's key grid.
    Candidate ``j`` in ``[0, 4 * KP)`` is child ``j % 4`` of key slot ``j // 4`` (slots >= num_keys pad).
    """
    group = tl.program_id(0).to(tl.int64)
    p = group % num_groups
    bh = group // num_groups
    b, h = bh // heads, bh % heads
    cand = tl.arange(0, 4 * KP)
    slot, child = cand // 4, cand % 4
    real = slot < num_keys
    keys = tl.load(parents_ptr + group * num_keys + slot, mask=real, other=0).to(tl.int64)
    key_y = 2 * (keys // key_pw) + child // 2  # (4KP,) each candidate's cell in this level's key grid
    key_x = 2 * (keys % key_pw) + child % 2
    query = tl.arange(0, 4)
    query_y = 2 * (p // query_pw) + query // 2  # (4,) the group's queries in this level's query grid
    query_x = 2 * (p % query_pw) + query % 2
    dims = tl.arange(0, DC)
    q_base = q_ptr + b * q_b + h * q_h + query_y * q_y + query_x * q_x  # (4,) pointers
    k_base = k_ptr + b * k_b + h * k_h + key_y * k_y + key_x * k_x  # (4KP,)
    v_base = v_ptr + b * v_b + h * v_h + key_y * v_y + key_x * v_x

    # logits (4, 4KP), accumulated over DC-wide slices of the head so intermediates stay small
    logits = tl.zeros((4, 4 * KP), dtype=tl.float32)
    for d0 in tl.static_range(0, D, DC):
        qd = tl.load(q_base[:, None] + (d0 + dims[None, :]) * q_d).to(tl.float32)  # (4, DC)
        kd = tl.load(k_base[:, None] + (d0 + dims[None, :]) * k_d, mask=real[:, None], other=0.0).to(tl.float32)
        logits += tl.sum(qd[:, None, :] * kd[None, :, :], axis=2)
    logits = logits * scale
    if HAS_MASK:  # padded keys: the finite stand-in for -inf of the PyTorch path
        valid = tl.load(valid_ptr + b * valid_b + key_y * valid_y + key_x * valid_x, mask=real, other=0)
        logits = tl.where(valid[None, :] != 0, logits, -3.4028234663852886e38)
    logits = tl.where(real[None, :], logits, float("-inf"))  # pad slots take no weight at all
    weights = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    attn = weights / tl.sum(weights, axis=1)[:, None]

    # message = attn @ values x mix + the parent query's message (copied to its 4 children)
    mix = tl.load(mix_ptr).to(tl.float32)
    coarse_base = coarse_ptr + b * coarse_b + h * coarse_h + p * coarse_p
    n = query_y * (2 * query_pw) + query_x  # (4,) flat indices of the queries
    out_base = msg_ptr + b * msg_b + h * msg_h + n * msg_n
    for d0 in tl.static_range(0, D, DC):
        vd = tl.load(v_base[:, None] + (d0 + dims[None, :]) * v_d, mask=real[:, None], other=0.0).to(tl.float32)
        part = tl.sum(attn[:, :, None] * vd[None, :, :], axis=1)  # (4, DC)
        parent = tl.load(coarse_base + (d0 + dims) * coarse_d).to(tl.float32)  # (DC,)
        part = part * mix + parent[None, :]
        tl.store(out_base[:, None] + (d0 + dims[None, :]) * msg_d, part.to(msg_ptr.dtype.element_ty))

    if SELECT:  # top-KSEL candidates per query by repeated arg-max (weights >= 0; -1 marks taken / pad)
        work = tl.where(real[None, :], attn, -1.0)
        chosen_base = chosen_ptr + (bh * (4 * num_groups) + n) * KSEL
        for t in tl.static_range(KSEL):
            best = tl.max(work, axis=1)
            pos = tl.min(tl.where(work == best[:, None], cand[None, :], 4 * KP), axis=1)  # (4,)
            key = tl.load(parents_ptr + group * num_keys + pos // 4).to(tl.int64)
            c = pos % 4
            fine = (2 * (key // key_pw) + c // 2) * (2 * key_pw) + 2 * (key % key_pw) + c % 2
            tl.store(chosen_base + t, fine)
            work = tl.where(cand[None, :] == pos[:, None], -2.0, work)


#: Head channels per step of the fused kernel's products (bounds its register use) and warps per program:
#: the fastest on an H100 at 144x144 tokens (2.72 ms per layer call vs 2.89-3.08 for 4/16 channels or 2 warps).
HEAD_SLICE = 8
NUM_WARPS = 1


def fused_refine_b(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    parent_idx: torch.Tensor,
    parent_message: torch.Tensor,
    mix: torch.Tensor,
    topk: int,
    scale: float,
    select: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A QuadTree-B refine level, fused: this level's attention, mixed with the coarser levels' message.

    Same result as the PyTorch path of :func:`matcher.attention.quadtree_attention` for one finer level
    (:func:`~matcher.attention._refine_level`, then ``msg * mix + parent message`` in grid order), up to
    float rounding and the order of the selection. Inputs are read in place through their strides (the
    model's channels-last projections need no regrouping copies), and the message is written in the
    ``(B, N, H, D)`` memory order of merged heads.

    Args:
        q: ``(B, H, hq, wq, D)`` queries; k, v: ``(B, H, hk, wk, D)`` keys and values (any strides).
        key_mask: ``(B, hk, wk)`` bool (False = padded key) or None.
        parent_idx: ``(B, H, hq/2 * wq/2, K)`` keys each parent query selected, as indices into the parent
            key grid (``hk/2 x wk/2``).
        parent_message: ``(B, H, hq/2 * wq/2, D)`` the parent queries' message so far.
        mix: ``()`` this level's weight in the mixture (a tensor: no device sync).
        topk: keys to select per query for the next level (used when ``select``); scale: logit scale.
    Returns:
        message ``(B, H, hq * wq, D)`` in the queries' dtype (a view of a ``(B, hq * wq, H, D)`` tensor),
        and selected key indices ``(B, H, hq * wq, min(topk, 4K))`` into this level's key grid (int64, no
        particular order), or None unless ``select``.
    """
    if not fused_refine_available(q):
        raise ValueError("the fused QuadTree kernel needs triton, a CUDA device (or TRITON_INTERPRET=1), float32 / "
                         "float16 / bfloat16 tokens and a power-of-two head width")
    b, nh, hq, wq, d = q.shape
    wk = k.shape[3]
    k_parents = parent_idx.shape[-1]
    ksel = min(topk, 4 * k_parents) if select else 1
    message = torch.empty(b, hq * wq, nh, d, dtype=q.dtype, device=q.device).transpose(1, 2)
    chosen = torch.empty(b, nh, hq * wq, ksel, dtype=torch.int64, device=q.device)
    num_groups = (hq // 2) * (wq // 2)
    if message.numel() == 0:
        return message, chosen if select else None
    valid, valid_strides = q, (0, 0, 0)  # q: an unused pointer
    if key_mask is not None:
        valid = key_mask.contiguous().view(torch.int8)
        valid_strides = valid.stride()
    jit_kernel(_refine_b)[(b * nh * num_groups,)](
        q, *q.stride(), k, *k.stride(), v, *v.stride(), valid, *valid_strides,
        parent_idx.contiguous(), parent_message, *parent_message.stride(), mix.to(q.device),
        message, *message.stride(), chosen,
        float(scale), nh, num_groups, wq // 2, wk // 2, k_parents,
        D=d, DC=min(HEAD_SLICE, d), KP=triton.next_power_of_2(k_parents), KSEL=ksel, SELECT=select,
        HAS_MASK=key_mask is not None, num_warps=NUM_WARPS,
    )
    return message, chosen if select else None
