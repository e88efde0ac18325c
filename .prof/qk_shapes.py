import time, torch
torch.manual_seed(0)
nq = nk = 4800; nh = 8; d = 32
q = torch.randn(1, nh, nq, d); k = torch.randn(1, nh, nk, d)
kt = k.transpose(-1, -2).contiguous()
def t(f, n=7):
    f(); ts = []
    for _ in range(n):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    return sorted(ts)[n // 2]
for rows in (16, 24, 27, 32, 40, 48, 54, 64):
    nch = nq / rows
    qc = q[:, :, :rows].contiguous()
    qs = q[:, :, :rows]
    print(rows, "bmm contig %.3f" % (nch * t(lambda: torch.matmul(qc, kt))),
          "bmm view %.3f" % (nch * t(lambda: torch.matmul(qs, kt))),
          "k-notT %.3f" % (nch * t(lambda: torch.matmul(qc, k.transpose(-1, -2)))),
          "per-head(8x rows) %.3f" % (nch / 8 * t(lambda: torch.matmul(q[0, 0, :8 * rows], kt[0, 0]))))
print(torch.__config__.parallel_info())
