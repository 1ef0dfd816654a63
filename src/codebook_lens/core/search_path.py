"""Which search path is faster on this machine, for a class of shapes: measured once.

The first time a shape class (groups, codes, width, k, similarity, a power-of-two class
of the token count, threads, SIMD level) is searched with enough work to matter, both
paths are timed on the call's own inputs (interleaved, the fastest of three each) and
the faster one is recorded. Records live in ``search-paths.json`` in the kernel's build
directory (one per environment), keyed by the machine's CPU (model and vector
features), and are read back by later processes.

``CODEBOOK_LENS_SEARCH_PATH=kernel|pytorch`` forces a path (``auto``, the default,
measures).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from codebook_lens.core import _native
from codebook_lens.core.cpu import cpu_info

PATHS = ("kernel", "pytorch")
ROUNDS = 3
CACHE_NAME = "search-paths.json"

_choices: dict[tuple[str, str], str] = {}  # memo of the file: (cache file, key) -> path


def forced() -> str | None:
    """The path forced by ``CODEBOOK_LENS_SEARCH_PATH``, or None for a measured choice."""
    value = os.environ.get("CODEBOOK_LENS_SEARCH_PATH", "auto").strip().lower()
    if value in PATHS:
        return value
    if value not in ("", "auto"):
        warnings.warn(
            f"CODEBOOK_LENS_SEARCH_PATH={value!r} is not one of auto, kernel, pytorch; "
            "choosing by measurement",
            RuntimeWarning,
            stacklevel=3,
        )
    return None


def machine_key() -> str:
    """The CPU's model and vector features, e.g. ``AMD EPYC [avx512f avx2 fma]``."""
    info = cpu_info()
    return f"{info.model} [{' '.join(info.features)}]"


def cache_file() -> Path:
    return _native.build_dir()[1] / CACHE_NAME


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, machine: str, key: str, record: dict) -> None:
    """Add one record; the file is replaced atomically (a concurrent writer's record may
    be lost, and is then measured again)."""
    data = _read(path)
    entry = data.get(machine)
    entry = entry if isinstance(entry, dict) else {}
    entry[key] = record
    data[machine] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def recorded(key: str) -> dict | None:
    """The record of a shape class on this machine, if one was measured."""
    record = _read(cache_file()).get(machine_key(), {}).get(key)
    return record if isinstance(record, dict) and record.get("path") in PATHS else None


def choose(key: str, run: dict[str, Callable[[], object]], tokens: int) -> str:
    """The faster path for ``key``: recorded, or measured now with ``run`` (a call per
    path, on inputs of ``tokens`` tokens) and recorded."""
    path = cache_file()
    memo = (str(path), key)
    if memo in _choices:
        return _choices[memo]
    record = recorded(key)
    if record is None:
        times = {name: [] for name in PATHS}
        for fn in run.values():
            fn()  # warm-up
        for _ in range(ROUNDS):
            for name in PATHS:
                start = time.perf_counter()
                run[name]()
                times[name].append(time.perf_counter() - start)
        best = {name: min(t) for name, t in times.items()}
        record = {
            "path": min(PATHS, key=lambda name: best[name]),
            "kernel_s": best["kernel"],
            "pytorch_s": best["pytorch"],
            "tokens": tokens,
            "torch": torch.__version__,
        }
        try:
            _write(path, machine_key(), key, record)
        except OSError:
            pass  # a read-only cache: measure again next time
    _choices[memo] = record["path"]
    return record["path"]
