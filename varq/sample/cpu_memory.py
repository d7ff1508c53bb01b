"""Opt-in: let glibc keep freed memory for reuse, so large CPU tensors stop paying page faults on every allocation.

PyTorch's CPU allocator hands large tensors to glibc, which serves anything above its mmap threshold (at most
32 MiB) with a fresh ``mmap`` and returns it on free; every new activation of that size then page-faults on first
touch. Writing a fresh 32 MiB tensor costs several times the arithmetic on it (measured here: an out-of-place
division 37–70 ms, in place 3–8 ms, single thread). With mmap switched off and trimming raised, freed blocks stay
in the heap and are reused. Values are unchanged; memory is returned to the OS only at exit.

This changes the allocator of the whole process, so nothing calls it implicitly: ``python -m varq.bench
--reuse-freed-memory`` does, and a user may (before the first large allocation).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Switch glibc's mmap allocations off and its heap trimming (almost) off; False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
