"""The next-state distribution read with one pass per prefix (a KV cache continued by
every head) equals the one read from full rows, prefix plus head, on a real model."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from codebook_lens.core.codebook import CodebookConfig
from codebook_lens.core.model import CodebookModel, CodebookModelConfig, SiteSpec
from codebook_lens.data.fsm import FSM
from codebook_lens.experiments.tokfsm import analysis as A
from codebook_lens.experiments.tokfsm.run import valid_transition_mass
from codebook_lens.experiments.tokfsm.task import neox_config


def full_rows(rows: int):
    """A context that does nothing: next_state_distribution then reads full rows."""
    return contextlib.nullcontext()


@pytest.fixture(scope="module")
def models():
    fsm = FSM.random(20, 4, 10, seed=1)  # 2 digits per state
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(neox_config(fsm, 2, 32, 2, 64, 40)).eval()
    sites = [
        SiteSpec("attn_heads", CodebookConfig(num_codes=16, k=1)),
        SiteSpec("mlp", CodebookConfig(num_codes=24, k=2)),
    ]
    torch.manual_seed(1)  # the codebook model wraps a copy: the base stays without codebooks
    return fsm, base, CodebookModel(copy.deepcopy(base), CodebookModelConfig(sites)).eval()


@pytest.mark.parametrize("which", ["base", "codebook"])
def test_cached_heads_match_full_rows(models, which):
    fsm, base, cb = models
    model = base if which == "base" else cb
    walks = fsm.walks(6, 5, torch.Generator().manual_seed(2))
    prefixes = torch.cat([torch.full((6, 1), fsm.bos), fsm.encode_states(walks)], dim=1)
    cached = A.next_state_distribution(model, fsm, prefixes)
    full = A.next_state_distribution(model, fsm, prefixes, full_rows)
    assert cached.shape == (6, fsm.num_states)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-4)
    assert torch.allclose(cached.sum(-1), torch.ones(6))
    # BOS alone as the prefix (the shortest walk context there is)
    bos = torch.full((3, 1), fsm.bos)
    torch.testing.assert_close(
        A.next_state_distribution(model, fsm, bos),
        A.next_state_distribution(model, fsm, bos, full_rows),
        atol=1e-5,
        rtol=1e-4,
    )


def test_the_codebooks_act_on_the_cached_pass(models):
    """A codebook model and its base differ on the same prefixes: the cached pass does
    not bypass the codebooks."""
    fsm, base, cb = models
    walks = fsm.walks(4, 3, torch.Generator().manual_seed(3))
    prefixes = torch.cat([torch.full((4, 1), fsm.bos), fsm.encode_states(walks)], dim=1)
    with_codes = A.next_state_distribution(cb, fsm, prefixes)
    with cb.codebooks_disabled():
        without = A.next_state_distribution(cb, fsm, prefixes)
    torch.testing.assert_close(without, A.next_state_distribution(base, fsm, prefixes))
    assert (with_codes - without).abs().max() > 1e-4


def test_valid_mass_is_unchanged(models):
    fsm, base, _ = models
    adj = fsm.adjacency().float()
    walks = fsm.walks(8, 4, torch.Generator().manual_seed(4))
    prefixes = torch.cat([torch.full((8, 1), fsm.bos), fsm.encode_states(walks)], dim=1)
    full = (A.next_state_distribution(base, fsm, prefixes, full_rows) * adj[walks[:, -1]]).sum(1)
    mass = valid_transition_mass(base, fsm, 40, per_length=8)
    assert 0.0 < mass < 1.0
    torch.testing.assert_close(
        (A.next_state_distribution(base, fsm, prefixes) * adj[walks[:, -1]]).sum(1), full
    )
