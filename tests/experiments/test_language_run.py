"""The language experiment end to end at a tiny size: every stage, metrics.json with
documented keys, the report, a rerun that loads what was trained, and the CLI."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import corpus_text, save_tiny_lm
from transformers import AutoModelForCausalLM

from codebook_lens.analysis.topics import topic_token_ids
from codebook_lens.cli.main import main
from codebook_lens.core.loading import load_codebook_model
from codebook_lens.core.refs import CodeRef
from codebook_lens.experiments.language.config import ConfigError, load_lm_config, stage_config
from codebook_lens.experiments.language.files import load_topics
from codebook_lens.experiments.language.measures import topic_share
from codebook_lens.experiments.language.metrics import METRIC_KEYS
from codebook_lens.experiments.language.run import _fingerprint, _stamped, run
from codebook_lens.steering.intervene import Intervention, apply_intervention
from codebook_lens.steering.sampling import generate

TOPICS = """
prompts: ["The", "In May"]
topics:
  - {name: boats, words: [boat, boats], text: "a small boat on the water"}
  - {name: zebras, words: [zebra], text: "a zebra"}
"""
REGEXES = """
patterns:
  - {name: years, pattern: '\\b(19|20)[0-9][0-9]\\b'}
  - {name: months, pattern: '\\b(January|February|March)\\b'}
  - {name: none, pattern: 'qqqq'}
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    corpus = root / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": corpus_text(4, seed=i)}) + "\n" for i in range(400))
    )
    (root / "topics.yaml").write_text(TOPICS)
    (root / "regexes.yaml").write_text(REGEXES)
    overrides = [
        f"data.corpus={corpus}",
        f"steer.topic_file={root / 'topics.yaml'}",
        f"measure.regex_file={root / 'regexes.yaml'}",
    ]
    return root, overrides


def _documented(key: str) -> bool:
    """Whether ``key`` is one of METRIC_KEYS, whose ``<...>`` parts stand for any name."""
    return any(
        re.fullmatch(re.sub(r"<[^>]+>", ".+", re.escape(pattern)), key) for pattern in METRIC_KEYS
    )


