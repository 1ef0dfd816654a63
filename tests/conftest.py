"""Fixtures shared by every test folder; the helpers they use live in helpers.py."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    FAMILY_NAMES,
    VOCAB,
    WEB_DOCS,
    save_tiny_codebook_model,
)


@pytest.fixture(params=FAMILY_NAMES)
def family(request):
    return request.param


@pytest.fixture
def tokens():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(2, VOCAB, (2, 12), generator=gen)


@pytest.fixture(scope="session")
def tiny_code_cache(tmp_path_factory):
    """(model_dir, cache_dir): the tiny codebook model and a code cache of WEB_DOCS."""
    from codebook_lens.cache.build import build_cache
    from codebook_lens.core.loading import load_codebook_model

    root = tmp_path_factory.mktemp("webcache")
    model_dir = save_tiny_codebook_model(root)
    out = root / "cache"
    build_cache(load_codebook_model(model_dir), WEB_DOCS, out, corpus_name="web-test", seq_len=32)
    return model_dir, out
