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


def _gather_blocks(blocks: torch.Tensor, parent_idx: torch.Tensor) -> torch.Tensor:
    """Rows of per-head blocks at per-head indices.

    ``blocks (B, H, M, 4, D)`` (the 4 children of every parent key), ``parent_idx (B, H, P, K)`` ->
    ``(B, H, P, 4K, D)`` ordered [key][child]. One contiguous 4*D row is copied per selected key.
    """
    b, nh, m, four, d = blocks.shape
    _, _, p, k = parent_idx.shape
    offsets = torch.arange(b * nh, device=parent_idx.device).view(b, nh, 1, 1) * m
    rows = blocks.reshape(b * nh * m, four * d).index_select(0, (parent_idx + offsets).reshape(-1))
    return rows.view(b, nh, p, k * four, d)


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
        is_finest = level == 0
        topk = topks[min(step, len(topks) - 1)]
        if step == 0:  # full attention over the coarsest keys, in grid order (P = Nq, one "child")
            q, k, v = q.reshape(b, nh, hq * wq, 1, d), k.reshape(b, nh, hk * wk, d), v.reshape(b, nh, hk * wk, d)
            logits = torch.einsum("bhpcd,bhkd->bhpck", q, k) * scale
            if kmask is not None:
                logits = logits.masked_fill(~kmask.reshape(b, 1, 1, 1, hk * wk), _neg_fill(logits.dtype))
            attn = torch.softmax(logits, dim=-1)  # (B, H, Nq, 1, Nk)
            cand, vals = None, v
        else:  # parent-grouped: P parent queries, 4 children each, 4K candidate keys per parent
            qc = _group_children(q.reshape(b, nh, hq * wq, d), hq, wq)  # (B, H, P, 4, D)
            cand = _child_indices(idx, wk // 2)  # (B, H, P, 4K)
            k_blocks = _group_children(k.reshape(b, nh, hk * wk, d), hk, wk)  # (B, H, Mk', 4, D)
            logits = torch.einsum("bhpcd,bhpkd->bhpck", qc, _gather_blocks(k_blocks, idx)) * scale
            if kmask is not None:
                m_blocks = _group_children(kmask.reshape(b, 1, hk * wk, 1).expand(-1, nh, -1, -1), hk, wk)
                cmask = _gather_blocks(m_blocks, idx)[..., 0]  # (B, H, P, 4K)
                logits = logits.masked_fill(~cmask[:, :, :, None, :], _neg_fill(logits.dtype))
            if variant == "B":
                attn = torch.softmax(logits, dim=-1)
            else:  # softmax over the 4 children of each selected key, times that key's score
                kp = cand.shape[-1] // 4
                attn = torch.softmax(logits.unflatten(-1, (kp, 4)), dim=-1) * scores[..., None]
                attn = attn.flatten(-2)
            vals = _gather_blocks(_group_children(v.reshape(b, nh, hk * wk, d), hk, wk), idx)
        if not is_finest:
            top_scores, top_pos = torch.topk(attn, min(topk, attn.shape[-1]), dim=-1)  # (B, H, P, c, K)
            if cand is None:
                new_idx = top_pos
            else:
                new_idx = torch.gather(cand[:, :, :, None, :].expand(-1, -1, -1, 4, -1), -1, top_pos)
            if variant == "A":
                attn = attn.scatter(-1, top_pos, 0.0)  # the selected keys are refined at the next level
        if cand is None:
            level_msg = torch.einsum("bhpck,bhkd->bhpcd", attn, vals)
        else:
            level_msg = torch.einsum("bhpck,bhpkd->bhpcd", attn, vals)
        if variant == "B":
            level_msg = level_msg * mix[step]
        if message is not None:  # a parent's message is copied to its 4 children
            level_msg = level_msg + message[:, :, :, None, :]
        # back to this level's grid order: these queries are the parents of the next level
        to_grid = (lambda t: t.reshape(b, nh, hq * wq, t.shape[-1])) if cand is None else (lambda t: _ungroup_children(t, hq, wq))
        message = to_grid(level_msg)
        if not is_finest:
            idx = to_grid(new_idx)
            scores = to_grid(top_scores)[:, :, :, None, :] if variant == "A" else None
            selections.append(idx)
    if return_selection:
        return message, selections
    return message
