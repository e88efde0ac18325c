import sys, time, torch
from matcher import Matcher, load_config
from matcher.allocator import reuse_freed_memory
reuse_freed_memory()
torch.manual_seed(0)
m = Matcher(load_config("quadtree_b_indoor")).eval()
def t(f, n=3):
    f(); ts = []
    for _ in range(n):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    return sorted(ts)[n // 2]
for hw in [(60, 80), (59, 79), (150, 200)]:
    c0 = torch.randn(1, 256, *hw); c1 = torch.randn(1, 256, *hw)
    with torch.inference_mode():
        print(hw, "coarse transform %.3f s" % t(lambda: m.coarse_transform(c0, c1, None, None)), flush=True)
