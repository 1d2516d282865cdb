"""glibc allocator settings for merges that stream row blocks.

A row-block merge frees and allocates the same few block-sized buffers thousands of times. With glibc's defaults
each freed buffer above the mmap threshold goes back to the kernel and is faulted in again on the next block: on
the Nemo-shaped benchmark most of della_linear's CPU time was page-fault system time. One arena, no mmap for
blocks and no trimming keep the buffers in the heap and reuse them. Whole-tensor merges allocate tensors of many
sizes, and a heap that never shrinks fragments: they keep the defaults.

`mallopt` changes these settings in the running process, so the command never restarts itself to set them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -2, -3, -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, 1 << 30), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 1 << 29))


def reuse_freed_blocks() -> bool:
    """Apply SETTINGS to this process (glibc Linux only; MERGESMITH_MALLOC=0 opts out). True when applied."""
    if not sys.platform.startswith("linux") or os.environ.get("MERGESMITH_MALLOC", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS)
