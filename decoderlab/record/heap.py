"""Large host allocations straight from the operating system, so that a long run's heap does not fragment.

Why: glibc's malloc serves an allocation from its heap unless it is larger than the mmap threshold, and it raises
that threshold each time a large block is freed (up to 32 MiB). A decode step on the CPU frees and allocates
blocks of a few hundred KiB (the KV cache grows by a position, the logits and their processed copies are a
vocabulary wide), soon all served from the heap; the recording's small per-step tensors, kept between them, pin
the holes, so the heap grows where plain `generate` reuses its blocks. Measured on the default model over 1,500
greedy steps with `Record()` (`benchmarks/bench_memory.py`): peak RSS growth 2.9x plain generate's; with the
threshold fixed at 64 KiB, 1.0x. A fixed threshold turns off glibc's raising of it, so blocks of 64 KiB and more
are mapped and unmapped (a system call each: microseconds, where a CPU step takes tens of milliseconds).

Set once per process, on Linux with glibc; elsewhere (musl, macOS, Windows) nothing changes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

MMAP_THRESHOLD = 64 * 1024  # bytes: blocks at least this large come from mmap
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_done: bool | None = None


def keep_large_allocations_apart() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD (once per process); whether it is fixed."""
    global _done
    if _done is None:
        _done = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = getattr(libc, "mallopt", None)
                _done = bool(mallopt and getattr(libc, "gnu_get_libc_version", None) and
                             mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1)
            except OSError:
                pass
    return _done
