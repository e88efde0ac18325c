"""Attention kernels on multi-head tensors: LoFTR's linear attention, exact softmax attention, and
QuadTree attention (variants A and B) in plain PyTorch.

Head layout everywhere: ``(B, nhead, N, D)``; a model's channel ``c`` belongs to head ``c // D``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: The four children of a coarse cell (dy, dx), in the order the parent-grouped tensors use.
CHILD_OFFSETS = ((0, 0), (0, 1), (1, 0), (1, 1))


def _neg_fill(dtype: torch.dtype) -> float:
    """Finite stand-in for -inf: a fully masked row still gets a (uniform) softmax instead of NaN."""
    return torch.finfo(dtype).min


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_mask: torch.Tensor | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """Linear attention with the elu(x) + 1 feature map (Katharopoulos et al.), as in LoFTR.

    Args:
        q: ``(B, H, L, D)``; k, v: ``(B, H, S, D)``; kv_mask: ``(B, S)`` bool, False = padded key.
    Returns:
        ``(B, H, L, D)``.
    """
    q, k = F.elu(q) + 1, F.elu(k) + 1
    if kv_mask is not None:
        keep = kv_mask[:, None, :, None].to(k.dtype)
        k, v = k * keep, v * keep
    length = v.shape[2]
    v = v / length  # keeps the key-value sums in fp16 range; multiplied back below
    kv = torch.einsum("bhsd,bhse->bhde", k, v)
    normaliser = 1.0 / (torch.einsum("bhld,bhd->bhl", q, k.sum(dim=2)) + eps)
    return torch.einsum("bhld,bhde->bhle", q, kv) * normaliser[..., None] * length


def full_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact softmax attention with scale 1/sqrt(D). Shapes as :func:`linear_attention`."""
    mask = None if kv_mask is None else kv_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def pool_levels(
    x: torch.Tensor, num_levels: int, mask: torch.Tensor | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Average-pool a map 2x2 ``num_levels - 1`` times, finest first.

    With a mask (``(B, h, w)`` bool, False = padded), each pooled cell is the mean of its valid children
    only and is valid when any child is; without padding this is the plain average pool.

    Args:
        x: ``(B, C, h, w)`` with h, w divisible by ``2 ** (num_levels - 1)``.
    Returns:
        maps ``[(B, C, h / 2^l, w / 2^l)]`` and masks ``[(B, h / 2^l, w / 2^l) | None]``, l = 0 finest.
    """
    maps, masks = [x], [mask]
    for _ in range(num_levels - 1):
        if mask is None:
            x = F.avg_pool2d(x, 2)
        else:
            weight = mask[:, None].to(x.dtype)
            count = F.avg_pool2d(weight, 2)
            x = F.avg_pool2d(x * weight, 2) / count.clamp_min(1e-6)
            mask = count[:, 0] > 0
        maps.append(x)
        masks.append(mask)
    return maps, masks


def _split_heads(x: torch.Tensor, nhead: int) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, nhead, h * w, C / nhead)``."""
    b, c, h, w = x.shape
    return x.reshape(b, nhead, c // nhead, h * w).transpose(2, 3)


def _group_children(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``(B, H, h * w, ...)`` in grid order -> ``(B, H, h/2 * w/2, 4, ...)`` grouped by 2x2 parent."""
    b, nh = x.shape[:2]
    rest = x.shape[3:]
    x = x.reshape(b, nh, h // 2, 2, w // 2, 2, *rest).transpose(3, 4)
    return x.reshape(b, nh, (h // 2) * (w // 2), 4, *rest)


def _ungroup_children(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`_group_children`: ``(B, H, h/2 * w/2, 4, ...)`` -> ``(B, H, h * w, ...)``."""
    b, nh = x.shape[:2]
    rest = x.shape[4:]
    x = x.reshape(b, nh, h // 2, w // 2, 2, 2, *rest).transpose(3, 4)
    return x.reshape(b, nh, h * w, *rest)


def _child_indices(parent_idx: torch.Tensor, parent_width: int) -> torch.Tensor:
    """Flat indices in the finer key grid of the 4 children of each parent key.

    ``(..., K)`` indices into a grid of width ``parent_width`` -> ``(..., 4K)`` ordered [key][child].
    """
    py, px = parent_idx // parent_width, parent_idx % parent_width
    width = 2 * parent_width
    children = [(2 * py + dy) * width + (2 * px + dx) for dy, dx in CHILD_OFFSETS]
    return torch.stack(children, dim=-1).flatten(-2)


def _gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x (B, H, S, D)`` at ``idx (B, H, P, K)`` -> ``(B, H, P, K, D)``."""
    b, nh, p, k = idx.shape
    flat = idx.reshape(b, nh, p * k, 1).expand(-1, -1, -1, x.shape[-1])
    return torch.gather(x, 2, flat).reshape(b, nh, p, k, x.shape[-1])


def quadtree_attention(
    queries: list[torch.Tensor],
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    topks: list[int],
    variant: str = "B",
    level_weights: torch.Tensor | None = None,
    key_masks: list[torch.Tensor | None] | None = None,
    return_selection: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """QuadTree attention (Tang et al., ICLR 2022) over token pyramids.

    The coarsest level is full softmax attention; at each finer level a query attends only to the 4
    children of the keys its parent query selected (top-k). Variant B softmaxes over all candidates,
    mixes the level messages with ``softmax(level_weights)`` (coarsest first) and lets every query pick its
    own top-k for the next level. Variant A softmaxes over the 4 children of each selected key times that
    key's score, removes the selected keys from the coarser messages and sums the messages, so a query's
    weights over all levels add up to 1. Only the coarsest level builds an (N x N) score matrix.

    Args:
        queries, keys, values: per level, finest first, ``(B, nhead, h_l, w_l, D)`` (query and key grids
            may differ in size); each level halves both sides of the previous one.
        topks: keys kept per query at each level, coarsest first (the finest entry is used by A only
            when it is not the finest level, and never by B).
        variant: "A" or "B".
        level_weights: ``(L,)`` logits of the level mixture (variant B), coarsest first.
        key_masks: per level, finest first, ``(B, h_l, w_l)`` bool (False = padded key) or None.
        return_selection: also return the selected key indices per level (coarsest first), each
            ``(B, nhead, N_l, K_l)`` with indices into that level's flattened key grid.
    Returns:
        ``(B, nhead, h_0 * w_0, D)`` messages for the finest queries (and the selections).
    """
    num_levels = len(queries)
    if variant not in ("A", "B"):
        raise ValueError(f"variant must be 'A' or 'B', got {variant!r}")
    if variant == "B" and (level_weights is None or level_weights.numel() != num_levels):
        raise ValueError("variant B needs level_weights of one entry per level")
    if key_masks is None:
        key_masks = [None] * num_levels
    scale = queries[0].shape[-1] ** -0.5
    mix = None
    if variant == "B":  # softmax in at least float32, then in the tokens' dtype
        mix = torch.softmax(level_weights.to(torch.promote_types(level_weights.dtype, torch.float32)), 0)
        mix = mix.to(queries[0].dtype)

    message, scores, idx, selections = None, None, None, []
    for step, level in enumerate(reversed(range(num_levels))):  # coarsest first
        q, k, v, kmask = queries[level], keys[level], values[level], key_masks[level]
        b, nh, hq, wq, d = q.shape
        hk, wk = k.shape[2:4]
        q, k, v = q.reshape(b, nh, hq * wq, d), k.reshape(b, nh, hk * wk, d), v.reshape(b, nh, hk * wk, d)
        kmask = None if kmask is None else kmask.reshape(b, hk * wk)
        is_finest = level == 0
        topk = topks[min(step, len(topks) - 1)]
        if step == 0:
            logits = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
            if kmask is not None:
                logits = logits.masked_fill(~kmask[:, None, None, :], _neg_fill(logits.dtype))
            attn = torch.softmax(logits, dim=-1)
            cand = None
        else:
            cand = _child_indices(idx, wk // 2)  # (B, H, Nq', 4K') candidate keys of each parent query
            qc = _group_children(q, hq, wq)  # (B, H, Nq', 4, D)
            logits = torch.einsum("bhpcd,bhpkd->bhpck", qc, _gather_tokens(k, cand)) * scale
            if kmask is not None:
                cmask = torch.gather(kmask[:, None].expand(-1, nh, -1), 2, cand.flatten(2)).view(cand.shape)
                logits = logits.masked_fill(~cmask[:, :, :, None, :], _neg_fill(logits.dtype))
            if variant == "B":
                attn = torch.softmax(logits, dim=-1)
            else:  # softmax over the 4 children of each selected key, times that key's score
                kp = cand.shape[-1] // 4
                attn = torch.softmax(logits.unflatten(-1, (kp, 4)), dim=-1) * scores[:, :, :, None, :, None]
                attn = attn.flatten(-2)
        # (B, H, Nq, C) scores over this level's candidates for each query, in the level's grid order
        attn_q = attn if cand is None else _ungroup_children(attn, hq, wq)
        if not is_finest:
            top_scores, top_pos = torch.topk(attn_q, min(topk, attn_q.shape[-1]), dim=-1)
            new_idx = top_pos if cand is None else _select_candidates(cand, top_pos, hq, wq)
        if variant == "A" and not is_finest:
            attn_q = attn_q.scatter(-1, top_pos, 0.0)  # refined below instead
        level_msg = _aggregate(attn_q, v, cand, hq, wq)  # (B, H, Nq, D)
        if variant == "B":
            level_msg = level_msg * mix[step]
        message = level_msg if message is None else _upsample_tokens(message, hq // 2, wq // 2) + level_msg
        if not is_finest:
            idx, scores = new_idx, top_scores  # this level's queries are the next level's parents
            selections.append(idx)
    if return_selection:
        return message, selections
    return message


def _select_candidates(cand: torch.Tensor, top_pos: torch.Tensor, hq: int, wq: int) -> torch.Tensor:
    """Key indices picked by each query: ``cand (B,H,Nq',4K)`` at ``top_pos (B,H,Nq,K)`` -> ``(B,H,Nq,K)``."""
    grouped_pos = _group_children(top_pos, hq, wq)  # (B, H, Nq', 4, K)
    cand4 = cand[:, :, :, None, :].expand(-1, -1, -1, 4, -1)
    return _ungroup_children(torch.gather(cand4, -1, grouped_pos), hq, wq)


def _aggregate(attn_q: torch.Tensor, v: torch.Tensor, cand: torch.Tensor | None, hq: int, wq: int) -> torch.Tensor:
    """Weighted sum of values: dense at the coarsest level, over gathered candidates below."""
    if cand is None:
        return attn_q @ v
    attn = _group_children(attn_q, hq, wq)  # (B, H, Nq', 4, 4K)
    msg = torch.einsum("bhpck,bhpkd->bhpcd", attn, _gather_tokens(v, cand))
    return _ungroup_children(msg, hq, wq)


def _upsample_tokens(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Copy each token of an ``(h, w)`` grid to its 4 children: ``(B,H,h*w,D)`` -> ``(B,H,4hw,D)``."""
    b, nh, _, d = x.shape
    x = x.reshape(b, nh, h, 1, w, 1, d).expand(-1, -1, -1, 2, -1, 2, -1)
    return x.reshape(b, nh, 4 * h * w, d)
