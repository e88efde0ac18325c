"""Process-wide malloc tuning for CPU inference and training.

glibc's malloc hands every block above its mmap threshold (at most 32 MB by default) to the kernel on
``free`` and maps a fresh one on the next allocation, whose pages are then faulted in and zeroed one by one
on first touch. A matcher's feature maps and attention temporaries are tens to hundreds of MB each and are
allocated and freed over and over. Keeping freed blocks in the heap makes them reusable with warm pages:
on the 2-core reference machine a 640x480 pair takes 2.56 instead of 3.10 s (kornia's LoFTR: 2.78 instead
of 5.05 s), the first 1600x1200 pair 32 instead of 39 s, and the backbone on later 1600x1200 pairs 7.7
instead of 11 s.

The price: the heap fragments and stays at its peak size. A 1600x1200 pair peaked at 4.0 instead of 3.1 GB
in that comparison; on an AMD EPYC Zen 1, since the backbone frees its maps early, at 2.43-2.91 GB against
1.72-1.77 GB with malloc's defaults. With reuse the peak also varies between identical runs in fresh
processes, as the fragmentation depends on the order of allocations (by up to 0.9 GB in seven runs before
the backbone change). The setting is process-wide, so the library never applies it on its own: the
command-line tools (demo, match_pairs, evaluation, benchmark) call :func:`reuse_freed_memory` at start-up,
and a Python user may call it once.
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

#: Never return free memory at the top of the heap to the kernel (mallopt(3): -1 disables trimming; any
#: finite value is an int, at most 2 GB, which a 1600x1200 pair's freed maps exceed, so they were trimmed
#: and faulted in again on every pair).
TRIM_THRESHOLD_BYTES = -1


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks up to 1 GB for reuse instead of unmapping them, and never
    shrink the heap.

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
