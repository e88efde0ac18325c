"""Working in chunks of bounded size: the slices, and per-chunk results assembled into whole tensors."""

from __future__ import annotations

import torch


def is_tracing() -> bool:
    """Whether the code runs under ``torch.jit.trace`` or ONNX export, where data-dependent control flow and
    copies into preallocated buffers would not be recorded."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def cpu_inference(*tensors: torch.Tensor | None) -> bool:
    """Whether CPU-only inference shortcuts may replace the plain torch ops: the tensors are on the CPU, none
    needs a gradient, and the code is neither traced for export nor compiled."""
    first = next(t for t in tensors if t is not None)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return first.device.type == "cpu" and not needs_grad and not is_tracing() and not torch.compiler.is_compiling()


def chunk_slices(total: int, size: int) -> list[slice]:
    """Slices of at most ``size`` (at least 1) items covering ``range(total)``."""
    size = max(1, size)
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


class ChunkedOutputs:
    """Whole tensors assembled from per-chunk result tuples (None entries allowed) along ``dim``.

    Chunks are copied into outputs allocated at the first chunk: keeping the pieces and concatenating
    them at the end lets small long-lived pieces split the freed chunk temporaries in the heap (that made
    the QuadTree layer at 76,800 tokens grow by gigabytes on CPU). Under tracing (ONNX export) the pieces
    are concatenated instead, since a traced graph does not follow copies into preallocated buffers. The
    results of a single chunk covering everything are kept as they are.
    """

    def __init__(self, total: int, dim: int) -> None:
        self.total, self.dim = total, dim
        self.concatenate = is_tracing()
        self.pieces: list[tuple] = []
        self.outputs: tuple | None = None

    def add(self, results: tuple, sl: slice) -> None:
        """Results of the items ``sl`` (each tensor of size ``sl.stop - sl.start`` along ``dim``)."""
        if self.concatenate:
            self.pieces.append(results)
            return
        if self.outputs is None and sl.start == 0 and sl.stop == self.total:  # one chunk: nothing to assemble
            self.outputs = tuple(results)
            return
        if self.outputs is None:
            d = self.dim
            self.outputs = tuple(None if r is None else r.new_empty((*r.shape[:d], self.total, *r.shape[d + 1:])) for r in results)
        for out, r in zip(self.outputs, results):
            if r is not None:
                out.narrow(self.dim, sl.start, sl.stop - sl.start).copy_(r)

    def result(self) -> tuple:
        if not self.concatenate:
            return self.outputs
        return tuple(None if f[0] is None else torch.cat(f, self.dim) for f in zip(*self.pieces))
