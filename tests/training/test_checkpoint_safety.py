"""Attacks on training runs, each written as the attack: a fresh run into a directory
holding another run's checkpoints, resuming another run or a run whose settings
changed, a damaged newest checkpoint, `--resume` followed by overrides, an output
directory that is a file, and checkpoint files readable only by their owner."""

from __future__ import annotations

import json
import os

import pytest
from helpers import save_tiny_training_dir
from safetensors.torch import load_file

from codebook_lens.cli.main import main
from codebook_lens.core.errors import CodebookLensError
from codebook_lens.training.checkpoint import run_record
from codebook_lens.training.config import load_train_config
from codebook_lens.training.loop import train


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_training_dir(tmp_path_factory.mktemp("tiny"), docs=12)


def run_args(tiny_dir, out, *extra) -> list[str]:
    """key=value arguments of a tiny run of 4 steps, a checkpoint after each step."""
    return [
        f"output_dir={out}",
        f"model.path={tiny_dir / 'model'}",
        f"data.corpus={tiny_dir / 'corpus'}",
        "data.seq_len=16",
        "data.eval_fraction=0.2",
        "codebooks.sites=[{site: mlp, layers: [1], codebook: {num_codes: 16, k: 1}}]",
        "schedule.max_steps=4",
        "schedule.batch_size=2",
        "schedule.warmup_steps=1",
        "eval.every=100",
        "eval.batches=1",
        "checkpoint.every=1",
        "checkpoint.keep=2",
        *extra,
    ]


def cfg(tiny_dir, out, *extra):
    return load_train_config(None, run_args(tiny_dir, out, *extra))


def steps(out) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_a_fresh_run_refuses_a_directory_holding_another_runs_checkpoints(tiny_dir, tmp_path):
    """An older run went to step 4; a fresh run of 2 steps into the same output_dir would
    prune its own checkpoints (the highest step numbers win) and leave the old ones."""
    out = tmp_path / "run"
    train(cfg(tiny_dir, out))
    before = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()}
    with pytest.raises(CodebookLensError, match="already holds checkpoints .*--resume"):
        train(cfg(tiny_dir, out, "schedule.max_steps=2", "optim.lr=3e-4"))
    assert {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()} == before


def test_resume_refuses_another_runs_checkpoints(tiny_dir, tmp_path):
    """The other run stopped at step 4; this one (another learning rate, 3 steps) would
    continue it past its own max_steps and exit 0."""
    out = tmp_path / "run"
    train(cfg(tiny_dir, out))
    before = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()}
    with pytest.raises(CodebookLensError, match=r"other settings \(optim.lr: 0.0001 -> 0.0003\)"):
        train(cfg(tiny_dir, out, "schedule.max_steps=3", "optim.lr=3e-4"), resume=True)
    with pytest.raises(CodebookLensError, match="at step 4, past schedule.max_steps=3"):
        train(cfg(tiny_dir, out, "schedule.max_steps=3"), resume=True)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()} == before


def test_resume_takes_checkpoints_written_before_an_option_existed(tiny_dir, tmp_path):
    """A checkpoint whose recorded settings lack an option added since (here
    optim.freeze_base_steps), which this run leaves at its default, is the same run;
    one that differs in a recorded setting is still refused."""
    out = tmp_path / "run"
    train(cfg(tiny_dir, out), stop_at_step=2)
    for path in (out / "checkpoints").iterdir():
        meta_file = path / "checkpoint.json"
        meta = json.loads(meta_file.read_text())
        config = meta["run"]["config"]
        del config["optim"]["freeze_base_steps"]
        meta["run"] = run_record(config)
        meta_file.write_text(json.dumps(meta))
    with pytest.raises(CodebookLensError, match=r"other settings \(optim.lr: 0.0001 -> 0.0003\)"):
        train(cfg(tiny_dir, out, "optim.lr=3e-4"), resume=True)
    train(cfg(tiny_dir, out), resume=True)
    assert steps(out) == ["step-0000003", "step-0000004"]  # and pruned them as its own


def test_resume_after_changing_num_codes_names_the_key(tiny_dir, tmp_path, capsys):
    """`codebook train CFG --resume key=value`, with the codebook grown from 16 to 32."""
    out = tmp_path / "run"
    train(cfg(tiny_dir, out), stop_at_step=2)
    config = tmp_path / "train.yaml"
    config.write_text("{}\n")
    grown = "codebooks.sites=[{site: mlp, layers: [1], codebook: {num_codes: 32, k: 1}}]"
    assert main(["train", str(config), "--resume", *run_args(tiny_dir, out), grown]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "codebooks.sites[0].codebook.num_codes: 16 -> 32" in err.strip().splitlines()[-1]


def test_resume_takes_overrides_after_the_flag(tiny_dir, tmp_path, capsys):
    """`codebook train CFG --resume key=value ...` (argparse alone stops at --resume)."""
    out = tmp_path / "run"
    config = tmp_path / "train.yaml"
    config.write_text("schedule:\n  max_steps: 100\n")
    args = run_args(tiny_dir, out, "schedule.max_steps=2")
    assert main(["train", str(config), "--resume", *args]) == 0
    assert steps(out) == ["step-0000001", "step-0000002"]
    assert (out / "model" / "codebooks.safetensors").is_file()
    with pytest.raises(SystemExit) as info:  # anything else after the flags is still refused
        main(["train", str(config), "--resume", "--no-such-flag"])
    assert info.value.code == 2


def test_resume_skips_a_damaged_newest_checkpoint(tiny_dir, tmp_path, capsys):
    """Killed while the disk filled up: step 3's weights are cut short. Resuming from
    step 2 must give exactly the uninterrupted run's model."""
    full = tmp_path / "full"
    train(cfg(tiny_dir, full))
    cut = tmp_path / "cut"
    train(cfg(tiny_dir, cut), stop_at_step=3)
    weights = cut / "checkpoints" / "step-0000003" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    train(cfg(tiny_dir, cut), resume=True)
    out = capsys.readouterr().out
    assert "skipping a damaged checkpoint" in out and "resuming from" in out
    assert "step-0000002 at step 2" in out
    a = load_file(str(full / "model" / "codebooks.safetensors"))
    b = load_file(str(cut / "model" / "codebooks.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_an_output_dir_that_is_a_file_fails_before_training(tiny_dir, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    config = tmp_path / "train.yaml"
    config.write_text("{}\n")
    assert main(["train", str(config), *run_args(tiny_dir, target)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"the output_dir {target} is a file" in err.strip().splitlines()[-1]
    assert target.read_text() == "keep me"


def test_checkpoints_and_models_are_readable_by_others(tiny_dir, tmp_path):
    out = tmp_path / "run"
    train(cfg(tiny_dir, out, "schedule.max_steps=1"))
    mask = os.umask(0o022)
    os.umask(mask)
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in written)
    for path in written:
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path
