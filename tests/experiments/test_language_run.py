"""The language experiment end to end at a tiny size: every stage, metrics.json with
documented keys, the report, a rerun that loads what was trained, and the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import corpus_text, save_tiny_lm
from transformers import AutoModelForCausalLM

from codebook_lens.analysis.topics import topic_tokens
from codebook_lens.cache.store import CodeCache
from codebook_lens.cli.main import main
from codebook_lens.core.loading import load_codebook_model
from codebook_lens.core.refs import CodeRef
from codebook_lens.data.tokenizer import load_tokenizer
from codebook_lens.experiments.language.config import ConfigError, load_lm_config, stage_config
from codebook_lens.experiments.language.files import load_topics
from codebook_lens.experiments.language.measures import topic_share
from codebook_lens.experiments.language.metrics import METRIC_KEYS
from codebook_lens.experiments.language.run import (
    _fingerprint,
    _stamped,
    base_embeddings,
    build_base,
    run,
    token_data,
    tokenizer_stage,
)
from codebook_lens.experiments.language.steer import (
    CalibrationPoint,
    bisect_prefixes,
    calibrated_codes,
    path_points,
    primed_passage,
    sample_blocks,
    sample_unsteered,
)
from codebook_lens.steering.intervene import Intervention, apply_intervention
from codebook_lens.steering.sampling import generate
from codebook_lens.steering.topic_codes import measured_topic_codes

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
    # the topic rates: the probability that the next word is a topic word, its first
    # tokens' probabilities weighted by how often each starts one in the cache, summed
    # from the softmax at every position of the unsteered samples (prompt and sample, EOS
    # between samples, cut into blocks), as the model is and with the codes forced
    unsteered = [row["baseline"] for row in boats["samples"]]
    stream = []
    for prompt, row in zip(prompts, unsteered, strict=True):
        for text in row:
            stream += loaded.codec.encode(prompt + text)[0] + [loaded.codec.eos_id]
    seq_len = cfg.data.seq_len
    blocks = torch.tensor(stream[: len(stream) // seq_len * seq_len]).view(-1, seq_len)
    tokens = topic_tokens(CodeCache.open(out / "cache"), ["boat", "boats"])
    weights = torch.tensor(tokens.weights)
    assert boats["topic_tokens"] == pytest.approx(tokens.to_dict(loaded.codec))
    assert "their weights in the topic rate" in (out / "report.html").read_text()

    def rate(forced):
        with torch.no_grad(), apply_intervention(loaded.model, Intervention(forced, mode=s.mode)):
            probs = loaded.model(blocks).logits.softmax(-1)
        return float((probs[..., list(tokens.ids)] * weights).sum(-1).mean())

    codes = [CodeRef.parse(c) for c in boats["codes"]]
    assert boats["topic_rate"] == pytest.approx(rate([]), rel=1e-4)
    assert boats["forced_topic_rate"] == pytest.approx(rate(codes), rel=1e-4)
    assert metrics["steer.boats.forced_topic_rate"] == pytest.approx(boats["forced_topic_rate"])
    # without codes forcing changes nothing
    assert zebras["forced_topic_rate"] == zebras["topic_rate"]
    assert "topic rate per token" in (out / "report.html").read_text()
    # the tiny preset chooses its codes by calibration: its points are in the details,
    # the chosen one's held-out share in the metrics
    assert boats["calibration"] and metrics["steer.boats.calibration_points"] >= 1
    chosen = boats["calibration"][boats["calibration_kept"]]
    assert chosen["codes"] == len(boats["codes"])
    assert metrics["steer.boats.calibration_share"] == chosen["share"]
    assert "held-out seeds" in (out / "report.html").read_text()
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


def test_calibrated_selection_keeps_the_best_prefix_within_budget(files):
    root, overrides = files
    out = root / "run"
    cfg = load_lm_config("tiny", overrides)
    if not (out / "cache" / "manifest.json").exists():
        run(cfg, out, log=lambda line: None)
    more = [
        "steer.select=calibrated",
        "steer.calibration_points=3",
        "steer.calibration_samples=3",
        "steer.explore_cost=5",
        "steer.target_rate=0.9",
    ]
    cfg = load_lm_config("tiny", [*overrides, *more])
    s = cfg.steer
    loaded = load_codebook_model(out / "codebook" / "model")
    model, codec = loaded.model, loaded.codec
    cache = CodeCache.open(out / "cache")
    prompts, topics = load_topics(root / "topics.yaml")
    boats = next(t for t in topics if t.name == "boats")
    held_out = sample_unsteered(model, codec, prompts, s, held_out=True)
    # the held-out samples: the calibration's seeds and count, not the measurement's
    again = generate(
        model, prompts, codec, samples=3, max_new_tokens=s.max_new_tokens, seed=s.seed + 1000
    )
    assert held_out.texts == again
    codes, tried, kept = calibrated_codes(model, codec, cache, prompts, boats, s, held_out)
    # the path the prefixes come from: the measured selection on the held-out samples
    blocks = sample_blocks(codec, prompts, held_out.texts, cfg.data.seq_len, s.measure_blocks)
    path = measured_topic_codes(
        cache,
        boats.words,
        contexts=blocks,
        candidates_per_group=s.candidates_per_group,
        target_rate=s.target_rate,
        max_cost=s.explore_cost,
        min_count=s.min_count,
        max_frequency=s.max_frequency,
        mode=s.mode,
    )
    lengths = [p.codes for p in tried]
    assert tried and lengths == sorted(set(lengths)) and len(tried) <= 3
    assert lengths == [i + 1 for i in path_points([f.cost for f in path.path], 3, 5.0)]
    # each point sampled from the held-out seeds with its prefix forced, scored by hand
    baseline = mean_loss(model, codec, prompts, held_out.texts)
    for point in tried:
        texts = generate(
            model,
            prompts,
            codec,
            samples=3,
            max_new_tokens=s.max_new_tokens,
            seed=s.seed + 1000,
            intervention=Intervention(path.codes[: point.codes], mode=s.mode),
        )
        assert point.share == pytest.approx(topic_share([t for r in texts for t in r], boats.words))
        steered = mean_loss(model, codec, prompts, texts)
        assert point.cost == pytest.approx(steered - baseline, abs=1e-5)
        assert point.predicted_cost == pytest.approx(path.path[point.codes - 1].cost)
    # the kept prefix: the largest share among points within max_cost, cheaper on a tie
    within = [p for p in tried if p.cost <= s.max_cost]
    best = max(within, key=lambda p: (p.share, -p.cost))
    assert codes == path.codes[: best.codes] and tried[kept] == best
    # the bisection: the same path, its prefixes chosen by the measured costs (a replay
    # with the points it sampled gives the same sequence), the kept one as above
    bisect = load_lm_config("tiny", [*overrides, *more, "steer.calibration_search=bisect"])
    codes, tried, _ = calibrated_codes(model, codec, cache, prompts, boats, bisect.steer, held_out)
    by_index = {p.codes - 1: p for p in tried}
    replay = bisect_prefixes([f.cost for f in path.path], 3, s.max_cost, by_index.__getitem__)
    assert replay == tried and 1 <= len(tried) <= 3
    within = [p for p in tried if p.cost <= s.max_cost]
    if within:
        assert codes == path.codes[: max(within, key=lambda p: (p.share, -p.cost)).codes]
    # no point within budget: nothing is forced
    strict = load_lm_config("tiny", [*overrides, *more, "steer.max_cost=1e-12"])
    if all(p.cost > 1e-12 for p in tried):
        none, _, kept = calibrated_codes(
            model, codec, cache, prompts, boats, strict.steer, held_out
        )
        assert none == [] and kept is None
    # objective: both: the prefixes of the two paths (each as its own objective samples
    # them), the best of all of them kept
    both = load_lm_config("tiny", [*overrides, *more, "steer.objective=both"])
    codes, tried, kept = calibrated_codes(model, codec, cache, prompts, boats, both.steer, held_out)
    alone = []
    for objective in ("log_prob", "rate"):
        one = load_lm_config("tiny", [*overrides, *more, f"steer.objective={objective}"])
        c, points, i = calibrated_codes(model, codec, cache, prompts, boats, one.steer, held_out)
        assert all(p.objective == objective for p in points)
        alone.append((c, points, i))
    assert tried == alone[0][1] + alone[1][1]
    within = [i for i, p in enumerate(tried) if p.cost <= s.max_cost]
    if within:
        assert kept == max(within, key=lambda i: (tried[i].share, -tried[i].cost))
        # the best of all is the best of its own path (the first of equals, as there)
        first = len(alone[0][1])
        own, index = (alone[0], kept) if kept < first else (alone[1], kept - first)
        assert own[2] == index and codes == own[0]
    # a screened pool and a cap per head reach the path as measured_topic_codes takes them
    extra = ["steer.candidates_per_group=3", "steer.screen_per_group=6"]
    extra += ["steer.screen_blocks=1", "steer.max_per_group=2"]
    screened = load_lm_config("tiny", [*overrides, *more, *extra]).steer
    codes, tried, _ = calibrated_codes(model, codec, cache, prompts, boats, screened, held_out)
    path = measured_topic_codes(
        cache,
        boats.words,
        contexts=blocks,
        candidates_per_group=3,
        target_rate=s.target_rate,
        max_cost=s.explore_cost,
        min_count=s.min_count,
        max_frequency=s.max_frequency,
        mode=s.mode,
        screen_per_group=6,
        screen_blocks=1,
        max_per_group=2,
    )
    assert [p.codes for p in tried] == [
        i + 1 for i in path_points([f.cost for f in path.path], 3, 5.0)
    ]
    assert codes == path.codes[: len(codes)]


def mean_loss(model, codec, prompts, texts) -> float:
    """The unsteered model's mean loss per token of ``texts`` after their prompts,
    computed sample by sample without the package's helpers."""
    total, count = 0.0, 0
    for prompt, row in zip(prompts, texts, strict=True):
        head = codec.encode(prompt)[0]
        for text in row:
            tail = codec.encode(text)[0]
            if not tail:
                continue
            ids = torch.tensor([head + tail])
            with torch.no_grad():
                logp = model(ids).logits.float().log_softmax(-1)[0]
            for j, token in enumerate(tail):
                total -= float(logp[len(head) + j - 1, token])
                count += 1
    return total / max(count, 1)


