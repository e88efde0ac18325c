"""matcher.allocator: freed big blocks are reused with warm pages instead of being faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = """
import resource, sys, torch
from matcher.allocator import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "reuse" else None
torch.empty(16 << 20).fill_(1.0)  # 64 MB allocated, written, freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(8 << 20).fill_(1.0)  # 32 MB: fits in the freed block (memalign needs a little more than the size)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_reuse_freed_memory_avoids_page_faults_on_reallocation():
    applied, faults_reused = _page_faults("reuse")
    _, faults_default = _page_faults("default")
    assert applied == "True"
    assert faults_default > 4000  # 32 MB of 4 kB pages mapped afresh (8,192 without huge pages)
    assert faults_reused < 500  # pages of the freed block, already in place
