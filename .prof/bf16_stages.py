import sys, time, torch, numpy as np
sys.path.insert(0, "eval")
from benchmark import sample_pair, run_pair, build_ours
from matcher import Matcher
from matcher.metrics import matches_kept
from matcher.allocator import reuse_freed_memory
reuse_freed_memory()
def wrap(model, attr):
    f = getattr(model, attr)
    def g(*a, **k):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = f(*a, **k)
        return tuple(o.float() for o in out)
    setattr(model, attr, g)
    return lambda: setattr(model, attr, f)
x0, x1 = sample_pair((480, 640), "cpu")
def kept(ref, new):
    n = lambda o, k: o[k].float().numpy()
    return matches_kept(n(ref, "keypoints0"), n(ref, "keypoints1"), n(new, "keypoints0"), n(new, "keypoints1"))
pre = Matcher.from_pretrained("default")
ref = run_pair(pre, x0, x1)
print("fp32 matches", len(ref["keypoints0"]))
for attr in ("extract_features", "coarse_transform"):
    undo = wrap(pre, attr); new = run_pair(pre, x0, x1); undo()
    print(attr, "bf16: matches", len(new["keypoints0"]), "kept %.4f" % kept(ref, new))
full = build_ours("quadtree_b_indoor", "cpu")
def t(f, n=3):
    f(); ts = []
    for _ in range(n):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    return sorted(ts)[n // 2]
base = t(lambda: run_pair(full, x0, x1))
undo = wrap(full, "extract_features"); bb = t(lambda: run_pair(full, x0, x1)); undo()
base2 = t(lambda: run_pair(full, x0, x1))
print("full fp32 %.3f / %.3f, bf16 backbone %.3f" % (base, base2, bb))
