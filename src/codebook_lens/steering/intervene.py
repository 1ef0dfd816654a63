"""Interventions on codes: force codes on and disable codes.

An intervention changes which codes a codebook sums, inside a ``with`` block::

    with intervene(model, force=["layer1_mlp:17"], mode="replace_last", positions=slice(5, None)):
        out = model.generate(ids, max_new_tokens=20)

Codes are named by :class:`~codebook_lens.core.refs.CodeRef` (or its text form,
``layer12_mlp:345`` or ``layer2_attn_heads/3:17``). Every codebook first finds its k
best codes as usual, ranked best first; the intervention then edits that list at the
chosen positions, for each (codebook, group) named:

- ``disable``: a disabled code never appears; when the search chose one, the next-best
  code that is not disabled takes its place (the k best remaining codes, in rank order).
- ``force`` with ``mode``:

  - ``"replace_last"``: the forced codes take the lowest-ranked slots, the first forced
    code the last slot, the second the slot before it, and so on. A forced code that
    the search already chose keeps its slot and costs none. At most k codes may be
    forced per (codebook, group).
  - ``"replace_all"``: the slots hold the forced codes only (any number of them); the
    activation becomes the sum of the forced codes alone, whatever k is.
  - ``"append"``: the forced codes that the search did not choose are added as extra
    slots; the activation becomes the sum of the k chosen codes plus the forced codes.

  A forced code is thus on exactly once, in every mode: it is never summed twice.
- ``strength``: a forced code enters the sum times this factor (default 1, the code as
  it is; the paper's setting) wherever it is forced, also where the search chose it
  anyway. Larger factors push harder; a negative one pushes away. Codes the search
  chooses on its own, and forced codes outside the chosen positions, keep factor 1.

When an intervention needs more than k slots (``append``, or ``replace_all`` with more
than k codes) the codebook's id tensor widens for the whole forward call; slots that
hold no code are :data:`~codebook_lens.core.codebook.EMPTY_SLOT` (-1) and add nothing. Codes
captured with ``model(ids, return_codes=True)`` show them as such. An activation that
the codebook's outlier rule passes through dense (``CodebookConfig.outlier_factor``)
stays dense under any intervention: its slots are all empty.

Positions (``positions``): ``None`` is every position; a list of ints names absolute token
positions; ``slice(P, None)`` is position P onwards, every generated token included
(``slice(P, Q)`` and a step work as for ``range``). A position is the token's index in
its own sequence, counted from its first real token: with a 2-D ``attention_mask`` (as
``generate`` passes), left padding is not counted and padding tokens are never
intervened on (except with ``positions=None``, where it makes no difference). Without
a mask, positions are indices into the sequence as given.

Positions are tracked by a forward pre-hook on the base model that reads the current
call's tokens (``input_ids`` or ``inputs_embeds``) and their positions: ``position_ids``
when given (what the model itself uses), else they start at ``cache_position``, or at
the length of the KV cache (``past_key_values``, or ``cache`` in newer transformers), or 0. ``generate`` with a KV cache
therefore works: the prompt call and each one-token call know their positions.

Interventions on different codebooks nest (each edits its own codebooks); entering one
on a codebook that already has an ids hook (an active intervention, or
:func:`~codebook_lens.experiments.tokfsm.analysis.replaced_codes`) raises a RuntimeError before anything
changes: put all codes of a codebook in one intervention. Leaving the block, normally or
by an exception, removes every hook it added.

Sampling text under an intervention and steering evaluation are in
:mod:`codebook_lens.steering.sampling`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from codebook_lens.core.codebook import EMPTY_SLOT, Codebook, IdsHook, topk_codes
from codebook_lens.core.errors import CodebookLensError
from codebook_lens.core.model import CodebookModel
from codebook_lens.core.refs import CodeRef, check_ref

MODES: tuple[str, ...] = ("replace_last", "replace_all", "append")

Positions = Sequence[int] | slice | None


def as_ref(code: CodeRef | str) -> CodeRef:
    """A :class:`CodeRef` from itself or from its text form."""
    if isinstance(code, CodeRef):
        return code
    if isinstance(code, str):
        return CodeRef.parse(code)
    raise CodebookLensError(
        f"a code is a CodeRef or a string such as layer12_mlp:345, got {code!r}"
    )


def _check_positions(positions: Positions) -> list[int] | slice | None:
    if positions is None:
        return None
    if isinstance(positions, slice):
        for name in ("start", "stop", "step"):
            value = getattr(positions, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise CodebookLensError(
                    f"positions slice {name} must be a non-negative integer or None, got {value!r}"
                )
        if positions.step == 0:
            raise CodebookLensError("positions slice step must not be 0")
        return positions
    if isinstance(positions, (str, bytes)) or not isinstance(positions, Sequence):
        raise CodebookLensError(
            f"positions must be None, a list of ints or a slice, got {positions!r}"
        )
    out = []
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise CodebookLensError(f"positions must be non-negative integers, got {p!r}")
        out.append(p)
    return out


def _describe_positions(positions: list[int] | slice | None) -> Any:
    if positions is None:
        return "all"
    if isinstance(positions, slice):
        start = positions.start or 0
        text = f"from {start}" if positions.stop is None else f"{start} to {positions.stop - 1}"
        return text if positions.step in (None, 1) else f"{text} every {positions.step}"
    return list(positions)


@dataclass
class Intervention:
    """Codes to force on and codes to disable, in one mode, at chosen positions.

    force, disable: codes (CodeRef or text); converted to tuples of CodeRef.
    mode: how forced codes enter the slots, one of :data:`MODES`.
    positions: None (every position), a list of absolute positions, or a slice.
    strength: the factor of each forced code in the sum (1: the code as it is).
    """

    force: Sequence[CodeRef | str] = ()
    disable: Sequence[CodeRef | str] = ()
    mode: str = "replace_last"
    positions: Positions = None
    strength: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise CodebookLensError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)):
            raise CodebookLensError(f"strength must be a number, got {self.strength!r}")
        if not math.isfinite(self.strength):
            raise CodebookLensError(f"strength must be finite, got {self.strength!r}")
        self.strength = float(self.strength)
        self.force = tuple(as_ref(c) for c in self.force)
        self.disable = tuple(as_ref(c) for c in self.disable)
        for name, refs in (("forced", self.force), ("disabled", self.disable)):
            seen: set[CodeRef] = set()
            for ref in refs:
                if ref in seen:
                    raise CodebookLensError(f"code {ref} is {name} twice")
                seen.add(ref)
        both = sorted(set(self.force) & set(self.disable))
        if both:
            raise CodebookLensError(f"code {both[0]} is both forced and disabled")
        self.positions = _check_positions(self.positions)

    @property
    def empty(self) -> bool:
        return not self.force and not self.disable

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "force": [str(c) for c in self.force],
            "disable": [str(c) for c in self.disable],
            "mode": self.mode,
            "positions": _describe_positions(self.positions),
            "strength": self.strength,
        }


# ----------------------------------------------------------------------------------------
# positions of the current forward call


def token_positions(args: tuple, kwargs: dict) -> torch.Tensor:
    """``(B, S)`` absolute positions of the tokens of one base-model call (-1: padding).

    ``args``/``kwargs`` are the call's arguments as a forward pre-hook sees them.
    """
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor):
        ids = args[0]
    if ids is not None:
        batch, seq = ids.shape[:2]
        device = ids.device
    else:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise RuntimeError("the base model was called with neither input_ids nor inputs_embeds")
        batch, seq = embeds.shape[:2]
        device = embeds.device
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != batch:
        mask = None
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and position_ids.shape[-1] == seq:
        # what the model itself uses (generate counts them from each row's first real token)
        real = position_ids.to(device=device, dtype=torch.long).reshape(-1, seq).expand(batch, seq)
        if mask is not None and mask.shape[1] >= seq:
            real = real.masked_fill(mask[:, -seq:].to(device) == 0, -1)
        return real
    cache_position = kwargs.get("cache_position")
    if cache_position is not None:
        padded = cache_position.to(device=device, dtype=torch.long).reshape(1, seq)
    else:
        # the KV cache is ``past_key_values`` (``cache`` in newer transformers releases)
        past = kwargs.get("past_key_values", kwargs.get("cache"))
        offset = 0
        if past is not None and hasattr(past, "get_seq_length"):
            offset = int(past.get_seq_length())
        padded = torch.arange(offset, offset + seq, device=device).unsqueeze(0)
    padded = padded.expand(batch, seq)
    if mask is None:
        return padded
    if bool((padded >= mask.shape[1]).any()):
        return padded  # a mask that does not cover the sequence: fall back to indices
    mask = mask.to(device=device, dtype=torch.long)
    real = (mask.cumsum(-1) - 1).gather(1, padded)
    return real.masked_fill(mask.gather(1, padded) == 0, -1)


class _PositionTracker:
    """Holds the positions of the base model's current call (set by its pre-hook)."""

    def __init__(self) -> None:
        self.current: torch.Tensor | None = None

    def before(self, _module, args, kwargs) -> None:
        self.current = token_positions(args, kwargs)

    def after(self, _module, _args, _kwargs, _output) -> None:
        self.current = None

    def selected(self, positions: list[int] | slice | None, rows: int) -> torch.Tensor:
        """``(rows,)`` bool: which flattened tokens of the current call are intervened on."""
        pos = self.current
        if pos is None:
            raise RuntimeError(
                "an intervened codebook ran outside a forward call of its model's base model"
            )
        if pos.numel() != rows:
            raise RuntimeError(
                f"the codebook saw {rows} tokens but the base model's call has {pos.numel()}"
            )
        pos = pos.reshape(-1)
        if positions is None:
            return torch.ones_like(pos, dtype=torch.bool)
        if isinstance(positions, slice):
            start = positions.start or 0
            step = positions.step or 1
            keep = (pos >= start) & ((pos - start) % step == 0)
            if positions.stop is not None:
                keep &= pos < positions.stop
            return keep
        return torch.isin(pos, torch.tensor(positions, dtype=torch.long, device=pos.device))