def test_tiny_preset_end_to_end_and_rerun(files, capsys):
    root, overrides = files
    out = root / "run"
    code = main(["lm", "--preset", "tiny", "--out", str(out), *overrides])
    assert code == 0
    printed = capsys.readouterr().out
    assert "gap recovered" in printed and "boats" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    undocumented = [k for k in metrics if not _documented(k)]
    assert not undocumented, undocumented
    for key in ("base.loss", "codebook.loss", "codebook.kl", "control.loss", "ablated.loss"):
        assert metrics[key] > 0
    assert metrics["regex.regexes"] == 3
    assert metrics["steer.topics"] == 2
    # a topic that no cached token leads to gets no codes: its steered samples are its own
    details = json.loads((out / "analysis.json").read_text())
    zebras = next(r for r in details["steering"] if r["name"] == "zebras")
    assert zebras["codes"] == [] and zebras["fluency_cost"] == 0.0
    boats = next(r for r in details["steering"] if r["name"] == "boats")
    assert boats["codes"], "a topic present in the corpus gets codes"
    # the primed share: the unsteered model's samples with the topic's passage before
    # every prompt, same seeds, counted as the steered share is
    cfg = load_lm_config("tiny", overrides)
    loaded = load_codebook_model(out / "codebook" / "model")
    prompts, topics = load_topics(root / "topics.yaml")
    s = cfg.steer
    texts = generate(
        loaded.model,
        [f"a small boat on the water {p}" for p in prompts],
        loaded.codec,
        samples=s.samples_per_prompt,
        max_new_tokens=s.max_new_tokens,
        temperature=s.temperature,
        seed=s.seed,
    )
    expected = topic_share([t for row in texts for t in row], ["boat", "boats"])
    assert boats["primed_share"] == pytest.approx(expected)
    assert metrics["steer.boats.primed_share"] == pytest.approx(expected)
    # the topic rates: the probability that the next token starts a topic word, summed
    # from the softmax at every position of the unsteered samples (prompt and sample, EOS
    # between samples, cut into blocks), as the model is and with the codes forced
    unsteered = [row["baseline"] for row in boats["samples"]]
    stream = []
    for prompt, row in zip(prompts, unsteered, strict=True):
        for text in row:
            stream += loaded.codec.encode(prompt + text)[0] + [loaded.codec.eos_id]
    seq_len = cfg.data.seq_len
    blocks = torch.tensor(stream[: len(stream) // seq_len * seq_len]).view(-1, seq_len)
    ids = topic_token_ids(loaded.codec, ["boat", "boats"])

    def rate(forced):
        with torch.no_grad(), apply_intervention(loaded.model, Intervention(forced, mode=s.mode)):
            probs = loaded.model(blocks).logits.softmax(-1)
        return float(probs[..., ids].sum(-1).mean())

    codes = [CodeRef.parse(c) for c in boats["codes"]]
    assert boats["topic_rate"] == pytest.approx(rate([]), rel=1e-4)
    assert boats["forced_topic_rate"] == pytest.approx(rate(codes), rel=1e-4)
    assert metrics["steer.boats.forced_topic_rate"] == pytest.approx(boats["forced_topic_rate"])
    # without codes forcing changes nothing
    assert zebras["forced_topic_rate"] == zebras["topic_rate"]
    assert "topic rate per token" in (out / "report.html").read_text()
    # a pattern that matches nothing has no code and counts as a loss
    none = next(r for r in details["regexes"] if r["name"] == "none")
    assert none["code"] is None and none["matching_tokens"] == 0
    report = (out / "report.html").read_text()
    for section in ("Language-model quality", "Figure 4", "Figure 3", "Table 3", "<svg"):
        assert section in report
    for stage in ("tokenizer", "base", "codebook", "control"):
        assert (out / stage / "done.json").exists()

    # a rerun with the same settings trains nothing and measures the same models
    logged: list[str] = []
    again = run(load_lm_config("tiny", overrides), out, log=logged.append)
    assert sum("loading the trained model" in line for line in logged) == 3
    for key in ("base.loss", "codebook.loss", "control.loss", "gap_recovered"):
        assert again[key] == pytest.approx(metrics[key], rel=1e-6)


def test_config_is_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="codebook.mlp_k must be in 1..63"):
        load_lm_config("tiny", ["codebook.mlp_k=64"])
    with pytest.raises(ConfigError, match="did you mean"):
        load_lm_config("tiny", ["codebook.mlp_kk=4"])
    with pytest.raises(ConfigError, match="net.source must be one of"):
        load_lm_config("tiny", ["net.source=gpt5"])
    with pytest.raises(ConfigError, match="unknown preset"):
        load_lm_config("huge")


def test_demo_lm_is_dispatched_and_plain_demo_stays_tokfsm(monkeypatch, tmp_path):
    import codebook_lens.cli.lm as lm
    import codebook_lens.experiments.tokfsm.run as fsm_run

    calls = []
    monkeypatch.setattr(lm, "demo_lm", lambda out, overrides: calls.append((out, overrides)) or 0)
    assert main(["demo", "lm", "--out", str(tmp_path / "d"), "steer.seed=3"]) == 0
    assert calls == [(str(tmp_path / "d"), ["steer.seed=3"])]

    def fake_fsm(cfg, out):
        calls.append(("fsm", cfg.preset))
        raise SystemExit(0)

    monkeypatch.setattr(fsm_run, "run", fake_fsm)
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path / "f")])
    assert calls[-1] == ("fsm", "demo")


def test_demo_preset_is_the_cpu_experiment_cut_down():
    # the demo must fit 15 minutes where the cpu preset has an hour: the same network
    # and measurements, no stage longer, no control, a smaller cache
    cpu, demo = load_lm_config("cpu"), load_lm_config("demo")
    assert demo.net == cpu.net and demo.tokenizer == cpu.tokenizer
    # the paper's steering model: codebooks on the attention heads of every layer
    assert demo.codebook.sites == cpu.codebook.sites == ["attn_heads"]
    assert demo.codebook.layers is None and cpu.codebook.layers is None
    for stage in ("base", "codebook"):
        a, b = getattr(cpu, stage), getattr(demo, stage)
        assert b.steps * b.batch_size <= a.steps * a.batch_size
    assert cpu.codebook.control and not demo.codebook.control
    assert demo.measure.cache_tokens < cpu.measure.cache_tokens
    assert demo.steer.select == cpu.steer.select == "measured"
    assert (demo.steer.target_rate, demo.steer.max_cost) == (cpu.steer.target_rate, 0.9)
    assert demo.steer.mode == cpu.steer.mode == "append"
    assert demo.steer.strength == cpu.steer.strength == 1.0


