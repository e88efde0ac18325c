"""Speed and memory benchmark: end to end against kornia LoFTR, QuadTree-B against exact attention, the coarse
matcher's restricted second pass against a full one, peak memory at 1600x1200, Winograd against direct 3x3
convolution by width (CPU), FLOPs per stage and how close each stage runs to the machine's matrix-multiply
rate, and a profile of one pair of each model (stage times and the costliest kernels or operators).

    python eval/benchmark.py                       # CPU, all sections (12-22 minutes on 2 cores, 21 on a Zen 1)
    python eval/benchmark.py --quick               # tiny sizes, under a minute (used by the tests)
    python eval/benchmark.py --device cuda         # GPU: adds pairs/s and peak memory at 640x480 and 1152x1152,
                                                   # ours and kornia, fp32 and bf16 / fp16 autocast

Every timing is a median over interleaved repetitions (A B A B ...), and every target is a RATIO of two
timings taken in the same process, so that a noisy machine moves both sides. The end-to-end target uses the
configuration the model runs by default on this machine (``inference.feature_dtype: auto``: bf16 features on
CPUs with native bf16, else fp32); fp32 is timed beside it. Peak memory on CPU is measured
in a child process per configuration (peak resident set minus the resident set before the run), on CUDA
with ``torch.cuda.max_memory_allocated``. Results: a Markdown table on stdout, and ``benchmark.json`` (all
raw numbers) + ``benchmark.md`` in ``--out``, rewritten before each section (a run stopped early keeps its
finished sections, marked partial).

Weights: timings use seeded random weights with the coarse threshold at 0, so every mutual nearest neighbour
is a match and the fine stage runs as with trained weights (speed depends on weights only through the number
of matches, which is reported, and through what the coarse matcher can skip, which needs a threshold above 0:
random weights time its worst case); the agreement of the faster paths (bf16 autocast; on CPU Winograd on
every 3x3 layer against direct convolutions) and the coarse matching section use the shipped default
weights (real matches, their threshold).

Memory: like the command-line tools, the benchmark (and its child processes) keeps freed memory for reuse
(matcher/allocator.py), for ours and kornia alike; ``--system-malloc`` leaves glibc's defaults. The reused
heap fragments, so its peak varies between identical runs (by up to 0.9 GB at 1600x1200); the memory section
on CPU therefore also runs the pair with glibc's defaults, whose peak is the live tensors' (within 2% between
runs).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from matcher.allocator import reuse_freed_memory
from matcher.metrics import matches_kept
from matcher.model import resolve_feature_dtype
from matcher.winograd import TRANSFORM_CHOICES

ASSETS = Path(__file__).resolve().parents[1] / "demo" / "assets"

#: Targets of the speed issue, as (description, key in the ratios dict, comparison, bound).
TARGETS = (
    ("e2e 640x480: ours (default precision on this machine) / kornia LoFTR time", "e2e_time_ratio", "<=", 1 / 3),
    ("QuadTree-B layer 19,200 tokens: SDPA / QuadTree time", "attention_speedup_19200", ">=", 10.0),
    ("QuadTree-B time growth 4,800 -> 19,200 tokens", "quadtree_time_growth_1", "<=", 4.6),
    ("QuadTree-B time growth 19,200 -> 76,800 tokens", "quadtree_time_growth_2", "<=", 4.6),
    ("QuadTree-B memory growth 4,800 -> 19,200 tokens", "quadtree_memory_growth_1", "<=", 4.6),
    ("QuadTree-B memory growth 19,200 -> 76,800 tokens", "quadtree_memory_growth_2", "<=", 4.6),
    ("QuadTree-B, coarsest level bounded (levels added): time growth 4,800 -> 19,200", "bounded_time_growth_1", "<=", 4.6),
    ("QuadTree-B, coarsest level bounded (levels added): time growth 19,200 -> 76,800", "bounded_time_growth_2", "<=", 4.6),
    ("QuadTree-B, coarsest level bounded (levels added): memory growth 4,800 -> 19,200", "bounded_memory_growth_1", "<=", 4.6),
    ("QuadTree-B, coarsest level bounded (levels added): memory growth 19,200 -> 76,800", "bounded_memory_growth_2", "<=", 4.6),
    ("1600x1200 pair, full-width model: peak memory (GB)", "peak_gb_1600x1200", "<=", 8.0),
    ("GPU 1152x1152: ours / kornia LoFTR time (fp32)", "gpu_time_ratio_1152", "<=", 1.0),
    ("bf16 path keeps fp32 matches within 1 px", "bf16_agreement", ">=", 0.95),
    ("bf16 features (backbone + coarse transformer only) keep fp32 matches within 1 px", "bf16_features_agreement", ">=", 0.95),
    ("Winograd on every 3x3 layer keeps the direct path's matches within 1 px", "winograd_agreement", ">=", 0.95),
    ("Coarsest level bounded (opt-in) keeps the trained levels' matches within 1 px at twice the size (95%: as a default)",
     "bounded_agreement", ">=", 0.95),
)


#: Token counts of the attention targets (4,800 -> 19,200 -> 76,800: 80x60, 160x120, 320x240 grids).
TARGET_TOKENS = (4800, 19200, 76800)

#: ``coarse.max_coarsest_tokens`` of the memory section's second run: the trained coarsest level's size at 640x480
#: (15 x 20), so a 1600x1200 pair (coarsest 50 x 38 with 3 levels) gets two levels more (its 200 x 150 grid padded
#: to 208 x 160, coarsest 13 x 10).
MEMORY_BOUND = 300

#: Image sizes (H, W) of the GPU throughput section; the target compares ours with kornia at the last one.
GPU_SIZES = [(480, 640), (1152, 1152)]


# ----------------------------------------------------------------------------------------------- helpers
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_times(fns: dict[str, Callable[[], Any]], repeats: int, device: str, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call of each function, calls interleaved (A B A B ...) after ``warmup`` rounds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def median_times(fns: dict[str, Callable[[], Any]], repeats: int, device: str, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved (A B A B ...) after ``warmup`` rounds."""
    return {k: statistics.median(v) for k, v in interleaved_times(fns, repeats, device, warmup).items()}


def check_target(value: float | None, op: str, bound: float) -> str:
    """'met' / 'not met' / 'n/a' for a ratio against its bound."""
    if value is None or not np.isfinite(value):
        return "n/a"
    ok = value <= bound if op == "<=" else value >= bound
    return "met" if ok else "not met"


def matmul_gflops(device: str, dtype: torch.dtype, n: int, repeats: int = 5, tf32: bool = False) -> float:
    """GFLOP/s of an n x n x n matmul (2 n^3 FLOPs), best of ``repeats``: the rate the machine can reach
    (noise only ever slows a run down). On CPU the better of torch's matmul (MKL in float32) and oneDNN's
    (what the model's linear maps use; 1.2-1.3x MKL's float32 rate on an AMD EPYC). ``tf32``: float32
    matmuls on CUDA tensor cores in TF32, the precision cuDNN uses for float32 convolutions by default."""
    from matcher.onednn import ONEDNN_DTYPES, onednn_available, products

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    fns = {"mm": lambda: a @ b}
    if device == "cpu" and onednn_available() and dtype in ONEDNN_DTYPES:  # (bf16 matmuls run on oneDNN anyway)
        b_rows = b.t().contiguous()  # products(a, b_rows) = a @ b_rows.T = a @ b
        fns["onednn"] = lambda: products(a, b_rows)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        best = min(min(times) for times in interleaved_times(fns, repeats, device).values())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return 2 * n**3 / best / 1e9


