"""QuadTree attention against a straightforward per-query implementation written here, on small grids."""

from __future__ import annotations

import pytest
import torch

from matcher.attention import (
    full_attention, linear_attention, num_levels_for, pool_levels, quadtree_attention, topk_last_dim,
)


def _reference(qs, ks, vs, topks, variant, weights=None, kmasks=None):
    """Per-query loops over one (batch, head): qs/ks/vs are lists, finest first, of (h, w, D) tensors."""
    L = len(qs)
    scale = qs[0].shape[-1] ** -0.5
    neg = torch.finfo(qs[0].dtype).min
    msgs, sels, scores = [None] * L, [None] * L, [None] * L
    for lvl in reversed(range(L)):
        hq, wq, _ = qs[lvl].shape
        hk, wk, _ = ks[lvl].shape
        kflat, vflat = ks[lvl].reshape(-1, ks[lvl].shape[-1]), vs[lvl].reshape(-1, vs[lvl].shape[-1])
        kvalid = None if kmasks is None else kmasks[lvl].reshape(-1)
        msg = torch.zeros(hq * wq, vflat.shape[-1], dtype=qs[0].dtype)
        sel, sc = {}, {}
        step = L - 1 - lvl
        topk = topks[min(step, len(topks) - 1)]
        for y in range(hq):
            for x in range(wq):
                qv = qs[lvl][y, x]
                p = y * wq + x
                if lvl == L - 1:
                    cands = list(range(hk * wk))
                    logit = kflat[cands] @ qv * scale
                    if kvalid is not None:
                        logit = logit.masked_fill(~kvalid[cands], neg)
                    w = torch.softmax(logit, 0)
                else:
                    parent = (y // 2) * (wq // 2) + x // 2
                    pw = wk // 2
                    cands, groups = [], []
                    for s in sels[lvl + 1][parent]:
                        py, px = divmod(int(s), pw)
                        kids = [(2 * py + dy) * wk + 2 * px + dx for dy in (0, 1) for dx in (0, 1)]
                        cands += kids
                        groups.append(kids)
                    logit = kflat[cands] @ qv * scale
                    if kvalid is not None:
                        logit = logit.masked_fill(~kvalid[cands], neg)
                    if variant == "B":
                        w = torch.softmax(logit, 0)
                    else:
                        parent_scores = scores[lvl + 1][parent]
                        w = torch.cat([
                            torch.softmax(logit[4 * g : 4 * g + 4], 0) * parent_scores[g] for g in range(len(groups))
                        ])
                keep = torch.ones(len(cands), dtype=torch.bool)
                if lvl > 0:
                    top_s, top_i = torch.topk(w, min(topk, len(cands)))
                    sel[p] = [cands[i] for i in top_i.tolist()]
                    sc[p] = top_s
                    if variant == "A":
                        keep[top_i] = False
                msg[p] = (w * keep) @ vflat[cands]
        msgs[lvl], sels[lvl], scores[lvl] = msg.reshape(hq, wq, -1), sel, sc
    mix = torch.softmax(weights, 0) if variant == "B" else torch.ones(L)
    h0, w0, _ = qs[0].shape
    out = torch.zeros(h0, w0, msgs[0].shape[-1], dtype=qs[0].dtype)
    for lvl in range(L):
        up = msgs[lvl].repeat_interleave(2**lvl, 0).repeat_interleave(2**lvl, 1)
        out += mix[L - 1 - lvl] * up
    return out.reshape(h0 * w0, -1)


def _pyramids(b, nh, d, hw_q, hw_k, levels, seed, masked=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, nh * d, *hw_q, generator=g, dtype=torch.float64)
    k = torch.randn(b, nh * d, *hw_k, generator=g, dtype=torch.float64)
    v = torch.randn(b, nh * d, *hw_k, generator=g, dtype=torch.float64)
    mask = None
    if masked:  # bottom-right padding of the key grid, as the matcher produces
        mask = torch.zeros(b, *hw_k, dtype=torch.bool)
        mask[:, : hw_k[0] - 3, : hw_k[1] - 2] = True
    qs, _ = pool_levels(q, levels)
    ks, kmasks = pool_levels(k, levels, mask)
    vs, _ = pool_levels(v, levels, mask)
    heads = lambda maps: [m.reshape(b, nh, d, *m.shape[2:]).permute(0, 1, 3, 4, 2) for m in maps]  # noqa: E731
    return heads(qs), heads(ks), heads(vs), kmasks


@pytest.mark.parametrize("variant", ["A", "B"])
@pytest.mark.parametrize(
    "hw_q,hw_k,topks,masked",
    [
        ((8, 8), (8, 8), [3, 2, 2], False),
        ((8, 12), (12, 8), [2, 3, 1], False),  # different query / key grids (cross attention)
        ((8, 8), (12, 12), [4, 3, 3], True),  # padded keys
        ((4, 4), (4, 4), [64, 64], False),  # top-k larger than the number of keys
    ],
)
def test_quadtree_matches_per_query_reference(variant, hw_q, hw_k, topks, masked):
    levels = len(topks)
    b, nh, d = 2, 2, 4
    qs, ks, vs, kmasks = _pyramids(b, nh, d, hw_q, hw_k, levels, seed=len(topks) + hw_k[0], masked=masked)
    weights = torch.tensor([0.3, -0.2, 0.5][:levels], dtype=torch.float64)
    out = quadtree_attention(qs, ks, vs, topks, variant, weights if variant == "B" else None, kmasks if masked else None)
    assert out.shape == (b, nh, hw_q[0] * hw_q[1], d)
    for bi in range(b):
        for h in range(nh):
            ref = _reference(
                [x[bi, h] for x in qs], [x[bi, h] for x in ks], [x[bi, h] for x in vs], topks, variant,
                weights, [m[bi] for m in kmasks] if masked else None,
            )
            torch.testing.assert_close(out[bi, h], ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("damage, match", [
    ("key level not halved", r"keys\[1\] must halve both sides of level 0 \(8, 8\), got \(8, 8\)"),
    ("odd query level", r"queries\[0\] needs even sides"),
    ("values of another shape", r"values\[2\] must have the shape of keys\[2\]"),
    ("mask of another grid", r"key_masks\[0\] must be \(B, h, w\)"),
    ("short topks", "one entry per level: 3, 3, 3, 3, 2"),
])
def test_malformed_pyramids_raise_one_clear_error(damage, match):
    # a key level of the finer level's size ran and read only its first cells; others failed in a reshape
    qs, ks, vs, _ = _pyramids(1, 2, 4, (8, 8), (8, 8), 3, seed=0)
    masks, topks = [None] * 3, [3, 2, 2]
    if damage == "key level not halved":
        ks[1] = ks[0].clone()
    elif damage == "odd query level":
        qs[0] = qs[0][:, :, :7]
    elif damage == "values of another shape":
        vs[2] = vs[2][..., :2]
    elif damage == "mask of another grid":
        masks[0] = torch.ones(1, 4, 4, dtype=torch.bool)
    else:
        topks = [3, 2]
    weights = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        quadtree_attention(qs, ks, vs, topks, "B", weights, masks)


@pytest.mark.parametrize("variant", ["A", "B"])
def test_quadtree_in_chunks_equals_one_piece(variant, monkeypatch):
    """Tiny chunks (one query row / one parent per chunk) give the same messages and selections."""
    import matcher.attention as attention

    qs, ks, vs, kmasks = _pyramids(2, 2, 4, (8, 12), (12, 8), 3, seed=11, masked=True)
    weights = torch.tensor([0.2, 0.1, -0.4], dtype=torch.float64)
    run = lambda: quadtree_attention(qs, ks, vs, [3, 2, 2], variant, weights, kmasks, return_selection=True)  # noqa: E731
    whole, whole_sel = run()
    monkeypatch.setattr(attention, "CHUNK_BYTES", 1)
    assert len(attention._chunks(10, 8, torch.device("cpu"))) == 10
    assert len(attention._chunks(10, 8, torch.device("meta"))) == 1  # GPU-sized chunks off the CPU
    chunked, chunked_sel = run()
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)  # the concatenating path used for ONNX export
    traced, traced_sel = run()
    for out, sel in ((chunked, chunked_sel), (traced, traced_sel)):
        torch.testing.assert_close(out, whole, rtol=1e-12, atol=1e-12)
        for a, b in zip(sel, whole_sel):
            assert torch.equal(a, b)


def _channels_last_heads(maps, nh):
    """Maps ``(B, C, h, w)`` -> ``(B, nh, h, w, C / nh)`` views of channels-last memory, as the model's
    projections lay them out (the trailing head channels contiguous: the row-gather path)."""
    return [m.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).unflatten(-1, (nh, -1))
            .permute(0, 3, 1, 2, 4) for m in maps]


