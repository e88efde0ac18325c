"""What the optional Triton kernels share: the guarded import and the interpreter switch.

Triton is optional: without it (or on CPU tensors) every kernel has a PyTorch path, which stays the
reference. With ``TRITON_INTERPRET=1`` set before triton is imported, kernels also run on CPU tensors in
Triton's interpreter (slowly): that is how the tests check them on machines without a GPU.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch paths need none of this
    triton = tl = None

# Kernel parameters annotated ``constexpr`` are compile-time constants. The annotations stay unevaluated
# strings (postponed annotations), which is the form both the compiler and the interpreter recognise.
constexpr = None if tl is None else tl.constexpr

#: Tensor dtypes the kernels take; they compute in float32, so float64 stays on the PyTorch paths.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def kernel_device(x: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on ``x``: triton installed, a kernel dtype, a CUDA tensor (or any
    tensor under the interpreter), and no tracing (an ONNX export cannot hold a Triton kernel)."""
    if triton is None or x.dtype not in KERNEL_DTYPES or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    return x.device.type == "cuda" or interpreting()


#: How a stage that has a Triton kernel runs: ``auto`` (the kernel on CUDA where it can run there, else
#: PyTorch), ``torch`` or ``triton`` (forced; an error where it cannot run).
KERNELS = ("auto", "torch", "triton")


def check_kernel_choice(kernel: str) -> None:
    """One clear error for a ``kernel`` setting outside :data:`KERNELS`."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def use_kernel(kernel: str, possible: bool, device: torch.device, requirements: str) -> bool:
    """Whether a stage runs its Triton kernel under the setting ``kernel`` (:data:`KERNELS`); ``possible``:
    whether the kernel can run on these inputs, ``requirements``: the error for a forced one that cannot."""
    check_kernel_choice(kernel)
    if kernel == "triton" and not possible:
        raise ValueError(requirements)
    return possible and (kernel == "triton" or (kernel == "auto" and device.type == "cuda"))


@functools.lru_cache(maxsize=None)
def _jit(fn, interpret: bool):
    return triton.jit(fn)


def jit_kernel(fn):
    """``triton.jit(fn)``, made on first use and cached: triton.jit reads TRITON_INTERPRET when it wraps."""
    return _jit(fn, interpreting())
