"""Keep freed memory in the process for the next training step instead of unmapping it (glibc only).

A training step allocates its activations and gradients afresh and frees them when the step ends. glibc
serves every buffer above its mmap threshold (32 MiB at most, by default) with a fresh mapping and unmaps it
on free, so each step writes to brand-new pages: one page fault and one kernel zeroing per 4 KiB. Raising the
mmap and trim thresholds keeps such buffers on the heap, where the next step finds them mapped already. The
PyTorch CPU performance guide reaches the same end with jemalloc or tcmalloc; this needs no extra library.
"""

from __future__ import annotations

import ctypes
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LARGEST = 2**31 - 1  # mallopt's value is a C int: buffers above 2 GiB still get their own mapping


def reuse_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed buffers of up to 2 GiB for reuse; True when applied.

    Process-wide and permanent, so only training entry points call it (`train.reuse_freed_memory`, on by
    default). The cost is a process that returns less memory to the OS between steps. On other C libraries
    (macOS, musl, Windows) nothing changes and it returns False.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _LARGEST)) and bool(mallopt(_M_TRIM_THRESHOLD, _LARGEST))