def _layouts():
    g = torch.Generator().manual_seed(3)
    grid = torch.randn(2, 24, 6, 8, generator=g, dtype=torch.float64)
    cl = _channels_last_heads([grid], 4)[0]  # (2, 4, 6, 8, 6): whole rows of 6
    return {
        "channels-last heads": (cl, True),
        "storage offset": (_channels_last_heads([torch.randn(3, 24, 6, 8, generator=g)], 4)[0][1:], True),
        "expanded mask": (torch.rand(2, 1, 6, 8, 1, generator=g).gt(0.5).expand(-1, 3, -1, -1, -1), True),
        "int64, two trailing dims": (torch.randint(0, 99, (2, 3, 6, 8, 2, 5), generator=g), True),
        "strided trailing dim": (grid.reshape(2, 4, 6, 6, 8).permute(0, 1, 3, 4, 2), False),
        "half rows": (cl[..., :3], True),  # runs of 3 that start at multiples of 3
        "runs off the row grid": (cl[..., 1:4], False),
    }


@pytest.mark.parametrize("name", list(_layouts()))
def test_rearranged_gathers_rows_like_a_copy(name):
    """The row gather gives what the plain reshape / permute copy gives, for every layout it takes; the
    others fall back to the copy."""
    from matcher.attention import _grid_to_blocks, _rearranged, _row_layout, _ungroup_children

    x, whole_rows = _layouts()[name]
    assert (_row_layout(x, 4) is not None) == whole_rows
    b, nh, h, w = x.shape[:4]
    rest = x.shape[4:]
    expected = x.reshape(b, nh, h // 2, 2, w // 2, 2, *rest).transpose(3, 4).reshape(b, nh, h * w // 4, 4, *rest)
    blocks = _grid_to_blocks(x)
    assert blocks.dtype == x.dtype and torch.equal(blocks, expected)
    assert torch.equal(_ungroup_children(blocks, h, w), x.reshape(b, nh, h * w, *rest))
    for _ in range(2):  # the second call reads the cached row order
        tokens = _rearranged(x, 4, (b, nh, h, w), (0, 2, 3, 1), (b, h * w, nh))
        assert torch.equal(tokens, x.permute(0, 2, 3, 1, *range(4, x.dim())).reshape(b, h * w, nh, *rest))


def test_rearranged_keeps_gradients_and_tracing_on_the_copy(monkeypatch):
    from matcher.attention import _grid_to_blocks

    x = _layouts()["channels-last heads"][0].clone().requires_grad_()
    x_cl = _channels_last_heads([x.detach().permute(0, 1, 4, 2, 3).flatten(1, 2)], 4)[0].requires_grad_()
    _grid_to_blocks(x_cl).square().sum().backward()
    torch.testing.assert_close(x_cl.grad, 2 * x_cl.detach())
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
    calls = []
    monkeypatch.setattr(torch.Tensor, "index_select", lambda *a: calls.append(a))
    with torch.no_grad():
        _grid_to_blocks(x_cl)
    assert not calls


@pytest.mark.parametrize("variant", ["A", "B"])
def test_quadtree_on_channels_last_maps_equals_contiguous_maps(variant):
    """The model's layout (channels-last maps: the row gathers) gives exactly what contiguous maps (strided
    copies) give, masks and both outputs included."""
    b, nh, d, hw_q, hw_k = 2, 2, 4, (8, 12), (12, 8)
    g = torch.Generator().manual_seed(5)
    maps = [torch.randn(b, nh * d, *hw, generator=g, dtype=torch.float64) for hw in (hw_q, hw_k, hw_k)]
    mask = torch.zeros(b, *hw_k, dtype=torch.bool)
    mask[:, :9, :7] = True
    (qs, _), (ks, kmasks), (vs, _) = pool_levels(maps[0], 3), pool_levels(maps[1], 3, mask), pool_levels(maps[2], 3, mask)
    heads = lambda ms: [m.reshape(b, nh, d, *m.shape[2:]).permute(0, 1, 3, 4, 2) for m in ms]  # noqa: E731
    weights = torch.tensor([0.2, 0.1, -0.4], dtype=torch.float64)
    run = lambda q, k, v: quadtree_attention(q, k, v, [3, 2, 2], variant, weights, kmasks, return_selection=True)  # noqa: E731
    with torch.inference_mode():
        out, sel = run(heads(qs), heads(ks), heads(vs))
        out_cl, sel_cl = run(_channels_last_heads(qs, nh), _channels_last_heads(ks, nh), _channels_last_heads(vs, nh))
    assert torch.equal(out_cl, out)
    assert all(torch.equal(a, c) for a, c in zip(sel, sel_cl))


@pytest.mark.parametrize("shape,k", [((3, 5, 4800), 32), ((2, 7, 1031), 16), ((4, 1024), 128), ((6, 2000), 1)])
def test_two_pass_topk_equals_torch_topk(shape, k):
    """Long rows (ragged tails included) give torch.topk's values and, without ties, its indices."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    values, idx = topk_last_dim(x, k)
    expected_values, expected_idx = torch.topk(x, k, dim=-1)
    assert torch.equal(values, expected_values) and torch.equal(idx, expected_idx)
    values, idx = topk_last_dim(x, k, sorted=False)  # the same entries in some order
    assert torch.equal(torch.gather(x, -1, idx), values)
    assert torch.equal(idx.sort(-1).values, expected_idx.sort(-1).values)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,k", [((64, 128), 16), ((8, 300), 32), ((3, 4800), 32)])
def test_topk_of_nonnegative_weights_ranks_bit_patterns(dtype, shape, k, monkeypatch):
    """Weights >= 0 (zeros, subnormals and ties included) are ranked as the integers of their bit patterns on
    CPU: torch.topk's values, bit for bit in the input dtype, and indices that point at them; while tracing
    for export the floats are ranked as they are."""
    import matcher.attention as attention

    g = torch.Generator().manual_seed(k)
    x = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64) * 8, dim=-1).to(dtype)
    x[0, :40] = 0.0
    x[1, :40] = torch.finfo(dtype).tiny / 4  # subnormal (bf16 and fp16 keep some)
    x[2, ::3] = x[2, 5]  # ties
    ranked = []
    real = attention.topk_last_dim
    monkeypatch.setattr(attention, "topk_last_dim", lambda t, *a, **kw: ranked.append(t.dtype) or real(t, *a, **kw))
    for tracing, ranked_as in ((False, attention._SAME_ORDER_INTS[dtype]), (True, dtype)):
        monkeypatch.setattr(torch.jit, "is_tracing", lambda tracing=tracing: tracing)
        values, idx = attention.topk_nonnegative(x, k)
        assert ranked.pop() == ranked_as and values.dtype == dtype
        assert torch.equal(values, torch.topk(x, k, dim=-1).values) and torch.equal(torch.gather(x, -1, idx), values)
        unsorted, idx = attention.topk_nonnegative(x, k, sorted=False)
        assert ranked.pop() == ranked_as
        assert torch.equal(unsorted.sort(-1, descending=True).values, values) and torch.equal(torch.gather(x, -1, idx), unsorted)


def test_two_pass_topk_with_ties_and_gradients():
    """Rows full of equal entries (softmax underflow): the same values, indices that point at them, and the
    gradient reaches exactly the selected entries."""
    g = torch.Generator().manual_seed(0)
    x = torch.softmax(torch.randn(4, 3000, generator=g, dtype=torch.float64) * 60, dim=-1)
    x[0, :2000] = 0.5  # more ties than k inside the row
    x.requires_grad_()
    values, idx = topk_last_dim(x, 32)
    assert torch.equal(values, torch.topk(x, 32, dim=-1).values)
    assert torch.equal(torch.gather(x, -1, idx), values) and all(len(set(r.tolist())) == 32 for r in idx)
    (grad,) = torch.autograd.grad(values.sum(), x)
    expected = torch.zeros_like(x).scatter_(-1, idx, 1.0)
    assert torch.equal(grad, expected)


@pytest.mark.parametrize("variant", ["A", "B"])
def test_quadtree_with_two_pass_topk_matches_reference(variant, monkeypatch):
    """The coarsest level's two-pass top-k (used from 1024 keys) inside QuadTree attention, on a grid small
    enough for the per-query reference: the switch is lowered so that 256 coarsest keys take it."""
    import matcher.attention as attention

    monkeypatch.setattr(attention, "BLOCK_TOPK_MIN_LENGTH", 200)
    qs, ks, vs, kmasks = _pyramids(1, 1, 4, (32, 32), (32, 32), 2, seed=17, masked=True)
    weights = torch.tensor([0.4, -0.1], dtype=torch.float64)
    out = quadtree_attention(qs, ks, vs, [12, 3], variant, weights if variant == "B" else None, kmasks)
    ref = _reference([x[0, 0] for x in qs], [x[0, 0] for x in ks], [x[0, 0] for x in vs], [12, 3], variant,
                     weights, [m[0] for m in kmasks])
    torch.testing.assert_close(out[0, 0], ref, rtol=1e-9, atol=1e-9)


def test_quadtree_b_with_all_keys_is_mixture_of_exact_attention():
    """With top-k covering every key, each level of B is exact softmax attention at that level."""
    qs, ks, vs, _ = _pyramids(1, 2, 8, (8, 8), (8, 8), 3, seed=3)
    weights = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    out = quadtree_attention(qs, ks, vs, [4, 64, 64], "B", weights)
    mix = torch.softmax(weights, 0)
    expected = 0
    for lvl in range(3):
        q, k, v = (x[lvl].flatten(2, 3) for x in (qs, ks, vs))
        exact = full_attention(q, k, v).unflatten(2, qs[lvl].shape[2:4])
        up = exact.repeat_interleave(2**lvl, 2).repeat_interleave(2**lvl, 3).flatten(2, 3)
        expected = expected + mix[2 - lvl] * up
    torch.testing.assert_close(out, expected)


def test_quadtree_a_weights_sum_to_one():
    """Variant A distributes each query's attention over the levels: constant values come back exactly."""
    qs, ks, vs, _ = _pyramids(1, 2, 4, (8, 8), (8, 8), 3, seed=5)
    ones = [torch.ones_like(v) for v in vs]
    out = quadtree_attention(qs, ks, ones, [3, 2, 2], "A")
    torch.testing.assert_close(out, torch.ones_like(out))


def test_padded_keys_get_no_attention():
    qs, ks, vs, kmasks = _pyramids(1, 2, 4, (8, 8), (12, 12), 3, seed=7, masked=True)
    poisoned = [v.clone() for v in vs]
    for v, m in zip(poisoned, kmasks):
        v[~m[:, None].expand(-1, v.shape[1], -1, -1)] = 1e6
    weights = torch.zeros(3, dtype=torch.float64)
    for variant in ("A", "B"):
        clean = quadtree_attention(qs, ks, vs, [3, 2, 2], variant, weights, kmasks)
        dirty = quadtree_attention(qs, ks, poisoned, [3, 2, 2], variant, weights, kmasks)
        torch.testing.assert_close(clean, dirty)


@pytest.mark.parametrize("variant", ["A", "B"])
@pytest.mark.parametrize("tiny_chunks", [False, True])
def test_quadtree_gradients_match_per_query_reference(variant, tiny_chunks, monkeypatch):
    """Backward through the chunked kernels equals autograd through the per-query reference (float64)."""
    if tiny_chunks:  # one query row / one parent per chunk: gradients flow through the chunk copies
        import matcher.attention as attention

        monkeypatch.setattr(attention, "CHUNK_BYTES", 1)
    qs, ks, vs, kmasks = _pyramids(1, 1, 4, (8, 8), (8, 12), 3, seed=13, masked=True)
    leaves = [x.clone().requires_grad_() for x in qs + ks + vs]
    weights = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    mix = weights if variant == "B" else None
    out = quadtree_attention(leaves[:3], leaves[3:6], leaves[6:], [3, 2, 2], variant, mix, kmasks)
    ours = torch.autograd.grad(out.sin().sum(), leaves + ([weights] if mix is not None else []))
    ref = _reference([x[0, 0] for x in leaves[:3]], [x[0, 0] for x in leaves[3:6]], [x[0, 0] for x in leaves[6:]],
                     [3, 2, 2], variant, weights, [m[0] for m in kmasks])
    expected = torch.autograd.grad(ref.sin().sum(), leaves + ([weights] if mix is not None else []))
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_quadtree_is_differentiable_in_float32():
    qs, ks, vs, _ = _pyramids(1, 2, 4, (8, 8), (8, 8), 3, seed=9)
    leaves = [x.float().requires_grad_() for x in qs + ks + vs]
    weights = torch.zeros(3, requires_grad=True)
    out = quadtree_attention(leaves[:3], leaves[3:6], leaves[6:], [3, 2, 2], "B", weights)
    out.square().sum().backward()
    assert weights.grad is not None and weights.grad.abs().sum() > 0
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in leaves)
    assert leaves[0].grad.abs().sum() > 0 and leaves[3].grad.abs().sum() > 0


