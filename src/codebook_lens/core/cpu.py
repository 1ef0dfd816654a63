"""The CPU a run is timed on: its model name and the vector instructions it offers.

Timings on the CPU depend on the vector units the matrix kernels can use: the same
2-core machine kind runs the TokFSM demo about 2.5 times slower with AVX2 alone than
with AVX-512. :func:`cpu_info` reads them from ``/proc/cpuinfo`` (Linux) so that a
timing can say which kind of machine it was measured on; :func:`describe_cpu` gives
the one line that the demo and the benchmarks print.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

# the flags that decide how fast the matrix kernels run, widest first
VECTOR_FLAGS: tuple[str, ...] = ("avx512f", "avx2", "fma")

CPUINFO = Path("/proc/cpuinfo")


@dataclasses.dataclass(frozen=True)
class CPUInfo:
    """``model``: the model name ("unknown" when not reported); ``features``: the
    :data:`VECTOR_FLAGS` the CPU has, in that order; ``cores``: logical CPUs this
    process may run on; ``known``: whether the flags could be read at all."""

    model: str
    features: tuple[str, ...]
    cores: int
    known: bool = True

    @property
    def kind(self) -> str:
        """The widest vector unit by name: "AVX-512", "AVX2" or "no AVX2" ("unknown"
        when the flags could not be read)."""
        if not self.known:
            return "unknown"
        if "avx512f" in self.features:
            return "AVX-512"
        return "AVX2" if "avx2" in self.features else "no AVX2"


def parse_cpuinfo(text: str, cores: int) -> CPUInfo:
    """The :class:`CPUInfo` of a ``/proc/cpuinfo`` text (its first processor entry;
    ``flags`` on x86, ``Features`` on ARM)."""
    model, flags, known = "unknown", set(), False
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key == "model name" and model == "unknown":
            model = " ".join(value.split())
        elif key in ("flags", "features") and not known:
            flags, known = set(value.split()), True
    features = tuple(flag for flag in VECTOR_FLAGS if flag in flags)
    return CPUInfo(model=model, features=features, cores=cores, known=known)


def cpu_info(path: Path = CPUINFO) -> CPUInfo:
    """The CPU this process runs on (flags unknown where ``path`` cannot be read)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return CPUInfo(model="unknown", features=(), cores=cores, known=False)
    return parse_cpuinfo(text, cores)


def describe_cpu(info: CPUInfo | None = None) -> str:
    """One line: model, cores and vector features, e.g. ``AMD EPYC 9B14, 2 cores,
    AVX-512 (avx512f avx2 fma)``."""
    info = cpu_info() if info is None else info
    flags = " ".join(info.features) if info.features else "none of " + " ".join(VECTOR_FLAGS)
    if not info.known:
        flags = "flags not readable"
    return f"{info.model}, {info.cores} cores, {info.kind} ({flags})"
