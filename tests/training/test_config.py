"""Strict YAML configs: typos are errors with suggestions at every level (codebook
options included), types and values are checked before any model loads."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from codebook_lens.cli.main import main as cli_main
from codebook_lens.core.codebook import CodebookConfig
from codebook_lens.core.model import SiteSpec
from codebook_lens.training import loop
from codebook_lens.training.config import (
    CheckpointSection,
    CodebooksSection,
    ConfigError,
    LoggingSection,
    OptimSection,
    ScheduleSection,
    SiteSection,
    TrainConfig,
    from_dict,
    load_train_config,
    to_dict,
)

CONFIGS = Path(__file__).parents[2] / "configs"


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
        ("optim:\n  freeze_base_steps: -1\n", "optim.freeze_base_steps must be"),
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


@pytest.mark.parametrize("name", ["smollm2-cpu.yaml", "paper-gpu.yaml", "smollm2-all-mlp.yaml"])
def test_shipped_configs_parse(name):
    cfg = load_train_config(CONFIGS / name)
    assert cfg.model.path == "smollm2-135m"
    specs = cfg.codebooks.sites
    assert specs and all(isinstance(s, SiteSpec) for s in specs)
    assert all(s.codebook.k < s.codebook.num_codes for s in specs)
    # the plain data written to OUTPUT/config.json reads back to the same config
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


# ----------------------------------------------------------------------------------------
# codebook sites are typed: SiteSection (the model's SiteSpec) holding a CodebookConfig


def test_sites_are_typed_with_every_option_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "codebooks:\n  sites:\n"
        "    - site: mlp\n      layers: [0, 2]\n"
        "      codebook: {num_codes: 64, k: 2, similarity: inner_product, outlier_factor: 8}\n"
        "    - site: attn_heads\n"
    )
    sites = load_train_config(path).codebooks.sites
    assert SiteSection is SiteSpec
    assert sites == [
        SiteSpec("mlp", CodebookConfig(64, 2, "inner_product", outlier_factor=8.0), [0, 2]),
        SiteSpec("attn_heads", CodebookConfig()),
    ]
    assert isinstance(sites[0].codebook.outlier_factor, float)
    assert CodebooksSection().sites == [SiteSpec("attn_heads", CodebookConfig(1024, 1))]


@pytest.mark.parametrize(
    "site, match",
    [
        (
            "{site: mlp, codebook: {num_code: 64}}",
            r"unknown key 'codebooks.sites\[0\].codebook.num_code'; did you mean 'num_codes'\?",
        ),
        (
            "{site: mlp, codebook: {simlarity: cosine}}",
            r"unknown key 'codebooks.sites\[0\].codebook.simlarity'; did you mean 'similarity'\?",
        ),
        (
            "{site: mlp, layer: [1]}",
            r"unknown key 'codebooks.sites\[0\].layer'; did you mean 'layers'\?",
        ),
        (
            "{site: mlp, codebok: {k: 1}}",
            r"unknown key 'codebooks.sites\[0\].codebok'; did you mean 'codebook'\?",
        ),
        ("{layers: [1]}", r"codebooks.sites\[0\]: missing required key\(s\) site"),
        ("{site: ffn}", r"codebooks.sites\[0\]: site 'ffn' is not supported; choose from"),
        ("{site: mlp, layers: [1.5]}", r"codebooks.sites\[0\].layers\[0\] must be an integer"),
        ("{site: mlp, layers: [-1]}", r"codebooks.sites\[0\].layers must be a list of layer"),
        ("{site: mlp, layers: [1, 1]}", "repeat a layer"),
        ("{site: mlp, codebook: {k: 1.5}}", r"codebook.k must be an integer, got 1.5"),
        ("{site: mlp, codebook: {num_codes: 8, k: 8}}", r"codebook: k must be an integer with 1"),
        ("{site: mlp, codebook: {similarity: l2}}", r"codebook: similarity must be one of"),
        ("{site: mlp, codebook: {outlier_factor: 1}}", "outlier_factor must be None or"),
        ("{site: mlp, codebook: {chunk_mib: .inf}}", r"codebook.chunk_mib must be finite, got inf"),
        ("{site: mlp, codebook: {commitment_weight: .nan}}", "commitment_weight must be finite"),
        ("mlp", r"codebooks.sites\[0\] must be a mapping"),
    ],
)
def test_bad_sites_are_refused_at_load_naming_the_key(site, match):
    with pytest.raises(ConfigError, match=match):
        load_train_config(None, [f"codebooks.sites=[{site}]"])


def test_sites_given_in_python_as_mappings_are_checked_and_typed():
    section = CodebooksSection(sites=[{"site": "mlp", "codebook": {"num_codes": 16, "k": 2}}])
    assert section.sites == [SiteSpec("mlp", CodebookConfig(16, 2))]
    with pytest.raises(ConfigError, match=r"'codebooks.sites\[0\].codebook.kk'; did you mean 'k'"):
        CodebooksSection(sites=[{"site": "mlp", "codebook": {"kk": 2}}])


def test_misspelt_codebook_option_fails_before_the_base_model_loads(tmp_path, monkeypatch, capsys):
    def explode(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(loop, "load_base", explode)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", explode)
    path = tmp_path / "c.yaml"
    path.write_text((CONFIGS / "smollm2-cpu.yaml").read_text().replace("k: 8,", "kk: 8,"))
    assert "kk: 8" in path.read_text()
    assert cli_main(["train", str(path), f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'codebooks.sites[0].codebook.kk'; did you mean 'k'?" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------
# values: one rule each, refused with the key, the bad value and what is allowed


@pytest.mark.parametrize(
    "override, match",
    [
        ("schedule.max_steps=-5", "schedule.max_steps must be >= 1, got -5"),
        ("schedule.max_steps=0", "schedule.max_steps must be >= 1, got 0"),
        ("schedule.batch_size=0", "schedule.batch_size must be >= 1, got 0"),
        ("schedule.grad_accum=0", "schedule.grad_accum must be >= 1, got 0"),
        ("schedule.warmup_steps=-1", "schedule.warmup_steps must be >= 0, got -1"),
        ("optim.lr=0", r"optim.lr must be a finite number > 0, got 0.0"),
        ("optim.lr=-1e-4", r"optim.lr must be a finite number > 0, got -0.0001"),
        ("optim.codebook_lr=0", r"optim.codebook_lr must be a finite number > 0, got 0.0"),
        ("optim.grad_clip=0", r"optim.grad_clip must be a finite number > 0, got 0.0"),
        ("optim.weight_decay=-1", r"optim.weight_decay must be a finite number >= 0, got -1.0"),
        ("optim.betas=[0.9]", r"optim.betas must be two numbers in \[0, 1\), got \[0.9\]"),
        ("optim.betas=[0.9, 1]", r"optim.betas must be two numbers in \[0, 1\)"),
        ("logging.every=0", "logging.every must be >= 1, got 0"),
        ("eval.every=0", "eval.every must be >= 1, got 0"),
        ("eval.batches=0", "eval.batches must be >= 1, got 0"),
        ("checkpoint.every=0", "checkpoint.every must be >= 1, got 0"),
        ("checkpoint.keep=-1", "checkpoint.keep must be >= 0, got -1"),
        ("codebooks.kmeans_tokens=0", "codebooks.kmeans_tokens must be >= 1, got 0"),
        ("codebooks.revive_after_steps=0", "codebooks.revive_after_steps must be >= 1, got 0"),
        ("data.max_train_tokens=0", "data.max_train_tokens must be >= 1, got 0"),
        ("data.seq_len=1", "data.seq_len must be >= 2, got 1"),
    ],
)
def test_bad_values_are_refused(override, match):
    with pytest.raises(ConfigError, match=f"^{match}"):
        load_train_config(None, [override])


@pytest.mark.parametrize(
    "key",
    [
        "optim.lr",
        "optim.codebook_lr",
        "optim.weight_decay",
        "optim.grad_clip",
        "optim.lm_weight",
        "data.eval_fraction",
    ],
)
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_nan_and_infinity_are_refused_everywhere(key, value):
    with pytest.raises(ConfigError, match=rf"^{key} must be finite, got (nan|inf|-inf) "):
        load_train_config(None, [f"{key}={value}"])


def test_nan_inside_a_list_is_refused():
    with pytest.raises(ConfigError, match=r"optim.betas\[1\] must be finite, got nan"):
        load_train_config(None, ["optim.betas=[0.9, .nan]"])


def test_smallest_allowed_values_pass():
    cfg = load_train_config(
        None,
        [
            "schedule.max_steps=1",
            "schedule.batch_size=1",
            "schedule.grad_accum=1",
            "schedule.warmup_steps=0",
            "logging.every=1",
            "eval.every=1",
            "checkpoint.every=1",
            "checkpoint.keep=0",  # keeps every checkpoint
            "optim.lr=1e-12",
            "optim.grad_clip=null",
            "codebooks.revive_after_steps=null",
        ],
    )
    assert cfg.schedule.max_steps == 1 and cfg.checkpoint.keep == 0
    assert cfg.optim.grad_clip is None and cfg.codebooks.revive_after_steps is None


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: ScheduleSection(max_steps=0), "schedule.max_steps must be >= 1, got 0"),
        (lambda: OptimSection(lr=math.nan), "optim.lr must be finite, got nan"),
        (lambda: OptimSection(codebook_lr=math.inf), "optim.codebook_lr must be finite"),
        (lambda: LoggingSection(every=0), "logging.every must be >= 1, got 0"),
        (lambda: CheckpointSection(every=0), "checkpoint.every must be >= 1, got 0"),
    ],
)
def test_sections_built_in_python_are_checked_too(build, match):
    with pytest.raises(ConfigError, match=match):
        build()


@pytest.mark.parametrize(
    ("text", "want"), [("no", "no"), ("'no'", "no"), ("bf16", "bf16"), ("auto", "auto")]
)
def test_a_choice_that_yaml_reads_as_a_boolean_is_the_word(text, want):
    """YAML 1.1 reads a bare ``no`` as false; where the choices are words it is the word."""
    cfg = load_train_config(None, [f"schedule.mixed_precision={text}"])
    assert cfg.schedule.mixed_precision == want


def test_a_boolean_is_still_refused_where_no_word_of_it_is_a_choice():
    with pytest.raises(ConfigError, match="must be one of"):
        load_train_config(None, ["schedule.mixed_precision=yes"])