def test_linear_attention_matches_explicit_formula():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 4, generator=g, dtype=torch.float64) for n in (5, 7, 7))
    mask = torch.tensor([[True] * 5 + [False] * 2])
    phi_q, phi_k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    weights = (phi_q @ phi_k[:, :, :5].transpose(-1, -2))
    expected = weights @ v[:, :, :5] / weights.sum(-1, keepdim=True)
    torch.testing.assert_close(linear_attention(q, k, v, mask, eps=0.0), expected)


def test_full_attention_masks_keys():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, n, 4, generator=g, dtype=torch.float64) for n in (3, 6, 6))
    mask = torch.tensor([[True, True, True, False, False, False]])
    expected = torch.softmax(q @ k[:, :, :3].transpose(-1, -2) / 2.0, -1) @ v[:, :, :3]
    torch.testing.assert_close(full_attention(q, k, v, mask), expected)


def test_transformer_initialisation_follows_the_published_code():
    """QuadTree blocks: LoFTR-QuadTree's own initialisation; LoFTR's linear-attention layers: Xavier uniform."""
    from matcher.transformer import LocalFeatureTransformer

    torch.manual_seed(0)
    quadtree = LocalFeatureTransformer(256, 8, ["self", "cross"], "quadtree", "B", [32, 16, 16])
    block = quadtree.layers[0]
    for w in (block.attn.q_proj.weight, block.attn.k_proj.weight, block.attn.v_proj.weight, block.attn.proj.weight,
              block.mlp.fc1.weight, block.mlp.fc2.weight):
        assert abs(w.std().item() - 0.02) < 0.002 and w.abs().max() <= 2.0
    dw = block.mlp.dwconv.dwconv.weight  # N(0, 2 / fan_out), fan_out = 3 * 3 * C / C
    assert abs(dw.std().item() - (2 / 9) ** 0.5) < 0.03
    for bias in (block.attn.proj.bias, block.mlp.fc1.bias, block.mlp.fc2.bias, block.mlp.dwconv.dwconv.bias, block.norm1.bias):
        assert not bias.any()
    assert (block.norm1.weight == 1).all() and block.attn.py_att.weight.shape == (3,)
    # LoFTR-QuadTree copies one block into every layer: all layers start equal (and are separate parameters)
    for name, p in quadtree.layers[1].named_parameters():
        assert torch.equal(p, dict(block.named_parameters())[name]) and p.data_ptr() != dict(block.named_parameters())[name].data_ptr()

    linear = LocalFeatureTransformer(256, 8, ["self", "cross"], "linear")
    w = linear.layers[0].q_proj.weight
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5
    assert w.abs().max() <= bound and abs(w.std().item() - bound / 3 ** 0.5) < 0.003
    assert not torch.equal(w, linear.layers[1].q_proj.weight)  # LoFTR draws each layer anew after copying