def _point(i: int, cost: float) -> CalibrationPoint:
    return CalibrationPoint(
        codes=i + 1, predicted_cost=0.0, predicted_rate=0.0, share=0.0, cost=cost
    )


def test_bisect_prefixes_by_hand():
    predicted = [0.1, 0.3, 0.5, 0.45, 0.9, 1.7, 2.0, 2.2]
    # measured costs below the predicted ones: the first sample is the longest prefix
    # predicted within 0.8 (index 3), then the search halves (3, 8): 5 is within, then
    # (5, 8): 6 is over, and nothing is left between 5 and 6
    lower = [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.85, 1.2]
    tried = bisect_prefixes(predicted, 4, 0.8, lambda i: _point(i, lower[i]))
    assert [p.codes - 1 for p in tried] == [3, 5, 6]
    assert [
        p.codes - 1 for p in bisect_prefixes(predicted, 2, 0.8, lambda i: _point(i, lower[i]))
    ] == [3, 5]
    # measured costs three times the predicted: 3 is over, then (-1, 3): 1 is over
    # (0.9), then (-1, 1): 0 is within (0.3)
    higher = [3 * c for c in predicted]
    tried = bisect_prefixes(predicted, 4, 0.8, lambda i: _point(i, higher[i]))
    assert [p.codes - 1 for p in tried] == [3, 1, 0]
    # no prefix predicted within the budget: the search starts at the first
    tried = bisect_prefixes([1.0, 2.0], 1, 0.5, lambda i: _point(i, 0.1))
    assert [p.codes - 1 for p in tried] == [0]
    assert bisect_prefixes([], 3, 0.5, lambda i: pytest.fail("sampled")) == []


