"""The one base class of the errors that report a user's mistake or a bad input.

Raise a :class:`CodebookLensError` (or a subclass) for anything a user can fix: a bad
argument, a damaged or mismatched file, a config typo. The ``codebook`` command prints
these as one line and exits with status 2; the web browser answers them with a 4xx.
Any other exception is a bug: the command shows its traceback, the browser answers
500 and logs it.

It subclasses :class:`ValueError` so that code written against the earlier plain
``ValueError`` keeps working.
"""

from __future__ import annotations


class CodebookLensError(ValueError):
    """A user mistake or bad input, reported in one sentence naming the bad value."""


class ModelLoadError(CodebookLensError):
    """A saved codebook model that cannot be opened: missing, damaged or mismatched."""
