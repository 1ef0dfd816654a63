"""The optional compiled kernels (csrc/: the search, the codes' gradient), built on first use.

The kernel computes the similarity in cache-sized tiles and keeps a running top-k, so
the token x code score matrix never goes to memory. It is compiled with the machine's
C++ compiler through ``torch.utils.cpp_extension``, without ``-march``: its SIMD scans
(AVX-512, AVX2 + FMA, plain C++) are compiled side by side and one is chosen at run
time from the CPU's features, so a build made on one machine runs on another.

Where it is built: ``$TORCH_EXTENSIONS_DIR`` (by default ``~/.cache/torch_extensions``)
holds one directory per environment, named by a hash of the source, the compiler flags,
the torch and Python versions and ``sys.prefix``: two virtual environments never share
(and rebuild) one build. There is no lock: a process that finds no built module
compiles in a private temporary directory beside it and moves the finished library into
place with an atomic rename, so a killed build leaves only its private directory
(removed by a later load once it is an hour old) and never makes another process wait.
If the kernel cannot be built, the PyTorch search is used and a warning says why.

Environment variables:

- ``CODEBOOK_LENS_NATIVE=0``: never build or use the kernel.
- ``CODEBOOK_LENS_SIMD=avx512|avx2|scalar``: use this SIMD scan instead of the best one
  the CPU supports (to measure one against another on the same machine); a level the
  CPU lacks is refused with a warning and the best supported one is used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import time
import warnings
from functools import lru_cache
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(CSRC / name for name in ("search.cpp", "scatter.cpp", "module.cpp"))
# -ffp-contract=off: the float64 rescoring must round exactly as the PyTorch path does;
# -fopenmp: at::parallel_for is an OpenMP loop compiled into the extension (without it,
# it runs on one thread); the library links libgomp.so.1, the one torch has loaded
FLAGS = ("-O3", "-ffp-contract=off", "-fopenmp")
LDFLAGS = ("-fopenmp",)
SIMD_LEVELS = ("scalar", "avx2", "avx512")  # index = the kernel's level number
STALE_BUILD_S = 3600  # a private build directory older than this was left by a killed build


def enabled() -> bool:
    return os.environ.get("CODEBOOK_LENS_NATIVE", "1") not in ("0", "false", "no", "off")


def build_dir() -> tuple[str, Path]:
    """(module name, build directory), both keyed by the source, the flags, the torch and
    Python versions and the environment (``sys.prefix``)."""
    import torch

    parts = [
        *(source.read_bytes() for source in SOURCES),
        " ".join(FLAGS + LDFLAGS).encode(),
        torch.__version__.encode(),
        sys.version.encode(),
        str(Path(sys.prefix).resolve()).encode(),
        os.environ.get("CXX", "c++").encode(),
    ]
    digest = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    name = f"codebook_lens_search_{digest}"
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    return name, root / name


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _clean(directory: Path) -> None:
    """Remove what killed builds left: private build directories older than an hour, and
    the lock files that older versions of this loader kept in the build directory."""
    lock = directory / "lock"
    if lock.is_file():
        lock.unlink(missing_ok=True)
    now = time.time()
    for leftover in directory.parent.glob(f"{directory.name}.build-*"):
        try:
            if now - leftover.stat().st_mtime > STALE_BUILD_S:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def _build(name: str, directory: Path) -> object:
    """Compile in a private directory, then move the library into ``directory``."""
    import torch  # noqa: F401  (the extension links against the loaded libtorch)
    from torch.utils.cpp_extension import load as build

    private = Path(tempfile.mkdtemp(prefix=f"{directory.name}.build-", dir=directory.parent))
    try:
        sources = [private / source.name for source in SOURCES]
        for source, copy in zip(SOURCES, sources, strict=True):
            shutil.copyfile(source, copy)
        module = build(
            name=name,
            sources=[str(source) for source in sources],
            extra_cflags=list(FLAGS),  # copies: the builder appends to the lists it gets
            extra_ldflags=list(LDFLAGS),
            build_directory=str(private),
            verbose=False,
        )
        os.replace(private / f"{name}.so", directory / f"{name}.so")  # atomic
        return module
    finally:
        shutil.rmtree(private, ignore_errors=True)


@lru_cache(maxsize=1)
def load():
    """The compiled module, or None when it is disabled or cannot be built."""
    if not enabled():
        return None
    try:
        import torch  # noqa: F401  (loads libtorch, which the library links against)

        name, directory = build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        _clean(directory)
        library = directory / f"{name}.so"
        if library.is_file():
            try:
                return _import(name, library)
            except ImportError:
                pass  # damaged: build it again and replace it
        return _build(name, directory)
    except Exception as err:  # no compiler, no ninja, ...: fall back, say so once
        warnings.warn(
            f"codebook-lens: the fused search kernel could not be built ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[-1] if str(err).strip() else err}); "
            "using the PyTorch search, which is slower on the CPU",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def simd_level(kernel) -> int:
    """The SIMD scan to use: the best the CPU supports, or ``CODEBOOK_LENS_SIMD``."""
    best = int(kernel.simd_supported())
    wanted = os.environ.get("CODEBOOK_LENS_SIMD", "").strip().lower()
    if not wanted or wanted == "auto":
        return best
    if wanted not in SIMD_LEVELS:
        warnings.warn(
            f"CODEBOOK_LENS_SIMD={wanted!r} is not one of auto, {', '.join(SIMD_LEVELS)}; "
            f"using {SIMD_LEVELS[best]}",
            RuntimeWarning,
            stacklevel=2,
        )
        return best
    level = SIMD_LEVELS.index(wanted)
    if level > best:
        warnings.warn(
            f"CODEBOOK_LENS_SIMD={wanted} is not supported by this CPU; using {SIMD_LEVELS[best]}",
            RuntimeWarning,
            stacklevel=2,
        )
        return best
    return level
