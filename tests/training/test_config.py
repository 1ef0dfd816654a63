"""Strict YAML configs: typos are errors with suggestions, types are checked."""

from __future__ import annotations

import pytest

from codebook_lens.training.config import ConfigError, TrainConfig, load_train_config


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-4\n  freeze_base: true\nschedule:\n  max_steps: 7\n")
    cfg = load_train_config(path, ["optim.codebook_lr=5e-3", "data.seq_len=64"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 1e-4 as str
    assert cfg.optim.freeze_base is True
    assert cfg.optim.codebook_lr == 5e-3
    assert cfg.schedule.max_steps == 7 and cfg.data.seq_len == 64
    assert cfg.schedule.batch_size == 8  # untouched default


@pytest.mark.parametrize(
    "yaml_text, match",
    [
        (
            "optim:\n  codebok_lr: 1\n",
            r"unknown key 'optim.codebok_lr'; did you mean 'codebook_lr'\?",
        ),
        ("optimizer:\n  lr: 1\n", r"unknown key 'optimizer'; did you mean 'optim'\?"),
        ("schedule:\n  max_steps: 1.5\n", "schedule.max_steps must be an integer, got 1.5"),
        ("schedule:\n  scheduler: step\n", "must be one of 'cosine', 'linear', 'constant'"),
        ("optim:\n  freeze_base: 1\n", "optim.freeze_base must be true or false"),
        ("data:\n  eval_fraction: 2\n", r"data.eval_fraction must be in \(0, 1\)"),
        ("optim:\n  distill_weight: 1\n", "needs optim.freeze_base: true"),
        ("optim:\n  lm_weight: -1\n", r"optim.lm_weight must be finite and >= 0, got -1"),
        ("optim:\n  distill_weight: .nan\n", "optim.distill_weight must be finite"),
        ("- a\n- b\n", "must hold a mapping"),
        ("optim: [1, 2\n", "is not valid YAML"),
    ],
)
def test_bad_configs(tmp_path, yaml_text, match):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=match):
        load_train_config(path)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_train_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", ["smollm2-cpu.yaml", "paper-gpu.yaml"])
def test_shipped_configs_parse(name):
    from pathlib import Path

    from codebook_lens.core.model import SiteSpec

    cfg = load_train_config(Path(__file__).parents[2] / "configs" / name)
    assert cfg.model.path == "smollm2-135m"
    specs = [SiteSpec.from_dict(s) for s in cfg.codebooks.sites]
    assert specs and all(s.codebook.k < s.codebook.num_codes for s in specs)