def test_path_points_by_hand():
    costs = [0.1, 0.3, 0.5, 0.45, 0.9, 1.7]
    # budgets 0.4, 0.8, 1.2, 1.6: the longest prefix whose costs all stay within each
    assert path_points(costs, 4, 1.6) == [1, 3, 4]
    assert path_points(costs, 1, 2.0) == [5]
    assert path_points([0.5], 2, 0.4) == []


def test_config_is_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="codebook.mlp_k must be in 1..63"):
        load_lm_config("tiny", ["codebook.mlp_k=64"])
    with pytest.raises(ConfigError, match="did you mean"):
        load_lm_config("tiny", ["codebook.mlp_kk=4"])
    with pytest.raises(ConfigError, match="net.source must be one of"):
        load_lm_config("tiny", ["net.source=gpt5"])
    with pytest.raises(ConfigError, match="unknown preset"):
        load_lm_config("huge")
    with pytest.raises(ConfigError, match="steer.screen_per_group must be >= candidates_per"):
        load_lm_config("tiny", ["steer.candidates_per_group=8", "steer.screen_per_group=4"])
    with pytest.raises(ConfigError, match="steer.max_per_group must be >= 1"):
        load_lm_config("tiny", ["steer.max_per_group=0"])


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


def test_demo_samples_show_the_topics_steered_furthest_where_they_mention_the_topic(
    tmp_path, capsys
):
    from codebook_lens.cli.lm import print_samples

    def topic(name, share, steered):
        row = {"prompt": "The", "baseline": ["plain one", "plain two"], "steered": steered}
        return {"name": name, "words": [name], "steered_share": share, "samples": [row]}

    steering = [
        topic("war", 0.2, ["a war", "b"]),
        topic("sea", 0.9, ["calm", "the sea rose"]),
        topic("food", 0.5, ["no", "none"]),  # steered samples that never mention it
        topic("music", 0.7, ["music <3", "x"]),
    ]
    (tmp_path / "analysis.json").write_text(json.dumps({"steering": steering}))
    print_samples(tmp_path, topics=3)
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    # the three largest shares are sea, music, food; food has no sample to show
    assert lines == [
        "  sea (90% of steered samples on topic); the first on topic, from prompt 'The':",
        "    unsteered  plain two",
        "    steered    the [sea] rose",
        "  music (70% of steered samples on topic); the first on topic, from prompt 'The':",
        "    unsteered  plain one",
        "    steered    [music] <3",
    ]


