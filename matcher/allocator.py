"""Process-wide malloc tuning for CPU inference and training.

glibc's malloc hands every block above its mmap threshold (at most 32 MB by default) to the kernel on
``free`` and maps a fresh one on the next allocation, whose pages are then faulted in and zeroed one by one
on first touch. A matcher's feature maps and attention temporaries are tens of MB each and are allocated
and freed over and over, so this costs about 10% of a CPU pair at 640x480 (kornia's LoFTR alike) and 25%
of a 1600x1200 pair. Keeping freed blocks in the heap instead makes them reusable with warm pages.

The price: the heap fragments (a 1600x1200 pair peaks at 4.2 instead of 3.1 GB) and stays at its peak
size. The setting is process-wide, so the library never applies it on its own: the command-line tools
(demo, match_pairs, evaluation, benchmark) call :func:`reuse_freed_memory` at start-up, and a Python user
may call it once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

#: ``mallopt`` parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Blocks up to this size come from the reusable heap (larger ones are still mapped separately).
MMAP_THRESHOLD_BYTES = 1 << 30

#: Free memory at the top of the heap is returned to the kernel only beyond this much (mallopt takes an
#: int: 2 GB is its largest value).
TRIM_THRESHOLD_BYTES = (1 << 31) - 1


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks up to 1 GB for reuse instead of unmapping them.

    Returns:
        True when applied; False where the C library is not glibc (macOS, Windows, musl), which is left as is.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
