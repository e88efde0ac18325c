import time, torch
torch.manual_seed(0)
def t(f, n=30):
    f(); ts = []
    for _ in range(n):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    return sorted(ts)[n // 2] * 1e3
# coarsest-level chunk: (1, 8, 27, 4800), key mask (1, 1, 1, 4800)
for shape, mshape in [((1, 8, 27, 4800), (1, 1, 1, 4800)), ((1, 136, 30400), (1, 136, 1)), ((1, 136, 30400), (1, 1, 30400)), ((1000, 4, 64), (1000, 1, 64))]:
    x = torch.randn(shape)
    m = torch.rand(mshape) < 0.1
    fill = torch.finfo(torch.float32).min
    bias = torch.zeros(mshape).masked_fill(m, fill)
    y = x.clone()
    print(shape, mshape, "masked_fill %.2f ms  masked_fill_ %.2f  where %.2f  add bias %.2f  add_ bias %.2f  mask.expand.contig %.2f" % (
        t(lambda: x.masked_fill(m, fill)), t(lambda: y.masked_fill_(m, fill)), t(lambda: torch.where(m, fill, x)),
        t(lambda: x + bias), t(lambda: y.add_(bias) if False else x.add(bias)), t(lambda: x.masked_fill(m.expand(shape).contiguous(), fill))))