def test_report_marks_topic_words_and_escapes_the_rest():
    from codebook_lens.experiments.language.report import marked

    assert marked("a <Fire> & fire!", ["fire"]) == (
        "a &lt;<mark>Fire</mark>&gt; &amp; <mark>fire</mark>!"
    )
    assert marked("firewood", ["fire"]) == "firewood"


def test_demo_preset_is_the_cpu_experiment_cut_down():
    # the demo must fit 15 minutes where the cpu preset has an hour: the same network
    # and measurements, no stage longer, no control, a smaller cache, a vocabulary no
    # larger (the unembedding's cost grows with it)
    cpu, demo = load_lm_config("cpu"), load_lm_config("demo")
    assert demo.net == cpu.net and demo.tokenizer.vocab_size <= cpu.tokenizer.vocab_size
    # the paper's steering model: codebooks on the attention heads of every layer
    assert demo.codebook.sites == cpu.codebook.sites == ["attn_heads"]
    assert demo.codebook.layers is None and cpu.codebook.layers is None
    for stage in ("base", "codebook"):
        a, b = getattr(cpu, stage), getattr(demo, stage)
        assert b.steps * b.batch_size <= a.steps * a.batch_size
    assert not cpu.codebook.control and not demo.codebook.control
    assert demo.measure.cache_tokens < cpu.measure.cache_tokens
    # each fits its budget on the machine it runs on (training scaled down when needed)
    assert (cpu.budget_minutes, demo.budget_minutes) == (50, 12)
    # codes chosen by sampling prefixes of the measured path from held-out seeds, within
    # a margin of the target's 1 nat of measured fluency cost (the wider, the fewer
    # held-out samples the cost is measured on)
    assert demo.steer.select == cpu.steer.select == "calibrated"
    assert demo.steer.max_cost == cpu.steer.max_cost == 0.8
    # along the same path: the topic rate's, from a screened pool, as many codes a head
    assert demo.steer.objective == cpu.steer.objective == "rate"
    assert demo.steer.search == cpu.steer.search == "greedy"
    assert demo.steer.max_per_group == cpu.steer.max_per_group == 8
    assert demo.steer.candidates_per_group < demo.steer.screen_per_group
    assert demo.steer.screen_per_group <= cpu.steer.screen_per_group
    assert demo.steer.calibration_samples <= cpu.steer.calibration_samples
    assert demo.steer.calibration_points <= cpu.steer.calibration_points
    # the same protocol: samples of the same length, as long as the positions allow
    assert demo.steer.max_new_tokens == cpu.steer.max_new_tokens == 96
    assert cpu.steer.max_new_tokens + 4 <= cpu.data.seq_len
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


