"""matcher/chunking.py: chunk slices and the assembly of per-chunk results."""

from __future__ import annotations

import pytest
import torch

from matcher.chunking import ChunkedOutputs, chunk_slices


@pytest.mark.parametrize("total,size", [(10, 3), (9, 3), (2, 5), (0, 4), (5, 0)])
def test_chunk_slices_cover_the_range_once_in_order(total, size):
    slices = chunk_slices(total, size)
    covered = [i for sl in slices for i in range(total)[sl]]
    assert covered == list(range(total))
    assert all(0 < sl.stop - sl.start <= max(1, size) for sl in slices)


def test_chunked_outputs_assemble_chunks_along_a_dim():
    g = torch.Generator().manual_seed(0)
    values, indices = torch.randn(2, 7, 3, generator=g), torch.randint(0, 9, (2, 7), generator=g)
    out = ChunkedOutputs(7, dim=1)
    for sl in chunk_slices(7, 3):
        out.add((values[:, sl], None, indices[:, sl]), sl)
    got_values, nothing, got_indices = out.result()
    assert nothing is None
    assert torch.equal(got_values, values) and torch.equal(got_indices, indices)
    assert got_values.data_ptr() != values.data_ptr()  # assembled in a buffer of its own


def test_one_chunk_is_kept_as_it_is():
    values = torch.randn(4, 5)
    out = ChunkedOutputs(4, dim=0)
    out.add((values, None), slice(0, 4))
    got, nothing = out.result()
    assert got is values and nothing is None


def test_under_tracing_chunks_are_concatenated():
    """ONNX export traces the model: there the pieces are concatenated (tests/test_export.py checks the
    exported graph's results)."""
    modes = []

    def assemble(x: torch.Tensor) -> torch.Tensor:
        out = ChunkedOutputs(x.shape[0], dim=0)
        modes.append(out.concatenate)
        for sl in chunk_slices(x.shape[0], 2):
            out.add((x[sl] * 2,), sl)
        return out.result()[0]

    x = torch.arange(5.0)
    with pytest.warns(torch.jit.TracerWarning):  # chunk sizes from shapes: fixed in the trace, as in the export
        traced = torch.jit.trace(assemble, (x,), check_trace=False)
    assemble(x)  # eager
    assert modes == [True, False]
    assert torch.equal(traced(x + 1), (x + 1) * 2)
