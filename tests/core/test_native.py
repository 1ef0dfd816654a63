"""The compiled kernels' build: what killed builds leave, and one build per environment.

A build takes 60-110 s here, so these tests use the kernel this environment has built
(or build it once) and attack the loader around it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings

import pytest
import torch

from codebook_lens.core import _native
from codebook_lens.core.topk import topk_codes

LOAD = "from codebook_lens.core import _native; import sys; sys.exit(0 if _native.load() else 1)"


def test_a_fresh_lock_from_a_killed_build_never_blocks_the_loader():
    """A build killed a moment ago leaves its lock files behind (an old loader's in the
    build directory, torch's in a private one); a new process must load at once."""
    assert _native.load() is not None
    name, directory = _native.build_dir()
    (directory / "lock").touch()  # fresh: younger than any staleness rule
    private = directory.parent / f"{directory.name}.build-killed"
    private.mkdir(exist_ok=True)
    (private / "lock").touch()
    (private / f"{name}.so").write_bytes(b"half a library")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", LOAD], timeout=60, capture_output=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.monotonic() - start < 60
    assert not (directory / "lock").exists()
    assert private.exists()  # another build may still own it: left alone while young
    old = time.time() - 2 * _native.STALE_BUILD_S
    os.utime(private, (old, old))
    proc = subprocess.run([sys.executable, "-c", LOAD], timeout=60, capture_output=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not private.exists()  # an hour old: left by a killed build, removed


def test_the_build_directory_stays_put_after_a_build(monkeypatch, tmp_path):
    """Building must not change the key of the directory the process then looks in
    (torch's builder appends to the flag lists it is given)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    before = _native.build_dir()
    seen = {}

    def fake_build(name, sources, extra_cflags, extra_ldflags, build_directory, verbose):
        extra_cflags.append("-DADDED_BY_THE_BUILDER")
        extra_ldflags.append("-lextra")
        seen["cflags"] = extra_cflags
        return "module"

    monkeypatch.setattr("torch.utils.cpp_extension.load", fake_build)
    with pytest.raises(FileNotFoundError):  # the fake leaves no library to move in place
        _native._build(*before)
    assert "-fopenmp" in seen["cflags"]
    assert _native.build_dir() == before


def test_two_environments_never_share_a_build(monkeypatch, tmp_path):
    """Two virtual environments with the same torch (and source, flags, Python) get two
    build directories, so neither rebuilds over the other's library."""
    name, directory = _native.build_dir()
    assert name == directory.name
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "other-venv"))
    other_name, other = _native.build_dir()
    assert other != directory and other_name != name
    assert other.parent == directory.parent  # side by side under the same root
    monkeypatch.setattr(torch, "__version__", "0.0.0+other")
    assert _native.build_dir()[1] not in (directory, other)


def test_a_damaged_library_is_built_again(monkeypatch, tmp_path):
    """A library that cannot be imported (truncated, say) is replaced by a new build."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    name, directory = _native.build_dir()
    directory.mkdir(parents=True)
    (directory / f"{name}.so").write_bytes(b"\x7fELF truncated")
    built = []
    monkeypatch.setattr(_native, "_build", lambda n, d: built.append((n, d)) or "module")
    _native.load.cache_clear()
    try:
        assert _native.load() == "module"
    finally:
        _native.load.cache_clear()
    assert built == [(name, directory)]


def test_a_kernel_that_cannot_be_built_falls_back_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))

    def no_compiler(name, directory):
        raise RuntimeError("error: command 'c++' failed: No such file or directory")

    monkeypatch.setattr(_native, "_build", no_compiler)
    _native.load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built.*No such file"):
            assert _native.load() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            x, w = torch.randn(5, 1, 4), torch.randn(1, 9, 4)
            ids = topk_codes(x, w, 2)  # the PyTorch search
        assert ids.shape == (5, 1, 2)
    finally:
        _native.load.cache_clear()


def test_the_kernels_run_on_every_intra_op_thread():
    """Built without OpenMP, the kernels' parallel loops run on one thread (at a lower
    load the search then took twice the matmul's time instead of its own)."""
    kernel = _native.load()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert kernel.parallel_threads() == 2
        torch.set_num_threads(1)
        assert kernel.parallel_threads() == 1
    finally:
        torch.set_num_threads(threads)
