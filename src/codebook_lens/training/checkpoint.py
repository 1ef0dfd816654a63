"""Training checkpoints without pickle, written atomically.

A checkpoint is a directory ``step-NNNNNNN`` holding safetensors files (weights,
optimizer tensors, RNG states) and JSON (step, which fixes the data position, optimizer scalars,
scheduler state). It is written under a temporary name and renamed into place, so
a crash never leaves a half-written checkpoint under the final name.

Each checkpoint records the run that wrote it: the run's config without the keys that
may change when a run is resumed (:data:`RESUMABLE`), and a digest of it
(:func:`run_record`). A run resumes only from its own checkpoints, prunes only its own,
and skips a damaged checkpoint for the newest complete one before it
(:func:`newest_readable`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from codebook_lens.core.errors import CodebookLensError
from codebook_lens.core.files import save_safetensors
from codebook_lens.training.config import TrainConfig, to_dict

PREFIX = "step-"
# config keys a resumed run may change: where it lives, how long it runs, how often it
# logs, evaluates and checkpoints; every other key shapes the run and must stay
RESUMABLE = ("output_dir", "schedule.max_steps", "logging", "eval", "checkpoint")


class CheckpointError(CodebookLensError):
    """A checkpoint that cannot be read, or that another run wrote."""


class OtherRunError(CheckpointError):
    """A checkpoint written by a run with other settings."""


def run_record(config: dict) -> dict:
    """``{"fingerprint": sha256, "config": ...}`` of a run's config (plain data) without
    the :data:`RESUMABLE` keys."""
    kept = copy.deepcopy(config)
    for key in RESUMABLE:
        *parents, last = key.split(".")
        node = kept
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    text = json.dumps(kept, sort_keys=True)
    return {"fingerprint": hashlib.sha256(text.encode()).hexdigest(), "config": kept}


def differences(old: Any, new: Any, where: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two plain configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{where}.{key}" if where else str(key)
            out += differences(old.get(key), new.get(key), path)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [
            d
            for i, (a, b) in enumerate(zip(old, new, strict=True))
            for d in differences(a, b, f"{where}[{i}]")
        ]
    return [] if old == new else [f"{where or 'config'}: {old!r} -> {new!r}"]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and plain JSON data."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    py = random.getstate()
    return tensors, {"python": [py[0], list(py[1]), py[2]]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))


def write_checkpoint(
    root: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler,
    keep: int,
    run: dict | None = None,
) -> Path:
    """Write ``root/step-NNNNNNN`` atomically and prune this run's checkpoints (those
    with ``run``'s fingerprint) to the ``keep`` newest; another run's are left alone."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_safetensors(
        {k: v.detach().contiguous().cpu() for k, v in weights.items()},
        tmp / "weights.safetensors",
    )
    opt_tensors, opt_meta = optimizer_to_files(optimizer)
    save_safetensors(opt_tensors, tmp / "optimizer.safetensors")
    rng_tensors, rng_meta = rng_state()
    save_safetensors(rng_tensors, tmp / "rng.safetensors")
    meta = {
        "step": step,
        "run": run,
        "optimizer": opt_meta,
        "scheduler": scheduler.state_dict(),
        "rng": rng_meta,
    }
    (tmp / "checkpoint.json").write_text(json.dumps(meta))
    for f in tmp.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    own = [p for p in list_checkpoints(root) if _written_by(p, run)]
    for old in own[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _meta(path: Path) -> dict:
    """The checkpoint.json of a checkpoint, or a CheckpointError when it is damaged."""
    try:
        meta = json.loads((path / "checkpoint.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}/checkpoint.json cannot be read: {err}") from None
    if not isinstance(meta, dict) or meta.get("step") != int(path.name[len(PREFIX) :]):
        raise CheckpointError(f"{path}/checkpoint.json does not describe step {path.name}")
    return meta


def _written_by(path: Path, run: dict | None) -> bool:
    """Whether the checkpoint in ``path`` was written by ``run`` (see :func:`same_run`);
    a damaged one was not."""
    try:
        theirs = _meta(path).get("run")
    except CheckpointError:
        return False
    if not isinstance(theirs, dict) or not isinstance(run, dict):
        return (theirs or {}).get("fingerprint") == (run or {}).get("fingerprint")
    return same_run(theirs, run)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary ones are ignored)."""
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir()
        and p.name.startswith(PREFIX)
        and _step(p) is not None
        and (p / "checkpoint.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def _step(path: Path) -> int | None:
    digits = path.name[len(PREFIX) :]
    return int(digits) if digits.isascii() and digits.isdigit() else None


def read_checkpoint(
    path: Path,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(weights, optimizer tensors, rng tensors, meta) of one checkpoint, or a
    CheckpointError when any of its files is damaged."""
    meta = _meta(path)
    for key in ("optimizer", "scheduler", "rng"):
        if not isinstance(meta.get(key), dict):
            raise CheckpointError(f"{path}/checkpoint.json has no {key} state")
    tensors = []
    for name in ("weights", "optimizer", "rng"):
        try:
            tensors.append(load_file(str(path / f"{name}.safetensors")))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}/{name}.safetensors cannot be read: {err}") from None
    if "torch" not in tensors[2]:
        raise CheckpointError(f"{path}/rng.safetensors holds no random state")
    return tensors[0], tensors[1], tensors[2], meta