def test_cooccurrence_embeddings_enter_the_base_and_stay_frozen(files):
    """net.embeddings: cooccurrence sets the input embeddings of the network from the
    training split before the base trains; no stage moves them, and the untied output
    embeddings train."""
    root, overrides = files
    out = root / "cooc"
    extra = ["net.embeddings=cooccurrence", "net.tie_embeddings=false", "net.embedding_window=3"]
    assert main(["lm", "--preset", "tiny", "--out", str(out), *overrides, *extra]) == 0
    cfg = load_lm_config("tiny", [*overrides, *extra])
    for stage in ("base", "codebook", "control"):
        assert stage_config(cfg, stage, out).optim.freeze_embeddings
    tokenizer = tokenizer_stage(cfg, out, lambda _: None)
    expected = base_embeddings(cfg, token_data(cfg, tokenizer), len(tokenizer), lambda _: None)
    assert expected.shape == (len(tokenizer), cfg.net.hidden)
    base = load_codebook_model(out / "base" / "model").model.model
    cbm = load_codebook_model(out / "codebook" / "model").model.model
    for net in (base, cbm):
        assert torch.equal(net.get_input_embeddings().weight, expected)
        assert not torch.equal(net.get_output_embeddings().weight[: len(expected)], expected)


def test_cooccurrence_embeddings_need_a_network_from_scratch():
    with pytest.raises(ConfigError, match="net.embeddings"):
        load_lm_config("smollm2", ["net.embeddings=cooccurrence"])
    assert not stage_config(load_lm_config("tiny"), "base", Path("x")).optim.freeze_embeddings


class _Vocab:
    """What build_base reads of a tokenizer: its size and end-of-sequence id."""

    eos_token_id = 0

    def __len__(self) -> int:
        return 50


@pytest.mark.parametrize("inputs", ["learned", "cooccurrence"])
def test_output_embeddings_start_from_the_cooccurrence_matrix(inputs):
    """net.output_embeddings: cooccurrence copies the co-occurrence matrix into the untied
    output embeddings (which the stages train: only the input ones are frozen), whatever
    the input embeddings are."""
    extra = [f"net.embeddings={inputs}", "net.tie_embeddings=false"]
    cfg = load_lm_config("tiny", [*extra, "net.output_embeddings=cooccurrence"])
    matrix = torch.randn(50, cfg.net.hidden)
    net = build_base(cfg, _Vocab(), 0, matrix)
    assert torch.equal(net.get_output_embeddings().weight, matrix)
    assert torch.equal(net.get_input_embeddings().weight, matrix) == (inputs == "cooccurrence")
    assert net.get_output_embeddings().weight is not net.get_input_embeddings().weight
    assert stage_config(cfg, "base", Path("x")).optim.freeze_embeddings == (inputs != "learned")
    plain = build_base(load_lm_config("tiny", extra), _Vocab(), 0, matrix)
    assert not torch.equal(plain.get_output_embeddings().weight, matrix)
    with pytest.raises(ConfigError, match="embeddings of shape"):
        build_base(cfg, _Vocab(), 0, torch.randn(49, cfg.net.hidden))


