"""The TokFSM config: strict keys, values checked when it is built (before any model
exists), and stages that become the training loop's typed config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codebook_lens.core.codebook import CodebookConfig
from codebook_lens.core.model import SiteSpec
from codebook_lens.experiments.tokfsm import run as run_module
from codebook_lens.experiments.tokfsm.config import (
    PRESETS,
    FSMExperimentConfig,
    load_fsm_config,
    stage_config,
)
from codebook_lens.training.config import ConfigError, TrainConfig, from_dict, to_dict


@pytest.mark.parametrize(
    "override, match",
    [
        ("net.heads=3", r"net.heads must be a divisor of net.hidden \(128\), got 3"),
        ("net.heads=0", "net.heads must be >= 1, got 0"),
        ("net.layers=0", "net.layers must be >= 1, got 0"),
        ("net.rotary_fraction=0", r"net.rotary_fraction must be in \(0, 1\], got 0.0"),
        ("net.rope_theta=.nan", "net.rope_theta must be finite, got nan"),
        ("base.batch_size=0", "base.batch_size must be >= 1, got 0"),
        ("base.log_every=0", "base.log_every must be >= 1, got 0"),
        ("base.eval_every=0", "base.eval_every must be >= 1, got 0"),
        ("base.checkpoint_every=0", "base.checkpoint_every must be >= 1, got 0"),
        ("base.eval_batches=0", "base.eval_batches must be >= 1, got 0"),
        ("base.steps=0", "base.steps must be >= 1, got 0"),
        ("base.warmup_steps=-1", "base.warmup_steps must be >= 0, got -1"),
        ("base.lr=0", r"base.lr must be a finite number > 0, got 0.0"),
        ("base.lr=.inf", "base.lr must be finite, got inf"),
        ("base.weight_decay=-1", r"base.weight_decay must be a finite number >= 0, got -1.0"),
        ("base.scheduler=step", "base.scheduler must be one of 'cosine', 'linear', 'constant'"),
        ("codebook.batch_size=0", "codebook.batch_size must be >= 1, got 0"),
        ("codebook.log_every=0", "codebook.log_every must be >= 1, got 0"),
        ("codebook.codebook_lr=.nan", "codebook.codebook_lr must be finite, got nan"),
        ("codebook.k=0", r"codebook.k must be in 1..1023 \(below the sites' number of codes\)"),
        ("codebook.k=1024", "codebook.k must be in 1..1023"),
        ("codebook.mlp_num_codes=1", "codebook.mlp_num_codes must be >= 2, got 1"),
        ("codebook.sites=[ffn]", "codebook.sites must be a list of distinct sites from"),
        ("codebook.sites=[]", "codebook.sites must be a list of distinct sites"),
        ("codebook.sites=[mlp, mlp]", "codebook.sites must be a list of distinct sites"),
        ("codebook.similarity=cosin", "codebook.similarity must be one of cosine"),
        ("codebook.commitment_weight=-1", "codebook.commitment_weight must be a finite number"),
        ("codebook.kmeans_tokens=0", "codebook.kmeans_tokens must be >= 1, got 0"),
        ("codebook.revive_after_steps=0", "codebook.revive_after_steps must be >= 1, got 0"),
        ("task.num_states=1", "task.num_states must be >= 2, got 1"),
        ("task.base=1", "task.base must be >= 2, got 1"),
        ("task.out_degree=101", r"task.out_degree must be in 1..task.num_states \(100\), got 101"),
        ("task.seq_len=4", "task.seq_len must be >= 5, got 4"),  # BOS and two 2-digit states
        ("task.jump_rate=1", r"task.jump_rate must be in \[0, 1\), got 1.0"),
        ("analysis.pairs=0", "analysis.pairs must be >= 1, got 0"),
        ("analysis.sequences=0", "analysis.sequences must be >= 1, got 0"),
        ("analysis.purity_threshold=0", r"analysis.purity_threshold must be in \(0, 1\]"),
        ("base.batchsize=8", r"unknown key 'base.batchsize'; did you mean 'batch_size'\?"),
        ("codebook.mlp_num_code=8", r"unknown key 'codebook.mlp_num_code'; did you mean"),
    ],
)
def test_bad_values_and_keys_are_refused_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=f"^{match}"):
        load_fsm_config("cpu", [override])


def test_parity_rotary_needs_four_rotary_dimensions_per_head():
    # the cpu preset rotates every dimension: head size 8 (32 / 4) is enough
    assert load_fsm_config("cpu", ["net.hidden=32", "net.heads=4"]).net.parity_rotary
    with pytest.raises(ConfigError, match=r"net.rotary_fraction must be large enough .* gives 2"):
        load_fsm_config("cpu", ["net.hidden=32", "net.heads=4", "net.rotary_fraction=0.25"])


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'fast'; choose from cpu, demo, paper"):
        load_fsm_config("fast")


def test_stages_build_the_training_loops_typed_config():
    cfg = load_fsm_config("cpu", ["codebook.k=2", "codebook.attn_num_codes=64"])
    base = stage_config(cfg, "base", Path("out"))
    assert isinstance(base, TrainConfig) and base.codebooks.sites == []
    assert base.output_dir == str(Path("out") / "base")
    stage = stage_config(cfg, "codebook", Path("out"))
    assert stage.codebooks.sites == [
        SiteSpec("attn_heads", CodebookConfig(num_codes=64, k=2)),
        SiteSpec("mlp", CodebookConfig(num_codes=1024, k=2)),
    ]
    assert stage.optim.freeze_base and stage.optim.codebook_lr == cfg.codebook.codebook_lr
    assert stage.schedule.max_steps == 800 and stage.logging.every == 25
    # what the stage writes to config.json reads back to the same config
    assert from_dict(TrainConfig, to_dict(stage)) == stage


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_builds_both_stages(preset):
    cfg = load_fsm_config(preset)
    assert isinstance(cfg, FSMExperimentConfig) and cfg.preset == preset
    for name in ("base", "codebook"):
        assert (
            stage_config(cfg, name, Path("o")).schedule.batch_size == getattr(cfg, name).batch_size
        )


def test_runs_stamped_with_plain_site_options_are_still_recognised():
    """A stage stamp written when sites were plain mappings of the options set (before
    sites were typed) fingerprints the same as the typed stage: reruns reuse its model."""
    cfg = load_fsm_config("demo")
    typed = {"train": to_dict(stage_config(cfg, "codebook", Path("a"))), "task": {}, "net": {}}
    old = json.loads(json.dumps(typed))
    old["train"]["output_dir"] = "elsewhere"
    old["train"]["codebooks"]["sites"] = [
        {
            "site": site,
            "codebook": {
                "num_codes": 1024,
                "k": 1,
                "similarity": "cosine",
                "commitment_weight": 0.0,
            },
        }
        for site in ("attn_heads", "mlp")
    ]
    assert run_module._fingerprint(old) == run_module._fingerprint(typed)
    changed = json.loads(json.dumps(old))
    changed["train"]["codebooks"]["sites"][1]["codebook"]["num_codes"] = 2048
    assert run_module._fingerprint(changed) != run_module._fingerprint(typed)
    # a stamp written before an option existed (left at its default) is the same too
    del old["train"]["optim"]["freeze_base_steps"]
    assert run_module._fingerprint(old) == run_module._fingerprint(typed)


def test_the_run_module_still_offers_the_config():
    assert run_module.load_fsm_config is load_fsm_config and run_module.PRESETS is PRESETS