@pytest.mark.parametrize("trained, bound, grids, expected", [
    (3, None, [(240, 320)], 3),  # off: the trained levels on any grid
    (3, 300, [(60, 80)], 3),  # 640x480: the trained coarsest level holds 15 x 20 = 300 tokens
    (3, 300, [(120, 160)], 4),  # 30 x 40 -> 15 x 20
    (3, 300, [(240, 320)], 5),
    (3, 300, [(150, 200)], 5),  # sides rounded up: 38 x 50, 19 x 25 = 475, 10 x 13 = 130
    (3, 1200, [(150, 200)], 4),
    (3, 300, [(60, 80), (120, 160)], 4),  # the larger grid of a pair decides
    (2, 1, [(3, 5)], 4),  # down to a single cell
])
def test_levels_are_added_until_the_coarsest_is_small_enough(trained, bound, grids, expected):
    assert num_levels_for(trained, bound, *grids) == expected


def test_a_coarsest_bound_below_one_is_an_error():
    with pytest.raises(ValueError, match="max_coarsest_tokens must be at least 1"):
        num_levels_for(3, 0, (8, 8))


def _layer_reference(layer, x, source, hw, levels):
    """A QuadtreeAttention layer's output from the per-query reference: its projections, ``levels`` pyramid
    levels, the added levels keeping ``topks[0]`` keys and, in variant B, weighted -inf (no message)."""
    nh, c = layer.nhead, x.shape[-1]
    grid = lambda t, conv: (t @ conv.weight.flatten(1).T).transpose(1, 2).reshape(1, c, *hw)  # noqa: E731
    heads = lambda maps: [m.reshape(1, nh, c // nh, *m.shape[2:]).permute(0, 1, 3, 4, 2)[0] for m in maps]  # noqa: E731
    qs, ks, vs = (heads(pool_levels(grid(t, conv), levels)[0])
                  for t, conv in ((x, layer.q_proj), (source, layer.k_proj), (source, layer.v_proj)))
    added = levels - layer.num_levels
    topks = [layer.topks[0]] * added + layer.topks
    weights = None
    if layer.variant == "B":
        weights = torch.cat([torch.full((added,), float("-inf"), dtype=x.dtype), layer.py_att.weight.detach()])
    per_head = [_reference([q[h] for q in qs], [k[h] for k in ks], [v[h] for v in vs], topks, layer.variant, weights)
                for h in range(nh)]
    message = torch.cat(per_head, dim=-1)  # channel = head * D + d
    return message @ layer.proj.weight.T + layer.proj.bias


@pytest.mark.parametrize("variant", ["A", "B"])
def test_added_levels_follow_the_per_query_reference(variant):
    """A bound on the coarsest level adds levels above the trained ones (here 2 -> 3: 4 x 4 = 16 coarsest keys
    > 6, so 2 x 2); the added level keeps 3 of its 4 keys, so the trained coarsest level no longer sees them all."""
    from matcher.transformer import QuadtreeAttention

    torch.manual_seed(0)
    layer = QuadtreeAttention(8, 2, [3, 2], variant, kernel="torch", max_coarsest_tokens=6).double().eval()
    x, source = torch.randn(1, 64, 8, dtype=torch.float64), torch.randn(1, 64, 8, dtype=torch.float64)
    with torch.no_grad():
        out, selection = layer(x, source, (8, 8), (8, 8), return_selection=True)
        expected = _layer_reference(layer, x, source, (8, 8), levels=3)
        layer.max_coarsest_tokens = None
        plain = layer(x, source, (8, 8), (8, 8))
    torch.testing.assert_close(out[0], expected, rtol=1e-9, atol=1e-9)
    assert [s.shape[-1] for s in selection] == [3, 3] and selection[0].max() < 4  # indices into the 2 x 2 level
    assert not torch.allclose(out, plain)  # the restriction is real on these random weights


def test_added_levels_that_keep_every_key_change_nothing_in_b():
    """When the added level keeps all its keys, the trained coarsest level sees every key again and variant
    B's output is the published one (the added level's message has weight 0)."""
    from matcher.transformer import QuadtreeAttention

    torch.manual_seed(1)
    plain = QuadtreeAttention(16, 4, [32, 16], "B", kernel="torch").eval()
    bounded = QuadtreeAttention(16, 4, [32, 16], "B", kernel="torch", max_coarsest_tokens=16).eval()
    bounded.load_state_dict(plain.state_dict())
    x, source = torch.randn(2, 256, 16), torch.randn(2, 256, 16)
    with torch.no_grad():
        expected = plain(x, source, (16, 16), (16, 16))
        out, selection = bounded(x, source, (16, 16), (16, 16), return_selection=True)
    assert len(selection) == 2 and selection[0].shape == (2, 4, 16, 16)  # 4 x 4 added level, all 16 keys kept
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_selection_only_levels_are_checked():
    qs, ks, vs, _ = _pyramids(1, 2, 4, (8, 8), (8, 8), 3, seed=5)
    with pytest.raises(ValueError, match="0 unless variant B"):
        quadtree_attention(qs, ks, vs, [3, 2, 2], "A", selection_only_levels=1)
    with pytest.raises(ValueError, match=r"must be in \[0, 3\)"):
        quadtree_attention(qs, ks, vs, [3, 2, 2], "B", torch.zeros(0, dtype=torch.float64), selection_only_levels=3)
    with pytest.raises(ValueError, match="one entry per level"):  # 3 logits, but the coarsest level only selects
        quadtree_attention(qs, ks, vs, [3, 2, 2], "B", torch.zeros(3, dtype=torch.float64), selection_only_levels=1)
