import time, torch, sys
import torch.nn.functional as F
from matcher.attention import topk_last_dim, _coarsest_level, _chunks
torch.manual_seed(0)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 4800
nq = nk = n; nh = 8; d = 32
q = torch.randn(1, nh, nq, d); k = torch.randn(1, nh, nk, d); v = torch.randn(1, nh, nk, d)
kmask = torch.ones(1, nk, dtype=torch.bool); kmask[:, -nk // 10:] = False
def t(f, n=5):
    f(); ts = []
    for _ in range(n):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    return sorted(ts)[n // 2]
scale = d ** -0.5
def sel_only(mask):
    kt = k.transpose(-1, -2).contiguous()
    out = []
    for rows in _chunks(nq, nh * nk * 4, q.device):
        logits = torch.matmul(q[:, :, rows] * scale, kt)
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, None, :], -1e30)
        out.append(topk_last_dim(logits, 32, sorted=False)[1])
    return torch.cat(out, 2)
def new(mask, chunked_sdpa=False):
    idx = sel_only(mask)
    am = None if mask is None else mask[:, None, None, :]
    msg = F.scaled_dot_product_attention(q, k, v, attn_mask=am)
    return msg, idx
for mask in (None, kmask):
    with torch.inference_mode():
        old = lambda: _coarsest_level(q, k, v, mask, 32, scale, "B", True)
        a, b = old(), new(mask)
        print("max diff", (a[0] - b[0]).abs().max().item(), "same sel", (a[1].sort(-1).values == b[1].sort(-1).values).float().mean().item())
        for i in range(2):
            print("mask" if mask is not None else "nomask", "old %.3f new %.3f selonly %.3f sdpa %.3f" % (
                t(old), t(lambda: new(mask)), t(lambda: sel_only(mask)),
                t(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :]))))
