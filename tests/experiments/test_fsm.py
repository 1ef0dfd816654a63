"""TokFSM generation and metrics against hand-computed values."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from codebook_lens.data.fsm import FSM
from codebook_lens.experiments.tokfsm.task import lm_metrics, transition_validity


def test_fsm_structure_and_generation_is_valid():
    fsm = FSM.random(num_states=100, out_degree=10, base=10, seed=3)
    assert fsm.successors.shape == (100, 10)
    # successors distinct per state
    assert all(len(set(row.tolist())) == 10 for row in fsm.successors)
    assert fsm.digits == 2 and fsm.vocab_size == 11 and fsm.bos == 10
    gen = torch.Generator().manual_seed(0)
    seqs = fsm.sequences(64, 128, gen)
    assert seqs.shape == (64, 128)
    assert (seqs[:, 0] == fsm.bos).all() and (seqs[:, 1:] < 10).all()
    states = fsm.decode_states(seqs[:, 1:])
    adj = fsm.adjacency()
    assert adj[states[:, :-1], states[:, 1:]].all()  # every transition is an edge
    per_seq, first = transition_validity(fsm, seqs)
    assert torch.equal(per_seq, torch.ones(64)) and torch.equal(first, torch.ones(64))
    # start states and successors are used roughly uniformly
    counts = torch.bincount(states[:, 0], minlength=100)
    assert counts.max() <= 8


def test_same_seed_same_machine_and_json_round_trip(tmp_path):
    a, b = FSM.random(seed=1), FSM.random(seed=1)
    assert torch.equal(a.successors, b.successors)
    assert not torch.equal(a.successors, FSM.random(seed=2).successors)
    a.save(tmp_path / "fsm.json")
    c = FSM.load(tmp_path / "fsm.json")
    assert torch.equal(c.successors, a.successors) and c.num_states == 100


def test_encode_decode_and_odd_sizes():
    fsm = FSM.random(num_states=1000, out_degree=3, base=10, seed=0)
    assert fsm.digits == 3
    states = torch.tensor([[0, 7, 42, 999]])
    tokens = fsm.encode_states(states)
    assert tokens.tolist() == [[0, 0, 0, 0, 0, 7, 0, 4, 2, 9, 9, 9]]
    assert torch.equal(fsm.decode_states(tokens), states)
    small = FSM.random(num_states=5, out_degree=2, base=2, seed=0)
    assert small.digits == 3  # 5 states need 3 binary digits
    assert fsm.decode_states(torch.tensor([[10, 0, 1]])).tolist() == [[-1]]  # BOS is no digit


def test_transition_validity_hand_computed():
    succ = torch.tensor([[1, 2], [2, 3], [3, 0], [0, 1]])  # 4 states, base 10, 1 digit each
    fsm = FSM(4, 2, 10, 0, succ)
    bos = fsm.bos
    seqs = torch.tensor(
        [
            [bos, 0, 1, 3, 0],  # 0->1 ok, 1->3 ok, 3->0 ok
            [bos, 0, 3, 1, 2],  # 0->3 bad, 3->1 ok, 1->2 ok
            [bos, 2, 9, 0, 2],  # 2->9 unreadable, 9->0 unreadable, 0->2 ok
        ]
    )
    per_seq, first = transition_validity(fsm, seqs)
    assert per_seq.tolist() == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert first.tolist() == [1.0, 0.0, 0.0]


def test_lm_metrics_hand_computed():
    # a "model" whose logits put probability 1/2 on token 1 and 1/2 on token 2, always
    logits = torch.full((1, 4, 3), -1e9)
    logits[..., 1] = 0.0
    logits[..., 2] = 0.0
    model = lambda tokens: SimpleNamespace(logits=logits)  # noqa: E731
    tokens = torch.tensor([[0, 1, 2, 1]])  # targets 1, 2, 1: each has probability 1/2
    m = lm_metrics(model, tokens)
    assert m["lm_loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert m["next_token_accuracy"] == pytest.approx(2 / 3)  # argmax picks token 1: right twice


def test_fsm_data_is_a_reproducible_stream_of_valid_walks():
    from codebook_lens.data.fsm import FSMData

    fsm = FSM.random(100, 10, 10, seed=0)
    data = FSMData(fsm, 33)
    a, b = data.batch(0, 5, 16), data.batch(0, 5, 16)
    assert torch.equal(a, b)  # a pure function of (seed, index): resuming sees the same data
    assert not torch.equal(a, data.batch(0, 6, 16))
    assert not torch.equal(a, data.batch(1, 5, 16))
    held_out = data.first(2, 16)
    assert len(held_out) == 2 and all(h.shape == (16, 33) for h in held_out)
    assert not any(torch.equal(h, data.batch(0, i, 16)) for h in held_out for i in range(4))
    per_seq, _ = transition_validity(fsm, torch.cat([a, *held_out]))
    assert (per_seq == 1).all()
    with pytest.raises(ValueError, match="seq_len"):
        FSMData(fsm, 4)


def test_sampling_with_the_kv_cache_matches_full_forward_passes():
    """The sampler steps the model with its KV cache; the distributions it samples
    from must equal those of full forward passes over the same prefix."""
    from transformers import AutoModelForCausalLM

    from codebook_lens.experiments.tokfsm.task import neox_config, sample

    fsm = FSM.random(20, 4, 10, seed=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(neox_config(fsm, 2, 32, 2, 64, 24)).eval()
    tokens = sample(model, fsm, 3, 24, torch.Generator().manual_seed(0))
    assert tokens.shape == (3, 24) and (tokens[:, 0] == fsm.bos).all()
    # replay: sampling the same way from full-prefix logits gives the same tokens
    gen = torch.Generator().manual_seed(0)
    replay = torch.full((3, 1), fsm.bos)
    with torch.no_grad():
        for _ in range(23):
            probs = torch.softmax(model(replay).logits[:, -1].float(), -1)
            replay = torch.cat([replay, torch.multinomial(probs, 1, generator=gen)], 1)
    assert torch.equal(tokens, replay)


def test_jumps_are_in_the_context_but_never_targets():
    from codebook_lens.data.fsm import FSMData

    fsm = FSM.random(100, 10, 10, seed=0)
    tokens, labels = FSMData(fsm, 129, jump_rate=0.2).batch(0, 0, 64)
    states = fsm.decode_states(tokens[:, 1:])  # (64, 64)
    valid = fsm.adjacency()[states[:, :-1], states[:, 1:]]
    masked = (labels[:, 1:] == -100).view(64, 64, 2)
    assert (masked[..., 0] == masked[..., 1]).all()  # both digits of a state, or neither
    jumped = masked[..., 0]
    assert not jumped[:, 0].any()  # the start state is a target
    assert valid[~jumped[:, 1:]].all()  # every unmasked transition is an edge
    assert 0.1 < jumped[:, 1:].float().mean() < 0.3  # about the jump rate
    assert (~valid[jumped[:, 1:]]).float().mean() > 0.8  # most jumps leave the machine
    assert torch.equal(labels[labels != -100], tokens[labels != -100])
    # held-out batches stay clean walks
    held = FSMData(fsm, 129, jump_rate=0.2).first(1, 8)[0]
    assert transition_validity(fsm, held)[0].eq(1).all()


@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_parity_rotary_scores_the_parity_of_a_distance(fraction):
    """With the parity rotary base the fastest rotary pair turns by pi per token, so a
    query and a key living in that pair score +|q||k| at even distances and -|q||k| at
    odd ones, whatever their absolute positions (checked through transformers' own
    rotary code)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    from codebook_lens.experiments.tokfsm.task import neox_config, parity_rope_theta

    fsm = FSM.random(20, 4, 10, seed=1)
    theta = parity_rope_theta(32, fraction)
    model = AutoModelForCausalLM.from_config(
        neox_config(fsm, 1, 128, 4, 64, 40, fraction, theta)
    ).eval()
    d = int(32 * fraction)
    inv = model.gpt_neox.rotary_emb.inv_freq
    assert inv.shape == (d // 2,)
    assert inv[0].item() == pytest.approx(1.0) and inv[-1].item() == pytest.approx(math.pi)
    assert torch.all(inv[1:] > inv[:-1])  # rising from 1 to pi
    positions = torch.arange(40)[None]
    x = torch.zeros(1, 40, 128)
    cos, sin = model.gpt_neox.rotary_emb(x, positions)
    q = torch.zeros(1, 1, 40, 32)
    q[..., d // 2 - 1] = 1.0  # the pi pair: dimensions d/2 - 1 and d - 1
    q_rot, k_rot = apply_rotary_pos_emb(q, q.clone(), cos, sin)
    scores = q_rot[0, 0] @ k_rot[0, 0].T  # (40, 40)
    distance = positions[0][:, None] - positions[0][None, :]
    expected = 1.0 - 2.0 * (distance.abs() % 2).float()
    assert torch.allclose(scores, expected, atol=1e-4)
    with pytest.raises(ValueError, match="at least 4 rotary dimensions"):
        parity_rope_theta(8, 0.25)


def test_tokfsm_presets_use_the_parity_rotary_base():
    from codebook_lens.experiments.tokfsm.run import build_base, load_fsm_config
    from codebook_lens.experiments.tokfsm.task import parity_rope_theta

    fsm = FSM.random(12, 3, 10, seed=0)
    cfg = load_fsm_config("cpu", ["net.layers=1", "net.hidden=32", "net.heads=2"])
    assert cfg.net.parity_rotary and load_fsm_config("demo").net.parity_rotary
    model = build_base(cfg, fsm, 0)
    assert model.config.rope_parameters["rope_theta"] == pytest.approx(parity_rope_theta(16, 1.0))
    paper = load_fsm_config("paper", ["net.layers=1", "net.hidden=32", "net.heads=2"])
    assert not paper.net.parity_rotary
    assert build_base(paper, fsm, 0).config.rope_parameters["rope_theta"] == 10000.0
