"""Attention kernels on multi-head tensors: LoFTR's linear attention, exact softmax attention, and
QuadTree attention (variants A and B) in plain PyTorch.

Head layout everywhere: ``(B, nhead, N, D)``; a model's channel ``c`` belongs to head ``c // D``.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .chunking import ChunkedOutputs, chunk_slices, cpu_inference, is_tracing
from .quadtree_triton import fused_refine_available, fused_refine_b
from .triton_support import use_kernel


def _neg_fill(dtype: torch.dtype) -> float:
    """Finite stand-in for -inf, added to the logits of padded keys: a fully masked row still gets a finite
    softmax instead of NaN, and half the dtype's minimum leaves room for the logit it is added to."""
    return torch.finfo(dtype).min / 2


def mask_bias(valid: torch.Tensor, dtype: torch.dtype, fill: float | None = None) -> torch.Tensor:
    """``valid`` (bool, False = padded) -> 0 / ``fill`` (default :func:`_neg_fill`) in ``dtype``, to be added to
    logits. Adding a float bias is 4-10x faster on CPU than ``masked_fill`` with a broadcast bool mask, which
    torch does not vectorise, and exact for a softmax: masked weights come out 0 either way."""
    fill = _neg_fill(dtype) if fill is None else fill
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill_(~valid, fill)


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


def num_levels_for(trained_levels: int, max_coarsest_tokens: int | None, *grids: tuple[int, int]) -> int:
    """Pyramid levels for token grids ``(h, w)``: ``trained_levels``, plus one for every halving still needed
    until the coarsest level of each grid holds at most ``max_coarsest_tokens`` tokens (sides rounded up, as
    the model pads them); None adds none. The coarsest level is full attention, so a bound on its size keeps
    the cost linear in the number of tokens."""
    if max_coarsest_tokens is None:
        return trained_levels
    if max_coarsest_tokens < 1:
        raise ValueError(f"max_coarsest_tokens must be at least 1 or None, got {max_coarsest_tokens}")
    levels = trained_levels
    while max(-(-h >> (levels - 1)) * -(-w >> (levels - 1)) for h, w in grids) > max_coarsest_tokens:
        levels += 1
    return levels


