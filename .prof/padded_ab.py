import sys, time, types, torch
import matcher.attention as A
from matcher import Matcher, load_config
from matcher.allocator import reuse_freed_memory
reuse_freed_memory()
src = open(".prof/old_attention_src.py").read()
old = types.ModuleType("matcher.old_attention"); old.__package__ = "matcher"
exec(compile(src, "old_attention", "exec"), old.__dict__)
new_fns = (A._coarsest_level, A._refine_level)
def use(fns):
    A._coarsest_level, A._refine_level = fns
torch.manual_seed(0)
m = Matcher(load_config("quadtree_b_indoor")).eval()
hws = [tuple(map(int, a.split("x"))) for a in sys.argv[1:]] or [(59, 79)]
for hw in hws:
    c0 = torch.randn(1, 256, *hw); c1 = torch.randn(1, 256, *hw)
    res = {"old": [], "new": []}
    outs = {}
    with torch.inference_mode():
        for rep in range(4):
            for name, fns in (("old", (old._coarsest_level, old._refine_level)), ("new", new_fns)):
                use(fns)
                s = time.perf_counter(); outs[name] = m.coarse_transform(c0, c1, None, None); res[name].append(time.perf_counter() - s)
    diff = max((a - b).abs().max().item() for a, b in zip(outs["old"], outs["new"]))
    med = {k: sorted(v[1:])[1] for k, v in res.items()}
    print(hw, {k: round(v, 3) for k, v in med.items()}, "new/old %.3f" % (med["new"] / med["old"]), "max diff", diff, flush=True)
