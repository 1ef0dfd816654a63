"""The optional compiled search kernel (csrc/search.cpp), built on first use.

The kernel computes the similarity in cache-sized tiles and keeps a running top-k,
so the token x code score matrix never goes to memory. It is compiled with the
machine's C++ compiler through ``torch.utils.cpp_extension`` (cached under
``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``). If it cannot
be built, the pure-PyTorch search is used and a warning says why.
Set ``CODEBOOK_LENS_NATIVE=0`` to never build or use it.
"""

from __future__ import annotations

import os
import warnings
from functools import lru_cache
from pathlib import Path

SOURCE = Path(__file__).parent / "csrc" / "search.cpp"


def enabled() -> bool:
    return os.environ.get("CODEBOOK_LENS_NATIVE", "1") not in ("0", "false", "no", "off")


@lru_cache(maxsize=1)
def load():
    """The compiled module, or None when it is disabled or cannot be built."""
    if not enabled():
        return None
    try:
        from torch.utils.cpp_extension import load as build

        return build(
            name="codebook_lens_search",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native"],
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
