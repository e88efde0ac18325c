import sys, time, torch
sys.path.insert(0, "eval")
from benchmark import attention_layer, attention_forward
from matcher.allocator import reuse_freed_memory
reuse_freed_memory()
def t(f, n=5):
    f(); ts = []
    for _ in range(n):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    return sorted(ts)[n // 2]
res = {}
for grid in [(120, 160), (240, 320)]:
    layer, inp = attention_layer(grid, "cpu")
    res[grid] = t(lambda: attention_forward(layer, "quadtree", grid, *inp))
    print(grid, res[grid], flush=True)
    if "prof" in sys.argv:
        from torch.profiler import profile
        with profile() as p:
            attention_forward(layer, "quadtree", grid, *inp)
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
print("growth", res[(240, 320)] / res[(120, 160)])
