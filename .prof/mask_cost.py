import time, torch
from matcher.attention import topk_last_dim
torch.manual_seed(0)
nh, rows, nk, d = 8, 27, 4800, 32
q = torch.randn(1, nh, rows, d); kt = torch.randn(1, nh, d, nk)
kmask = torch.ones(1, nk, dtype=torch.bool); kmask[:, -nk // 10:] = False
def t(f, n=50):
    f(); ts = []
    for _ in range(n):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    return sorted(ts)[n // 2] * 178
lg = torch.matmul(q, kt)
m = ~kmask[:, None, None, :]
lgm = lg.masked_fill(m, -3.4e38)
bias = torch.zeros(1, 1, 1, nk).masked_fill(m, -3.4e38)
qa = torch.cat([q, torch.ones(1, nh, rows, 1)], -1); kta = torch.cat([kt, bias.expand(1, nh, 1, nk)], -2)
for _ in range(2):
    print("QK %.3f  masked_fill %.3f  add bias %.3f  QK aug %.3f  topk plain %.3f  topk masked %.3f  torch.topk masked %.3f" % (
        t(lambda: torch.matmul(q, kt)), t(lambda: lg.masked_fill(m, -3.4e38)), t(lambda: lg + bias),
        t(lambda: torch.matmul(qa, kta)),
        t(lambda: topk_last_dim(lg, 32, sorted=False)), t(lambda: topk_last_dim(lgm, 32, sorted=False)),
        t(lambda: torch.topk(lgm, 32, sorted=False))))
