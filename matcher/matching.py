"""Coarse matching (dual softmax + mutual nearest neighbour) and fine refinement (window expectation)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import onednn
from .attention import mask_bias
from .chunking import ChunkedOutputs, chunk_slices, is_tracing
from .matching_triton import combine_column_lse, log_confidence_maxima, similarity_log_sum_exps, use_matching_kernels


def dual_softmax(
    feat0: torch.Tensor,
    feat1: torch.Tensor,
    temperature: float,
    mask0: torch.Tensor | None = None,
    mask1: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dual-softmax confidence ``(B, L0, L1)`` of tokens ``(B, L0, C)`` and ``(B, L1, C)``.

    Features are scaled by 1/sqrt(C) each, the similarity divided by ``temperature``; masked (False)
    rows / columns get zero confidence. Computed in float32 at least, also under autocast (as the chunked
    matcher): similarities divided by a temperature of 0.1 are too large for bf16's 8-bit mantissa.
    """
    dtype = torch.promote_types(feat0.dtype, torch.float32)
    with torch.autocast(feat0.device.type, enabled=False):
        scale = 1.0 / (feat0.shape[-1] * temperature)
        sim = _chunk_similarity(feat0.to(dtype), feat1.to(dtype), scale, slice(None), mask0, mask1)
        conf = F.softmax(sim, 1) * F.softmax(sim, 2)
    invalid = _invalid_entries(mask0, mask1, slice(None))
    if invalid is not None:
        conf = conf.masked_fill(invalid, 0.0)
    return conf


