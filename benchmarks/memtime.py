"""Timing and peak-memory measurement shared by the benchmark scripts.

Standalone on purpose (standard library only): the peer benchmarks import it inside
virtual environments that do not have codebook-lens installed.

Peak memory is the rise of the process's resident-set high-water mark (VmHWM) over
its resident set just before the call, after resetting the mark through
/proc/self/clear_refs. It therefore counts every allocation the call makes (PyTorch's
CPU allocator returns large blocks to the system), and nothing allocated before it.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _trim_heap() -> None:
    """Give freed heap memory back to the system, so that a later call's allocations show
    up in the resident set again instead of reusing pages already counted."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def peak_extra_mib(fn: Callable[[], object]) -> float:
    """MiB of resident memory the call adds at its peak."""
    gc.collect()
    _trim_heap()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the high-water mark to the current resident set
    before = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    return max(0, peak - before) / 1024


def measure(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> dict:
    """Median and fastest wall time over ``repeats`` calls (after ``warmup``) and the peak
    extra memory. On a shared machine other load only ever adds time, so the fastest call
    is the steadier figure."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {
        "time_s": statistics.median(times),
        "min_s": min(times),
        "times_s": times,
        "peak_extra_mib": peak_extra_mib(fn),
    }
