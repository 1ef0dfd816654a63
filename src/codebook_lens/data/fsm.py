"""TokFSM's data: the finite state machine and its random walks.

A finite state machine of N states, each with a fixed set of distinct successors
chosen uniformly at random. A state is written as ``digits`` base-``base`` tokens
(N = 100, base 10: two digit tokens); the vocabulary is the ``base`` digits plus one
BOS/EOS token. A sequence is BOS followed by a random walk from a random start state,
cut to ``seq_len`` tokens. Generation is vectorised. The experiment that trains and
measures models on it lives in :mod:`codebook_lens.experiments.tokfsm`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from codebook_lens.core.errors import CodebookLensError


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
            raise CodebookLensError(f"num_states must be >= 2, got {num_states}")
        if not 1 <= out_degree <= num_states:
            raise CodebookLensError(
                f"out_degree must be in 1..num_states ({num_states}), got {out_degree}"
            )
        if base < 2:
            raise CodebookLensError(f"base must be >= 2, got {base}")
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
            raise CodebookLensError(
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

    Has the interface of :class:`codebook_lens.data.documents.Blocks` that the training loop uses:
    ``batch(seed, index, batch_size)`` is a pure function of its arguments (so a resumed
    run sees the same stream), ``first(count, batch_size)`` gives fixed held-out batches
    (drawn from a separate seed stream), and ``len()`` is effectively unbounded.
    """

    eval_seed = 1_000_000_007

    def __init__(self, fsm: FSM, seq_len: int, stream: int = 0, jump_rate: float = 0.0) -> None:
        if seq_len < 1 + 2 * fsm.digits:
            raise CodebookLensError(
                f"seq_len must hold BOS and two states ({1 + 2 * fsm.digits} tokens), got {seq_len}"
            )
        if not 0.0 <= jump_rate < 1.0:
            raise CodebookLensError(f"jump_rate must be in [0, 1), got {jump_rate}")
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
