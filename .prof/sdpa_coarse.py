import time, torch
import torch.nn.functional as F
torch.manual_seed(0)
nq = nk = 4800; nh = 8; d = 32
q = torch.randn(1, nh, nq, d); k = torch.randn(1, nh, nk, d); v = torch.randn(1, nh, nk, d)
kt = k.transpose(-1, -2).contiguous()
def t(f, n=5):
    f(); ts = []
    for _ in range(n):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    return sorted(ts)[n // 2]
def manual():
    out = []
    for r in range(0, nq, 27):
        a = torch.softmax(torch.matmul(q[:, :, r:r+27] * d ** -0.5, kt), -1)
        out.append(a @ v)
    return torch.cat(out, 2)
def logits_only():
    for r in range(0, nq, 27):
        a = torch.matmul(q[:, :, r:r+27] * d ** -0.5, kt)
for i in range(2):
    print("manual %.3f" % t(manual), "sdpa %.3f" % t(lambda: F.scaled_dot_product_attention(q, k, v)),
          "logits only %.3f" % t(logits_only))
print((manual() - F.scaled_dot_product_attention(q, k, v)).abs().max())
