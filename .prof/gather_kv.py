import time, torch
torch.manual_seed(0)
nh, M, D, K = 8, 19200, 32, 16
P = 19200  # parent queries per head at level 0 (76,800 tokens)
kt = torch.randn(nh * M, 4 * D); vt = torch.randn(nh * M, 4 * D)
kvt = torch.cat([kt.view(-1, 4, D), vt.view(-1, 4, D)], -1).reshape(nh * M, 8 * D)  # [child][k|v]
idx = (torch.randint(0, M, (nh, P, K)) + torch.arange(nh)[:, None, None] * M).reshape(-1, K)
q = torch.randn(nh * P, 4, D)
def t(f, n=5):
    f(); ts = []
    for _ in range(n):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    return sorted(ts)[n // 2]
step = 512
def two():
    for s in range(0, idx.shape[0], step):
        r = idx[s:s + step]; p = r.shape[0]
        kc = kt.index_select(0, r.reshape(-1)).view(p, 4 * K, D)
        vc = vt.index_select(0, r.reshape(-1)).view(p, 4 * K, D)
        a = torch.softmax(torch.matmul(q[s:s + step], kc.transpose(-1, -2)), -1)
        torch.matmul(a, vc)
def one():
    for s in range(0, idx.shape[0], step):
        r = idx[s:s + step]; p = r.shape[0]
        kv = kvt.index_select(0, r.reshape(-1)).view(p, 4 * K, 2 * D)
        kc, vc = kv[..., :D], kv[..., D:]
        a = torch.softmax(torch.matmul(q[s:s + step], kc.transpose(-1, -2)), -1)
        torch.matmul(a, vc)
def gathers_only():
    for s in range(0, idx.shape[0], step):
        r = idx[s:s + step]
        kt.index_select(0, r.reshape(-1)); vt.index_select(0, r.reshape(-1))
def gather_one_only():
    for s in range(0, idx.shape[0], step):
        r = idx[s:s + step]
        kvt.index_select(0, r.reshape(-1))
for _ in range(3):
    print("two %.3f one %.3f | gathers two %.3f one %.3f" % (t(two), t(one), t(gathers_only), t(gather_one_only)))
