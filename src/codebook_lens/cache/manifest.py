"""A code cache's manifest and array headers, checked before anything is read.

Caches are shared between people, so :func:`read_manifest` treats a cache directory as
untrusted input: the manifest must follow the schema below, every codebook key must
have the shape of a code reference's codebook (``layer12_mlp``; see
:func:`codebook_lens.core.refs.is_codebook_name`), so that it cannot name a path, and
every file is opened through :func:`cache_file`, which keeps resolved paths (symbolic
links followed) inside the cache. :func:`check_arrays` then reads the ``.npy`` headers of
every codebook and checks their shapes and types against the manifest, and the file
sizes against the headers, so that a truncated array or a manifest that disagrees with
its arrays is reported when the cache is opened, not as a wrong answer later.

Manifest schema (format version 1)::

    format          "codebook-lens-cache"
    format_version  1
    model           str, the model directory the cache was built from
    corpus          str
    num_tokens      int >= 1, the length of every codes array
    num_docs        int, 1 .. num_tokens
    seq_len         int >= 1
    codebooks       {key: {key, site, layer, groups, k, num_codes, dtype}}
    codebook_digest {key: sha256 hex} of the code vectors (optional: caches built
                    before it was recorded have none)
"""

from __future__ import annotations

import json
import math
import re
import tokenize
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from codebook_lens.core.errors import CodebookLensError
from codebook_lens.core.model import site_key
from codebook_lens.core.refs import is_codebook_name
from codebook_lens.core.sites import SITES

FORMAT_NAME = "codebook-lens-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_HEX64 = re.compile(r"[0-9a-f]{64}")
# what numpy's parser of a .npy header (a Python literal, read with ast and tokenize)
# raises on a damaged one
_HEADER_ERRORS = (
    ValueError,
    EOFError,
    SyntaxError,
    TypeError,
    KeyError,
    RecursionError,
    tokenize.TokenError,
)


class CacheError(CodebookLensError):
    """A cache that cannot be built or read as asked."""


