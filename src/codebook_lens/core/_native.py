"""The optional compiled search kernel (csrc/search.cpp), built on first use.

The kernel computes the similarity in cache-sized tiles and keeps a running top-k,
so the token x code score matrix never goes to memory. It is compiled with the
machine's C++ compiler through ``torch.utils.cpp_extension`` (cached under
``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``, in a directory
named by a hash of the source, so checkouts never rebuild over each other). If it cannot
be built, the pure-PyTorch search is used and a warning says why.
Set ``CODEBOOK_LENS_NATIVE=0`` to never build or use it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import warnings
from functools import lru_cache
from pathlib import Path

SOURCE = Path(__file__).parent / "csrc" / "search.cpp"


def enabled() -> bool:
    return os.environ.get("CODEBOOK_LENS_NATIVE", "1") not in ("0", "false", "no", "off")


FLAGS = ["-O3", "-march=native"]
STALE_LOCK_S = 180  # a build takes well under a minute; an older lock was left by a killed build


def build_dir() -> tuple[str, Path]:
    """(module name, build directory), both keyed by the source, flags and torch version, so
    a changed source or checkout never rebuilds over another one's files."""
    import torch

    digest = hashlib.sha256(
        SOURCE.read_bytes() + " ".join(FLAGS).encode() + torch.__version__.encode()
    )
    name = f"codebook_lens_search_{digest.hexdigest()[:12]}"
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    return name, root / name


@lru_cache(maxsize=1)
def load():
    """The compiled module, or None when it is disabled or cannot be built."""
    if not enabled():
        return None
    try:
        from torch.utils.cpp_extension import load as build

        name, directory = build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        lock = directory / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink(missing_ok=True)  # left by a build that was killed; waiting would hang
        source = directory / SOURCE.name
        if not source.is_file() or source.read_bytes() != SOURCE.read_bytes():
            shutil.copyfile(SOURCE, source)
        return build(
            name=name,
            sources=[str(source)],
            extra_cflags=FLAGS,
            build_directory=str(directory),
            verbose=False,
        )
    except Exception as err:  # no compiler, no ninja, ...: fall back, say so once
        warnings.warn(
            f"codebook-lens: the fused search kernel could not be built ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[-1] if str(err).strip() else err}); "
            "using the PyTorch search, which is slower on the CPU",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