def test_a_pretrained_network_as_it_is_with_codebooks_on_chosen_layers(files, tmp_path):
    # net.source: a model directory (as smollm2-135m is); base.steps = 0 keeps it as it
    # is, and codebook.layers puts codebooks on those layers only
    _, overrides = files
    source = save_tiny_lm(tmp_path / "pretrained", family="llama")
    layers = AutoModelForCausalLM.from_pretrained(source).config.num_hidden_layers
    assert layers >= 2
    cfg = load_lm_config(
        "tiny",
        [
            *overrides,
            f"net.source={source}",
            f"net.layers={layers}",
            "base.steps=0",
            "codebook.sites=[attn_heads]",
            "codebook.layers=[1]",
            "codebook.control=false",
        ],
    )
    out = tmp_path / "run"
    metrics = run(cfg, out, log=lambda _: None)
    assert metrics["base.loss"] > 0 and metrics["codebook.loss"] > 0
    # the base stage is the source network, bit for bit
    kept = load_codebook_model(out / "base" / "model").model
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    ids = torch.tensor([[3, 14, 15, 9, 26, 5, 35]])
    with torch.no_grad():
        assert torch.equal(kept(ids).logits, original(ids).logits)
    model = load_codebook_model(out / "codebook" / "model").model
    assert sorted(model.placement.values()) == [("attn_heads", 1)]
    assert not (out / "tokenizer").exists(), "a pretrained network keeps its own tokenizer"


def test_pretrained_source_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="base.steps must be >= 1"):
        load_lm_config("tiny", ["base.steps=0"])  # a network from scratch must be trained
    with pytest.raises(ConfigError, match="net.source must be one of scratch, smollm2-135m"):
        load_lm_config("tiny", [f"net.source={tmp_path}"])  # no config.json there
    with pytest.raises(ConfigError, match=r"codebook.layers must be below net.layers \(1\)"):
        load_lm_config("tiny", ["codebook.layers=[1]"])
    with pytest.raises(ConfigError, match="codebook.layers must be distinct layer numbers"):
        load_lm_config("tiny", ["net.layers=2", "codebook.layers=[0, 0]"])


def test_codes_first_then_the_network_settings_reach_the_training_stage(tmp_path):
    cfg = load_lm_config("tiny", ["codebook.freeze_base_steps=2", "codebook.distill_weight=1"])
    optim = stage_config(cfg, "codebook", tmp_path).optim
    assert optim.freeze_base_steps == 2 and not optim.freeze_base and optim.distill_weight == 1
    with pytest.raises(ConfigError, match="codebook.freeze_base_steps must be below codebook"):
        load_lm_config("tiny", ["codebook.freeze_base_steps=4"])
    with pytest.raises(ConfigError, match="codebook.freeze_base must be false with freeze_base"):
        load_lm_config("tiny", ["codebook.freeze_base_steps=2", "codebook.freeze_base=true"])


def test_a_stage_stamped_before_an_option_existed_is_still_reused(tmp_path):
    """A finished stage whose stamp predates an option (here optim.freeze_base_steps,
    left at its default) is the same settings: it is loaded, not removed and retrained;
    a stamp of other settings is removed."""

    cfg = load_lm_config("tiny")
    settings = _fingerprint(cfg, "codebook", tmp_path)
    old = json.loads(json.dumps(settings))
    del old["train"]["optim"]["freeze_base_steps"]
    stage = tmp_path / "codebook"
    stage.mkdir()
    (stage / "stage.json").write_text(json.dumps(old))
    (stage / "done.json").write_text("{}")
    assert _stamped(stage, settings, print, "codebook") and stage.exists()
    old["train"]["optim"]["lr"] = 1.0
    (stage / "stage.json").write_text(json.dumps(old))
    assert not _stamped(stage, settings, print, "codebook") and not stage.exists()
