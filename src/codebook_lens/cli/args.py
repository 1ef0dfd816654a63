"""What every ``codebook`` command shares: number types for argparse, and JSON output.

A negative count, a zero page size or a ``nan`` budget is refused by argparse itself,
before any work, with the usual ``codebook COMMAND: error: argument --flag: ...``
line and exit status 2. Every type names the value it got and what is allowed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any


def _number(text: str, kind: type) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"must be {noun}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (a count, a size, a limit)."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def nonneg_int(text: str) -> int:
    """An integer >= 0 (an offset, a window, a seed, a position)."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def port(text: str) -> int:
    """A TCP port, 0..65535 (0: any free port)."""
    value = _number(text, int)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port in 0..65535, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """Any finite number (``nan`` and ``inf`` refused)."""
    return _number(text, float)


def nonneg_float(text: str) -> float:
    """A finite number >= 0 (a temperature)."""
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (a time budget)."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1] (a least precision or recall)."""
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text!r}")
    return value


def open_fraction(text: str) -> float:
    """A number in (0, 1] (a least share of a text, a most share of a corpus)."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def plain(data: Any) -> Any:
    """``data`` with every non-finite float as None, so that the JSON printed is valid
    JSON (which has no NaN or Infinity)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: plain(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [plain(v) for v in data]
    return data


def print_json(data: Any) -> None:
    """Print ``data`` as indented, valid JSON (non-finite numbers as null)."""
    print(json.dumps(plain(data), indent=2, ensure_ascii=False, allow_nan=False))


def one_line(message: str) -> str:
    """An error message on one line (a wrapped library message joined up)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def error(message: str) -> None:
    """Print ``codebook: error: MESSAGE`` (one line) to stderr."""
    print(f"codebook: error: {one_line(message)}", file=sys.stderr)
