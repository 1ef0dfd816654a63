"""TokFSM: the paper's algorithmic task.

A finite state machine of N states, each with a fixed set of distinct successors
chosen uniformly at random. A state is written as ``digits`` base-``base`` tokens
(N = 100, base 10: two digit tokens); the vocabulary is the ``base`` digits plus one
BOS/EOS token. A sequence is BOS followed by a random walk from a random start state,
cut to ``seq_len`` tokens. Generation is vectorised.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class FSM:
    """A random-successor state machine.

    successors: (num_states, out_degree) int64, distinct successors per state, uniform.
    """

    num_states: int
    out_degree: int
    base: int
    seed: int
    successors: torch.Tensor

    @classmethod
    def random(
        cls, num_states: int = 100, out_degree: int = 10, base: int = 10, seed: int = 0
    ) -> FSM:
        if num_states < 2:
            raise ValueError(f"num_states must be >= 2, got {num_states}")
        if not 1 <= out_degree <= num_states:
            raise ValueError(
                f"out_degree must be in 1..num_states ({num_states}), got {out_degree}"
            )
        if base < 2:
            raise ValueError(f"base must be >= 2, got {base}")
        gen = torch.Generator().manual_seed(seed)
        # distinct successors per state: the first out_degree entries of a random permutation
        keys = torch.rand(num_states, num_states, generator=gen)
        successors = keys.argsort(dim=1)[:, :out_degree].sort(dim=1).values
        return cls(num_states, out_degree, base, seed, successors)

    # -- tokens ----------------------------------------------------------------------------

    @property
    def digits(self) -> int:
        """Tokens per state."""
        return max(1, math.ceil(math.log(self.num_states, self.base) - 1e-9))

    @property
    def bos(self) -> int:
        return self.base

    @property
    def vocab_size(self) -> int:
        return self.base + 1

    def encode_states(self, states: torch.Tensor) -> torch.Tensor:
        """(..., S) states -> (..., S * digits) digit tokens, most significant first."""
        powers = self.base ** torch.arange(self.digits - 1, -1, -1, device=states.device)
        digits = (states.unsqueeze(-1) // powers) % self.base
        return digits.flatten(-2)

    def decode_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., S * digits) digit tokens -> (..., S) states (-1 where a token is not a digit
        or the number is not a state)."""
        shape = tokens.shape[:-1]
        usable = tokens.shape[-1] // self.digits * self.digits
        groups = tokens[..., :usable].reshape(*shape, -1, self.digits)
        powers = self.base ** torch.arange(self.digits - 1, -1, -1, device=tokens.device)
        valid = ((groups >= 0) & (groups < self.base)).all(-1)
        states = (groups.clamp(0, self.base - 1) * powers).sum(-1)
        return torch.where(valid & (states < self.num_states), states, torch.full_like(states, -1))

    # -- transitions -----------------------------------------------------------------------

    def adjacency(self) -> torch.Tensor:
        """(N, N) bool: adjacency[a, b] when b is a successor of a."""
        adj = torch.zeros(self.num_states, self.num_states, dtype=torch.bool)
        adj.scatter_(1, self.successors, True)
        return adj

    def walks(
        self,
        batch: int,
        num_states: int,
        generator: torch.Generator | None = None,
        jumps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(batch, num_states) random walks from uniform random start states.

        ``jumps`` (bool, ``(batch, num_states)``), when given, marks steps that go to a
        uniformly random state instead of a successor.
        """
        states = torch.empty(batch, num_states, dtype=torch.long)
        states[:, 0] = torch.randint(0, self.num_states, (batch,), generator=generator)
        choice = torch.randint(0, self.out_degree, (batch, num_states), generator=generator)
        if jumps is not None:
            anywhere = torch.randint(0, self.num_states, (batch, num_states), generator=generator)
        for t in range(1, num_states):
            states[:, t] = self.successors[states[:, t - 1], choice[:, t]]
            if jumps is not None:
                states[:, t] = torch.where(jumps[:, t], anywhere[:, t], states[:, t])
        return states

    def sequences(
        self, batch: int, seq_len: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(batch, seq_len) token sequences: BOS, then a random walk written in digits."""
        n_states = math.ceil((seq_len - 1) / self.digits)
        tokens = self.encode_states(self.walks(batch, n_states, generator))
        bos = torch.full((batch, 1), self.bos, dtype=torch.long)
        return torch.cat([bos, tokens], dim=1)[:, :seq_len]

    def next_state_distribution(self, state: int) -> torch.Tensor:
        """(N,) true distribution of the state after ``state`` (uniform over successors)."""
        dist = torch.zeros(self.num_states)
        dist[self.successors[state]] = 1.0 / self.out_degree
        return dist

    # -- persistence -----------------------------------------------------------------------

    def to_json(self) -> dict:
        data = asdict(self)
        data["successors"] = self.successors.tolist()
        return data

    @classmethod
    def from_json(cls, data: dict) -> FSM:
        fsm = cls(
            int(data["num_states"]),
            int(data["out_degree"]),
            int(data["base"]),
            int(data["seed"]),
            torch.tensor(data["successors"], dtype=torch.long),
        )
        if fsm.successors.shape != (fsm.num_states, fsm.out_degree):
            raise ValueError(
                f"successors has shape {tuple(fsm.successors.shape)}, expected "
                f"({fsm.num_states}, {fsm.out_degree})"
            )
        return fsm

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> FSM:
        return cls.from_json(json.loads(Path(path).read_text()))


# ----------------------------------------------------------------------------------------
# data and model


class FSMData:
    """Batches of fresh random walks, generated on the fly and reproducible.

    Has the interface of :class:`codebook_lens.data.Blocks` that the training loop uses:
    ``batch(seed, index, batch_size)`` is a pure function of its arguments (so a resumed
    run sees the same stream), ``first(count, batch_size)`` gives fixed held-out batches
    (drawn from a separate seed stream), and ``len()`` is effectively unbounded.
    """

    eval_seed = 1_000_000_007

    def __init__(self, fsm: FSM, seq_len: int, stream: int = 0, jump_rate: float = 0.0) -> None:
        if seq_len < 1 + 2 * fsm.digits:
            raise ValueError(
                f"seq_len must hold BOS and two states ({1 + 2 * fsm.digits} tokens), got {seq_len}"
            )
        if not 0.0 <= jump_rate < 1.0:
            raise ValueError(f"jump_rate must be in [0, 1), got {jump_rate}")
        self.fsm = fsm
        self.seq_len = seq_len
        self.stream = stream
        self.jump_rate = jump_rate

    def __len__(self) -> int:
        return 2**62

    def batch(self, seed: int, index: int, batch_size: int):
        """Walk sequences; with a ``jump_rate``, ``(tokens, labels)`` where some steps
        jump to a random state and the jumped-to digits are not targets (label -100).

        Jumps put the model's own kind of mistake into the context without ever
        teaching it to make one: a model sampling from itself must keep following
        the machine after an invalid transition.
        """
        gen = torch.Generator().manual_seed(
            (seed * 1_000_003 + index * 7_919 + self.stream * 104_729) % (2**63)
        )
        if not self.jump_rate:
            return self.fsm.sequences(batch_size, self.seq_len, gen)
        fsm = self.fsm
        n_states = math.ceil((self.seq_len - 1) / fsm.digits)
        jumps = torch.rand(batch_size, n_states, generator=gen) < self.jump_rate
        jumps[:, 0] = False
        walks = fsm.walks(batch_size, n_states, gen, jumps)
        bos = torch.full((batch_size, 1), fsm.bos, dtype=torch.long)
        tokens = torch.cat([bos, fsm.encode_states(walks)], dim=1)[:, : self.seq_len]
        masked = torch.cat(
            [torch.zeros(batch_size, 1, dtype=torch.bool), jumps.repeat_interleave(fsm.digits, 1)],
            dim=1,
        )[:, : self.seq_len]
        return tokens, tokens.masked_fill(masked, -100)

    def first(self, count: int, batch_size: int) -> list[torch.Tensor]:
        """Held-out batches of clean walks (no jumps)."""
        clean = FSMData(self.fsm, self.seq_len, self.stream)
        return [clean.batch(self.eval_seed, i, batch_size) for i in range(count)]


def parity_rope_theta(head_dim: int, rotary_fraction: float) -> float:
    """The rotary base whose fastest frequency is pi radians per token.

    GPT-NeoX rotates pair i of its ``d = int(head_dim * rotary_fraction)`` rotary
    dimensions by ``theta ** (-2i / d)`` radians per token; with
    ``theta = pi ** (-d / (d - 2))`` the frequencies rise from 1 to pi, and the pi pair
    contributes ``(-1) ** distance`` to a query-key score: the parity of the distance,
    which is what tells a TokFSM state's first digit from its second."""
    d = int(head_dim * rotary_fraction)
    if d < 4:
        raise ValueError(f"parity rotary needs at least 4 rotary dimensions per head, got {d}")
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
        raise ValueError("sequences need at least two states after BOS")
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
