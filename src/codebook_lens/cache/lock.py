"""One writer per cache build, and the finished build moved into place.

Two identical ``codebook cache`` commands would otherwise resume the same
``OUT.partial`` at once and write the same arrays and progress file over each other.
:class:`BuildLock` holds an ``flock`` on ``OUT.partial.lock`` for the whole build; a
second build fails at once with a :class:`~codebook_lens.cache.manifest.CacheError`
that names the process holding it. The kernel drops the lock when its holder dies
(even on ``kill -9``), so a stale lock file never blocks a rerun.

:func:`check_target` says whether ``OUT`` may be written (``overwrite`` replaces a code
cache, never another directory), and :func:`install` moves the finished build in: an old
cache is moved aside first and removed only once the new one is in place.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from codebook_lens.cache.manifest import MANIFEST, CacheError
from codebook_lens.core.files import check_output_dir


class BuildLock:
    """``with BuildLock(path):`` holds an exclusive lock on ``path`` or raises CacheError."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> BuildLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise CacheError(
                    f"another build (process {holder}) is writing {self.path.with_suffix('')}; "
                    "wait for it to finish"
                ) from None
            # the file may have been removed by a build that finished between our open and
            # our lock: then the lock is on a file nobody else will see; take a fresh one
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing releases the lock
            self._fd = None


def check_target(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that is a file, that exists without ``overwrite``, or that is a
    directory other than a code cache (``overwrite`` never removes anything else)."""
    check_output_dir(out, "cache directory")
    if out.exists():
        if not overwrite:
            raise CacheError(f"{out} exists; pass overwrite to replace it")
        if not (out / MANIFEST).is_file():
            raise CacheError(f"{out} exists and is not a code cache; refusing to replace it")


def install(partial: Path, out: Path) -> None:
    """Move the finished build in as ``out``: an old cache there is moved aside first and
    removed only once the new one is in place."""
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(partial, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old)
