"""Naming one code: ``layer12_mlp:345`` or, for per-head codebooks, ``layer2_attn_heads/3:17``.

A :class:`CodeRef` is the codebook's key (see :func:`codebook_lens.core.model.site_key`), the
group (attention head; 0 for ungrouped codebooks) and the code id within that group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from codebook_lens.core.errors import CodebookLensError

_CODEBOOK = r"layer\d+_[a-z_]+"
_PATTERN = re.compile(rf"^({_CODEBOOK})(?:/(\d+))?:(\d+)$")
_CODEBOOK_NAME = re.compile(_CODEBOOK, re.ASCII)


def is_codebook_name(name: object) -> bool:
    """Whether ``name`` has the shape of a codebook key (``layer12_mlp``,
    ``layer2_attn_heads``): a key that can also be used as a file name, with no path
    separator, dot or other character outside ``[a-z0-9_]``."""
    return isinstance(name, str) and _CODEBOOK_NAME.fullmatch(name) is not None


@dataclass(frozen=True, order=True)
class CodeRef:
    codebook: str
    code: int
    group: int = 0

    def __post_init__(self) -> None:
        if self.code < 0 or self.group < 0:
            raise CodebookLensError(
                f"code and group must be non-negative, got {self.code}, {self.group}"
            )

    def __str__(self) -> str:
        if self.group or self.codebook.endswith("attn_heads"):
            return f"{self.codebook}/{self.group}:{self.code}"
        return f"{self.codebook}:{self.code}"

    @classmethod
    def parse(cls, text: str) -> CodeRef:
        """``layer12_mlp:345`` or ``layer2_attn_heads/3:17`` -> CodeRef."""
        m = _PATTERN.match(text.strip())
        if m is None:
            raise CodebookLensError(
                f"{text!r} does not name a code; write CODEBOOK:CODE such as layer12_mlp:345, "
                "or CODEBOOK/HEAD:CODE such as layer2_attn_heads/3:17"
            )
        return cls(codebook=m.group(1), code=int(m.group(3)), group=int(m.group(2) or 0))


def check_ref(ref: CodeRef, codebooks: dict[str, tuple[int, int]]) -> None:
    """Raise a clear ValueError unless ``ref`` exists; ``codebooks``: key -> (groups, num_codes)."""
    if ref.codebook not in codebooks:
        raise CodebookLensError(
            f"no codebook {ref.codebook!r}; present: {', '.join(sorted(codebooks)) or 'none'}"
        )
    groups, num_codes = codebooks[ref.codebook]
    if ref.group >= groups:
        raise CodebookLensError(
            f"{ref.codebook} has {groups} group(s); group {ref.group} does not exist"
        )
    if ref.code >= num_codes:
        raise CodebookLensError(
            f"{ref.codebook} has {num_codes} codes; code {ref.code} does not exist"
        )
