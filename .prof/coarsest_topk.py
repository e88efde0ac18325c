"""Where the coarsest level's time goes at 76,800 tokens (4,800 coarsest tokens, 8 heads, D=32)."""
import time, torch
from matcher.attention import topk_last_dim, _coarsest_level, _chunks
torch.manual_seed(0)
nq = nk = 4800; nh = 8; d = 32
q = torch.randn(1, nh, nq, d); k = torch.randn(1, nh, nk, d); v = torch.randn(1, nh, nk, d)
def t(f, n=5):
    f(); ts = []
    for _ in range(n):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    return sorted(ts)[n // 2]
print("whole coarsest level", t(lambda: _coarsest_level(q, k, v, None, 32, d ** -0.5, "B", True)))
print("no select", t(lambda: _coarsest_level(q, k, v, None, 32, d ** -0.5, "B", False)))
rows = _chunks(nq, nh * nk * 4, q.device)
print("chunks", len(rows), rows[0])
r = rows[0]
kt = k.transpose(-1, -2).contiguous()
attn = torch.softmax(torch.matmul(q[:, :, r] * d ** -0.5, kt), -1)
print("chunk shape", attn.shape)
nchunks = len(rows)
print("topk_last_dim per level", nchunks * t(lambda: topk_last_dim(attn, 32, sorted=False)))
print("torch.topk per level", nchunks * t(lambda: torch.topk(attn, 32, -1, sorted=False)))
n = nk; G = 8; ng = n // G
strided = attn.unflatten(-1, (G, ng))
print("amax", nchunks * t(lambda: strided.amax(dim=-2)))
gm = strided.amax(dim=-2)
print("topk groups", nchunks * t(lambda: torch.topk(gm, 32, -1, sorted=False)))
gi = torch.topk(gm, 32, -1, sorted=False).indices
lead = attn.shape[:-1]
print("gather members", nchunks * t(lambda: torch.gather(strided, -1, gi.unsqueeze(-2).expand(*lead, G, 32))))
mem = torch.gather(strided, -1, gi.unsqueeze(-2).expand(*lead, G, 32)).flatten(-2)
print("topk members", nchunks * t(lambda: torch.topk(mem, 32, -1, sorted=False)))
print("softmax", nchunks * t(lambda: torch.softmax(attn, -1)))