def sample_pair(hw: tuple[int, int], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The demo pair (real texture) resized to ``hw``, as (1, 1, H, W) tensors in [0, 1]."""
    import cv2

    images = []
    for name in ("pair_a.png", "pair_b.png"):
        gray = cv2.imread(str(ASSETS / name), cv2.IMREAD_GRAYSCALE)
        gray = cv2.resize(gray, (hw[1], hw[0]), interpolation=cv2.INTER_AREA)
        images.append(torch.from_numpy(gray).float().div(255)[None, None].to(device))
    return images[0], images[1]


def build_ours(config: str, device: str, seed: int = 0, kernel: str = "auto", feature_dtype: str = "float32",
               max_coarsest_tokens: int | None = None) -> torch.nn.Module:
    """Seeded random weights; coarse threshold 0 so that every mutual nearest neighbour is a match and the
    fine stage does the work it does with trained weights (random weights give no confident matches).
    ``kernel``: the coarse stage's Triton kernels (auto: on CUDA when installed) or ``torch``;
    ``feature_dtype``: ``inference.feature_dtype``; ``max_coarsest_tokens``: ``coarse.max_coarsest_tokens``."""
    from matcher import Matcher, load_config

    torch.manual_seed(seed)
    cfg = load_config(config)
    cfg.match_coarse.thr = 0.0
    cfg.coarse.kernel = kernel
    cfg.coarse.max_coarsest_tokens = max_coarsest_tokens
    cfg.inference.feature_dtype = feature_dtype
    model = Matcher(cfg)
    _init_like_kornia(model.loftr_coarse)
    return model.eval().to(device)


def _init_like_kornia(transformer: torch.nn.Module) -> None:
    """Re-draw the coarse transformer as kornia's LoFTR draws its own (torch's default initialisation, then
    Xavier uniform over every matrix), so that both models are timed with weights drawn alike. With
    LoFTR-QuadTree's own initialisation (the training default) the random features are far more distinctive:
    3,187 mutual nearest neighbours on the 640x480 pair instead of 500-590 (trained weights: about 1,400),
    and the fine stage's share of the time grows with them."""
    from matcher.transformer import init_xavier_

    for module in transformer.modules():
        if module is not transformer and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    init_xavier_(transformer)


def build_kornia(device: str, seed: int = 0) -> torch.nn.Module:
    """kornia LoFTR with seeded random weights and coarse threshold 0, as :func:`build_ours`."""
    from copy import deepcopy

    from kornia.feature import LoFTR
    from kornia.feature.loftr.loftr import default_cfg

    torch.manual_seed(seed)
    cfg = deepcopy(default_cfg)
    cfg["match_coarse"]["thr"] = 0.0
    return LoFTR(pretrained=None, config=cfg).eval().to(device)


def run_pair(model: torch.nn.Module, x0: torch.Tensor, x1: torch.Tensor, autocast: torch.dtype | None = None) -> dict:
    device_type = x0.device.type
    with torch.inference_mode(), torch.autocast(device_type, dtype=autocast or torch.float32, enabled=autocast is not None):
        return model({"image0": x0, "image1": x1})


# ----------------------------------------------------------------------------------------------- child runs
def child_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in this (child) process; report time and peak memory above the start."""
    torch.set_num_threads(spec["threads"])
    if spec.get("reuse_freed_memory"):
        reuse_freed_memory()
    device = spec["device"]
    if spec["kind"] == "pair":
        if spec["model"] == "ours":
            model = build_ours(spec["config"], device, max_coarsest_tokens=spec.get("max_coarsest_tokens"))
        else:
            model = build_kornia(device)
        x0, x1 = sample_pair(tuple(spec["hw"]), device)
        fn = lambda: run_pair(model, x0, x1)  # noqa: E731
    else:
        layer, inputs = attention_layer(tuple(spec["grid"]), device, max_coarsest_tokens=spec.get("max_coarsest_tokens"))
        fn = lambda: attention_forward(layer, spec["model"], tuple(spec["grid"]), *inputs)  # noqa: E731
    first_seconds = None
    if device.startswith("cuda"):  # the first pair compiles the Triton kernels for its sizes: timed apart
        start = time.perf_counter()
        fn()
        sync(device)
        first_seconds = time.perf_counter() - start
    before = resident_mb()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    out = fn()
    sync(device)
    seconds = time.perf_counter() - start
    if device.startswith("cuda"):
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = peak_resident_mb() - before
    matches = len(out["keypoints0"]) if isinstance(out, dict) else None
    return {"seconds": seconds, "first_seconds": first_seconds, "peak_mb": peak, "process_peak_mb": peak_resident_mb(),
            "matches": matches}


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def resident_mb() -> float:
    return _status_mb("VmRSS")


def peak_resident_mb() -> float:
    return _status_mb("VmHWM")


def run_child(spec: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    """Run :func:`child_main` in a fresh interpreter (own peak memory); errors come back as ``error``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- attention
def attention_layer(grid: tuple[int, int], device: str, dim: int = 256, nhead: int = 8, kernel: str = "auto",
                    max_coarsest_tokens: int | None = None):
    """The QuadTree-B attention layer of ``quadtree_b_indoor`` (q/k/v projections, pyramids, top-k 32/16/16,
    output projection) and random inputs; :func:`attention_forward` runs it or its projections around exact
    softmax attention (SDPA). ``kernel``: the layer's Triton kernels (auto: on CUDA when installed) or torch;
    ``max_coarsest_tokens``: ``coarse.max_coarsest_tokens`` (levels added on larger grids). Seeded: the same
    weights and inputs on every call."""
    from matcher.transformer import QuadtreeAttention

    torch.manual_seed(0)
    layer = QuadtreeAttention(dim, nhead, [32, 16, 16], "B", kernel=kernel, max_coarsest_tokens=max_coarsest_tokens)
    layer = layer.eval().to(device)
    n = grid[0] * grid[1]
    x = torch.randn(1, n, dim, device=device)
    src = torch.randn(1, n, dim, device=device)
    return layer, (x, src)


#: Largest score matrix exact attention may hold at once (bytes): torch's CPU SDPA materialises the N x N
#: scores, 11.8 GB per layer call at 19,200 tokens and 8 heads, so queries are processed in chunks.
SDPA_CHUNK_BYTES = 1 << 30


def chunked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact softmax attention (``scaled_dot_product_attention``) over query chunks whose (B, H, chunk, N)
    score matrix stays under :data:`SDPA_CHUNK_BYTES`; the result equals one unchunked call."""
    b, h, n, _ = q.shape
    chunk = max(1, SDPA_CHUNK_BYTES // (b * h * k.shape[2] * q.element_size()))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return torch.cat([sdpa(q[:, :, i : i + chunk], k, v) for i in range(0, n, chunk)], dim=2)


def attention_forward(layer, kind: str, grid: tuple[int, int], x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        if kind == "quadtree":
            return layer(x, src, grid, grid)
        b, n, c = x.shape
        h = layer.nhead
        as_grid = lambda t: t.transpose(1, 2).reshape(b, c, *grid)  # noqa: E731
        heads = lambda t: t.flatten(2).reshape(b, h, c // h, n).transpose(2, 3)  # noqa: E731
        q, k, v = heads(layer.q_proj(as_grid(x))), heads(layer.k_proj(as_grid(src))), heads(layer.v_proj(as_grid(src)))
        message = chunked_sdpa(q, k, v)
        return layer.proj(message.transpose(1, 2).reshape(b, n, c))


def flop_counter():
    """torch's FlopCounterMode (matrix products and convolutions), told about the oneDNN ops that CPU
    inference runs its linear maps through."""
    from torch.utils.flop_counter import FlopCounterMode

    from matcher.onednn import flop_formulas

    return FlopCounterMode(display=False, custom_mapping=flop_formulas())


def counted_gflop(fn: Callable[[], Any]) -> float:
    """GFLOP of the matrix products and convolutions one call of ``fn`` runs (:func:`flop_counter`)."""
    counter = flop_counter()
    with counter:
        fn()
    return counter.get_total_flops() / 1e9


def quadtree_gflop(grid: tuple[int, int], device: str, max_coarsest_tokens: int | None = None) -> float:
    """GFLOP of the QuadTree-B layer at ``grid``, counted on its PyTorch path: Triton kernels (CUDA) bypass
    torch's dispatcher, where FlopCounterMode counts, and do the same arithmetic."""
    layer, inputs = attention_layer(grid, device, kernel="torch", max_coarsest_tokens=max_coarsest_tokens)
    return counted_gflop(functools.partial(attention_forward, layer, "quadtree", grid, *inputs))


def sdpa_estimates(grids: list[tuple[int, int]], first_sdpa: Callable[[], Any], device: str) -> dict[tuple[int, int], float]:
    """Estimated seconds of one exact-attention call per grid, from one timed call of ``first_sdpa`` (the
    first grid's, after one untimed) scaled by the square of the token ratio (exact attention is quadratic)."""
    first_sdpa()
    sync(device)
    start = time.perf_counter()
    first_sdpa()
    sync(device)
    probe_s = time.perf_counter() - start
    n0 = grids[0][0] * grids[0][1]
    return {g: probe_s * (g[0] * g[1] / n0) ** 2 for g in grids}