def _span(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and one-past-last index ``(B,)`` each of the True entries of ``(B, N)`` (0, 0 where none)."""
    index = torch.arange(valid.shape[1], device=valid.device)
    start = torch.where(valid, index, valid.shape[1]).amin(1)
    end = torch.where(valid, index + 1, 0).amax(1)
    return start.clamp_max(end), end


def valid_extent(
    mask: torch.Tensor | None, b: int, h: int, w: int, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row start, row end, column start, column end ``(B,)`` each of the unpadded block of a coarse grid, read
    off its padding mask: the rows and columns holding a valid cell, wherever the padding is (bottom-right, as
    the matcher pads, or around the image, as a letterbox)."""
    if mask is None:
        zero = torch.zeros(b, dtype=torch.long, device=device)
        return zero, torch.full((b,), h, device=device), zero, torch.full((b,), w, device=device)
    grid = mask.reshape(b, h, w)
    return (*_span(grid.any(2)), *_span(grid.any(1)))


def off_border(b: int, h: int, w: int, border: int, mask: torch.Tensor | None, device) -> torch.Tensor:
    """``(B, h * w)`` bool: cells at least ``border`` cells inside the valid (unpadded) block."""
    rows = torch.arange(h, device=device)[None, :, None]
    cols = torch.arange(w, device=device)[None, None, :]
    r0, r1, c0, c1 = (e[:, None, None] for e in valid_extent(mask, b, h, w, device))
    keep = (rows >= r0 + border) & (rows < r1 - border) & (cols >= c0 + border) & (cols < c1 - border)
    return keep.reshape(b, h * w)


def mutual_nearest_matches(
    conf: torch.Tensor,
    thr: float,
    border: int,
    hw0: tuple[int, int],
    hw1: tuple[int, int],
    mask0: torch.Tensor | None = None,
    mask1: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coarse matches: confidence above ``thr``, mutual maximum, both cells off the border.

    Returns ``b_ids, i_ids, j_ids, mconf``, each ``(M,)``.
    """
    row_max, j_best = conf.max(dim=2)
    return _select_mutual(row_max, j_best, conf.amax(dim=1), thr, border, hw0, hw1, mask0, mask1)


def _select_mutual(
    row_max: torch.Tensor, j_best: torch.Tensor, col_max: torch.Tensor, thr: float, border: int,
    hw0: tuple[int, int], hw1: tuple[int, int], mask0: torch.Tensor | None, mask1: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Matches from per-row maxima / argmax ``(B, L0)`` and per-column maxima ``(B, L1)`` of the confidence."""
    b = row_max.shape[0]
    keep0 = off_border(b, *hw0, border, mask0, row_max.device)
    keep1 = off_border(b, *hw1, border, mask1, row_max.device)
    valid = (row_max > thr) & (torch.gather(col_max, 1, j_best) == row_max)
    valid = valid & keep0 & torch.gather(keep1, 1, j_best)
    b_ids, i_ids = torch.where(valid)
    return b_ids, i_ids, j_best[b_ids, i_ids], row_max[b_ids, i_ids]


#: Above this many confidence entries (B x L0 x L1) inference matches in row chunks instead of building the
#: dense matrix: on GPUs to bound memory (64M entries = 256 MB in fp32; a 1600x1200 pair has 900M), on CPU
#: from 4M entries, where the chunked matcher is also faster (0.17 vs 0.23 s at 4,800 x 4,800 tokens).
GPU_DENSE_MATCHING_MAX_ENTRIES = 1 << 26
CPU_DENSE_MATCHING_MAX_ENTRIES = 1 << 22


def dense_matching_limit(device: torch.device) -> int:
    """Largest confidence matrix (entries) inference builds whole on ``device``."""
    return CPU_DENSE_MATCHING_MAX_ENTRIES if device.type == "cpu" else GPU_DENSE_MATCHING_MAX_ENTRIES


#: Similarity entries per row chunk of the chunked matcher on CPU: 16 MB in fp32, enough rows for the matrix
#: products to run near full rate and few enough for the passes over each chunk to stay in the large caches
#: (30,000 x 30,000 tokens on 2 cores: 6.5 s with 1M entries, 5.4 s with 2M, 4.9 s with 4M, 5.3 s with 8M).
#: On GPUs chunks only bound memory: 64M entries.
MATCHING_CHUNK_ENTRIES = 1 << 22
GPU_MATCHING_CHUNK_ENTRIES = 1 << 26

#: With the Triton kernels (GPU) each chunk's similarity is computed once and read twice by the kernels, so
#: a pair that fits in one chunk needs one matrix product: 512M entries (2 GB in float32) hold 1152x1152
#: (20,736 x 20,736 tokens); larger pairs compute each chunk's product twice.
FUSED_MATCHING_CHUNK_ENTRIES = 1 << 29


def _chunk_similarity(feat0: torch.Tensor, feat1: torch.Tensor, scale: float, rows: slice, mask0, mask1) -> torch.Tensor:
    """Scaled similarity of the query rows ``rows`` ``(B, r, L1)``. Padded rows and columns each add a quarter
    of the dtype's minimum: far below any real similarity, and finite even where both add up."""
    sim = onednn.products(feat0[:, rows] * scale, feat1)  # scaling the rows, not the products
    for bias in _padding_biases(mask0, mask1, rows, sim.dtype, torch.finfo(sim.dtype).min / 4):
        sim = sim + bias
    return sim


def _padding_biases(mask0: torch.Tensor | None, mask1: torch.Tensor | None, rows: slice, dtype: torch.dtype,
                    fill: float) -> list[torch.Tensor]:
    """Additive masks of a chunk's padded rows ``(B, r, 1)`` and columns ``(B, 1, L1)``: 0 where valid, ``fill``
    where padded (two broadcast additions are several times cheaper on CPU than one ``masked_fill``)."""
    masks = (None if mask0 is None else mask0[:, rows, None], None if mask1 is None else mask1[:, None, :])
    return [mask_bias(m, dtype, fill) for m in masks if m is not None]


def _invalid_entries(mask0: torch.Tensor | None, mask1: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """``(B, r, L1)`` (broadcastable) True where row ``rows`` or the column is padding; None without masks."""
    invalid = None
    if mask0 is not None:
        invalid = ~mask0[:, rows, None]
    if mask1 is not None:
        invalid = ~mask1[:, None, :] if invalid is None else invalid | ~mask1[:, None, :]
    return invalid


def _logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(exp(a) + exp(b))``, stable (torch.logaddexp has no ONNX export)."""
    top = torch.maximum(a, b)
    return top + torch.log(torch.exp(a - top) + torch.exp(b - top))


#: Log-confidence term of padded rows / columns in the chunked matcher's second pass: exp() of it is 0 in
#: float32, and twice it plus any similarity stays finite.
PADDED_LOG_CONFIDENCE = -1e30


def _extended_features(
    feat0: torch.Tensor, feat1: torch.Tensor, scale: float, row_lse: torch.Tensor, col_lse: torch.Tensor,
    mask0: torch.Tensor | None, mask1: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[scale f0_i, -R_i, 1]`` ``(B, L0, C + 2)`` and columns ``[f1_j, 1, -C_j]`` ``(B, C + 2, L1)``, in
    float32 at least, whose product is ``scale f0_i . f1_j - R_i - C_j``. Padded rows / columns get
    :data:`PADDED_LOG_CONFIDENCE` instead of -R / -C, so the product itself masks their entries (exp gives 0)
    and no pass over each chunk is needed."""
    dtype = torch.promote_types(feat0.dtype, torch.float32)
    row_term, col_term = -row_lse.to(dtype), -col_lse.to(dtype)
    if mask0 is not None:
        row_term = row_term.masked_fill(~mask0, PADDED_LOG_CONFIDENCE)
    if mask1 is not None:
        col_term = col_term.masked_fill(~mask1, PADDED_LOG_CONFIDENCE)
    ones0, ones1 = row_term.new_ones(row_term.shape), col_term.new_ones(col_term.shape)
    rows = torch.cat([feat0.to(dtype) * scale, row_term[..., None], ones0[..., None]], dim=-1)
    cols = torch.cat([feat1.to(dtype), ones1[..., None], col_term[..., None]], dim=-1).transpose(1, 2)
    return rows, cols


def chunked_mutual_nearest_matches(
    feat0: torch.Tensor,
    feat1: torch.Tensor,
    temperature: float,
    thr: float,
    border: int,
    hw0: tuple[int, int],
    hw1: tuple[int, int],
    mask0: torch.Tensor | None = None,
    mask1: torch.Tensor | None = None,
    max_entries: int | None = None,
    kernel: str = "auto",
    skip_unmatchable: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`dual_softmax` followed by :func:`mutual_nearest_matches`, without the ``(B, L0, L1)`` matrix.

    The dual softmax is ``exp(2 s_ij - R_i - C_j)`` with ``R`` / ``C`` the log-sum-exp of the similarity
    ``s`` over rows / columns: a first pass over row chunks of at most ``max_entries`` entries computes
    ``R`` and accumulates ``C``; a second one computes each chunk's log-confidence ``2 s - R - C`` for
    its row maxima and the running column maxima (exp is taken of the maxima only), as one float32 matrix
    product of features extended by two columns, ``[2 f0_i / (c T), -R_i, 1] . [f1_j, 1, -C_j]``, instead
    of a product and three passes over the chunk. Memory is O(chunk x L1) instead of O(L0 x L1); same
    outputs as the dense pair (up to float rounding). ``max_entries`` defaults to
    :data:`MATCHING_CHUNK_ENTRIES` on CPU and :data:`GPU_MATCHING_CHUNK_ENTRIES` elsewhere.

    With ``thr > 0`` the second pass skips what cannot hold a match: ``conf_ij <= exp(a_i + b_j)``, where
    ``a_i`` / ``b_j`` are the logs of row i's / column j's largest softmax weight (from the first pass), so a
    match above ``thr`` needs ``a_i + b_j > log thr``, and so does every entry that could beat it in its row
    or column. The second pass visits rows by decreasing ``a`` and, per chunk, only the columns with
    ``b_j > log thr - a`` (:func:`_pruned_log_confidence_maxima`): the same matches (ties aside). With
    trained weights that is a third of the entries at 640x480 and a thirtieth at 1600x1200 (README).
    ``skip_unmatchable=False`` computes every entry (the reference the benchmark times this against).

    ``kernel`` (:func:`use_matching_kernels`): ``auto`` runs both passes as Triton kernels on CUDA, over a
    similarity computed once per chunk (chunks of :data:`FUSED_MATCHING_CHUNK_ENTRIES`); ``torch`` /
    ``triton`` force a path.
    """
    fused = use_matching_kernels(feat0, kernel)
    if max_entries is None:
        max_entries = MATCHING_CHUNK_ENTRIES if feat0.device.type == "cpu" else GPU_MATCHING_CHUNK_ENTRIES
        max_entries = FUSED_MATCHING_CHUNK_ENTRIES if fused else max_entries
    b, l0, c = feat0.shape
    scale = 1.0 / (c * temperature)
    step = max(1, max_entries // max(1, b * feat1.shape[1]))
    chunks = chunk_slices(l0, step)
    if fused:
        return _fused_mutual_nearest_matches(feat0, feat1, scale, chunks, thr, border, hw0, hw1, mask0, mask1)
    prune = skip_unmatchable and thr > 0 and not is_tracing()  # data-dependent shapes: not in a traced graph
    dtype = torch.promote_types(feat0.dtype, torch.float32)
    # both passes in float32 at least, also under an outer autocast (as the Triton path): R and C are large, and
    # the second pass's skipping relies on the first pass's bounds
    with torch.autocast(feat0.device.type, enabled=False):
        feat0, feat1 = feat0.to(dtype), feat1.to(dtype)
        row_lse, col_lse, row_peak, col_peak = _log_sum_exps(feat0, feat1, scale, chunks, mask0, mask1)
        rows_ext, cols_ext = _extended_features(feat0, feat1, 2 * scale, row_lse, col_lse, mask0, mask1)
        if prune:
            row_bound, col_bound = _log_peak_weight(row_peak, row_lse, mask0), _log_peak_weight(col_peak, col_lse, mask1)
            log_thr = math.log(thr) - _rounding_slack(row_lse, col_lse, mask0, mask1)
            row_best, j_best, col_best = _pruned_log_confidence_maxima(
                rows_ext, cols_ext, row_bound, col_bound, log_thr, max_entries
            )
        else:
            row_best, j_best, col_best = _log_confidence_maxima(rows_ext, cols_ext, chunks)
    return _select_mutual(row_best.exp(), j_best, col_best.exp(), thr, border, hw0, hw1, mask0, mask1)


#: A column of a chunk whose largest similarity lies this far below the chunk's largest row maximum gets its
#: log-sum-exp computed directly: through the rows' exponentials (:func:`_log_sum_exps`) its terms could
#: underflow in float32 (exp(-87) is its smallest normal number).
DIRECT_COLUMN_GAP = 60.0


def _log_sum_exps(feat0, feat1, scale: float, chunks: list[slice], mask0, mask1):
    """First pass: the similarity's log-sum-exps over each row ``R (B, L0)`` and column ``C (B, L1)`` and its
    row and column maxima ``(B, L0)``, ``(B, L1)``.

    One exponential per entry serves both sums: with ``m_i`` the row maxima and ``g`` the chunk's largest,
    ``e_ij = exp(s_ij - m_i)`` gives ``R_i = m_i + log sum_j e_ij`` and the chunk's column sums
    ``sum_i exp(s_ij) = exp(g) sum_i exp(m_i - g) e_ij``, one vector-matrix product (torch's two
    ``logsumexp`` calls take two exponentials and two more passes). A column whose maximum ``n_j`` is more than
    :data:`DIRECT_COLUMN_GAP` below ``g`` is summed directly instead, so terms lost to underflow are at most
    exp(-27) of the column's largest (padded columns, whose sums are never used, excepted).
    """
    row_lse, col_lse, col_peak = ChunkedOutputs(feat0.shape[1], dim=1), None, None
    for rows in chunks:
        sim = _chunk_similarity(feat0, feat1, scale, rows, mask0, mask1)
        row_max, col_max = sim.amax(2, keepdim=True), sim.amax(1)
        top = row_max.amax(1, keepdim=True)  # (B, 1, 1)
        direct = col_max < top[:, 0] - DIRECT_COLUMN_GAP
        if mask1 is not None:
            direct = direct & mask1
        exact = None
        if is_tracing() or bool(direct.any()):
            columns = direct.any(0).nonzero()[:, 0]  # of any pair in the batch
            exact = (columns, sim.index_select(2, columns).logsumexp(1))
        weights = sim.sub_(row_max).exp_()  # in place: the chunk's similarity is not needed any more
        row_lse.add((row_max[..., 0] + weights.sum(2).log(), row_max[..., 0]), rows)
        col_sums = torch.bmm((row_max - top).exp().transpose(1, 2), weights)[:, 0]
        part = top[:, 0] + col_sums.clamp_min(torch.finfo(col_sums.dtype).tiny).log()
        if exact is not None:
            part = part.scatter(1, exact[0].expand(part.shape[0], -1), exact[1])
        col_lse = part if col_lse is None else _logaddexp(col_lse, part)
        col_peak = col_max if col_peak is None else torch.maximum(col_peak, col_max)
    row_lse, row_peak = row_lse.result()
    return row_lse, col_lse, row_peak, col_peak


def _log_confidence_maxima(rows_ext: torch.Tensor, cols_ext: torch.Tensor, chunks: list[slice]):
    """Second pass over every entry: the log-confidence's row maxima and argmax ``(B, L0)`` and column maxima
    ``(B, L1)``, from the extended features of :func:`_extended_features`."""
    best, col_best = ChunkedOutputs(rows_ext.shape[1], dim=1), None
    for rows in chunks:
        log_conf = onednn.products(rows_ext[:, rows], cols_ext.transpose(1, 2))  # cols_ext: a transposed view
        best.add(log_conf.max(dim=2), rows)
        part = log_conf.amax(dim=1)
        col_best = part if col_best is None else torch.maximum(col_best, part)
    row_best, j_best = best.result()
    return row_best, j_best, col_best


def _log_peak_weight(peak: torch.Tensor, lse: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Log of each row's (column's) largest softmax weight, ``max - log-sum-exp``; -inf where padded."""
    bound = peak - lse
    return bound if valid is None else bound.masked_fill(~valid, -math.inf)


def _rounding_slack(row_lse: torch.Tensor, col_lse: torch.Tensor, mask0, mask1) -> float:
    """How far the second pass's log-confidence ``2 s - R - C`` (another matrix product) may exceed the first
    pass's bound: a generous multiple of the dtype's rounding at the terms' magnitude (float32: 1.5e-5 of it)."""
    magnitude = 0.0
    for lse, valid in ((row_lse, mask0), (col_lse, mask1)):
        values = lse if valid is None else lse[valid]
        values = values[values.isfinite()]  # one pair's NaN / inf must not change the other pairs' bounds
        magnitude += float(values.abs().max()) if values.numel() else 0.0
    return 1e-3 + 128 * torch.finfo(row_lse.dtype).eps * 2 * magnitude


def _pruned_log_confidence_maxima(
    rows_ext: torch.Tensor, cols_ext: torch.Tensor, row_bound: torch.Tensor, col_bound: torch.Tensor,
    log_thr: float, max_entries: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_log_confidence_maxima` where a match above ``exp(log_thr)`` is possible; -inf elsewhere.

    ``row_bound (B, L0)``, ``col_bound (B, L1)``: :func:`_log_peak_weight` of the rows / columns. Only rows and
    columns with a bound above ``log_thr`` take part; rows in order of decreasing bound ``a``, each chunk of
    them against the columns with ``b > log_thr - a`` of its first row (a prefix of the columns sorted by
    decreasing bound), so every entry that could reach ``log_thr`` is computed, and with it each kept row's
    maximum and each column's maximum over the rows that could reach ``log_thr`` in it.
    """
    b, l0 = row_bound.shape
    row_best = rows_ext.new_full((b, l0), -math.inf)
    j_best = torch.zeros(b, l0, dtype=torch.long, device=rows_ext.device)
    col_best = rows_ext.new_full(col_bound.shape, -math.inf)
    for i in range(b):
        # stable: among equal bounds the lower index comes first, as in an unpruned argmax
        a, rows = row_bound[i].sort(descending=True, stable=True)
        c, cols = col_bound[i].sort(descending=True, stable=True)
        num_rows, num_cols = int((a > log_thr).sum()), int((c > log_thr).sum())
        if num_rows == 0 or num_cols == 0:
            continue
        a, rows, c, cols = a[:num_rows], rows[:num_rows], c[:num_cols], cols[:num_cols]
        # columns a row needs: c_j > log_thr - a_i, i.e. -c_j < a_i - log_thr (-c ascends)
        widths = torch.searchsorted(-c, (a - log_thr).contiguous()).tolist()
        lhs = rows_ext[i].index_select(0, rows)
        rhs = cols_ext[i].transpose(0, 1).index_select(0, cols)  # (columns, C + 2), contiguous
        col_max = rhs.new_full((num_cols,), -math.inf)
        start = 0
        while start < num_rows and widths[start] > 0:  # widths never grow: a row without columns ends it
            width = widths[start]
            stop = min(num_rows, start + max(1, max_entries // width))
            log_conf = onednn.products(lhs[start:stop], rhs[:width])
            best, arg = log_conf.max(dim=1)
            row_best[i, rows[start:stop]] = best
            j_best[i, rows[start:stop]] = cols[arg]
            col_max[:width] = torch.maximum(col_max[:width], log_conf.amax(dim=0))
            start = stop
        col_best[i, cols] = col_max
    return row_best, j_best, col_best


def _fused_mutual_nearest_matches(
    feat0: torch.Tensor, feat1: torch.Tensor, scale: float, chunks: list[slice], thr: float, border: int,
    hw0: tuple[int, int], hw1: tuple[int, int], mask0: torch.Tensor | None, mask1: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`chunked_mutual_nearest_matches` with each pass one Triton kernel over a chunk's float32
    similarity (:mod:`matcher.matching_triton`); a single chunk's similarity is kept for the second pass."""
    feat0, feat1 = feat0.float(), feat1.float()  # once, not per chunk (as the PyTorch path's second pass: float32)

    def similarity(rows: slice) -> torch.Tensor:
        with torch.autocast(feat0.device.type, enabled=False):
            return _chunk_similarity(feat0, feat1, scale, rows, mask0, mask1)

    kept = None
    row_lse, col_parts = ChunkedOutputs(feat0.shape[1], dim=1), []
    for rows in chunks:
        sim = similarity(rows)
        lse, col_max, col_sum = similarity_log_sum_exps(sim)
        row_lse.add((lse,), rows)
        col_parts.append((col_max, col_sum))
        kept = sim if len(chunks) == 1 else None
    (row_lse,) = row_lse.result()
    col_lse = combine_column_lse(*(torch.cat(parts, dim=1) for parts in zip(*col_parts)))
    best, col_best = ChunkedOutputs(feat0.shape[1], dim=1), None
    for rows in chunks:
        sim = kept if kept is not None else similarity(rows)
        row_valid = None if mask0 is None else mask0[:, rows]
        row_best, j_best, part = log_confidence_maxima(sim, row_lse[:, rows], col_lse, row_valid, mask1)
        best.add((row_best, j_best), rows)
        col_best = part if col_best is None else torch.maximum(col_best, part)
    row_best, j_best = best.result()
    return _select_mutual(row_best.exp(), j_best, col_best.exp(), thr, border, hw0, hw1, mask0, mask1)


def pad_with_ground_truth(
    b_ids: torch.Tensor,
    i_ids: torch.Tensor,
    j_ids: torch.Tensor,
    mconf: torch.Tensor,
    spv: dict[str, torch.Tensor],
    num_train: int,
    num_gt_min: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training: keep at most ``num_train - num_gt_min`` predictions and pad with ground-truth matches
    (confidence 0) up to ``num_train`` (at least ``num_gt_min`` of them), so the fine stage always learns.

    A batch without ground truth and without predictions gets one placeholder (0, 0, 0), confidence 0, as
    LoFTR: the fine stage then still runs and every parameter takes part in the backward pass, which DDP
    requires; the training loss gives the placeholder no fine target."""
    device = b_ids.device
    num_pred = len(b_ids)
    num_gt_min = min(num_gt_min, num_train // 2)  # small images hold fewer cells than the configured minimum
    if num_pred <= num_train - num_gt_min:
        pred = torch.arange(num_pred, device=device)
    else:
        pred = torch.randint(num_pred, (num_train - num_gt_min,), device=device)
    num_gt = len(spv["spv_b_ids"])
    if num_gt == 0:
        if num_pred == 0:
            zero = torch.zeros(1, device=device, dtype=b_ids.dtype)
            return zero, zero.clone(), zero.clone(), torch.zeros(1, device=device, dtype=mconf.dtype)
        return b_ids[pred], i_ids[pred], j_ids[pred], mconf[pred]
    gt = torch.randint(num_gt, (max(num_train - num_pred, num_gt_min),), device=device)
    zeros = torch.zeros(len(gt), device=device, dtype=mconf.dtype)
    return (
        torch.cat([b_ids[pred], spv["spv_b_ids"][gt]]),
        torch.cat([i_ids[pred], spv["spv_i_ids"][gt]]),
        torch.cat([j_ids[pred], spv["spv_j_ids"][gt]]),
        torch.cat([mconf[pred], zeros]),
    )


def cell_coordinates(ids: torch.Tensor, width: int, stride: int) -> torch.Tensor:
    """Pixel position ``(M, 2)`` (x, y) of coarse cells: cell (x, y) sits on pixel (stride x, stride y)."""
    return torch.stack([ids % width, ids // width], dim=1).float() * stride


def gather_windows(feat: torch.Tensor, b_ids: torch.Tensor, ids: torch.Tensor, window: int, stride: int, grid_w: int) -> torch.Tensor:
    """Windows ``(M, window**2, C)`` of a fine map ``(B, C, Hf, Wf)`` centred on fine cell ``stride * cell``
    of each coarse cell ``ids`` (grid width ``grid_w``), zero outside the map (as F.unfold with padding)."""
    pad = window // 2
    padded = F.pad(feat, (pad, pad, pad, pad))
    offsets = torch.arange(window, device=ids.device)
    rows = (ids // grid_w * stride)[:, None] + offsets
    cols = (ids % grid_w * stride)[:, None] + offsets
    win = padded[b_ids[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (M, w, w, C)
    return win.reshape(-1, window * window, feat.shape[1])  # -1: M stays symbolic in traced exports


class FinePreprocess(nn.Module):
    """Crops the fine windows of every coarse match and merges the coarse feature into them."""

    def __init__(self, d_coarse: int, d_fine: int, window: int, concat_coarse: bool = True) -> None:
        super().__init__()
        self.window, self.concat_coarse, self.d_fine = window, concat_coarse, d_fine
        if concat_coarse:
            self.down_proj = nn.Linear(d_coarse, d_fine, bias=True)
            self.merge_feat = nn.Linear(2 * d_fine, d_fine, bias=True)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.kaiming_normal_(p, mode="fan_out", nonlinearity="relu")

    def forward(
        self,
        feat_f0: torch.Tensor,
        feat_f1: torch.Tensor,
        feat_c0: torch.Tensor,
        feat_c1: torch.Tensor,
        b_ids: torch.Tensor,
        i_ids: torch.Tensor,
        j_ids: torch.Tensor,
        w0c: int,
        w1c: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fine maps ``(B, Cf, Hf, Wf)``, coarse tokens ``(B, L, Cc)`` -> windows ``(M, W*W, Cf)`` each."""
        ww = self.window**2
        if len(b_ids) == 0:
            empty = feat_f0.new_zeros(0, ww, self.d_fine)
            return empty, empty.clone()
        win0 = gather_windows(feat_f0, b_ids, i_ids, self.window, 4, w0c)
        win1 = gather_windows(feat_f1, b_ids, j_ids, self.window, 4, w1c)
        if not self.concat_coarse:
            return win0, win1
        down, merge = self.down_proj, self.merge_feat
        coarse = onednn.linear(torch.cat([feat_c0[b_ids, i_ids], feat_c1[b_ids, j_ids]], 0), down.weight, down.bias)
        merged = torch.cat([torch.cat([win0, win1], 0), coarse[:, None].expand(-1, ww, -1)], -1)
        merged = onednn.linear(merged, merge.weight, merge.bias)
        return merged.chunk(2, dim=0)


def window_expectation(feat_f0: torch.Tensor, feat_f1: torch.Tensor) -> torch.Tensor:
    """Correlate the centre of window 0 with window 1; softmax; expectation and std.

    Args: ``(M, W*W, C)`` each. Returns ``(M, 3)`` (float32 at least): expected (x, y) in [-1, 1] window
    coordinates and the summed standard deviation of x and y.
    """
    m, ww, c = feat_f1.shape
    w = int(math.isqrt(ww))
    dtype = torch.promote_types(feat_f1.dtype, torch.float32)
    if m == 0:
        return feat_f1.new_zeros(0, 3, dtype=dtype)
    # float32 at least, also under an outer autocast: the variance is a difference of nearly equal moments
    with torch.autocast(feat_f1.device.type, enabled=False):
        centre, feat_f1 = feat_f0[:, ww // 2].to(dtype), feat_f1.to(dtype)
        heat = torch.softmax(torch.einsum("mc,mrc->mr", centre, feat_f1) / c**0.5, dim=1)
        lin = torch.linspace(-1, 1, w, device=heat.device, dtype=heat.dtype)
        grid = torch.stack(torch.meshgrid(lin, lin, indexing="xy"), -1).reshape(ww, 2)  # (x, y), row-major
        mean = heat @ grid
        var = heat @ grid**2 - mean**2
    std = torch.where(var > 1e-10, var.clamp_min(1e-10).sqrt(), torch.full_like(var, 1e-5)).sum(-1)
    return torch.cat([mean, std[:, None]], -1)
