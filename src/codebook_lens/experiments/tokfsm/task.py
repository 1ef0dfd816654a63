"""TokFSM, the paper's algorithmic task: the model shape, sampling and the metrics.

The machine and its walks are :mod:`codebook_lens.data.fsm`.
"""

from __future__ import annotations

import inspect
import math

import torch

from codebook_lens.core.errors import CodebookLensError
from codebook_lens.data.fsm import FSM


def parity_rope_theta(head_dim: int, rotary_fraction: float) -> float:
    """The rotary base whose fastest frequency is pi radians per token.

    GPT-NeoX rotates pair i of its ``d = int(head_dim * rotary_fraction)`` rotary
    dimensions by ``theta ** (-2i / d)`` radians per token; with
    ``theta = pi ** (-d / (d - 2))`` the frequencies rise from 1 to pi, and the pi pair
    contributes ``(-1) ** distance`` to a query-key score: the parity of the distance,
    which is what tells a TokFSM state's first digit from its second."""
    d = int(head_dim * rotary_fraction)
    if d < 4:
        raise CodebookLensError(
            f"parity rotary needs at least 4 rotary dimensions per head, got {d}"
        )
    return math.pi ** (-d / (d - 2))


def neox_config(
    fsm: FSM,
    layers: int = 4,
    hidden: int = 128,
    heads: int = 4,
    mlp: int = 512,
    seq_len: int = 128,
    rotary_fraction: float = 0.25,
    rope_theta: float = 10000.0,
):
    """A GPT-NeoX config for ``fsm``'s vocabulary (the paper's model: 4 x 128, 4 heads).

    ``rotary_fraction``: the share of each head's dimensions that get rotary position
    embeddings (GPT-NeoX's default is 0.25). ``rope_theta``: the rotary base; rotary
    pair i turns by ``rope_theta ** (-2i / d)`` radians per token (d rotary dimensions),
    so the default's frequencies fall from 1 rad per token, and a base below 1 makes
    them rise from 1 rad instead (``math.pi ** (-d / (d - 2))`` puts the fastest at pi,
    where a query and a key score the parity of their distance)."""
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=fsm.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=mlp,
        max_position_embeddings=seq_len,
        bos_token_id=fsm.bos,
        eos_token_id=fsm.bos,
        pad_token_id=fsm.bos,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": rope_theta,
            "partial_rotary_factor": rotary_fraction,
        },
    )


# ----------------------------------------------------------------------------------------
# metrics


def transition_validity(fsm: FSM, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For sequences that start with BOS: (valid transition fraction, first-transition valid).

    Each sequence's digits after BOS are read as states; every consecutive pair is a
    transition, valid when it is an edge of the FSM (an unreadable state makes both of
    its transitions invalid). Returns per-sequence tensors.
    """
    states = fsm.decode_states(tokens[:, 1:])
    if states.shape[1] < 2:
        raise CodebookLensError("sequences need at least two states after BOS")
    a, b = states[:, :-1], states[:, 1:]
    ok = (a >= 0) & (b >= 0)
    adj = fsm.adjacency()
    valid = ok & adj[a.clamp(min=0), b.clamp(min=0)]
    return valid.float().mean(1), valid[:, 0].float()


@torch.no_grad()
def lm_metrics(model, tokens: torch.Tensor) -> dict:
    """Mean next-token loss and accuracy of ``model`` (any callable returning ``.logits``)."""
    params = getattr(model, "parameters", None)
    if params is not None:
        tokens = tokens.to(next(params()).device)
    logits = model(tokens).logits[:, :-1].float()
    target = tokens[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    )
    acc = (logits.argmax(-1) == target).float().mean()
    return {"lm_loss": loss.item(), "next_token_accuracy": acc.item()}


@torch.no_grad()
def sample(
    model,
    fsm: FSM,
    batch: int,
    seq_len: int,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """(batch, seq_len) sequences sampled from ``model`` starting at BOS.

    ``model`` is a transformers causal LM or a :class:`CodebookModel` (whose codebooks
    act on every sampled token: the base model is stepped with its KV cache and the
    codebook hooks apply to each new position).
    """
    lm = getattr(model, "model", model) if hasattr(model, "codebooks") else model
    device = next(lm.parameters()).device
    tokens = torch.full((batch, 1), fsm.bos, dtype=torch.long, device=device)
    # the KV cache argument and output are named ``cache`` in newer transformers
    # (``past_key_values`` before; the old name warns there)
    cache_name = (
        "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    )
    out = lm(input_ids=tokens, use_cache=True)
    pieces = [tokens]
    for _ in range(seq_len - 1):
        logits = out.logits[:, -1].float() / temperature
        probs = torch.softmax(logits, dim=-1).cpu()
        nxt = torch.multinomial(probs, 1, generator=generator).to(device)
        pieces.append(nxt)
        if len(pieces) == seq_len:
            break
        out = lm(input_ids=nxt, use_cache=True, **{cache_name: getattr(out, cache_name)})
    return torch.cat(pieces, dim=1)


def state_metrics(model, fsm: FSM, batch: int, seq_len: int, seed: int = 0) -> dict:
    """State accuracy (valid transitions among sampled ones) and first-transition accuracy."""
    gen = torch.Generator().manual_seed(seed)
    tokens = sample(model, fsm, batch, seq_len, gen)
    per_seq, first = transition_validity(fsm, tokens)
    # the same samples read one token later: digits paired the other way round. A model
    # that keeps track of which digit starts a state scores ~out_degree/N here; one
    # that slips into the other pairing and walks on validly scores much higher
    shifted = torch.cat([tokens[:, :1], tokens[:, 2:]], dim=1)
    shifted_per_seq, _ = transition_validity(fsm, shifted)
    return {
        "state_accuracy": per_seq.mean().item(),
        "first_transition_accuracy": first.mean().item(),
        "shifted_state_accuracy": shifted_per_seq.mean().item(),
    }
