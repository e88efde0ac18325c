import sys, time, torch
sys.path.insert(0, "eval")
from benchmark import sample_pair, run_pair, build_ours
from matcher import Matcher
from matcher.metrics import matches_kept
from matcher.allocator import reuse_freed_memory
reuse_freed_memory()
def bf16_stages(model, attrs):
    orig = {a: getattr(model, a) for a in attrs}
    def make(f):
        def g(*a, **k):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = f(*a, **k)
            return tuple(o.float() for o in out)
        return g
    for a in attrs: setattr(model, a, make(orig[a]))
    return lambda: [setattr(model, a, f) for a, f in orig.items()]
x0, x1 = sample_pair((480, 640), "cpu")
kept = lambda r, n: matches_kept(*(o[k].float().numpy() for o in (r, n) for k in ("keypoints0", "keypoints1")))
pre = Matcher.from_pretrained("default")
ref = run_pair(pre, x0, x1)
undo = bf16_stages(pre, ["extract_features", "coarse_transform"]); new = run_pair(pre, x0, x1); undo()
print("backbone+coarse bf16: matches", len(new["keypoints0"]), "kept %.4f" % kept(ref, new), flush=True)
full = build_ours("quadtree_b_indoor", "cpu")
variants = {"fp32": [], "bb": ["extract_features"], "bb+coarse": ["extract_features", "coarse_transform"], "autocast": None}
times = {k: [] for k in variants}
for rep in range(4):
    for name, attrs in variants.items():
        if attrs is None:
            s = time.perf_counter(); run_pair(full, x0, x1, torch.bfloat16); times[name].append(time.perf_counter() - s); continue
        undo = bf16_stages(full, attrs)
        s = time.perf_counter(); run_pair(full, x0, x1); times[name].append(time.perf_counter() - s)
        undo()
print({k: round(sorted(v[1:])[1], 3) for k, v in times.items()})