def _row_layout(x: torch.Tensor, lead: int) -> tuple[tuple[int, ...], int] | None:
    """Where ``x``'s positions lie in its storage seen as rows of ``x.shape[lead:]`` (one position per row):
    the row strides of the first ``lead`` dims and the first position's row. None where the trailing dims
    are not one contiguous run that starts at a multiple of its length."""
    unit = 1
    for size, stride in reversed(list(zip(x.shape[lead:], x.stride()[lead:]))):
        if size > 1 and stride != unit:  # the trailing dims are not one contiguous run
            return None
        unit *= size
    strides = [s if n > 1 else 0 for s, n in zip(x.stride()[:lead], x.shape[:lead])]
    if unit == 0 or x.storage_offset() % unit or any(s % unit for s in strides):
        return None
    return tuple(s // unit for s in strides), x.storage_offset() // unit


@functools.lru_cache(maxsize=16)
def _gather_order(shape, row_strides, first_row, split, perm, device: str) -> torch.Tensor:
    """The rows, in gather order, of positions ``shape`` laid out as ``row_strides`` from ``first_row``, split
    into ``split`` and permuted by ``perm`` (int64, flat). Cached: the same few layouts recur in every layer."""
    with torch.inference_mode(False):  # usable outside inference mode too
        rows = torch.full((), first_row, dtype=torch.int64, device=device)
        for dim, (size, stride) in enumerate(zip(shape, row_strides)):
            view = [1] * len(shape)
            view[dim] = size
            rows = rows + torch.arange(size, device=device).view(view) * stride
        return rows.expand(shape).reshape(split).permute(perm).reshape(-1)


def _rearranged(x: torch.Tensor, lead: int, split: tuple[int, ...], perm: tuple[int, ...],
                shape: tuple[int, ...]) -> torch.Tensor:
    """``x.reshape(*split, *rest).permute(*perm, ...).reshape(*shape, *rest)``, ``rest = x.shape[lead:]`` (a
    rearrangement of the first ``lead`` dims that moves the trailing ones as units).

    On CPU inference this is one gather of whole trailing blocks (``index_select`` of rows, the row order
    cached per layout): torch's strided copy with the short contiguous runs of these rearrangements (a
    head's 32 channels) is 2-4x slower. With gradients, under tracing or compilation, on GPUs and for
    layouts without whole rows: the plain copy.
    """
    rest = x.shape[lead:]
    layout = _row_layout(x, lead) if cpu_inference(x) else None
    if layout is None:
        moved = x.reshape(*split, *rest).permute(*perm, *range(len(split), len(split) + len(rest)))
        return moved.reshape(*shape, *rest)
    unit = math.prod(rest)
    table = x.as_strided((x.untyped_storage().nbytes() // (unit * x.element_size()), unit), (unit, 1), 0)
    order = _gather_order(tuple(x.shape[:lead]), *layout, tuple(split), tuple(perm), str(x.device))
    return table.index_select(0, order).view(*shape, *rest)


def _ungroup_children(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`_grid_to_blocks` (flattened): ``(B, H, h/2 * w/2, 4, ...)`` -> ``(B, H, h * w, ...)``."""
    b, nh = x.shape[:2]
    return _rearranged(x, 4, (b, nh, h // 2, w // 2, 2, 2), (0, 1, 2, 4, 3, 5), (b, nh, h * w))


def _children_to_tokens(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``(B, H, h/2 * w/2, 4, D)`` grouped by parent -> ``(B, H, h * w, D)`` in grid order, as a view of
    tokens ``(B, h * w, H * D)`` (heads merged, what the output projection reads): one rearrangement instead
    of :func:`_ungroup_children` and a copy to merge the heads."""
    b, nh, _, _, d = x.shape
    tokens = _rearranged(x, 4, (b, nh, h // 2, w // 2, 2, 2), (0, 2, 4, 3, 5, 1), (b, h * w, nh))
    return tokens.view(b, h * w, nh, d).transpose(1, 2)


#: Bytes of gathered keys (or coarsest-level scores) per chunk of queries on CPU. Working in chunks of
#: this size keeps the temporaries in cache and in reused heap memory; one big gather per level would be
#: written to fresh pages and run several times slower.
CHUNK_BYTES = 4 << 20

#: The same on GPUs, where chunks only bound memory: there is no cache to fit and every chunk costs kernel
#: launches, so they are much larger.
GPU_CHUNK_BYTES = 256 << 20


def _chunks(total: int, bytes_per_item: int, device: torch.device) -> list[slice]:
    """Slices covering ``range(total)``, each about :data:`CHUNK_BYTES` (CPU) or :data:`GPU_CHUNK_BYTES`
    bytes of ``bytes_per_item``."""
    budget = CHUNK_BYTES if device.type == "cpu" else GPU_CHUNK_BYTES
    return chunk_slices(total, budget // max(1, bytes_per_item))


def _block_rows(blocks: torch.Tensor) -> torch.Tensor:
    """``(B, H, M, 4, E)`` -> a ``(B * H * M, 4 * E)`` table: row ``(b * H + h) * M + m`` holds the 4 children
    of parent key ``m`` of head ``h``."""
    return blocks.reshape(-1, blocks.shape[-2] * blocks.shape[-1])


def _gather_rows(table: torch.Tensor, rows: torch.Tensor, width: int) -> torch.Tensor:
    """``table (R, 4 * E)`` at ``rows (p, K)`` -> ``(p, 4K, E)`` ordered [key][child]."""
    p, k = rows.shape
    return table.index_select(0, rows.reshape(-1)).view(p, 4 * k, width)


def _child_table(parent_hw: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``(h * w * 4,)``: entry ``4 * parent + c`` is the flat index, in the grid twice as fine, of child ``c``
    (row-major: (0, 0), (0, 1), (1, 0), (1, 1)) of cell ``parent`` of an ``(h, w)`` grid."""
    h, w = parent_hw
    fine = torch.arange(4 * h * w, device=device).view(h, 2, w, 2)
    return fine.transpose(1, 2).reshape(-1)


def _selected_children(parent_idx: torch.Tensor, positions: torch.Tensor, child_table: torch.Tensor) -> torch.Tensor:
    """Flat indices in the finer key grid of selected candidates.

    ``parent_idx (P, K)``: parent keys; ``positions (P, c, K')``: candidate positions in ``[0, 4K)`` ordered
    [key][child]; ``child_table`` from :func:`_child_table` -> ``(P, c, K')``.
    """
    p, k = parent_idx.shape
    # every candidate's index, (P, 4K): one lookup of 4 children per parent key, then one gather (5x faster
    # than splitting the positions into key slot and child)
    candidates = child_table.view(-1, 4).index_select(0, parent_idx.reshape(-1)).view(p, 1, 4 * k)
    return torch.gather(candidates.expand(p, positions.shape[1], 4 * k), -1, positions)


def _grid_to_blocks(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, h, w, ...)`` (any strides) -> ``(B, H, h/2 * w/2, 4, ...)`` grouped by 2x2 parent, one copy."""
    b, nh, h, w = x.shape[:4]
    return _rearranged(x, 4, (b, nh, h // 2, 2, w // 2, 2), (0, 1, 2, 4, 3, 5), (b, nh, (h // 2) * (w // 2), 4))


#: CPU rows at least this long take their top-k in two passes (:func:`topk_last_dim`); torch's CPU top-k
#: costs about 2 ns per entry, a vectorised maximum a tenth of that. (GPUs keep torch.topk: on an H100 a
#: top-32 of 20,736 rows of 1,296 takes 0.75 ms, and a Triton arg-max kernel was no faster, 0.66 ms.)
BLOCK_TOPK_MIN_LENGTH = 1024

#: Entries per group of the first pass.
TOPK_GROUP = 8


def topk_last_dim(x: torch.Tensor, k: int, sorted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(x, k, dim=-1, sorted=sorted)`` (largest), long CPU rows in two passes.

    A row of n entries is split into n / :data:`TOPK_GROUP` groups, group g holding entries g, g + n/8,
    g + 2n/8, ... (strided, so the group maxima are elementwise maxima of contiguous slices). The k
    groups with the largest maxima hold k entries at least as large as any entry outside them, so the
    top-k values are among those groups' entries (plus the ragged tail), and only these are ranked. Same
    values as ``torch.topk``; indices differ only between equal values (and, unsorted, in order).

    Args:
        x: ``(..., n)``; k: at most n; sorted: largest first, else in no particular order (faster).
    Returns:
        values and indices into the last dim, ``(..., k)``.
    """
    n = x.shape[-1]
    num_groups = n // TOPK_GROUP
    if n < BLOCK_TOPK_MIN_LENGTH or num_groups < k or x.device.type != "cpu":
        return torch.topk(x, k, dim=-1, sorted=sorted)
    lead = x.shape[:-1]
    body = num_groups * TOPK_GROUP
    strided = x[..., :body].unflatten(-1, (TOPK_GROUP, num_groups))  # [..., j, g] = entry j * groups + g
    group_idx = torch.topk(strided.amax(dim=-2), k, dim=-1, sorted=False).indices  # (..., k)
    # candidate j * k + s is entry j * num_groups + group_idx[s] (member j of the s-th chosen group); then the
    # ragged tail
    candidates = torch.gather(strided, -1, group_idx.unsqueeze(-2).expand(*lead, TOPK_GROUP, k)).flatten(-2)
    if body < n:
        candidates = torch.cat([candidates, x[..., body:]], dim=-1)
    values, pos = torch.topk(candidates, k, dim=-1, sorted=sorted)
    # indices of the k winners only (8x fewer than the candidates)
    idx = torch.div(pos, k, rounding_mode="floor") * num_groups + torch.gather(group_idx, -1, pos % k)
    if body < n:
        idx = torch.where(pos < TOPK_GROUP * k, idx, pos + (body - TOPK_GROUP * k))
    return values, idx


#: Signed integers of each float's width: on non-negative floats (attention weights) the order of their bit
#: patterns read as these integers is the order of the values.
_SAME_ORDER_INTS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def topk_nonnegative(x: torch.Tensor, k: int, sorted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`topk_last_dim` of ``x >= 0`` (attention weights; NaN-free). On CPU the bit patterns are ranked as
    integers, which order non-negative IEEE floats as their values and which torch's CPU top-k ranks 20-30%
    faster (fp32 and bf16, rows of 128 to 4,800); the values are gathered from ``x`` (gradients reach them, as
    variant A needs). Not while tracing for export: ONNX opset 17 has no bit cast."""
    as_int = _SAME_ORDER_INTS.get(x.dtype)
    if as_int is None or x.device.type != "cpu" or is_tracing():
        return topk_last_dim(x, k, sorted)
    indices = topk_last_dim(x.view(as_int), k, sorted)[1]
    return torch.gather(x, -1, indices), indices


def _select_and_message(attn, values, topk: int, variant: str, select: bool):
    """Top-k of the weights (for the next level) and the message they carry.

    ``attn (..., c, n)``, ``values (..., n, D)`` -> message ``(..., c, D)`` and, when ``select``, the
    positions and weights of the top-k candidates ``(..., c, K)`` (else None). Variant A removes the
    selected candidates from this level's message: they are refined at the next level instead.
    """
    top_scores = top_pos = None
    if select:
        # unsorted: the next level does not care about the order, and sorting costs 18% of a short top-k
        top_scores, top_pos = topk_nonnegative(attn, min(topk, attn.shape[-1]), sorted=False)
        if variant == "A":
            attn = attn.scatter(-1, top_pos, 0.0)
    return torch.matmul(attn, values), top_pos, top_scores


def _coarsest_level(q, k, v, kmask, topk: int, scale: float, variant: str, select: bool):
    """Full softmax attention over the coarsest keys, in query chunks (no whole score matrix).

    ``q (B, H, Nq, D)``, ``k, v (B, H, Nk, D)``, ``kmask (B, Nk) | None`` -> message ``(B, H, Nq, D)``,
    selected key indices and weights ``(B, H, Nq, K)`` (None unless ``select``).
    """
    b, nh, nq, _ = q.shape
    kt = k.transpose(-1, -2).contiguous()  # else every chunk's matmul copies the keys again (4x slower)
    outputs, bias = ChunkedOutputs(nq, dim=2), None
    for rows in _chunks(nq, b * nh * k.shape[2] * q.element_size(), q.device):
        logits = torch.matmul(q[:, :, rows] * scale, kt)  # scaling the few queries, not the many logits
        if kmask is not None:
            bias = mask_bias(kmask[:, None, None, :], logits.dtype) if bias is None else bias  # autocast's dtype
            logits = logits + bias
        outputs.add(_select_and_message(torch.softmax(logits, dim=-1), v, topk, variant, select), rows)
    return outputs.result()


def _refine_level(qc, k_blocks, v_blocks, valid_blocks, parent_idx, parent_scores, parent_hw: tuple[int, int],
                  topk: int, scale: float, variant: str, select: bool):
    """One finer level in chunks of parents: attention over the children of the keys each parent selected.

    ``qc (B, H, P, 4, D)`` queries grouped by parent, ``k_blocks, v_blocks (B, H, M, 4, D)`` and
    ``valid_blocks (B, H, M, 4, 1) | None`` keys grouped by parent key, ``parent_idx (B, H, P, K)`` into the
    parent key grid of size ``parent_hw``, ``parent_scores (B, H, P, K) | None`` (variant A) ->
    message ``(B, H, P, 4, D)``, selected key indices (this level's grid) and weights ``(B, H, P, 4, K')``.

    Chunks follow the flattened (B, H, P) order, so a chunk reads the key table of one head.
    """
    b, nh, num_parents, _, d = qc.shape
    m, k = k_blocks.shape[2], parent_idx.shape[-1]
    heads = torch.arange(b * nh, device=parent_idx.device).view(b, nh, 1, 1)
    local_idx = parent_idx.reshape(-1, k)
    table_idx = (parent_idx + heads * m).reshape(-1, k)  # rows of the (B * H * M) tables
    queries, scores = qc.reshape(-1, 4, d), None if parent_scores is None else parent_scores.reshape(-1, k)
    k_table, v_table = _block_rows(k_blocks), _block_rows(v_blocks)
    valid_table = None if valid_blocks is None else _block_rows(valid_blocks)
    bias_table = None
    as_groups = lambda t: None if t is None else t.view(b, nh, num_parents, *t.shape[1:])  # noqa: E731
    child_table = _child_table(parent_hw, qc.device)
    total = local_idx.shape[0]
    outputs = ChunkedOutputs(total, dim=0)
    for sl in _chunks(total, 4 * k * d * qc.element_size(), qc.device):
        rows = table_idx[sl]
        logits = torch.matmul(queries[sl] * scale, _gather_rows(k_table, rows, d).transpose(-1, -2))
        if valid_table is not None:
            bias_table = mask_bias(valid_table, logits.dtype) if bias_table is None else bias_table  # autocast's dtype
            logits = logits + _gather_rows(bias_table, rows, 1)[..., 0][:, None, :]  # (p, 1, 4K)
        if variant == "B":
            attn = torch.softmax(logits, dim=-1)
        else:  # softmax over the 4 children of each selected key, times that key's score
            attn = (torch.softmax(logits.unflatten(-1, (-1, 4)), dim=-1) * scores[sl, None, :, None]).flatten(-2)
        msg, top_pos, top_scores = _select_and_message(attn, _gather_rows(v_table, rows, d), topk, variant, select)
        chosen = None if top_pos is None else _selected_children(local_idx[sl], top_pos, child_table)
        outputs.add((msg, chosen, top_scores), sl)
    return tuple(as_groups(t) for t in outputs.result())


def _use_fused_kernel(kernel: str, variant: str, tensors: list[torch.Tensor]) -> bool:
    """Whether the refine levels run through the fused Triton kernel (``kernel`` as in
    :data:`~matcher.triton_support.KERNELS`: ``auto`` takes it for variant B inference on CUDA when triton is
    installed)."""
    first = tensors[0]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    possible = variant == "B" and not needs_grad and fused_refine_available(first)
    requirements = (
        "the Triton QuadTree kernel needs variant B, no gradient, triton installed, float32 / float16 / bfloat16 "
        "tokens with a power-of-two head width, a CUDA device (or TRITON_INTERPRET=1) and no tracing; got "
        f"variant {variant}, {first.dtype} on {first.device.type}"
    )
    return use_kernel(kernel, possible, first.device, requirements)


def _check_pyramids(queries: list[torch.Tensor], keys: list[torch.Tensor], values: list[torch.Tensor],
                    key_masks: list[torch.Tensor | None], topks: list[int]) -> None:
    """One ValueError for pyramids :func:`quadtree_attention` cannot read: levels that do not halve (a
    malformed key level was read only in part, silently), keys and values of other shapes, masks of other
    grids, or a top-k list of another length."""
    num_levels = len(queries)
    if num_levels < 1 or not len(keys) == len(values) == len(key_masks) == len(topks) == num_levels:
        raise ValueError(f"queries, keys, values, key_masks and topks need one entry per level: {num_levels}, "
                         f"{len(keys)}, {len(values)}, {len(key_masks)}, {len(topks)}")
    for name, pyramid in (("queries", queries), ("keys", keys)):
        for level, t in enumerate(pyramid):
            if t.dim() != 5 or t.shape[:2] != queries[0].shape[:2] or t.shape[-1] != queries[0].shape[-1]:
                raise ValueError(f"{name}[{level}] must be (B, nhead, h, w, D) like queries[0] "
                                 f"{tuple(queries[0].shape)}, got {tuple(t.shape)}")
            if level and tuple(t.shape[2:4]) != (pyramid[level - 1].shape[2] // 2, pyramid[level - 1].shape[3] // 2):
                raise ValueError(f"{name}[{level}] must halve both sides of level {level - 1} "
                                 f"{tuple(pyramid[level - 1].shape[2:4])}, got {tuple(t.shape[2:4])}")
            if level < num_levels - 1 and (t.shape[2] % 2 or t.shape[3] % 2):
                raise ValueError(f"{name}[{level}] needs even sides to have a coarser level, got {tuple(t.shape[2:4])}")
    for level, (k, v, mask) in enumerate(zip(keys, values, key_masks)):
        if v.shape != k.shape:
            raise ValueError(f"values[{level}] must have the shape of keys[{level}] {tuple(k.shape)}, got {tuple(v.shape)}")
        if mask is not None and tuple(mask.shape) != (k.shape[0], *k.shape[2:4]):
            raise ValueError(f"key_masks[{level}] must be (B, h, w) = {(k.shape[0], *k.shape[2:4])}, got {tuple(mask.shape)}")
    if min(topks) < 1:
        raise ValueError(f"topks must be positive, got {list(topks)}")


def quadtree_attention(
    queries: list[torch.Tensor],
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    topks: list[int],
    variant: str = "B",
    level_weights: torch.Tensor | None = None,
    key_masks: list[torch.Tensor | None] | None = None,
    return_selection: bool = False,
    kernel: str = "auto",
    selection_only_levels: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """QuadTree attention (Tang et al., ICLR 2022) over token pyramids.

    The coarsest level is full softmax attention; at each finer level a query attends only to the 4
    children of the keys its parent query selected (top-k). Variant B softmaxes over all candidates,
    mixes the level messages with ``softmax(level_weights)`` (coarsest first) and lets every query pick its
    own top-k for the next level. Variant A softmaxes over the 4 children of each selected key times that
    key's score, removes the selected keys from the coarser messages and sums the messages, so a query's
    weights over all levels add up to 1. No level builds a whole (N x N) score matrix: the coarsest level
    runs in query chunks, the finer ones in chunks of parents (:data:`CHUNK_BYTES` each).

    Args:
        queries, keys, values: per level, finest first, ``(B, nhead, h_l, w_l, D)`` (query and key grids
            may differ in size; any strides); each level halves both sides of the previous one.
        topks: keys kept per query at each level, coarsest first, one per level (the finest entry selects
            nothing: no level is finer).
        variant: "A" or "B".
        level_weights: ``(L,)`` logits of the level mixture (variant B), coarsest first.
        key_masks: per level, finest first, ``(B, h_l, w_l)`` bool (False = padded key) or None.
        return_selection: also return the selected key indices per level (coarsest first), each
            ``(B, nhead, N_l, K_l)`` with indices into that level's flattened key grid, in no particular
            order (an unsorted top-k is faster, and the next level does not depend on the order).
        kernel: refine-level implementation, one of :data:`~matcher.triton_support.KERNELS`. The fused
            Triton kernel has no backward pass, so ``auto`` takes it only when no gradient is needed.
        selection_only_levels: variant B: the number of coarsest levels that only select keys for the next
            level (levels added above the trained ones): their messages get weight 0 and ``level_weights``
            holds the logits of the other levels only.
    Returns:
        ``(B, nhead, h_0 * w_0, D)`` messages for the finest queries (and the selections).
    """
    num_levels = len(queries)
    if variant not in ("A", "B"):
        raise ValueError(f"variant must be 'A' or 'B', got {variant!r}")
    if not 0 <= selection_only_levels < num_levels or (selection_only_levels and variant != "B"):
        raise ValueError(f"selection_only_levels must be in [0, {num_levels}) and 0 unless variant B, got {selection_only_levels}")
    if variant == "B" and (level_weights is None or level_weights.numel() != num_levels - selection_only_levels):
        raise ValueError("variant B needs level_weights of one entry per level (but the selection-only levels)")
    if key_masks is None:
        key_masks = [None] * num_levels
    _check_pyramids(queries, keys, values, key_masks, topks)
    fused = _use_fused_kernel(kernel, variant, queries + keys + values)
    scale = queries[0].shape[-1] ** -0.5
    mix = None
    if variant == "B":  # softmax in at least float32, then in the tokens' dtype
        mix = torch.softmax(level_weights.to(torch.promote_types(level_weights.dtype, torch.float32)), 0)
        mix = torch.cat([mix.new_zeros(selection_only_levels), mix]).to(queries[0].dtype)

    message, idx, scores, selections = None, None, None, []
    for step, level in enumerate(reversed(range(num_levels))):  # coarsest first
        q, k, v, kmask = queries[level], keys[level], values[level], key_masks[level]
        b, nh, hq, wq, d = q.shape
        hk, wk = k.shape[2:4]
        topk, select = topks[step], level > 0
        if step == 0:
            flat = lambda t: t.reshape(b, nh, -1, d)  # noqa: E731
            kvalid = None if kmask is None else kmask.reshape(b, hk * wk)
            message, idx, scores = _coarsest_level(flat(q), flat(k), flat(v), kvalid, topk, scale, variant, select)
            if mix is not None:
                message = message * mix[0]
        elif fused:  # this level's message, mixed and added to the parents' in one kernel, in grid order
            message, idx = fused_refine_b(q, k, v, kmask, idx, message, mix[step], topk, scale, select)
        else:
            valid_blocks = None
            if kmask is not None:
                valid_blocks = _grid_to_blocks(kmask[:, None, :, :, None].expand(-1, nh, -1, -1, -1))
            msg, idx, scores = _refine_level(
                _grid_to_blocks(q), _grid_to_blocks(k), _grid_to_blocks(v), valid_blocks, idx, scores,
                (hk // 2, wk // 2), topk, scale, variant, select,
            )
            if mix is not None:
                msg = msg * mix[step]
            # a parent's message is copied to its 4 children; back to this level's grid order, where
            # these queries are the parents of the next level
            message = msg + message[:, :, :, None, :]
            message = _ungroup_children(message, hq, wq) if select else _children_to_tokens(message, hq, wq)
            if select:
                idx = _ungroup_children(idx, hq, wq)
                scores = _ungroup_children(scores, hq, wq) if variant == "A" else None
        if select:
            selections.append(idx)
    if return_selection:
        return message, selections
    return message
