import time, torch
torch.manual_seed(0)
def t(f, n=20):
    f(); ts = []
    for _ in range(n):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    return sorted(ts)[n // 2] * 1e3
for shape, k in [((216, 600), 32), ((216, 256), 32), ((216, 4800), 32), ((4096, 128), 16), ((4096, 300), 32)]:
    x = torch.randn(shape)
    print(shape, k, "topk unsorted %.3f ms  topk sorted %.3f  sort %.3f  argsort %.3f  sort stable %.3f" % (
        t(lambda: torch.topk(x, k, sorted=False)), t(lambda: torch.topk(x, k)), t(lambda: torch.sort(x, descending=True)),
        t(lambda: torch.argsort(x, descending=True)), t(lambda: torch.sort(x, stable=True))))
