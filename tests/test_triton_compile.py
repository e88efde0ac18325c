"""The Triton kernels compiled ahead of time for NVIDIA GPUs, on any machine (no GPU needed).

Triton's interpreter (the other kernel tests on machines without a GPU) runs the kernels' logic but accepts
code that only the compiler rejects (a global that is not a constexpr, a construct the GPU backend lacks).
Here the wrappers run on small CPU tensors with their launches captured, and every launch they make is
compiled with the real argument types and compile-time constants for an A100 (sm_80) and an H100 (sm_90).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import matcher.conv_triton as ct
import matcher.matching_triton as mt
import matcher.quadtree_triton as qt
from matcher.triton_support import triton

TARGETS = [80, 90]  # compute capabilities
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8", torch.int32: "i32",
         torch.int64: "i64"}


def _nvidia_backend() -> bool:
    """Whether this triton can compile for NVIDIA GPUs here: its NVIDIA backend with ptxas, and the
    ``ASTSource(fn, signature, constexprs)`` interface this test uses."""
    if triton is None:
        return False
    try:
        from triton.compiler import ASTSource
    except ImportError:
        return False
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return ptxas.exists() and "constexprs" in inspect.signature(ASTSource).parameters


pytestmark = pytest.mark.skipif(not _nvidia_backend(), reason="no triton with its NVIDIA backend (ptxas) here")

# Compiles in a fresh interpreter: with TRITON_INTERPRET=1 set at import (tests/conftest.py does on machines
# without a GPU), triton's language functions are wrapped for the interpreter and cannot compile.
COMPILE_CHILD = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
specs, targets = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for spec in specs:
    fn = getattr(importlib.import_module(spec["module"]), spec["name"])
    for capability in targets:
        source = ASTSource(fn=JITFunction(fn), signature=spec["signature"], constexprs=spec["constexprs"])
        kernel = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": spec["num_warps"]})
        assert kernel.asm.get("cubin"), (spec["name"], capability)
        print("compiled", spec["name"], "sm_%d" % capability, flush=True)
"""


@pytest.fixture
def launches(monkeypatch) -> list:
    """The kernels' launches ``(fn, args, kwargs)``, recorded instead of run (the wrappers take CPU tensors
    as they do under the interpreter)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    records = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: records.append((self.fn, args, kwargs))

    for module in (qt, ct, mt):
        monkeypatch.setattr(module, "jit_kernel", Recorder)
    return records


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _compile_all(records: list) -> int:
    """Compile every distinct launch for every target (in a child process); returns how many compiled."""
    specs = {}
    for fn, args, kwargs in records:
        kwargs = dict(kwargs)
        num_warps = kwargs.pop("num_warps", 4)
        names = list(inspect.signature(fn).parameters)
        signature = {name: _arg_type(a) for name, a in zip(names, args)}
        signature.update({name: "constexpr" for name in kwargs})
        assert set(signature) == set(names), f"{fn.__name__}: the launch does not bind every parameter"
        spec = {"module": fn.__module__, "name": fn.__name__, "signature": signature, "constexprs": kwargs,
                "num_warps": num_warps}
        specs[json.dumps(spec, sort_keys=True)] = spec
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE_CHILD, json.dumps(list(specs.values())), json.dumps(TARGETS)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.count("compiled ")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quadtree_and_mlp_kernels_compile_for_nvidia_gpus(launches, dtype):
    g = torch.Generator().manual_seed(0)
    grid = lambda b, h, w: torch.randn(b, 2, h, w, 32, generator=g).to(dtype)  # noqa: E731  (B, H, h, w, D)
    q, k, v = grid(1, 4, 6), grid(1, 4, 4), grid(1, 4, 4)
    parents = torch.randint(0, 4, (1, 2, 6, 3), generator=g)  # 3 of the 2x2 parent keys per parent query
    mask = torch.rand(1, 4, 4, generator=g) > 0.2
    coarse = torch.randn(1, 2, 6, 32, generator=g).to(dtype)
    mix = torch.tensor(0.5, dtype=dtype)
    for select, key_mask in ((False, None), (True, mask)):  # the finest level, and one that selects, masked
        qt.fused_refine_b(q, k, v, key_mask, parents, coarse, mix, 5, 0.2, select)
    hidden = torch.randn(2, 24, 64, generator=g).to(dtype)
    weight, bias = torch.randn(64, 1, 3, 3, generator=g), torch.randn(64, generator=g)
    for token_mask in (None, torch.rand(2, 24, generator=g) > 0.2):
        ct.relu_dwconv_gelu(hidden, (4, 6), weight, bias, token_mask)
    assert {fn.__name__ for fn, _, _ in launches} == {"_refine_b", "_relu_dwconv_gelu"}
    assert _compile_all(launches) == 4 * len(TARGETS)


def test_matching_kernels_compile_for_nvidia_gpus(launches):
    g = torch.Generator().manual_seed(1)
    sim = torch.randn(2, 40, 70, generator=g)
    row_lse, col_max, col_sum = mt.similarity_log_sum_exps(sim)
    col_lse = mt.combine_column_lse(col_max, col_sum)
    valid = lambda n: torch.rand(2, n, generator=g) > 0.2  # noqa: E731
    for row_valid, col_valid in ((None, None), (valid(40), valid(70))):
        mt.log_confidence_maxima(sim, row_lse, col_lse, row_valid, col_valid)
    assert [fn.__name__ for fn, _, _ in launches] == ["_lse_pass", "_best_pass", "_best_pass"]
    assert _compile_all(launches) == 3 * len(TARGETS)