def code_dtype(num_codes: int) -> np.dtype:
    """The smallest unsigned integer type that holds ids ``0 .. num_codes``: the code ids,
    and ``num_codes`` itself, which marks an empty slot (see :func:`stored_ids`)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_codes <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


@dataclass
class CodebookInfo:
    key: str
    site: str
    layer: int
    groups: int
    k: int
    num_codes: int
    dtype: str

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def cache_file(root: Path, rel: str) -> Path:
    """``root / rel``, or a CacheError when it resolves (links followed) outside ``root``."""
    path = root / rel
    try:
        resolved = path.resolve()
        inside = resolved.is_relative_to(root.resolve())
    except (OSError, RuntimeError) as err:  # a link loop
        raise CacheError(f"{path} cannot be resolved: {err}") from None
    if not inside:
        raise CacheError(f"{path} points outside the cache {root}; refusing to read {resolved}")
    return path


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(data: dict, name: str, where: str, low: int) -> int:
    value = data.get(name)
    if not _is_int(value) or value < low:
        raise CacheError(f"{where}: {name} must be an integer >= {low}, got {value!r}")
    return value


def _codebook(key: Any, data: Any, where: str) -> CodebookInfo:
    if not is_codebook_name(key):
        raise CacheError(
            f"{where} names a codebook {key!r}; codebook names look like layer12_mlp "
            "(letters, digits and underscores only)"
        )
    where = f"{where}, codebook {key}"
    if not isinstance(data, dict):
        raise CacheError(f"{where} must be a mapping, got {data!r}")
    names = [f.name for f in fields(CodebookInfo)]
    if sorted(data) != sorted(names):
        raise CacheError(f"{where} must have exactly the keys {', '.join(names)}")
    if data["key"] != key:
        raise CacheError(f"{where} says its key is {data['key']!r}")
    if data["site"] not in SITES:
        raise CacheError(f"{where}: site must be one of {', '.join(SITES)}, got {data['site']!r}")
    layer = _int(data, "layer", where, 0)
    if site_key(data["site"], layer) != key:
        raise CacheError(f"{where}: site {data['site']} of layer {layer} is not codebook {key}")
    groups, k, num_codes = (_int(data, n, where, 1) for n in ("groups", "k", "num_codes"))
    if k > num_codes:
        raise CacheError(f"{where}: k={k} exceeds num_codes={num_codes}")
    if data["dtype"] != code_dtype(num_codes).name:
        raise CacheError(
            f"{where}: dtype must be {code_dtype(num_codes).name} for {num_codes} codes, "
            f"got {data['dtype']!r}"
        )
    return CodebookInfo(key, data["site"], layer, groups, k, num_codes, data["dtype"])


def read_manifest(path: Path) -> tuple[dict, dict[str, CodebookInfo]]:
    """The validated manifest of the cache in ``path`` and its codebooks."""
    manifest_path = cache_file(path, MANIFEST)
    if not manifest_path.is_file():
        partial = path.with_name(path.name + ".partial")
        hint = (
            f" (an unfinished build is in {partial.name}; rerun `codebook cache`)"
            if partial.exists()
            else ""
        )
        raise CacheError(f"{path} is not a code cache: {MANIFEST} is missing{hint}")
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except (OSError, ValueError) as err:  # JSON and Unicode errors are ValueErrors
        raise CacheError(f"{manifest_path} is not readable JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CacheError(f"{manifest_path} is not a {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if not _is_int(version) or version < 1:
        raise CacheError(f"{manifest_path}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CacheError(
            f"{path} has cache format {version}; this codebook-lens reads up to {FORMAT_VERSION}"
        )
    where = str(manifest_path)
    for name in ("model", "corpus"):
        if not isinstance(manifest.get(name), str):
            raise CacheError(f"{where}: {name} must be a string, got {manifest.get(name)!r}")
    tokens = _int(manifest, "num_tokens", where, 1)
    docs = _int(manifest, "num_docs", where, 1)
    if docs > tokens:
        raise CacheError(f"{where}: num_docs={docs} exceeds num_tokens={tokens}")
    _int(manifest, "seq_len", where, 1)
    books = manifest.get("codebooks")
    if not isinstance(books, dict):
        raise CacheError(f"{where}: codebooks must be a mapping, got {books!r}")
    infos = {key: _codebook(key, data, where) for key, data in books.items()}
    digests = manifest.get("codebook_digest")
    if digests is not None and (
        not isinstance(digests, dict)
        or sorted(digests) != sorted(infos)
        or not all(isinstance(d, str) and _HEX64.fullmatch(d) for d in digests.values())
    ):
        raise CacheError(f"{where}: codebook_digest must map every codebook to a SHA-256 digest")
    return manifest, infos


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of a ``.npy`` file, checked against its size (not its contents)."""
    try:
        with path.open("rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            offset = fh.tell()
        size = path.stat().st_size
    except FileNotFoundError:
        raise CacheError(f"{path} is missing") from None
    except (*_HEADER_ERRORS, OSError) as err:
        raise CacheError(f"{path} is not a readable .npy array ({err!r})") from None
    if fortran or dtype.hasobject:
        raise CacheError(f"{path} is not a plain C-ordered numeric array")
    need = offset + math.prod(shape) * dtype.itemsize
    if size < need:
        raise CacheError(f"{path} is truncated: {size:,} bytes, its header needs {need:,}")
    return tuple(shape), dtype


def check_arrays(path: Path, num_tokens: int, infos: dict[str, CodebookInfo]) -> None:
    """Check every codebook's codes, counts and index headers against the manifest."""
    for key, info in infos.items():
        expected = {
            f"codes/{key}.npy": ((num_tokens, info.groups, info.k), (np.dtype(info.dtype),)),
            f"counts/{key}.npy": ((info.groups, info.num_codes), (np.dtype(np.int64),)),
            f"index/{key}.offsets.npy": ((info.groups, info.num_codes + 1), (np.dtype(np.int64),)),
        }
        for rel, (shape, dtypes) in expected.items():
            got_shape, got_dtype = npy_header(cache_file(path, rel))
            if got_shape != shape or got_dtype not in dtypes:
                raise CacheError(
                    f"{path / rel} holds a {got_dtype} array of shape {got_shape}; the manifest "
                    f"says {dtypes[0]} of shape {shape}"
                )
        rel = f"index/{key}.rows.npy"
        shape, dtype = npy_header(cache_file(path, rel))
        most = num_tokens * info.groups * info.k
        if len(shape) != 1 or dtype not in (np.dtype(np.uint32), np.dtype(np.uint64)):
            raise CacheError(f"{path / rel} must be a 1-D uint32 or uint64 array")
        if shape[0] > most:
            raise CacheError(f"{path / rel} lists {shape[0]:,} positions; at most {most:,} fit")