def test_cooccurrence_output_embeddings_need_untied_embeddings_from_scratch():
    for extra in (["net.tie_embeddings=true"], ["net.source=smollm2-135m"]):
        with pytest.raises(ConfigError, match="net.output_embeddings"):
            load_lm_config("tiny", [*extra, "net.output_embeddings=cooccurrence"])


def test_both_objectives_need_the_calibrated_selection():
    assert load_lm_config("tiny", ["steer.objective=both"]).steer.objective == "both"
    with pytest.raises(ConfigError, match="steer.objective"):
        load_lm_config("tiny", ["steer.objective=both", "steer.select=measured"])


def test_samples_longer_than_the_network_are_refused_before_training(files, tmp_path, capsys):
    root, overrides = files
    out = tmp_path / "run"
    # the tiny network has 32 positions: 32 new tokens cannot follow any prompt
    code = main(
        ["lm", "--preset", "tiny", "--out", str(out), *overrides, "steer.max_new_tokens=32"]
    )
    assert code != 0
    err = capsys.readouterr().err
    tokenizer = load_tokenizer(out / "tokenizer")
    longest = max(len(tokenizer(p, add_special_tokens=False).input_ids) for p in ["The", "In May"])
    assert "steer.max_new_tokens=32" in err and "data.seq_len=32" in err
    assert f"at most {32 - longest}" in err
    assert (out / "tokenizer").exists() and not (out / "base").exists()


def test_a_primed_passage_keeps_the_last_words_that_fit(files):
    root, overrides = files
    out = root / "run"
    if not (out / "cache" / "manifest.json").exists():
        run(load_lm_config("tiny", overrides), out, log=lambda line: None)
    loaded = load_codebook_model(out / "codebook" / "model")
    model, codec = loaded.model, loaded.codec
    prompts = ["The", "In May"]
    passage = "a small boat on the water near the shore of the sea"

    def need(text):
        return max(len(codec.encode(f"{text} {p}")[0]) for p in prompts)

    room = 32 - need(passage)  # the new tokens the whole passage leaves room for
    if room >= 1:
        assert primed_passage(model, codec, passage, prompts, room) == passage
    cut = 0
    for new in range(max(room + 1, 1), 32):
        kept = primed_passage(model, codec, passage, prompts, new)
        assert passage.endswith(kept) and kept != passage
        if kept:
            cut += 1
            assert need(kept) + new <= 32
            # one more word would not fit
            assert need(" ".join(passage.split()[-len(kept.split()) - 1 :])) + new > 32
    assert cut, "some cut of the passage fits"
    assert primed_passage(model, codec, passage, prompts, 31) == ""


class _Codec:
    """Characters as token ids, EOS 0: a stream of samples one can count by hand."""

    eos_id = 0

    def encode(self, text):
        return [ord(c) for c in text], None


def test_sample_blocks_by_hand():
    prompts, texts = ["ab", "c"], [["cde", "f"], ["ghijk"]]
    # the stream: abcde 0 abf 0 cghijk 0 = 17 tokens, blocks of 4 (the last token left)
    stream = [*b"abcde", 0, *b"abf", 0, *b"cghijk", 0]
    blocks = sample_blocks(_Codec(), prompts, texts, 4)
    assert blocks.tolist() == [stream[i : i + 4] for i in range(0, 16, 4)]
    assert sample_blocks(_Codec(), prompts, texts, 5).tolist() == [
        stream[i : i + 5] for i in range(0, 15, 5)
    ]
    # at most 2 blocks: the first and the last, evenly spaced along the stream
    capped = sample_blocks(_Codec(), prompts, texts, 4, max_blocks=2)
    assert capped.tolist() == [stream[0:4], stream[12:16]]
    assert sample_blocks(_Codec(), prompts, texts, 4, max_blocks=9).tolist() == blocks.tolist()
    assert sample_blocks(_Codec(), prompts, texts, 18) is None