def section_attention(grids: list[tuple[int, int]], device: str, threads: int, repeats: int, sdpa_budget_s: float,
                      reuse_memory: bool) -> dict:
    """Time, FLOPs and peak memory (child processes) of QuadTree-B vs SDPA per grid, and of QuadTree-B with
    its coarsest level bounded (``coarse.max_coarsest_tokens`` = the first grid's coarsest level, 300 tokens
    for 4,800: levels are added on the larger grids, so the first grid runs the published 3 levels).

    Every grid's QuadTree-B calls and the SDPA calls that fit the budget are timed in ONE interleaved run
    (4,800 / SDPA / 19,200 / SDPA / 76,800 tokens, round after round), so the time-growth ratios, like the
    speed-ups, compare calls taken moments apart rather than minutes apart on a machine whose speed drifts.
    """
    from matcher.attention import num_levels_for

    bound = max(1, grids[0][0] * grids[0][1] // 16)  # the published 3 levels' coarsest on the first grid
    fns: dict[str, Callable[[], Any]] = {}
    for grid in grids:
        layer, inputs = attention_layer(grid, device)
        fns[f"quadtree {grid}"] = functools.partial(attention_forward, layer, "quadtree", grid, *inputs)
        bounded, _ = attention_layer(grid, device, max_coarsest_tokens=bound)
        fns[f"bounded {grid}"] = functools.partial(attention_forward, bounded, "quadtree", grid, *inputs)
        sdpa = functools.partial(attention_forward, layer, "sdpa", grid, *inputs)
        if grid == grids[0]:
            estimates = sdpa_estimates(grids, sdpa, device)
        if estimates[grid] * (repeats + 1) <= sdpa_budget_s:
            fns[f"sdpa {grid}"] = sdpa
    times = median_times(fns, repeats, device)
    rows = []
    for grid in grids:
        n = grid[0] * grid[1]
        row = {"tokens": n, "grid": list(grid), "quadtree_s": times[f"quadtree {grid}"], "sdpa_s": times.get(f"sdpa {grid}"),
               "quadtree_gflop": quadtree_gflop(grid, device)}
        if row["sdpa_s"] is not None:
            row["speedup"] = row["sdpa_s"] / row["quadtree_s"]
        else:
            row["sdpa_note"] = f"skipped: estimated {estimates[grid]:.0f} s per call (quadratic extrapolation)"
        spec = {"kind": "attention", "grid": list(grid), "device": device, "threads": threads, "reuse_freed_memory": reuse_memory}
        row["quadtree_peak_mb"] = run_child({**spec, "model": "quadtree"}).get("peak_mb")
        row["sdpa_peak_mb"] = run_child({**spec, "model": "sdpa"}).get("peak_mb") if row["sdpa_s"] is not None else None
        row.update(bounded_levels=num_levels_for(3, bound, grid), bounded_s=times[f"bounded {grid}"],
                   bounded_gflop=quadtree_gflop(grid, device, bound),
                   bounded_peak_mb=run_child({**spec, "model": "quadtree", "max_coarsest_tokens": bound}).get("peak_mb"))
        rows.append(row)
        print(f"  attention {n} tokens: {row}", flush=True)
    return {"rows": rows, "bounded_coarsest_tokens": bound}


# ----------------------------------------------------------------------------------------------- end to end
def section_e2e(hw: tuple[int, int], device: str, repeats: int, with_kornia: bool, autocast: torch.dtype | None) -> dict:
    """Ours (quadtree_b_indoor: fp32, fp32 with the direct convolutions instead of Winograd on CPU, autocast,
    and the backbone + coarse transformer alone in bf16) vs kornia LoFTR (fp32) on one pair, interleaved.

    ``default`` names the configuration the model runs by default on this machine (``inference.feature_dtype:
    auto``: bf16 features on a CPU with native bf16, else fp32); the target ratio is taken from it, and
    ``time_ratio_fp32`` from fp32."""
    ours = build_ours("quadtree_b_indoor", device)
    x0, x1 = sample_pair(hw, device)
    fns = {"ours_fp32": lambda: run_pair(ours, x0, x1)}
    if device == "cpu":
        direct = build_ours("quadtree_b_indoor", device)
        direct.backbone.set_winograd(False)
        fns["ours_fp32_direct_conv"] = lambda: run_pair(direct, x0, x1)
    if autocast is not None:
        fns["ours_" + str(autocast).split(".")[-1]] = lambda: run_pair(ours, x0, x1, autocast)
    default = "ours_bf16_features" if resolve_feature_dtype("auto", device) == torch.bfloat16 else "ours_fp32"
    if autocast == torch.bfloat16 or default == "ours_bf16_features":
        bf16_features = build_ours("quadtree_b_indoor", device, feature_dtype="bfloat16")
        fns["ours_bf16_features"] = lambda: run_pair(bf16_features, x0, x1)
    if with_kornia:
        kornia_model = build_kornia(device)
        fns["kornia_loftr_fp32"] = lambda: run_pair(kornia_model, x0, x1)
    times = median_times(fns, repeats, device)
    matches = {k: len(fns[k]()["keypoints0"]) for k in dict.fromkeys(["ours_fp32", default])}
    result = {"hw": list(hw), "seconds": times, "matches": matches, "default": default}
    if with_kornia:
        result["matches"]["kornia_loftr_fp32"] = len(run_pair(kornia_model, x0, x1)["keypoints0"])
        result["time_ratio"] = times[default] / times["kornia_loftr_fp32"]
        result["time_ratio_fp32"] = times["ours_fp32"] / times["kornia_loftr_fp32"]
    return result


def _dtype_name(dtype: torch.dtype | None) -> str:
    return "fp32" if dtype is None else {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def section_throughput(sizes: list[tuple[int, int]], device: str, repeats: int, autocasts: list[torch.dtype]) -> dict:
    """Pairs per second of ours (quadtree_b_indoor) and kornia LoFTR per image size, in fp32 and under each
    autocast dtype, all configurations of one size interleaved; on CUDA also each one's peak memory (one
    more run each). A configuration that fails (an autocast kernel a GPU lacks, out of memory) is reported
    with its error instead of stopping the section. Where ours runs Triton kernels (CUDA with triton), ours
    with the PyTorch paths only (``ours_pytorch``, fp32) is timed beside it."""
    from matcher.triton_support import kernel_device

    models = {"ours": build_ours("quadtree_b_indoor", device), "kornia_loftr": build_kornia(device)}
    dtypes = {"ours": (None, *autocasts), "kornia_loftr": (None, *autocasts)}
    if device.startswith("cuda") and kernel_device(torch.empty(0, device=device)):
        models["ours_pytorch"], dtypes["ours_pytorch"] = build_ours("quadtree_b_indoor", device, kernel="torch"), (None,)
    result: dict[str, Any] = {}
    for hw in sizes:
        x0, x1 = sample_pair(hw, device)
        fns, matches, errors, peaks = {}, {}, {}, {}
        for name, model in models.items():
            for dtype in dtypes[name]:
                key = f"{name}_{_dtype_name(dtype)}"
                fn = lambda model=model, dtype=dtype: run_pair(model, x0, x1, dtype)  # noqa: E731
                try:
                    if device.startswith("cuda"):
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                    matches[key] = len(fn()["keypoints0"])
                    sync(device)
                    if device.startswith("cuda"):
                        peaks[key] = (torch.cuda.max_memory_allocated() - base) / 2**20
                    fns[key] = fn
                except (RuntimeError, NotImplementedError) as err:  # torch reports missing kernels and OOM so
                    errors[key] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                    if device.startswith("cuda"):
                        torch.cuda.empty_cache()
        seconds = median_times(fns, repeats, device)
        row = {"hw": list(hw), "seconds": seconds, "matches": matches, "peak_mb": peaks, "errors": errors}
        if "ours_fp32" in seconds and "kornia_loftr_fp32" in seconds:
            row["time_ratio_fp32"] = seconds["ours_fp32"] / seconds["kornia_loftr_fp32"]
        result[f"{hw[1]}x{hw[0]}"] = row
        print(f"  throughput {hw[1]}x{hw[0]}: {row}", flush=True)
    return result


def section_workers(hw: tuple[int, int], pairs: int, workers: int, rounds: int) -> dict:
    """CPU pairs per second of the shipped model (``default``, as ``eval/pose.py --matcher default`` builds it)
    on ``pairs`` copies of one pair: one process with all of torch's threads against a
    :class:`~matcher.workers.MatcherPool` of ``workers`` processes (``--workers``), started and warmed up
    before the clock; ``rounds`` alternating rounds, medians."""
    from matcher.evaluation import build_matchers, timed_match
    from matcher.workers import MatcherPool

    build = functools.partial(build_matchers, ["default"], "cpu", None, "float32")
    matcher = build()["default"]
    image0, image1 = (x[0, 0].numpy() for x in sample_pair(hw, "cpu"))
    seconds: dict[str, list[float]] = {"one process": [], f"{workers} workers": []}
    with MatcherPool(build, workers, reuse_memory=True) as pool:
        warm = [pool.submit(timed_match, "default", image0, image1, None) for _ in range(2 * workers)]
        matches = {len(MatcherPool.result(job)[0]["confidence"]) for job in warm}
        matches.add(len(timed_match(matcher, image0, image1, None)[0]["confidence"]))
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(pairs):
                timed_match(matcher, image0, image1, None)
            seconds["one process"].append(time.perf_counter() - start)
            start = time.perf_counter()
            for job in [pool.submit(timed_match, "default", image0, image1, None) for _ in range(pairs)]:
                MatcherPool.result(job)
            seconds[f"{workers} workers"].append(time.perf_counter() - start)
    per_second = {k: pairs / statistics.median(v) for k, v in seconds.items()}
    return {"hw": list(hw), "pairs": pairs, "workers": workers, "threads": torch.get_num_threads(),
            "threads_per_worker": pool.threads, "pairs_per_second": per_second, "matches": sorted(matches),
            "speedup": per_second[f"{workers} workers"] / per_second["one process"]}


def kept_within_1px(ref: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> float:
    """Share of ``ref``'s matches that ``new`` (another run's model outputs) has within 1 px
    (:func:`matcher.metrics.matches_kept`)."""
    to_np = lambda t: t.float().cpu().numpy()  # noqa: E731
    return matches_kept(*(to_np(o[k]) for o in (ref, new) for k in ("keypoints0", "keypoints1")))


def section_agreement(hw: tuple[int, int], device: str, autocasts: list[torch.dtype]) -> dict:
    """Share of the reference matches that a faster path keeps within 1 px, with the shipped default weights:
    each autocast dtype against fp32 (with bf16 also ``inference.feature_dtype: bfloat16``, the backbone and
    coarse transformer alone in bf16), (on CPU) Winograd on every 3x3 layer against direct convolutions, and
    at twice the size the coarsest QuadTree level bounded to its size at ``hw`` against the trained levels
    (:func:`bounded_agreement`)."""
    from matcher import Matcher

    model = Matcher.from_pretrained("default").to(device)
    model.config.inference.feature_dtype = "float32"  # the reference, on any CPU (auto may pick bf16)
    x0, x1 = sample_pair(hw, device)
    ref = run_pair(model, x0, x1)
    result: dict[str, Any] = {"weights": "default (lite)", "hw": list(hw), "fp32_matches": len(ref["keypoints0"]), "autocast": {}}
    for dtype in autocasts:
        new = run_pair(model, x0, x1, dtype)
        result["autocast"][_dtype_name(dtype)] = {"matches": len(new["keypoints0"]), "kept_within_1px": kept_within_1px(ref, new)}
        if dtype == torch.bfloat16:
            model.config.inference.feature_dtype = "bfloat16"
            new = run_pair(model, x0, x1)
            model.config.inference.feature_dtype = "float32"
            result["bf16_features"] = {"matches": len(new["keypoints0"]), "kept_within_1px": kept_within_1px(ref, new)}
    if device == "cpu":  # Winograd on all 14 layers (AVX-512 CPUs' default; others only from winograd.default_min_channels())
        model.backbone.set_winograd(True, min_channels=0)
        every = run_pair(model, x0, x1)
        model.backbone.set_winograd(False)
        direct = run_pair(model, x0, x1)
        result.update(direct_matches=len(direct["keypoints0"]), winograd_matches=len(every["keypoints0"]),
                      winograd_kept_within_1px=kept_within_1px(direct, every))
    result["bounded"] = bounded_agreement(model, hw, device)
    return result


def bounded_agreement(model: torch.nn.Module, hw: tuple[int, int], device: str) -> dict[str, Any]:
    """``model`` on the sample pair at twice ``hw``, with the trained QuadTree levels and with
    ``coarse.max_coarsest_tokens`` at the trained coarsest level's size at ``hw`` (300 tokens at 640x480: one
    level more at 1280x960): matches of each, the share of the trained levels' matches kept within 1 px, and
    the time of each (one call after one untimed)."""
    big = (2 * hw[0], 2 * hw[1])
    bound = -(-hw[0] // 32) * -(-hw[1] // 32)
    x0, x1 = sample_pair(big, device)
    outputs, seconds = {}, {}
    for name, tokens in (("trained_levels", None), ("bounded", bound)):
        model.set_max_coarsest_tokens(tokens)
        run_pair(model, x0, x1)
        sync(device)
        start = time.perf_counter()
        outputs[name] = run_pair(model, x0, x1)
        sync(device)
        seconds[name] = time.perf_counter() - start
    model.set_max_coarsest_tokens(None)
    return {"hw": list(big), "max_coarsest_tokens": bound, "matches": {k: len(o["keypoints0"]) for k, o in outputs.items()},
            "seconds": seconds, "kept_within_1px": kept_within_1px(outputs["trained_levels"], outputs["bounded"])}


def section_matching(sizes: list[tuple[int, int]], device: str, repeats: int) -> dict:
    """The chunked coarse matcher on the shipped default model's coarse features of the sample pair (trained
    weights and their threshold: random weights with the threshold at 0 leave nothing to skip), with the
    second pass restricted to the rows and columns that can hold a match against one over every entry."""
    from matcher import Matcher
    from matcher.matching import chunked_mutual_nearest_matches

    model = Matcher.from_pretrained("default").to(device)
    model.config.inference.feature_dtype = "float32"
    mc = model.config.match_coarse
    rows = []
    for hw in sizes:
        x0, x1 = sample_pair(hw, device)
        with torch.inference_mode():
            c0, _, c1, _ = model.extract_features(x0, x1)
            t0, t1 = model.coarse_transform(c0, c1, None, None)
        grid0, grid1 = tuple(c0.shape[2:]), tuple(c1.shape[2:])

        def match(skip: bool, t0=t0, t1=t1, grid0=grid0, grid1=grid1):
            with torch.inference_mode():
                return chunked_mutual_nearest_matches(t0, t1, mc.dsmax_temperature, mc.thr, mc.border_rm, grid0, grid1,
                                                      kernel="torch", skip_unmatchable=skip)

        restricted, full = match(True), match(False)  # the results compared, and the warm-up of the timing
        seconds = median_times({"restricted": lambda: match(True), "full": lambda: match(False)}, repeats, device, warmup=0)
        rows.append({"hw": list(hw), "tokens": t0.shape[1], "matches": len(restricted[0]),
                     "same_matches": all(torch.equal(a, b) for a, b in zip(restricted[:3], full[:3])),
                     "restricted_s": seconds["restricted"], "full_s": seconds["full"]})
    return {"weights": "default (lite)", "thr": mc.thr, "rows": rows}


# ----------------------------------------------------------------------------------------------- Winograd
def winograd_break_even(rows: list[dict[str, Any]]) -> int | None:
    """The smallest width from which Winograd was faster at every width measured (``rows``: ``channels`` and
    ``ratio`` = Winograd / direct time, any order), or None if it lost at the widest."""
    ordered = sorted(rows, key=lambda r: r["channels"])
    even = None
    for row in reversed(ordered):
        if row["ratio"] >= 1.0:
            break
        even = row["channels"]
    return even


def section_winograd(widths: list[int], hw: tuple[int, int], repeats: int) -> dict:
    """CPU, float32: one 3x3 convolution (C -> C channels, bias and ReLU, batch 2, channels-last) as
    Winograd F(4x4, 3x3) with each way of transforming the tiles (:data:`matcher.winograd.TRANSFORMS`) and as
    oneDNN's direct convolution, interleaved, per width; where Winograd with this CPU's transforms starts to
    win here, beside the threshold the backbone uses on this CPU (:func:`matcher.winograd.default_min_channels`)."""
    import torch.nn.functional as F

    from matcher import winograd

    here = winograd.default_transforms()
    rows = []
    for c in widths:
        g = torch.Generator().manual_seed(c)
        x = torch.randn(2, c, *hw, generator=g).contiguous(memory_format=torch.channels_last)
        weight, bias = torch.randn(c, c, 3, 3, generator=g) * 0.05, torch.randn(c, generator=g)
        direct_weight = weight.contiguous(memory_format=torch.channels_last)
        runs = {t: functools.partial(winograd.conv3x3_winograd, x, weight, bias, 0.0, t) for t in TRANSFORM_CHOICES}
        runs["direct"] = lambda: F.relu(F.conv2d(x, direct_weight, bias, padding=1), inplace=True)
        seconds = median_times(runs, repeats, "cpu")
        rows.append({"channels": c, "seconds": seconds, "winograd_s": seconds[here], "direct_s": seconds["direct"],
                     "ratio": seconds[here] / seconds["direct"]})
    return {"hw": list(hw), "rows": rows, "break_even": winograd_break_even(rows), "transforms_here": here,
            "threshold_here": winograd.default_min_channels(), "cpu_class": winograd.this_cpu_class()}


# ----------------------------------------------------------------------------------------------- FLOPs
STAGES = ("backbone", "loftr_coarse", "fine_preprocess", "loftr_fine")


class StageTimer:
    """Seconds of every call of the named submodules of ``model`` while in the ``with`` block (forward hooks
    that synchronise the device around each call): ``seconds[stage]`` lists them."""

    def __init__(self, model: torch.nn.Module, stages: tuple[str, ...], device: str) -> None:
        self.modules = {s: getattr(model, s) for s in stages if isinstance(getattr(model, s, None), torch.nn.Module)}
        self.device = device
        self.seconds: dict[str, list[float]] = {s: [] for s in self.modules}
        self._starts: dict[str, float] = {}
        self._hooks: list = []

    def _start(self, stage: str) -> None:
        sync(self.device)
        self._starts[stage] = time.perf_counter()

    def _stop(self, stage: str) -> None:
        sync(self.device)
        self.seconds[stage].append(time.perf_counter() - self._starts[stage])

    def __enter__(self) -> "StageTimer":
        for s, module in self.modules.items():
            self._hooks.append(module.register_forward_pre_hook(lambda m, a, s=s: self._start(s)))
            self._hooks.append(module.register_forward_hook(lambda m, a, o, s=s: self._stop(s)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def stage_reference_rates(device: str, rates: dict[str, float], feature_dtype: str = "float32") -> dict[str, str]:
    """Which measured matmul rate (a key of ``rates``) each stage is compared with: the float32 one, except
    the stages that run in bf16 (backbone and coarse transformer with ``feature_dtype`` bfloat16, when a bf16
    rate was measured) and the backbone on CUDA when cuDNN runs float32 convolutions in TF32 (its default)
    and a TF32 rate was measured."""
    conv_tf32 = device.startswith("cuda") and torch.backends.cudnn.allow_tf32 and "tf32" in rates
    refs = {s: "tf32" if s == "backbone" and conv_tf32 else "fp32" for s in (*STAGES, "other")}
    if feature_dtype == "bfloat16" and "bf16" in rates:
        refs.update(backbone="bf16", loftr_coarse="bf16")
    return refs


def stage_flops(model: torch.nn.Module, x0: torch.Tensor, x1: torch.Tensor) -> tuple[float, dict[str, float]]:
    """FLOPs of one pair through ``model`` (:func:`flop_counter`): the total, and per stage of
    :data:`STAGES` plus 'other' (what runs outside them)."""
    counter = flop_counter()
    with counter:
        run_pair(model, x0, x1)
    counts = counter.get_flop_counts()
    total = sum(counts.get("Global", {}).values())
    flops = {s: sum(v for k, d in counts.items() if k.endswith("." + s) and k.count(".") == 1 for v in d.values()) for s in STAGES}
    flops["other"] = total - sum(flops.values())
    return total, flops


def section_flops(hw: tuple[int, int], device: str, repeats: int, rates: dict[str, float], feature_dtype: str = "float32") -> dict:
    """FLOPs per stage (:func:`flop_counter`), time per stage (module hooks), achieved GFLOP/s and its share
    of the measured matmul rate (``rates``, by :func:`stage_reference_rates`). 'other' = everything outside
    the four modules (position encoding, dual softmax and mutual nearest neighbours, window expectation).
    Each row also has the FLOPs with the backbone's convolutions counted as direct ones (``gflop_direct_conv``,
    the model's nominal arithmetic) and the rate that makes (``gflops_direct_conv``): where Winograd runs,
    the counted products are about a quarter of the 3x3 layers' nominal arithmetic.
    ``feature_dtype``: ``inference.feature_dtype`` of the model (resolved: float32 or bfloat16)."""
    model = build_ours("quadtree_b_indoor", device, feature_dtype=feature_dtype)
    x0, x1 = sample_pair(hw, device)
    total, flops = stage_flops(model, x0, x1)
    if device != "cpu":
        # the coarse transformer's Triton kernels bypass torch's dispatcher, where FlopCounterMode counts, and do
        # its PyTorch path's arithmetic: count that stage there (the coarse matcher's kernels run their one
        # similarity product through cuBLAS, which is counted)
        _, torch_path = stage_flops(build_ours("quadtree_b_indoor", device, feature_dtype=feature_dtype, kernel="torch"), x0, x1)
        total += torch_path["loftr_coarse"] - flops["loftr_coarse"]
        flops["loftr_coarse"] = torch_path["loftr_coarse"]
    backbone_direct = flops["backbone"]
    if device == "cpu":
        # the backbone's arithmetic as direct convolutions, the usual count: Winograd (CPU only) runs a quarter of
        # its 3x3 layers' products, and FlopCounterMode does not see its tile transforms when they are additions
        direct = build_ours("quadtree_b_indoor", device, feature_dtype=feature_dtype)
        direct.backbone.set_winograd(False)
        backbone_direct = stage_flops(direct, x0, x1)[1]["backbone"]
        del direct
    run_pair(model, x0, x1)  # warm-up
    totals, stage_runs = [], {s: [] for s in STAGES}
    with StageTimer(model, STAGES, device) as timer:
        for _ in range(repeats):
            calls = {s: len(timer.seconds[s]) for s in STAGES}
            totals.extend(interleaved_times({"all": lambda: run_pair(model, x0, x1)}, 1, device, warmup=0)["all"])
            for s in STAGES:
                stage_runs[s].append(sum(timer.seconds[s][calls[s]:]))
    # medians of each run's own split: 'other' of a run is its time outside the stages (a median of totals
    # minus means of stages mixed runs, and one slow run on a noisy machine made it negative)
    per_stage = {s: statistics.median(v) for s, v in stage_runs.items()}
    per_stage["other"] = max(statistics.median(t - sum(v[i] for v in stage_runs.values()) for i, t in enumerate(totals)), 0.0)
    total_s = statistics.median(totals)
    rows = []
    for s, ref in stage_reference_rates(device, rates, feature_dtype).items():
        achieved = flops[s] / per_stage[s] / 1e9 if per_stage[s] > 0 else float("nan")
        nominal = (backbone_direct if s == "backbone" else flops[s]) / 1e9
        rows.append({"stage": s, "gflop": flops[s] / 1e9, "seconds": per_stage[s], "gflops": achieved,
                     "reference_rate": ref, "share_of_matmul_rate": achieved / rates[ref], "gflop_direct_conv": nominal,
                     "gflops_direct_conv": nominal / per_stage[s] if per_stage[s] > 0 else float("nan")})
    return {"hw": list(hw), "feature_dtype": feature_dtype, "total_gflop": total / 1e9, "total_seconds": total_s,
            "total_gflop_direct_conv": (total - flops["backbone"] + backbone_direct) / 1e9, "rows": rows}


# ----------------------------------------------------------------------------------------------- profile
#: Submodules whose time the profile section reports (those a model has): ours runs its coarse matching
#: outside modules, kornia LoFTR in ``coarse_matching`` / ``fine_matching``.
PROFILE_STAGES = ("backbone", "loftr_coarse", "coarse_matching", "fine_preprocess", "loftr_fine", "fine_matching")


def top_operations(events, device: str, rows: int) -> list[dict[str, Any]]:
    """The ``rows`` costliest entries of a profiler's ``key_averages()``: on CUDA the GPU kernels by self
    device time, on CPU the operators by self CPU time; milliseconds per profiled call and call counts."""
    cuda = device.startswith("cuda")
    if cuda:
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        ms = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) / 1e3  # noqa: E731
    else:
        ms = lambda e: e.self_cpu_time_total / 1e3  # noqa: E731
    ranked = sorted((e for e in events if ms(e) > 0), key=ms, reverse=True)
    return [{"name": e.key, "ms": ms(e), "calls": e.count} for e in ranked[:rows]]


def section_profile(hw: tuple[int, int], device: str, repeats: int, rows: int = 15) -> dict:
    """Where each model spends one pair: median time per stage (module hooks) and the costliest kernels
    (CUDA) or operators (CPU) of one profiled pair (torch.profiler), for ours, ours with the PyTorch paths
    only where the Triton kernels run (``ours_pytorch``, to see what each kernel replaces), and kornia LoFTR."""
    from torch.profiler import ProfilerActivity, profile

    from matcher.triton_support import kernel_device

    x0, x1 = sample_pair(hw, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    # ours as it runs by default on this machine (bf16 features on CPUs with native bf16)
    feature_dtype = "bfloat16" if resolve_feature_dtype("auto", device) == torch.bfloat16 else "float32"
    models = {"ours": lambda: build_ours("quadtree_b_indoor", device, feature_dtype=feature_dtype)}
    if device.startswith("cuda") and kernel_device(torch.empty(0, device=device)):
        models["ours_pytorch"] = lambda: build_ours("quadtree_b_indoor", device, kernel="torch")
    models["kornia_loftr"] = lambda: build_kornia(device)
    result: dict[str, Any] = {"hw": list(hw), "ours_feature_dtype": feature_dtype, "models": {}}
    for name, build in models.items():
        model = build()
        fn = lambda model=model: run_pair(model, x0, x1)  # noqa: E731
        fn()  # warm-up (and kernel compilation)
        with StageTimer(model, PROFILE_STAGES, device) as timer:
            total_s = median_times({name: fn}, repeats, device, warmup=0)[name]
        with profile(activities=activities) as prof:
            fn()
            sync(device)
        result["models"][name] = {
            "seconds": total_s,
            "stage_ms": {s: 1e3 * statistics.median(v) for s, v in timer.seconds.items() if v},
            "top": top_operations(prof.key_averages(), device, rows),
        }
    return result


# ----------------------------------------------------------------------------------------------- report
def machine_info(device: str) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "device": device,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def ratios_of(results: dict[str, Any]) -> dict[str, float | None]:
    r: dict[str, float | None] = {}
    e2e = results.get("e2e")
    r["e2e_time_ratio"] = e2e.get("time_ratio") if e2e else None
    # only at the targets' token counts: a --quick run measures other sizes, whose ratios say nothing of them
    by_n = {row["tokens"]: row for row in results.get("attention", {}).get("rows", [])}
    r["attention_speedup_19200"] = by_n.get(19200, {}).get("speedup")
    for i, (n_a, n_b) in enumerate(zip(TARGET_TOKENS, TARGET_TOKENS[1:]), start=1):
        a, b = by_n.get(n_a), by_n.get(n_b)
        for name, key in (("quadtree_time", "quadtree_s"), ("quadtree_flop", "quadtree_gflop"),
                          ("quadtree_memory", "quadtree_peak_mb"), ("bounded_time", "bounded_s"),
                          ("bounded_flop", "bounded_gflop"), ("bounded_memory", "bounded_peak_mb")):
            va, vb = (a or {}).get(key), (b or {}).get(key)
            r[f"{name}_growth_{i}"] = vb / va if va and vb else None
    mem = results.get("memory")
    r["peak_gb_1600x1200"] = mem["peak_mb"] / 1024 if mem and "peak_mb" in mem else None
    agree = results.get("agreement")
    r["bf16_agreement"] = agree.get("autocast", {}).get("bf16", {}).get("kept_within_1px") if agree else None
    r["bf16_features_agreement"] = agree.get("bf16_features", {}).get("kept_within_1px") if agree else None
    r["winograd_agreement"] = agree.get("winograd_kept_within_1px") if agree else None
    r["bounded_agreement"] = agree.get("bounded", {}).get("kept_within_1px") if agree else None
    gpu_row = results.get("gpu", {}).get("1152x1152")
    r["gpu_time_ratio_1152"] = gpu_row.get("time_ratio_fp32") if gpu_row else None
    return r


def _memory_run_line(label: str, run: dict[str, Any]) -> str:
    """``label: peak, time, matches`` of one extra child run of the memory section, or ``label: error``."""
    if "peak_mb" not in run:
        return f"{label}: {run.get('error', '')}"
    return f"{label}: {run['peak_mb'] / 1024:.2f} GB above the loaded model, {run['seconds']:.1f} s, {run['matches']} matches"


def render_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [f"# Benchmark ({'quick' if results['quick'] else 'full'})", "",
             f"Machine: {m['cpu']}, {m['threads']} threads, {m.get('gpu', m['device'])}; torch {m['torch']} "
             f"(CPU capability {m['cpu_capability']}). Matmul rate: "
             + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in results["matmul_gflops"].items())
             + (". malloc: freed blocks kept for reuse (matcher/allocator.py)" if m.get("reuse_freed_memory") else ". malloc: system defaults"), ""]
    if not results.get("complete", True):
        lines += ["**Partial report**: the run had not finished when this was written (still running, or stopped by "
                  "an error or a time limit); the sections below are complete.", ""]
    if "e2e" in results:
        e = results["e2e"]
        lines += [f"## End to end, one {e['hw'][1]}x{e['hw'][0]} pair", "", "| configuration | s / pair | matches |", "|:---|---:|---:|"]
        lines += [f"| {k}{' (default here)' if k == e.get('default') else ''} | {v:.3f} | {e['matches'].get(k, '')} |"
                  for k, v in e["seconds"].items()]
        if "time_ratio" in e:
            lines += ["", f"Ours / kornia LoFTR: {e['time_ratio']:.2f} with the default ({e['default']}), "
                      f"{e['time_ratio_fp32']:.2f} in fp32."]
        lines.append("")
    if "agreement" in results:
        a = results["agreement"]
        where = f"{a['weights']} weights, {a['hw'][1]}x{a['hw'][0]}"
        for name, row in a.get("autocast", {}).items():
            lines += [f"{name} autocast agreement ({where}): {100 * row['kept_within_1px']:.1f}% of "
                      f"{a['fp32_matches']} fp32 matches kept within 1 px ({row['matches']} {name} matches)", ""]
        if "bf16_features" in a:
            row = a["bf16_features"]
            lines += [f"bf16 features (backbone + coarse transformer in bf16, `inference.feature_dtype`; {where}): "
                      f"{100 * row['kept_within_1px']:.1f}% of {a['fp32_matches']} fp32 matches kept within 1 px "
                      f"({row['matches']} matches)", ""]
        if "bounded" in a:
            bd = a["bounded"]
            lines += [f"Coarsest QuadTree level bounded to {bd['max_coarsest_tokens']} tokens (`coarse.max_coarsest_tokens`; "
                      f"{a['weights']} weights, {bd['hw'][1]}x{bd['hw'][0]}): {100 * bd['kept_within_1px']:.1f}% of the "
                      f"{bd['matches']['trained_levels']} matches with the trained levels kept within 1 px "
                      f"({bd['matches']['bounded']} matches); {bd['seconds']['bounded']:.2f} s vs "
                      f"{bd['seconds']['trained_levels']:.2f} s per pair", ""]
        if "winograd_kept_within_1px" in a:
            lines += [f"Winograd agreement ({where}): {100 * a['winograd_kept_within_1px']:.1f}% of the {a['direct_matches']} "
                      f"matches with direct convolutions kept within 1 px ({a['winograd_matches']} with Winograd on every "
                      "3x3 layer)", ""]
    if "attention" in results:
        lines += ["## Attention layer (d_model 256, 8 heads): QuadTree-B (top-k 32/16/16) vs exact softmax (SDPA)", "",
                  "Both with the same q/k/v and output projections; SDPA runs over query chunks whose score matrix stays under 1 GB "
                  "(one call would need N x N x 8 heads x 4 bytes: 11.8 GB at 19,200 tokens).", "",
                  "| tokens | grid | QuadTree-B s | QuadTree-B GFLOP | GFLOP/s | SDPA s | speed-up | QuadTree-B peak MB | SDPA peak MB |",
                  "|---:|:---|---:|---:|---:|---:|---:|---:|---:|"]
        fmt = lambda v, spec=".0f": format(v, spec) if isinstance(v, (int, float)) else "n/a"  # noqa: E731
        rows = results["attention"]["rows"]
        for r in rows:
            sd = f"{r['sdpa_s']:.3f}" if r.get("sdpa_s") is not None else r.get("sdpa_note", "n/a")
            sp = f"{r['speedup']:.1f}x" if "speedup" in r else "n/a"
            gflop = r.get("quadtree_gflop")
            rate = gflop / r["quadtree_s"] if gflop else None
            lines.append(f"| {r['tokens']} | {r['grid'][1]}x{r['grid'][0]} | {r['quadtree_s']:.3f} | {fmt(gflop, '.2f')} | "
                         f"{fmt(rate, '.1f')} | {sd} | {sp} | {fmt(r['quadtree_peak_mb'])} | {fmt(r['sdpa_peak_mb'])} |")
        growth = [f"{b['quadtree_gflop'] / a['quadtree_gflop']:.2f}x from {a['tokens']:,} to {b['tokens']:,} tokens"
                  for a, b in zip(rows, rows[1:]) if a.get("quadtree_gflop") and b.get("quadtree_gflop")]
        if growth:
            lines += ["", "QuadTree-B FLOPs grow " + ", ".join(growth) + ": the coarsest level is full attention over "
                      "N/16 tokens, a quadratic term, so where the layer runs at one FLOP rate its time grows as much."]
        if any("bounded_s" in r for r in rows):
            bound = results["attention"].get("bounded_coarsest_tokens")
            lines += ["", f"QuadTree-B with its coarsest level bounded (`coarse.max_coarsest_tokens: {bound}`, the first grid's "
                      "coarsest level): levels are added above the published 3 on larger grids, so the cost is linear. "
                      "The added levels only choose candidates (weight 0 in the level mixture).", "",
                      "| tokens | levels | s | GFLOP | GFLOP/s | peak MB | time vs 3 levels |", "|---:|---:|---:|---:|---:|---:|---:|"]
            for r in rows:
                if "bounded_s" not in r:
                    continue
                rate = r["bounded_gflop"] / r["bounded_s"] if r.get("bounded_gflop") else None
                lines.append(f"| {r['tokens']} | {r['bounded_levels']} | {r['bounded_s']:.3f} | {fmt(r.get('bounded_gflop'), '.2f')} | "
                             f"{fmt(rate, '.1f')} | {fmt(r.get('bounded_peak_mb'))} | {r['bounded_s'] / r['quadtree_s']:.2f} |")
        lines.append("")
    if "matching" in results:
        mt = results["matching"]
        lines += [f"## Coarse matching (chunked dual softmax + mutual NN), {mt['weights']} weights, threshold {mt['thr']}", "",
                  "Second pass restricted to the rows and columns that can hold a match above the threshold, against one "
                  "over every entry (`skip_unmatchable=False`); the coarse features of the sample pair.", "",
                  "| size | tokens per image | restricted s | every entry s | ratio | matches | same matches |",
                  "|:---|---:|---:|---:|---:|---:|:---|"]
        lines += [f"| {r['hw'][1]}x{r['hw'][0]} | {r['tokens']} | {r['restricted_s']:.3f} | {r['full_s']:.3f} | "
                  f"{r['restricted_s'] / r['full_s']:.2f} | {r['matches']} | {'yes' if r['same_matches'] else 'NO'} |" for r in mt["rows"]]
        lines.append("")
    if "memory" in results:
        mem = results["memory"]
        val = f"{mem['peak_mb'] / 1024:.2f} GB above the loaded model ({mem['process_peak_mb'] / 1024:.2f} GB process peak), {mem['seconds']:.1f} s, {mem['matches']} matches" if "peak_mb" in mem else mem.get("error", "")
        if mem.get("first_seconds") is not None:
            val += f" (second pair; the first, which compiles the GPU kernels, took {mem['first_seconds']:.1f} s)"
        lines += [f"## Peak memory, one {mem['hw'][1]}x{mem['hw'][0]} pair, quadtree_b_indoor", "", val, ""]
        if sm := mem.get("system_malloc"):
            lines += [_memory_run_line("With malloc's defaults (freed blocks above 32 MB unmapped at once, so the peak is "
                                       "the live tensors'; reused freed memory fragments the heap and its peak varies "
                                       "between runs)", sm), ""]
        if bd := mem.get("bounded"):
            lines += [_memory_run_line(f"With `coarse.max_coarsest_tokens: {bd['max_coarsest_tokens']}` (coarsest QuadTree "
                                       "level bounded)", bd), ""]
    for f in (results[k] for k in ("flops", "flops_default") if k in results):
        precision = " (backbone + coarse transformer in bf16: the default here)" if f.get("feature_dtype") == "bfloat16" else ""
        lines += [f"## FLOPs per stage, quadtree_b_indoor{precision}, {f['hw'][1]}x{f['hw'][0]} ({f['total_gflop']:.1f} GFLOP, "
                  f"{f['total_seconds']:.3f} s)", "", "| stage | GFLOP | s | GFLOP/s | % of matmul rate | GFLOP as direct conv. | "
                  "GFLOP/s as direct conv. |", "|:---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['stage']} | {r['gflop']:.2f} | {r['seconds']:.3f} | {r['gflops']:.1f} | "
                  f"{100 * r['share_of_matmul_rate']:.0f}% ({r.get('reference_rate', 'fp32')}) | "
                  f"{r.get('gflop_direct_conv', r['gflop']):.2f} | {r.get('gflops_direct_conv', r['gflops']):.1f} |" for r in f["rows"]]
        lines += ["", "GFLOP: the matrix products and convolutions run, as torch's FlopCounterMode counts them (Winograd's "
                  "products, and its tile transforms where they run as matrix products, not as additions); as direct "
                  "conv.: with the backbone's convolutions counted as direct ones, the model's nominal arithmetic.", ""]
    if wk := results.get("workers"):
        lines += [f"## Many pairs on the CPU: one process vs `--workers {wk['workers']}` ({wk['pairs']} pairs of "
                  f"{wk['hw'][1]}x{wk['hw'][0]}, shipped model, float32)", "", "| configuration | threads | pairs/s |",
                  "|:---|---:|---:|"]
        for name, rate in wk["pairs_per_second"].items():
            threads = wk["threads"] if name == "one process" else f"{wk['threads_per_worker']} per worker"
            lines.append(f"| {name} | {threads} | {rate:.3f} |")
        lines += ["", f"Worker processes: {wk['speedup']:.2f}x the pairs per second of one process (matches per pair: "
                  f"{', '.join(map(str, wk['matches']))}; workers started and warmed up before the clock).", ""]
    if "gpu" in results:
        lines += ["## Pairs per second (autocast for bf16 / fp16)", "",
                  "| size | configuration | pairs/s | matches | peak MB |", "|:---|:---|---:|---:|---:|"]
        for size, row in results["gpu"].items():
            for k, v in row["seconds"].items():
                peak = row["peak_mb"].get(k)
                lines.append(f"| {size} | {k} | {1 / v:.2f} | {row['matches'][k]} | {'n/a' if peak is None else f'{peak:.0f}'} |")
            lines += [f"| {size} | {k} | failed: {e} | | |" for k, e in row["errors"].items()]
        lines.append("")
    if "winograd" in results:
        w = results["winograd"]
        even = "at no width measured" if w["break_even"] is None else f"from {w['break_even']} channels"
        lines += [f"## Winograd vs direct convolution (one 3x3 layer, C -> C, batch 2, {w['hw'][1]}x{w['hw'][0]}, float32)", "",
                  "| channels | " + " | ".join(f"Winograd, {t} transforms s" for t in TRANSFORM_CHOICES)
                  + f" | direct s | Winograd ({w['transforms_here']}) / direct |",
                  "|---:|" + "---:|" * (len(TRANSFORM_CHOICES) + 2)]
        lines += [f"| {r['channels']} | " + " | ".join(f"{r['seconds'][t]:.4f}" for t in TRANSFORM_CHOICES)
                  + f" | {r['direct_s']:.4f} | {r['ratio']:.2f} |" for r in w["rows"]]
        lines += ["", f"Winograd with this CPU's transforms ({w['transforms_here']}) wins here {even}; the backbone takes it "
                  f"from {w['threshold_here']} channels on this CPU (class {w['cpu_class']}, `matcher.winograd.MIN_CHANNELS` "
                  "and `TRANSFORMS`).", ""]
    if "profile" in results:
        lines += render_profile(results["profile"], results["machine"]["device"])
    lines += ["## Targets", ""]
    if results["quick"]:
        lines += ["Quick run: tiny sizes, not the targets' (a smoke test of this table; statuses n/a).", ""]
    lines += ["| target | value | bound | status |", "|:---|---:|---:|:---|"]
    for desc, key, op, bound in TARGETS:
        v = results["ratios"].get(key)
        status = "n/a (quick)" if results["quick"] else check_target(v, op, bound)
        lines.append(f"| {desc} | {'n/a' if v is None else f'{v:.4g}'} | {op} {bound:.3g} | {status} |")
    return "\n".join(lines) + "\n"


def render_profile(prof: dict[str, Any], device: str) -> list[str]:
    what = "GPU kernels by self device time" if device.startswith("cuda") else "operators by self CPU time"
    lines = [f"## Profile, one {prof['hw'][1]}x{prof['hw'][0]} pair", "",
             f"ours with `inference.feature_dtype: {prof['ours_feature_dtype']}` (the default on this machine)", ""]
    for name, m in prof["models"].items():
        stages = ", ".join(f"{s} {v:.1f}" for s, v in m["stage_ms"].items())
        lines += [f"{name}: {1e3 * m['seconds']:.1f} ms per pair; stages (ms): {stages}", "",
                  f"| {what} | ms | calls |", "|:---|---:|---:|"]
        lines += [f"| {op['name'][:90].replace('|', '/')} | {op['ms']:.2f} | {op['calls']} |" for op in m["top"]]
        lines.append("")
    return lines


def write_report(results: dict[str, Any], out: Path) -> str:
    """Write ``benchmark.json`` and ``benchmark.md`` (ratios of what ``results`` holds) under ``out`` and
    return the Markdown. Called before each section too, so a run stopped early keeps its finished sections
    (``complete`` stays false and the report says so)."""
    results["ratios"] = ratios_of(results)
    markdown = render_markdown(results)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("benchmark.json", json.dumps(results, indent=2, default=float)), ("benchmark.md", markdown)):
        partial = out / f".{name}.partial"  # then renamed: a run killed while writing leaves the last whole file
        partial.write_text(text)
        partial.replace(out / name)
    return markdown


# ----------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and one repetition (a smoke run)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--sections", default="e2e,agreement,attention,matching,memory,winograd,workers,flops,gpu,profile", help="comma-separated subset")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 3, and 5 for the end-to-end and attention sections, whose ratios are targets; quick 1)")
    p.add_argument("--out", default="runs/benchmark", help="folder for benchmark.json and benchmark.md")
    p.add_argument("--system-malloc", action="store_true",
                   help="leave glibc's malloc at its defaults (by default freed blocks are kept for reuse, as the "
                        "command-line tools do: matcher/allocator.py)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        print(json.dumps(child_main(json.loads(args.child))))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device, quick = args.device, args.quick
    repeats = args.repeats or (1 if quick else 3)
    target_repeats = repeats if quick or args.repeats else 5  # sections whose ratios are targets: more runs against noise
    sections = set(args.sections.split(","))
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print(f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU", file=sys.stderr)
        return 2
    bf16 = torch.bfloat16 if (cuda or "avx512" in torch.backends.cpu.get_cpu_capability().lower()) else None
    reuse_memory = not args.system_malloc and reuse_freed_memory()
    results: dict[str, Any] = {"quick": quick, "machine": {**machine_info(device), "reuse_freed_memory": reuse_memory},
                               "repeats": repeats, "complete": False}
    n = 1024 if quick else 2048
    results["matmul_gflops"] = {"fp32": matmul_gflops(device, torch.float32, n)}
    if bf16 is not None:
        results["matmul_gflops"]["bf16"] = matmul_gflops(device, bf16, n)
    e2e_hw = (96, 128) if quick else (480, 640)
    out = Path(args.out)

    def starting(section: str, what: str) -> bool:
        """Whether ``section`` was asked for; if so, first writes the report of the sections before it (a run
        stopped by a time limit keeps what it finished) and says what starts."""
        if section not in sections:
            return False
        write_report(results, out)
        print(f"{what} ...", flush=True)
        return True

    autocasts = [bf16] if bf16 is not None else []
    if cuda:
        autocasts.append(torch.float16)
    # on a GPU the throughput section (the GPU target) runs first: a session's time may run out before the end
    if cuda and starting("gpu", "GPU throughput"):
        results["gpu"] = section_throughput(GPU_SIZES, device, max(repeats, 5), autocasts)
    if starting("e2e", "end to end"):
        results["e2e"] = section_e2e(e2e_hw, device, target_repeats, with_kornia=True, autocast=bf16)
    if (autocasts or device == "cpu") and starting("agreement", "agreement of the faster paths"):
        results["agreement"] = section_agreement(e2e_hw, device, autocasts)
    if starting("attention", "attention"):
        grids = [(8, 8), (16, 16), (32, 32)] if quick else [(60, 80), (120, 160), (240, 320)]
        results["attention"] = section_attention(grids, device, threads, target_repeats, sdpa_budget_s=30 if quick else 300,
                                                  reuse_memory=reuse_memory)
    if starting("matching", "coarse matching"):
        results["matching"] = section_matching([(96, 128), (240, 320)] if quick else [(480, 640), (1200, 1600)], device, repeats)
    if starting("memory", "peak memory"):
        hw = (240, 320) if quick else (1200, 1600)
        spec = {"kind": "pair", "model": "ours", "config": "quadtree_b_indoor", "hw": list(hw), "device": device, "threads": threads,
                "reuse_freed_memory": reuse_memory}
        results["memory"] = {"hw": list(hw), **run_child(spec)}
        if reuse_memory and device == "cpu":  # the live tensors' peak: the reused heap's fragments vary between runs
            results["memory"]["system_malloc"] = run_child({**spec, "reuse_freed_memory": False})
        # the same pair with the coarsest QuadTree level bounded (levels added)
        bound = 20 if quick else MEMORY_BOUND  # quick: 320x240, coarsest 8 x 10 with 3 levels
        results["memory"]["bounded"] = {"max_coarsest_tokens": bound, **run_child({**spec, "max_coarsest_tokens": bound})}
    if device == "cpu" and starting("winograd", "Winograd vs direct convolution by width"):
        widths, hw = ([8, 16, 32], (16, 24)) if quick else ([64, 96, 128, 160, 196, 256], (120, 160))
        results["winograd"] = section_winograd(widths, hw, repeats if quick else max(repeats, 7))
    if starting("flops", "FLOPs per stage"):
        rates = results["matmul_gflops"]
        rates["fp32"] = max(rates["fp32"], matmul_gflops(device, torch.float32, n))
        if cuda:
            rates["tf32"] = matmul_gflops(device, torch.float32, n, tf32=True)
        results["flops"] = section_flops(e2e_hw, device, repeats, rates)
        if resolve_feature_dtype("auto", device) == torch.bfloat16:  # the default here: its stages too
            results["flops_default"] = section_flops(e2e_hw, device, repeats, rates, "bfloat16")
    if device == "cpu" and threads > 1 and starting("workers", "many pairs: one process vs worker processes"):
        results["workers"] = section_workers((96, 128) if quick else e2e_hw, 2 if quick else 8, 2, 1 if quick else 3)
    if starting("profile", "profile"):
        hw = (96, 128) if quick else GPU_SIZES[-1] if cuda else e2e_hw
        results["profile"] = section_profile(hw, device, repeats)
    results["complete"] = True
    print(write_report(results, out))
    print(f"wrote {out / 'benchmark.json'} and {out / 'benchmark.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
