"""The chunked coarse matcher's passes: log-sum-exps from one exponential per entry, and the second pass
restricted to the rows and columns that can hold a match."""

import math

import pytest
import torch

from matcher import matching
from matcher.matching import chunked_mutual_nearest_matches, dual_softmax, mutual_nearest_matches


def _features(seed: int, l0: int = 96, l1: int = 120, dim: int = 32, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    f0 = torch.randn(batch, l0, dim, generator=g)
    f1 = torch.randn(batch, l1, dim, generator=g)
    f1[:, :60] = f0[:, 10:70] + 0.1 * torch.randn(batch, 60, dim, generator=g)  # clear matches
    return f0, f1


def _masks(batch: int, hw0: tuple[int, int], hw1: tuple[int, int]):
    """Bottom-right padding: image0 of the second pair three rows short, image1 of the first two columns."""
    m0 = torch.ones(batch, *hw0, dtype=torch.bool)
    m0[1, -3:] = False
    m1 = torch.ones(batch, *hw1, dtype=torch.bool)
    m1[0, :, -2:] = False
    return m0.flatten(1), m1.flatten(1)


@pytest.mark.parametrize("masked", [False, True])
def test_log_sum_exps_equal_torch_logsumexp(masked):
    """Row / column log-sum-exps and maxima over row chunks equal torch's over the whole similarity, also for
    columns far below a chunk's largest similarity (summed directly: through the rows' exponentials their
    terms would underflow)."""
    f0, f1 = _features(0)
    f0[:, 5] *= 40.0  # one row with similarities of a few hundred: most columns lie > 60 below it
    hw0, hw1 = (8, 12), (10, 12)
    m0, m1 = _masks(2, hw0, hw1) if masked else (None, None)
    scale = 1.0 / (32 * 0.1)
    chunks = matching.chunk_slices(96, 20)
    sim = matching._chunk_similarity(f0, f1, scale, slice(None), m0, m1)
    row_lse, col_lse, row_peak, col_peak = matching._log_sum_exps(f0, f1, scale, chunks, m0, m1)

    first_chunk = sim[:, chunks[0]]
    gap = first_chunk.amax(dim=(1, 2))[:, None] - first_chunk.amax(1)
    assert (gap > matching.DIRECT_COLUMN_GAP).any()  # the direct path is needed here
    rows = torch.ones(2, 96, dtype=torch.bool) if m0 is None else m0
    cols = torch.ones(2, 120, dtype=torch.bool) if m1 is None else m1
    torch.testing.assert_close(row_lse[rows], sim.logsumexp(2)[rows], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(col_lse[cols], sim.logsumexp(1)[cols], rtol=1e-6, atol=1e-5)
    assert torch.equal(row_peak, sim.amax(2)) and torch.equal(col_peak, sim.amax(1))
    assert torch.isfinite(col_lse).all()  # padded columns too (their sums are never used)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("thr", [0.0, 0.01, 0.2, 0.6, 0.99])
def test_chunked_matches_equal_dense_at_any_threshold(masked, thr):
    """With the second pass restricted to what can match (any thr > 0), and in chunks of a few rows each, the
    chunked matcher gives the dense dual-softmax + mutual-NN matches."""
    f0, f1 = _features(1)
    hw0, hw1 = (8, 12), (10, 12)
    m0, m1 = _masks(2, hw0, hw1) if masked else (None, None)
    dense = mutual_nearest_matches(dual_softmax(f0, f1, 0.1, m0, m1), thr, 1, hw0, hw1, m0, m1)
    chunked = chunked_mutual_nearest_matches(f0, f1, 0.1, thr, 1, hw0, hw1, m0, m1, max_entries=2 * 120 * 7)
    if thr < 0.9:
        assert len(dense[0]) > 20
    for a, b in zip(dense[:3], chunked[:3]):
        assert torch.equal(a, b)
    torch.testing.assert_close(dense[3], chunked[3], rtol=1e-4, atol=1e-6)


def test_second_pass_computes_only_entries_that_can_reach_the_threshold(monkeypatch):
    """Entries computed: every (i, j) with a_i + b_j above log thr (a, b: logs of the row's / column's largest
    softmax weight), far fewer than all; kept rows get the maxima of the full matrix wherever those can
    reach the threshold, the others -inf."""
    f0, f1 = _features(2, batch=1)
    scale = 1.0 / (32 * 0.1)
    sim = matching._chunk_similarity(f0, f1, scale, slice(None), None, None)
    row_lse, col_lse = sim.logsumexp(2), sim.logsumexp(1)
    row_bound, col_bound = sim.amax(2) - row_lse, sim.amax(1) - col_lse
    rows_ext, cols_ext = matching._extended_features(f0, f1, 2 * scale, row_lse, col_lse, None, None)
    log_conf = torch.bmm(rows_ext, cols_ext)
    log_thr = math.log(0.3)

    computed = []
    real_products = matching.onednn.products

    def counting_products(a, b):
        computed.append(a.shape[0] * b.shape[0])
        return real_products(a, b)

    monkeypatch.setattr(matching.onednn, "products", counting_products)
    row_best, j_best, col_best = matching._pruned_log_confidence_maxima(
        rows_ext, cols_ext, row_bound, col_bound, log_thr, max_entries=200
    )
    needed = int((row_bound[0, :, None] + col_bound[0, None, :] > log_thr).sum())
    assert len(computed) > 1 and needed <= sum(computed) < log_conf.numel() / 2

    full_best, full_arg = log_conf.max(dim=2)
    can_match = full_best > log_thr
    assert can_match.sum() > 20
    # a product of other shapes: the same values up to float32 rounding
    torch.testing.assert_close(row_best[can_match], full_best[can_match], rtol=0, atol=1e-5)
    assert torch.equal(j_best[can_match], full_arg[can_match])
    assert (row_best[row_bound <= log_thr] == -math.inf).all()
    full_col = log_conf.amax(dim=1)
    col_can_match = full_col > log_thr
    torch.testing.assert_close(col_best[col_can_match], full_col[col_can_match], rtol=0, atol=1e-5)


def test_both_matchers_run_in_float32_under_autocast():
    """Under a bf16 autocast the dense dual softmax and the chunked matcher give their float32 results."""
    f0, f1 = _features(3)
    hw0, hw1 = (8, 12), (10, 12)
    dense_ref = dual_softmax(f0, f1, 0.1)
    chunked_ref = chunked_mutual_nearest_matches(f0, f1, 0.1, 0.2, 1, hw0, hw1, max_entries=2 * 120 * 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = dual_softmax(f0, f1, 0.1)
        chunked = chunked_mutual_nearest_matches(f0, f1, 0.1, 0.2, 1, hw0, hw1, max_entries=2 * 120 * 7)
    assert dense.dtype == torch.float32 and torch.equal(dense, dense_ref)
    assert len(chunked_ref[0]) > 20
    for a, b in zip(chunked, chunked_ref):
        assert torch.equal(a, b)


def _off_border_by_hand(mask: torch.Tensor, border: int) -> torch.Tensor:
    """Per cell: inside the bounding box of the valid cells, at least ``border`` cells from each of its sides."""
    b, h, w = mask.shape
    keep = torch.zeros(b, h, w, dtype=torch.bool)
    for k in range(b):
        rows = [r for r in range(h) if mask[k, r].any()]
        cols = [c for c in range(w) if mask[k, :, c].any()]
        for r in range(h):
            for c in range(w):
                keep[k, r, c] = bool(rows) and rows[0] + border <= r <= rows[-1] - border and cols[0] + border <= c <= cols[-1] - border
    return keep.reshape(b, h * w)


def test_border_removal_follows_the_valid_block_wherever_the_padding_is():
    from matcher.matching import off_border

    h, w = 12, 16
    masks = torch.zeros(4, h, w, dtype=torch.bool)
    masks[0] = True                 # no padding
    masks[1, :9, :13] = True        # bottom-right padding, as the matcher pads
    masks[2, 3:10, 4:14] = True     # a letterbox: padding on every side
    # masks[3]: nothing valid
    for border in (0, 2):
        torch.testing.assert_close(off_border(4, h, w, border, masks.reshape(4, -1), "cpu"), _off_border_by_hand(masks, border))
    keep = off_border(4, h, w, 2, masks.reshape(4, -1), "cpu").reshape(4, h, w)
    assert keep[2].nonzero().amin(0).tolist() == [5, 6] and keep[2].nonzero().amax(0).tolist() == [7, 11]
    torch.testing.assert_close(off_border(1, h, w, 2, None, "cpu"), _off_border_by_hand(masks[:1], 2))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_feature_in_one_pair_leaves_the_other_pairs_matches(bad):
    # the pruning bound's rounding slack was taken over the whole batch: one NaN pair emptied every pair
    g = torch.Generator().manual_seed(5)
    f0, f1 = torch.randn(2, 96, 32, generator=g), torch.randn(2, 120, 32, generator=g)
    f0[:, :40] *= 3
    f1[:, :40] = f0[:, :40] + 0.05 * torch.randn(2, 40, 32, generator=g)
    f0[0, 3, 0] = bad
    hw0, hw1 = (8, 12), (10, 12)
    dense = mutual_nearest_matches(dual_softmax(f0, f1, 0.1), 0.2, 1, hw0, hw1)
    chunked = chunked_mutual_nearest_matches(f0, f1, 0.1, 0.2, 1, hw0, hw1)
    assert (dense[0] == 1).sum() > 10
    for a, b in zip(dense[:3], chunked[:3]):
        assert torch.equal(a, b)
