"""The ``codebook`` command: one module per command group, :func:`main` dispatches."""

from codebook_lens.cli.main import main

__all__ = ["main"]