# ----------------------------------------------------------------------------------------
# the ids hook of one codebook


class _CodebookEdit:
    """The edit an intervention makes to one codebook's ids."""

    def __init__(
        self,
        codebook: Codebook,
        forced: dict[int, list[int]],
        disabled: dict[int, list[int]],
        intervention: Intervention,
        tracker: _PositionTracker,
    ) -> None:
        self.codebook = codebook
        self.forced = forced
        self.disabled = disabled
        self.mode = intervention.mode
        self.positions = intervention.positions
        self.strength = intervention.strength
        self.tracker = tracker
        k = codebook.k
        most_forced = max((len(v) for v in forced.values()), default=0)
        self.width = k
        if self.mode == "append":
            self.width = k + most_forced
        elif self.mode == "replace_all":
            self.width = max(k, most_forced)
        self.most_disabled = max((len(v) for v in disabled.values()), default=0)
        table = torch.zeros(codebook.groups, codebook.num_codes, dtype=torch.bool)
        for group, codes in disabled.items():
            table[group, codes] = True
        self.disabled_table = table

    def __call__(
        self, ids: torch.Tensor, a: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        rows = self.tracker.selected(self.positions, ids.shape[0])
        if self.disabled:
            ids = self._disable(ids, a, rows)
        if self.forced:
            ids = self._force(ids, rows)
            if self.strength != 1.0:
                return ids, self._scales(ids, rows)
        return ids

    def _scales(self, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Per slot: ``strength`` where a forced code sits at a chosen position, else 1."""
        scales = torch.ones(ids.shape, dtype=torch.float32, device=ids.device)
        for group, codes in self.forced.items():
            forced = torch.tensor(codes, device=ids.device)
            hit = torch.isin(ids[:, group], forced) & rows.unsqueeze(-1)
            scales[:, group] = torch.where(hit, self.strength, scales[:, group])
        return scales

    def _disable(self, ids: torch.Tensor, a: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        cb = self.codebook
        table = self.disabled_table.to(ids.device)
        groups = torch.arange(cb.groups, device=ids.device).view(1, -1, 1)
        hit = table[groups, ids].any(-1) & rows.unsqueeze(-1)  # (N, G): a disabled code chosen
        where = hit.any(-1).nonzero().squeeze(-1)
        if where.numel() == 0:
            return ids
        c = cb.config
        candidates = topk_codes(
            a.detach()[where],
            cb.weight.detach(),
            cb.k + self.most_disabled,
            c.similarity,
            c.chunk_mib,
        )
        banned = table[groups, candidates]
        order = banned.to(torch.uint8).argsort(dim=-1, stable=True)[..., : cb.k]
        best = candidates.gather(-1, order)
        ids = ids.clone()
        ids[where] = torch.where(hit[where].unsqueeze(-1), best, ids[where])
        return ids

    def _force(self, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        k = self.codebook.k
        n, groups, _ = ids.shape
        out = ids.new_full((n, groups, self.width), EMPTY_SLOT)
        out[..., :k] = ids
        keep = rows.unsqueeze(-1)
        for group, codes in self.forced.items():
            chosen = ids[:, group]  # (N, k), best first
            if self.mode == "replace_all":
                row = torch.tensor(codes + [EMPTY_SLOT] * (self.width - len(codes)))
                out[:, group] = torch.where(keep, row.to(ids.device), out[:, group])
            elif self.mode == "replace_last":
                out[:, group, :k] = self._replace_last(chosen, codes, rows)
            else:
                out[:, group, k:] = self._append(chosen, codes, rows, self.width - k)
        return out

    @staticmethod
    def _replace_last(chosen: torch.Tensor, codes: list[int], rows: torch.Tensor) -> torch.Tensor:
        k = chosen.shape[1]
        forced = torch.tensor(codes, device=chosen.device)
        taken = torch.isin(chosen, forced)  # slots that hold a forced code stay
        slots = chosen.clone()
        for code in codes:
            place = rows & ~(chosen == code).any(-1)
            last_free = k - 1 - (~taken).flip(-1).to(torch.uint8).argmax(-1)
            col = last_free.unsqueeze(-1)
            slots.scatter_(1, col, torch.where(place.unsqueeze(-1), code, slots.gather(1, col)))
            taken.scatter_(1, col, taken.gather(1, col) | place.unsqueeze(-1))
        return slots

    @staticmethod
    def _append(
        chosen: torch.Tensor, codes: list[int], rows: torch.Tensor, extra: int
    ) -> torch.Tensor:
        n = chosen.shape[0]
        slots = chosen.new_full((n, extra), EMPTY_SLOT)
        filled = torch.zeros(n, dtype=torch.long, device=chosen.device)
        for code in codes:
            place = rows & ~(chosen == code).any(-1)
            col = filled.clamp(max=extra - 1).unsqueeze(-1)
            slots.scatter_(1, col, torch.where(place.unsqueeze(-1), code, slots.gather(1, col)))
            filled += place.long()
        return slots


def _plan(
    model: CodebookModel, intervention: Intervention
) -> dict[str, tuple[dict[int, list[int]], dict[int, list[int]]]]:
    """Per codebook key: forced and disabled codes per group, checked against the model."""
    shapes = {key: (cb.groups, cb.num_codes) for key, cb in model.codebooks.items()}
    plan: dict[str, tuple[dict[int, list[int]], dict[int, list[int]]]] = {}
    for which, refs in ((0, intervention.force), (1, intervention.disable)):
        for ref in refs:
            check_ref(ref, shapes)
            entry = plan.setdefault(ref.codebook, ({}, {}))
            entry[which].setdefault(ref.group, []).append(ref.code)
    for key, (forced, disabled) in plan.items():
        cb = model.codebooks[key]
        if intervention.mode == "replace_last":
            for group, codes in forced.items():
                if len(codes) > cb.k:
                    raise CodebookLensError(
                        f"replace_last can force at most k={cb.k} codes in {_group_name(key, group)}, "
                        f"got {len(codes)}; use mode append or replace_all"
                    )
        for group, codes in disabled.items():
            if cb.k + len(codes) > cb.num_codes:
                raise CodebookLensError(
                    f"cannot disable {len(codes)} codes in {_group_name(key, group)}: "
                    f"it has {cb.num_codes} codes and needs k={cb.k} left"
                )
    return plan


def _group_name(key: str, group: int) -> str:
    return f"{key}/{group}" if group or key.endswith("attn_heads") else key


def check_intervention(model: CodebookModel, intervention: Intervention) -> None:
    """Raise a clear ValueError unless every code of ``intervention`` fits ``model``."""
    _plan(model, intervention)


@contextlib.contextmanager
def apply_intervention(model: CodebookModel, intervention: Intervention) -> Iterator[Intervention]:
    """Within the block, ``model``'s codebooks follow ``intervention`` (see the module doc)."""
    plan = _plan(model, intervention)
    busy = [key for key in plan if model.codebooks[key].ids_hook is not None]
    if busy:
        raise RuntimeError(
            f"codebook {busy[0]} is already intervened on; interventions do not nest, "
            "so put all codes in one intervention"
        )
    if not plan:
        yield intervention
        return
    tracker = _PositionTracker()
    handles = []
    installed: list[str] = []
    try:
        base = model.model
        handles.append(base.register_forward_pre_hook(tracker.before, with_kwargs=True))
        handles.append(base.register_forward_hook(tracker.after, with_kwargs=True))
        for key, (forced, disabled) in plan.items():
            hook: IdsHook = _CodebookEdit(
                model.codebooks[key], forced, disabled, intervention, tracker
            )
            model.codebooks[key].ids_hook = hook
            installed.append(key)
        yield intervention
    finally:
        for key in installed:
            model.codebooks[key].ids_hook = None
        for handle in handles:
            handle.remove()


def intervene(
    model: CodebookModel,
    force: Sequence[CodeRef | str] = (),
    disable: Sequence[CodeRef | str] = (),
    mode: str = "replace_last",
    positions: Positions = None,
    strength: float = 1.0,
) -> contextlib.AbstractContextManager[Intervention]:
    """Context manager: force codes on and disable codes in ``model`` (see the module doc)."""
    return apply_intervention(model, Intervention(force, disable, mode, positions, strength))
