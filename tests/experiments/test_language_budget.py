"""Fitting the language experiment to a time budget: the cost model and the scaled
config by hand, the factor reused by a rerun, a clear error when nothing fits."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_model

from codebook_lens.experiments.language import budget as B
from codebook_lens.experiments.language.config import ConfigError, load_lm_config


def _cfg(*overrides: str):
    return load_lm_config(
        "cpu",
        [
            "base.steps=1000",
            "base.warmup_steps=100",
            "base.eval_every=200",
            "base.checkpoint_every=400",
            "codebook.steps=200",
            "codebook.freeze_base_steps=100",
            "codebook.warmup_steps=20",
            "codebook.eval_every=50",
            "codebook.checkpoint_every=50",
            "codebook.control=false",
            "steer.max_new_tokens=32",
            "steer.search=ranked",
            "steer.measure_blocks=16",
            "steer.screen_per_group=null",
            *overrides,
        ],
    )


def test_predicted_seconds_by_hand():
    cfg = _cfg("steer.select=measured", "steer.objective=log_prob")
    # 10 prompts, 6 topics: 10 * (1 + 2 * 6) = 130 sampling batches
    assert B.sampling_batches(cfg, 10, 6) == 130
    # the cpu network: 1 layer of 8 heads, one codebook per head
    assert B.groups(cfg) == 8
    # forward passes, in tokens: quality (5 * 32 eval + 2 * 16 ablation batches of
    # 32 x 128), the cache six times (200,000 tokens), and per topic a fixed amount and
    # 8 candidates of 8 heads twice (alone, and on the one path) over 10 prompts x 10
    # samples x (32 + 4) tokens, at most 16 blocks of 128 (steer.measure_blocks)
    quality = (5 * 32 + 2 * 16) * 32 * 128
    selection = 6 * B.TOPIC_FORWARDS + 6 * 2 * 8 * 8 * min(10 * 10 * 36, 16 * 128)
    assert B.measure_forwards(cfg, 10, 6) == quality + 6 * 200_000 + selection
    step, forward, sample = 2.0, 0.6, 0.5
    train = 1000 + B.CODEBOOK_STEP * 200
    kmeans = B.KMEANS_STEPS  # 16,384 tokens, 2,048 codes
    token = forward / (32 * 128)  # a forward pass of 32 sequences of 128 tokens
    rest = token * (quality + 6 * 200_000 + selection) + B.SAMPLE_OVERHEAD * sample * 130
    rest *= B.MEASURE_OVERHEAD  # what the timed passes leave out
    expected = step * (train + kmeans) + rest
    assert B.predicted_seconds(cfg, step, forward, sample, 10, 6) == pytest.approx(expected)
    # at a factor of 0.25 the base runs a quarter of its steps, the codebook stage half
    quarter = step * (0.25 * 1000 + 0.5 * B.CODEBOOK_STEP * 200 + kmeans) + rest
    assert B.predicted_seconds(cfg, step, forward, sample, 10, 6, scale=0.25) == pytest.approx(
        quarter
    )
    # the control stage costs its steps
    control = _cfg("steer.select=measured", "steer.objective=log_prob", "codebook.control=true")
    got = B.predicted_seconds(control, step, forward, sample, 10, 6)
    assert got == pytest.approx(expected + step * B.CONTROL_STEP * 200)
    got = B.predicted_seconds(control, step, forward, sample, 10, 6, scale=0.25)
    assert got == pytest.approx(quarter + 0.5 * step * B.CONTROL_STEP * 200)
    # a calibrated selection: 4 points of 5 samples per prompt (half of
    # samples_per_prompt = 10) per topic plus the held-out unsteered ones; its path is
    # measured on the 5 held-out samples per prompt
    points = [
        "steer.select=calibrated",
        "steer.calibration_points=4",
        "steer.calibration_samples=5",
    ]
    calibrated = _cfg(*points, "steer.objective=log_prob")
    assert B.sampling_batches(calibrated, 10, 6) == pytest.approx(130 + 10 * 0.5 * (1 + 24))
    half_paths = 6 * B.TOPIC_FORWARDS + 6 * 2 * 8 * 8 * (10 * 5 * 36)
    assert B.measure_forwards(calibrated, 10, 6) == quality + 6 * 200_000 + half_paths
    # objective: both measures and samples two paths per topic (the candidates alone
    # once for both)
    both = _cfg(*points, "steer.objective=both")
    assert B.sampling_batches(both, 10, 6) == pytest.approx(130 + 10 * 0.5 * (1 + 2 * 24))
    two_paths = 6 * B.TOPIC_FORWARDS + 6 * 3 * 8 * 8 * (10 * 5 * 36)
    assert B.measure_forwards(both, 10, 6) == quality + 6 * 200_000 + two_paths
    # a greedy search measures each candidate GREEDY_PASSES times per path
    greedy = _cfg(*points, "steer.objective=both", "steer.search=greedy")
    passes = 6 * B.TOPIC_FORWARDS + 6 * (1 + 2 * B.GREEDY_PASSES) * 8 * 8 * (10 * 5 * 36)
    assert B.measure_forwards(greedy, 10, 6) == pytest.approx(quality + 6 * 200_000 + passes)
    # a screened pool: every group's screen_per_group codes once over the screening
    # blocks (3 blocks of the cpu preset's 128 tokens), shared by the paths
    screened = _cfg(
        *points,
        "steer.objective=both",
        "steer.search=greedy",
        "steer.screen_per_group=32",
        "steer.screen_blocks=3",
    )
    pool = 6 * 32 * 8 * (3 * 128)
    got = B.measure_forwards(screened, 10, 6)
    assert got == pytest.approx(quality + 6 * 200_000 + passes + pool)


def test_scaled_config_by_hand():
    cfg = _cfg()
    assert B.stage_scales(0.25) == (0.25, 0.5)
    small = B.scaled(cfg, 0.25)  # the base to a quarter, the codebook stage to half
    assert (small.base.steps, small.base.warmup_steps) == (250, 25)
    assert (small.base.eval_every, small.base.checkpoint_every) == (50, 100)
    assert (small.codebook.steps, small.codebook.freeze_base_steps) == (100, 50)
    assert (small.codebook.warmup_steps, small.codebook.eval_every) == (10, 25)
    assert small.codebook.revive_after_steps == 25  # the cpu preset's 50, halved
    # nothing else moves, and the original is untouched
    assert small.codebook.attn_num_codes == cfg.codebook.attn_num_codes
    assert small.steer == cfg.steer and cfg.base.steps == 1000
    assert B.scaled(cfg, 1.0) is cfg
    # a stage too short to split trains the network along from its first step
    tiny = B.scaled(cfg, 0.00001)  # sqrt: 0.00316
    assert tiny.codebook.steps == 1 and tiny.codebook.freeze_base_steps == 0
    assert tiny.base.steps == 1 and tiny.base.eval_every == 1


def test_fit_budget_scales_to_the_budget_and_a_rerun_reuses_the_factor(tmp_path):
    cfg = _cfg("budget_minutes=50")
    calls = []

    def measure():
        calls.append(1)
        return 2.0, 0.6, 0.5

    logged: list[str] = []
    fitted, budget = B.fit_budget(cfg, tmp_path, measure, 10, 6, 60.0, logged.append)
    full = B.predicted_seconds(cfg, 2.0, 0.6, 0.5, 10, 6)
    fixed = B.predicted_seconds(cfg, 2.0, 0.6, 0.5, 10, 6, scale=0.0)
    # by hand: with u = sqrt(s) the scaled run takes fixed + 2 (1000 u^2 + 360 u) seconds,
    # the budget leaves 50 * 60 - 60; the positive root of the quadratic
    a, b, c = 2.0 * 1000, 2.0 * B.CODEBOOK_STEP * 200, fixed - (50 * 60 - 60)
    root = (-b + (b * b - 4 * a * c) ** 0.5) / (2 * a)
    assert budget.scale == pytest.approx(root**2, abs=1e-3) and budget.scale <= root**2
    assert budget.predicted_minutes == pytest.approx((full + 60) / 60)
    # the scaled run is predicted to fit the budget, a thousandth more would not
    assert B.predicted_seconds(cfg, 2.0, 0.6, 0.5, 10, 6, budget.scale) + 60 <= 50 * 60
    assert B.predicted_seconds(cfg, 2.0, 0.6, 0.5, 10, 6, budget.scale + 1e-3) + 60 > 50 * 60
    assert budget.forward_seconds == 0.6
    assert fitted.base.steps == round(1000 * budget.scale)
    assert fitted.codebook.steps == round(200 * budget.scale**0.5)
    assert "runs" in logged[-1] and calls == [1]
    saved = json.loads((tmp_path / "budget.json").read_text())
    assert saved["budget"]["scale"] == budget.scale
    # a rerun of the same settings reuses the factor without timing anything
    again, reused = B.fit_budget(cfg, tmp_path, measure, 10, 6, 0.0, logged.append)
    assert calls == [1] and reused == budget and again.base.steps == fitted.base.steps
    # other topics or steering settings: the trained stages' factor, nothing timed
    other = _cfg("budget_minutes=50", "steer.topic_file=/elsewhere.yaml", "measure.min_count=5")
    again, reused = B.fit_budget(other, tmp_path, measure, 10, 9, 0.0, logged.append)
    assert calls == [1] and reused == budget and again.base.steps == fitted.base.steps
    assert again.steer.topic_file == "/elsewhere.yaml" and "trained stages are kept" in logged[-1]
    # other training settings: timed again
    B.fit_budget(_cfg("budget_minutes=600"), tmp_path, measure, 10, 6, 0.0, logged.append)
    assert calls == [1, 1]
    B.fit_budget(_cfg("budget_minutes=50", "base.lr=0.01"), tmp_path, measure, 10, 6, 0.0, print)
    assert calls == [1, 1, 1]


def test_fit_budget_without_a_budget_or_with_room_to_spare(tmp_path):
    cfg = _cfg()
    assert cfg.budget_minutes == 50  # the cpu preset's
    roomy, budget = B.fit_budget(cfg, tmp_path, lambda: (0.01, 0.01, 0.01), 10, 6, 0.0, print)
    assert budget.scale == 1.0 and roomy.base.steps == 1000
    off = _cfg("budget_minutes=null")
    same, none = B.fit_budget(off, tmp_path, lambda: pytest.fail("timed"), 10, 6, 0.0, print)
    assert none is None and same is off


def test_fit_budget_refuses_a_budget_that_leaves_no_training(tmp_path):
    cfg = _cfg("budget_minutes=1")
    with pytest.raises(ConfigError, match="budget_minutes=1 leaves too little time"):
        B.fit_budget(cfg, tmp_path, lambda: (2.0, 0.6, 0.5), 10, 6, 0.0, print)
    with pytest.raises(ConfigError, match="budget_minutes"):
        _cfg("budget_minutes=0")


def test_timing_leaves_the_network_as_it_was():
    net = tiny_model("gpt_neox")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    seconds = B.time_base_step(net, net.config.vocab_size, 2, 8, steps=1, warmup=1)
    assert seconds > 0
    after = net.state_dict()
    assert all((before[k] == after[k]).all() for k in before)
    net.train()
    assert B.time_forward(net, net.config.vocab_size, 2, 8, passes=1) > 0
    assert net.training  # left as it was


def test_the_summary_names_the_cpu_and_a_scaled_budget(capsys, tmp_path):
    from codebook_lens.cli.lm import print_lm_summary
    from codebook_lens.core.cpu import describe_cpu

    m = {
        "base.loss": 3.6,
        "base.accuracy": 0.3,
        "codebook.loss": 3.7,
        "codebook.accuracy": 0.29,
        "gap_recovered": 0.97,
        "codebook.kl": 0.1,
        "loss_increase": 0.1,
        "regex.codes_win_share": 0.9,
        "regex.regexes": 14,
        "regex.median_lead_points": 40.0,
        "steer.topics_steered": 0,
        "steer.topics": 0,
        "seconds.base": 600.0,
        "seconds.codebook": 300.0,
        "budget.scale": 0.44,
        "budget.codebook_scale": 0.66,
        "budget.step_seconds": 1.3,
        "budget.predicted_minutes": 94.0,
    }
    print_lm_summary(m, tmp_path)
    printed = capsys.readouterr().out
    assert f"15.0 min on {describe_cpu()}" in printed
    assert (
        "the base ran 44.0% of its steps, the codebook stage 66.0%" in printed
        and "1.30 s" in printed
    )
    print_lm_summary({**m, "budget.scale": 1.0}, tmp_path)
    assert "scaled" not in capsys.readouterr().out
