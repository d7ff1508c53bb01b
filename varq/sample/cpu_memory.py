"""Opt-in: let glibc keep freed memory for reuse, so large CPU tensors stop paying page faults on every allocation.

PyTorch's CPU allocator hands large tensors to glibc, which serves anything above its mmap threshold (at most
32 MiB) with a fresh ``mmap`` and returns it on free; every new activation of that size then page-faults on first
touch. Writing a fresh 32 MiB tensor costs several times the arithmetic on it (measured here: an out-of-place
division 37–70 ms, in place 3–8 ms, single thread). With mmap switched off and trimming raised, freed blocks stay
in the heap and are reused. Values are unchanged; memory is returned to the OS only at exit.

This changes the allocator of the whole process, so a library call never switches it: the command-line run
(``python -m varq.run``, on a CPU device, unless ``reuse_freed_memory=false``) and ``python -m varq.bench
--reuse-freed-memory`` do, and a user of the Python API may (before the first large allocation).

Measured (d16, fp32, batch 4, one thread, `results/bench/bench_cpu_d16_reuse.json`): FP sampling 30.3 s per batch
against 32–34 s, and ours W4A4 fake quantization 1.23× FP against 1.31×: most of the quantizers' CPU overhead was
page faults on their fresh full-size temporaries (a fresh fp32 copy of the (8, 16, 256, 680) attention logits: 48 ms,
29 ms with this on, 12 ms into a reused buffer).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory", "reuse_for_run"]

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


def reuse_for_run(enabled: bool, device_type: str) -> bool:
    """The command-line run's choice (``reuse_freed_memory``): keep freed memory on CPU devices; True when it is on.

    CUDA runs are left alone: their activations live in PyTorch's caching allocator, which already reuses blocks.
    """
    if not enabled or device_type != "cpu":
        return False
    return keep_freed_memory()