def with_defaults(config: Any, defaults: Any) -> Any:
    """``config`` with the keys it lacks taken from ``defaults`` (nested mappings)."""
    if not isinstance(config, dict) or not isinstance(defaults, dict):
        return config
    filled = {key: with_defaults(value, defaults.get(key)) for key, value in config.items()}
    for key, value in defaults.items():
        filled.setdefault(key, copy.deepcopy(value))
    return filled


def recorded_as_today(recorded: dict) -> dict:
    """A run record (see :func:`run_record`) with the options added to the training
    config since it was written taking their defaults."""
    return run_record(with_defaults(recorded.get("config"), to_dict(TrainConfig())))


def same_run(theirs: dict, run: dict) -> bool:
    """Whether two run records are the same run: the same fingerprint, or the same once
    the older record's missing options take their defaults."""
    if theirs.get("fingerprint") == run["fingerprint"]:
        return True
    return recorded_as_today(theirs)["fingerprint"] == run["fingerprint"]


def check_run(path: Path, run: dict) -> None:
    """Raise an OtherRunError naming the settings that differ when the checkpoint in
    ``path`` was written by a run other than ``run`` (see :func:`same_run`).
    Checkpoints written before runs were recorded pass, and so do those written before
    an option existed that this run leaves at its default."""
    theirs = _meta(path).get("run")
    if not isinstance(theirs, dict) or same_run(theirs, run):
        return
    changed = differences(recorded_as_today(theirs)["config"], run["config"])
    raise OtherRunError(
        f"{path} was written by a run with other settings ({'; '.join(changed[:5]) or 'unknown'}); "
        "resume with the settings it was written with, or train into another output_dir"
    )


def newest_readable(
    checkpoints: list[Path], log: Callable[[str], None]
) -> tuple[Path, tuple[dict, dict, dict, dict]]:
    """The newest of ``checkpoints`` (oldest first) whose files all read, and its
    contents; a damaged one is reported through ``log`` and the one before it tried."""
    problems = []
    for path in reversed(checkpoints):
        try:
            return path, read_checkpoint(path)
        except CheckpointError as err:
            problems.append(str(err))
            log(f"skipping a damaged checkpoint: {err}")
    raise CheckpointError("no checkpoint could be read: " + "; ".join(problems))


def resumable(root: Path, run: dict, resume: bool, max_steps: int) -> list[Path]:
    """The checkpoints in ``root`` that ``run`` may resume from (oldest first), or a
    clear error when a fresh run would write among old checkpoints, when ``root`` holds
    another run's, or when the newest is past ``max_steps``. Reads only the JSON files."""
    existing = list_checkpoints(root)
    if not existing:
        return []
    if not resume:
        raise CheckpointError(
            f"{root} already holds checkpoints (the newest is {existing[-1].name}); pass "
            "--resume to continue that run, or choose another output_dir"
        )
    step = 0
    for path in existing:
        try:
            check_run(path, run)
        except OtherRunError:
            raise
        except CheckpointError:
            continue  # a damaged checkpoint: resuming skips it
        step = int(path.name[len(PREFIX) :])
    if step > max_steps:
        raise CheckpointError(
            f"the newest checkpoint in {root} is at step {step}, past schedule.max_steps="
            f"{max_steps}; raise max_steps to continue it"
        )
    return existing


def restore(
    checkpoints: list[Path],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    log: Callable[[str], None],
) -> tuple[Path, int]:
    """Load the newest readable of ``checkpoints`` into the model, optimizer, scheduler
    and random state; returns it and its step."""
    path, (weights, opt_tensors, rng_tensors, meta) = newest_readable(checkpoints, log)
    try:
        _, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected:
            raise CheckpointError(
                f"checkpoint {path} does not fit this model: unexpected {unexpected[:5]}"
            )
        optimizer_from_files(optimizer, opt_tensors, meta["optimizer"])
        scheduler.load_state_dict(meta["scheduler"])
        set_rng_state(rng_tensors, meta["rng"])
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        if isinstance(err, CodebookLensError):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} does not fit this model: {first}") from None
    return path, meta["step"]
