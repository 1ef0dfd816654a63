"""Files the project writes: where an output may go, and with which permissions.

Every command that writes checks its output path before it does any work (a run of
minutes should not end on "is a directory"): :func:`check_output_file` for a file,
:func:`check_output_dir` for a directory. Both raise a :class:`CodebookLensError`
naming the path and what is wrong with it.

safetensors writes its files readable by their owner only (mode 0600), while
everything else the project writes follows the process's umask (0644 under the usual
umask 022); :func:`save_safetensors` and :func:`make_readable` give safetensors files
the same mode as the rest, so that a model or a cache shared with others opens for them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from codebook_lens.core.errors import CodebookLensError

if TYPE_CHECKING:
    import torch


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_readable(path: str | Path) -> None:
    """Give a file the mode a plain ``open(path, "w")`` would have given it (0666 less
    the umask)."""
    os.chmod(path, 0o666 & ~_umask())


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """``safetensors.torch.save_file`` with the mode of every other file written."""
    from safetensors.torch import save_file  # loads PyTorch: only when writing tensors

    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    make_readable(path)
    return path


def _first_file_above(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` that is not a directory, if any."""
    for parent in path.absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_output_file(path: str | Path, what: str = "output file") -> Path:
    """``path`` as a place to write a file: not a directory, and no file where a parent
    directory has to be."""
    path = Path(path)
    if path.is_dir():
        raise CodebookLensError(f"the {what} {path} is a directory; give a file name")
    blocker = _first_file_above(path)
    if blocker is not None:
        raise CodebookLensError(
            f"the {what} {path} cannot be written: {blocker} is a file, not a directory"
        )
    return path


def check_output_dir(path: str | Path, what: str = "output directory") -> Path:
    """``path`` as a directory to write into: not an existing file, and no file where a
    parent directory has to be."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CodebookLensError(f"the {what} {path} is a file; give a directory")
    blocker = _first_file_above(path)
    if blocker is not None:
        raise CodebookLensError(
            f"the {what} {path} cannot be created: {blocker} is a file, not a directory"
        )
    return path
