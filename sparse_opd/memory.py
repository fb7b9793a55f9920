"""Keep streaming loops at the memory of one item: return freed heap pages to the OS after each one."""

from __future__ import annotations

import ctypes

_TRIM = None


def release_freed_memory() -> None:
    """``malloc_trim(0)`` on glibc (a no-op elsewhere).

    Loops that free multi-MiB transients while keeping small results leave glibc's freed pages pinned between the
    kept allocations, so the process grows by a few MiB per item; trimming after each item keeps the peak near one
    item plus the results (measured in benchmarks/mask_diff_bench.py and analysis_bench.py).
    """
    global _TRIM
    if _TRIM is None:
        try:
            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)
