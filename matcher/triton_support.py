"""What the optional Triton kernels share: the guarded import and the interpreter switch.

Triton is optional: without it (or on CPU tensors) every kernel has a PyTorch path, which stays the
reference. With ``TRITON_INTERPRET=1`` set before triton is imported, kernels also run on CPU tensors in
Triton's interpreter (slowly): that is how the tests check them on machines without a GPU.
"""

from __future__ import annotations

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
