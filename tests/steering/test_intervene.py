"""Interventions on codes (force, disable, positions, generate), steering eval and the CLI."""

from __future__ import annotations

import json
import re
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from helpers import save_tiny_lm, tiny_model

from codebook_lens.cli.main import main
from codebook_lens.core import sites as S
from codebook_lens.core.codebook import CodebookConfig
from codebook_lens.core.loading import load_codebook_model
from codebook_lens.core.model import CodebookModel, CodebookModelConfig, SiteSpec
from codebook_lens.core.refs import CodeRef
from codebook_lens.steering.intervene import Intervention, intervene, token_positions
from codebook_lens.steering.sampling import generate, mentions_topic, steering_eval

K_MLP, K_HEADS = 3, 2
POSITIONS = [1, 4, 6]


def build(family: str = "llama") -> CodebookModel:
    """MLP codebooks (24 codes, k=3) and per-head codebooks (4 x 16 codes, k=2) on both layers."""
    cfg = CodebookModelConfig(
        [
            SiteSpec("attn_heads", CodebookConfig(num_codes=16, k=K_HEADS)),
            SiteSpec("mlp", CodebookConfig(num_codes=24, k=K_MLP)),
        ]
    )
    model = CodebookModel(tiny_model(family), cfg).eval()
    with torch.no_grad():  # codes large enough that forcing one visibly moves the logits
        for cb in model.codebooks.values():
            cb.weight.mul_(3.0)
    return model


@pytest.fixture(scope="module")
def model() -> CodebookModel:
    return build()


@pytest.fixture
def ids(tokens) -> torch.Tensor:
    return tokens[:, :8]


def codes_of(model: CodebookModel, ids: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model(ids, return_codes=True, **kwargs).codes


# upstream of a codebook: those whose input it cannot change
UPSTREAM = {
    "layer1_mlp": ["layer0_attn_heads", "layer0_mlp", "layer1_attn_heads"],
    "layer1_attn_heads": ["layer0_attn_heads", "layer0_mlp"],
}


def expected_slots(chosen: list[int], forced: list[int], mode: str, width: int) -> list[int]:
    """Reference: the slots of one (token, group) after forcing ``forced`` in ``mode``."""
    if mode == "replace_all":
        slots = list(forced)
    elif mode == "append":
        slots = chosen + [f for f in forced if f not in chosen]
    else:
        slots = list(chosen)
        missing = [f for f in forced if f not in chosen]
        free = [i for i, c in enumerate(chosen) if c not in forced]
        for code, slot in zip(missing, reversed(free), strict=False):
            slots[slot] = code
    return slots + [-1] * (width - len(slots))


def summed_codes(weight: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Reference: the sum of the code vectors in ``codes`` (``(B, T, G, slots)``, -1 empty)."""
    groups, num_codes, dim = weight.shape
    total = torch.zeros(*codes.shape[:3], dim)
    for b, t, g, s in torch.nonzero(codes >= 0).tolist():
        total[b, t, g] += weight[g, codes[b, t, g, s]]
    return total


# -- exactness when nothing applies ---------------------------------------------------------


def test_empty_intervention_reproduces_the_model_exactly(model, ids):
    with torch.no_grad():
        reference = model(ids).logits
        with intervene(model):
            assert torch.equal(model(ids).logits, reference)
        # hooks installed, but no position matches: the same computation
        with intervene(model, force=["layer0_mlp:5"], disable=["layer1_mlp:2"], positions=[40]):
            assert torch.equal(model(ids).logits, reference)
        assert torch.equal(model(ids).logits, reference)


# -- forcing codes -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["replace_last", "replace_all", "append"])
@pytest.mark.parametrize(
    "target,case",
    [
        ("layer1_mlp", "one"),
        ("layer1_mlp", "two"),
        ("layer1_attn_heads", "one"),
        ("layer1_attn_heads", "two"),
    ],
)
def test_forcing_changes_exactly_the_targeted_slots(model, ids, mode, target, case):
    group = 2 if target.endswith("attn_heads") else 0
    k = K_HEADS if target.endswith("attn_heads") else K_MLP
    reference = codes_of(model, ids)
    chosen_at = reference[target][0, 4, group].tolist()
    absent = min(set(range(16)) - set(chosen_at))
    # "two": the first forced code is chosen already at a targeted position (row 0, position 4)
    forced = [absent] if case == "one" else [chosen_at[1], absent]
    refs = [CodeRef(target, code, group) for code in forced]
    width = {"replace_last": k, "replace_all": max(k, len(forced)), "append": k + len(forced)}

    cb = model.codebooks[target]
    site, layer = model.placement[target]
    seen = {}
    observer = S.attach(model.model, site, layer, lambda x: seen.setdefault("out", x.detach()))
    try:
        with torch.no_grad(), intervene(model, force=refs, mode=mode, positions=POSITIONS):
            out = model(ids, return_codes=True)
    finally:
        observer.remove()

    got = out.codes[target]
    assert got.shape == (*ids.shape, cb.groups, width[mode])
    untouched = torch.full_like(got, -1)
    untouched[..., :k] = reference[target]
    expect = untouched.clone()
    for b in range(ids.shape[0]):
        for t in POSITIONS:
            chosen = reference[target][b, t, group].tolist()
            expect[b, t, group] = torch.tensor(expected_slots(chosen, forced, mode, width[mode]))
    assert torch.equal(got, expect)
    assert not torch.equal(got, untouched)  # the intervention did something
    for key in UPSTREAM[target]:
        assert torch.equal(out.codes[key], reference[key])
    # what flows on is the sum of exactly those code vectors
    weight = cb.weight.detach()
    activation = seen["out"].view(*ids.shape, cb.groups, cb.dim)
    assert torch.allclose(activation, summed_codes(weight, got), atol=1e-5)


@pytest.mark.parametrize("mode", ["replace_last", "replace_all", "append"])
@pytest.mark.parametrize("strength", [2.5, 0.0, -1.0])
def test_strength_scales_forced_codes_only(model, ids, mode, strength):
    """With a strength, the slots are those of strength 1, and what flows on is the sum of
    their codes with each forced code (at a targeted position) times the strength."""
    target = "layer1_mlp"
    reference = codes_of(model, ids)
    chosen_at = reference[target][0, 4, 0].tolist()
    forced = [chosen_at[1], min(set(range(24)) - set(chosen_at))]  # one chosen already
    refs = [CodeRef(target, code) for code in forced]
    cb = model.codebooks[target]
    site, layer = model.placement[target]
    seen = []
    observer = S.attach(model.model, site, layer, lambda x: seen.append(x.detach()))
    try:
        with torch.no_grad():
            with intervene(model, force=refs, mode=mode, positions=POSITIONS):
                plain = model(ids, return_codes=True)
            with intervene(model, force=refs, mode=mode, positions=POSITIONS, strength=strength):
                scaled = model(ids, return_codes=True)
    finally:
        observer.remove()
    got = scaled.codes[target]
    assert torch.equal(got, plain.codes[target])  # the same slots
    weight = cb.weight.detach()
    expect = summed_codes(weight, got)
    for b, t, g, slot in torch.nonzero(got >= 0).tolist():
        if t in POSITIONS and got[b, t, g, slot].item() in forced:
            expect[b, t, g] += (strength - 1) * weight[g, got[b, t, g, slot]]
    activation = seen[1].view(*ids.shape, cb.groups, cb.dim)
    assert torch.allclose(activation, expect, atol=1e-5)
    assert not torch.allclose(scaled.logits, plain.logits)
    # strength 1 is the plain intervention, bit for bit
    with torch.no_grad(), intervene(model, force=refs, mode=mode, positions=POSITIONS, strength=1):
        assert torch.equal(model(ids).logits, plain.logits)


def test_replace_all_with_more_codes_than_k_widens_the_slots(model, ids):
    forced = [CodeRef("layer0_mlp", c) for c in (1, 2, 3, 4, 5)]
    with intervene(model, force=forced, mode="replace_all", positions=[0]):
        got = codes_of(model, ids)["layer0_mlp"]
    assert got.shape[-1] == 5
    assert got[:, 0, 0].tolist() == [[1, 2, 3, 4, 5]] * 2
    assert (got[:, 1:, 0, K_MLP:] == -1).all()


def test_empty_slots_take_no_gradient(ids):
    cfg = CodebookModelConfig([SiteSpec("attn_heads", CodebookConfig(16, k=2), layers=[0])])
    model = CodebookModel(tiny_model("gpt2"), cfg)
    cb = model.codebooks["layer0_attn_heads"]
    inputs = []
    grab = cb.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach()))
    with intervene(model, force=["layer0_attn_heads/1:3", "layer0_attn_heads/1:4"], mode="append"):
        out = model(ids, return_codes=True)
    grab.remove()
    out.reconstruction_loss.backward()
    codes = out.codes["layer0_attn_heads"]
    assert (codes == -1).any() and codes.shape[-1] == 4
    # reference: autograd through a plain gather-and-sum of the filled slots
    weight = cb.weight.detach().clone().requires_grad_(True)
    padded = torch.cat([weight, weight.new_zeros(cb.groups, 1, cb.dim)], 1)
    slots = codes.masked_fill(codes < 0, cb.num_codes)
    groups = torch.arange(cb.groups).view(1, 1, -1, 1)
    summed = padded[groups, slots].sum(-2)
    target = inputs[0].view(*ids.shape, cb.groups, cb.dim)
    F.mse_loss(summed, target).backward()
    assert torch.allclose(cb.weight.grad, weight.grad, atol=1e-6)
    assert cb.weight.grad[1, 3].abs().sum() > 0


# -- disabling codes -----------------------------------------------------------------------


@pytest.mark.parametrize("target", ["layer1_mlp", "layer1_attn_heads"])
def test_disabled_codes_give_way_to_the_next_best(model, ids, target):
    cb = model.codebooks[target]
    group = 1 if target.endswith("attn_heads") else 0
    reference = codes_of(model, ids)
    top = reference[target][:, :, group, 0]
    # the best code at (0, 4) and the second best at (1, 1): both are chosen somewhere
    disabled = sorted({int(top[0, 4]), int(reference[target][1, 1, group, 1])})
    inputs = []
    grab = cb.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach()))
    try:
        with intervene(model, disable=[CodeRef(target, c, group) for c in disabled]):
            got = codes_of(model, ids)[target]
    finally:
        grab.remove()
    # brute force: cosine scores against every code, disabled ones excluded, top k
    a = inputs[0].view(*ids.shape, cb.groups, cb.dim)
    scores = torch.einsum("btgd,gcd->btgc", a, F.normalize(cb.weight.detach(), dim=-1))
    scores[..., group, disabled] = -torch.inf
    expect = scores.topk(cb.k, dim=-1).indices
    for g in range(cb.groups):
        if g != group:
            expect[:, :, g] = reference[target][:, :, g]
    assert torch.equal(got, expect)
    assert not torch.isin(got[..., group, :], torch.tensor(disabled)).any()
    assert not torch.equal(got, reference[target])


def test_disable_and_force_together_and_at_positions(model, ids):
    reference = codes_of(model, ids)["layer0_mlp"]
    best = int(reference[0, 4, 0, 0])
    with intervene(
        model, force=["layer0_mlp:0"], disable=[f"layer0_mlp:{best}"], positions=slice(4, None)
    ):
        got = codes_of(model, ids)["layer0_mlp"]
    assert torch.equal(got[:, :4], reference[:, :4])
    assert (got[:, 4:] != best).all()
    assert (got[:, 4:] == 0).any(-1).all()  # code 0 is on at every position from 4 on


# -- positions -----------------------------------------------------------------------------


def test_positions_count_from_the_first_real_token(model, ids):
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # row 0 is left-padded by two tokens
    reference = codes_of(model, ids, attention_mask=mask)["layer0_mlp"]
    with intervene(model, force=["layer0_mlp:7"], mode="replace_all", positions=[2]):
        got = codes_of(model, ids, attention_mask=mask)["layer0_mlp"]
    hit = torch.zeros(ids.shape, dtype=torch.bool)
    hit[0, 4] = hit[1, 2] = True  # real position 2 of each row
    assert got[hit].tolist() == [[[7, -1, -1]]] * 2
    assert torch.equal(got[~hit], reference[~hit])


def test_token_positions_reads_the_cache_and_the_mask():
    class Past:
        def get_seq_length(self) -> int:
            return 5

    ids = torch.zeros(2, 1, dtype=torch.long)
    assert token_positions((), {"input_ids": ids, "past_key_values": Past()}).tolist() == [[5], [5]]
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    got = token_positions((), {"input_ids": ids, "past_key_values": Past(), "attention_mask": mask})
    assert got.tolist() == [[3], [5]]
    got = token_positions(
        (ids.expand(2, 3),), {"cache_position": torch.tensor([2, 3, 4]), "attention_mask": mask}
    )
    assert got.tolist() == [[0, 1, 2], [2, 3, 4]]
    embeds = torch.zeros(1, 4, 8)
    assert token_positions((), {"inputs_embeds": embeds}).tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neo"])
@pytest.mark.parametrize("start", [5, 2])
def test_generate_with_kv_cache_matches_a_full_forward(family, start, tokens):
    model = build(family)
    prompt = tokens[:, :5]
    steer = dict(
        force=["layer1_mlp:7", "layer0_attn_heads/1:3"], mode="append", positions=slice(start, None)
    )
    with torch.no_grad(), intervene(model, **steer):
        gen = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            return_dict_in_generate=True,
            output_logits=True,
        )
    seq = gen.sequences
    assert seq.shape == (2, 11)
    steps = torch.stack(gen.logits, 1)
    with torch.no_grad():
        with intervene(model, **steer):
            full = model(seq).logits
        plain = model(seq).logits
    assert torch.allclose(full[:, 4:-1], steps, atol=1e-4)
    assert torch.equal(full[:, 4:-1].argmax(-1), seq[:, 5:])
    # positions before ``start`` are untouched, later ones are not
    assert torch.equal(full[:, :start], plain[:, :start])
    assert not torch.allclose(full[:, start:], plain[:, start:])


def test_left_padded_generate_matches_rows_alone(model, tokens):
    short, long = tokens[0, :3], tokens[1, :5]
    batch = torch.stack([torch.cat([torch.zeros(2, dtype=torch.long), short]), long])
    mask = torch.ones_like(batch)
    mask[0, :2] = 0
    options = dict(
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        return_dict_in_generate=True,
        output_logits=True,
    )
    steer = dict(force=["layer0_mlp:7"], mode="replace_all", positions=[3, 4])
    with torch.no_grad(), intervene(model, **steer):
        together = model.generate(batch, attention_mask=mask, **options)
        alone = [
            model.generate(row[None], attention_mask=torch.ones_like(row[None]), **options)
            for row in (short, long)
        ]
    for i, single in enumerate(alone):
        assert torch.equal(together.sequences[i, -4:], single.sequences[0, -4:])
        for step_batch, step_alone in zip(together.logits, single.logits, strict=True):
            assert torch.allclose(step_batch[i], step_alone[0], atol=1e-4)


# -- restoring, nesting, errors --------------------------------------------------------------


def test_hooks_are_restored_after_an_exception(model, ids):
    base = model.model
    before = (len(base._forward_pre_hooks), len(base._forward_hooks))
    reference = model(ids).logits.detach()
    with pytest.raises(KeyError, match="boom"):
        with intervene(model, force=["layer0_mlp:5"], disable=["layer1_attn_heads/3:1"]):
            assert model.codebooks["layer0_mlp"].ids_hook is not None
            raise KeyError("boom")
    assert all(cb.ids_hook is None for cb in model.codebooks.values())
    assert (len(base._forward_pre_hooks), len(base._forward_hooks)) == before
    assert torch.equal(model(ids).logits, reference)


def test_nesting_on_the_same_codebook_raises_and_disjoint_ones_compose(model, ids):
    with intervene(model, force=["layer0_mlp:5"], mode="replace_all"):
        with pytest.raises(RuntimeError, match="layer0_mlp is already intervened on"):
            with intervene(model, force=["layer0_mlp:6"]):
                pass
        assert model.codebooks["layer0_mlp"].ids_hook is not None  # the outer one holds
        with intervene(model, force=["layer1_mlp:6"], mode="replace_all"):
            got = codes_of(model, ids)
        assert (got["layer0_mlp"][..., 0, 0] == 5).all()
        assert (got["layer1_mlp"][..., 0, 0] == 6).all()
        assert model.codebooks["layer1_mlp"].ids_hook is None
    assert all(cb.ids_hook is None for cb in model.codebooks.values())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"force": ["layer0_mlp:1"], "mode": "swap"}, "mode must be one of replace_last"),
        ({"force": ["layer9_mlp:1"]}, "no codebook 'layer9_mlp'; present: layer0_attn_heads"),
        ({"force": ["layer0_attn_heads/4:1"]}, "has 4 group\\(s\\); group 4 does not exist"),
        ({"force": ["layer0_mlp:24"]}, "has 24 codes; code 24 does not exist"),
        ({"force": ["layer0_mlp 1"]}, "does not name a code"),
        ({"force": [f"layer0_mlp:{i}" for i in range(4)]}, "at most k=3 codes in layer0_mlp"),
        ({"force": ["layer0_mlp:1"], "disable": ["layer0_mlp:1"]}, "both forced and disabled"),
        ({"disable": ["layer0_mlp:1", "layer0_mlp:1"]}, "layer0_mlp:1 is disabled twice"),
        ({"disable": [f"layer0_mlp:{i}" for i in range(22)]}, "cannot disable 22 codes"),
        ({"force": ["layer0_mlp:1"], "positions": [-1]}, "non-negative integers, got -1"),
        ({"force": ["layer0_mlp:1"], "positions": slice(-2, None)}, "slice start"),
        ({"force": ["layer0_mlp:1"], "strength": float("nan")}, "strength must be finite"),
        ({"force": ["layer0_mlp:1"], "strength": float("inf")}, "strength must be finite"),
        ({"force": ["layer0_mlp:1"], "strength": "2"}, "strength must be a number"),
        ({"force": ["layer0_mlp:1"], "strength": True}, "strength must be a number"),
    ],
)
def test_bad_interventions_fail_clearly(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        with intervene(model, **kwargs):
            pass
    assert all(cb.ids_hook is None for cb in model.codebooks.values())


# -- topic words ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,words,expected",
    [
        ("The Cat sat.", ["cat"], True),
        ("the CAT", ["Cat"], True),
        ("(cat)", ["cat"], True),
        ("two cats", ["cat"], False),
        ("concatenate", ["cat"], False),
        ("bobcat", ["cat"], False),
        ("cat_food", ["cat"], False),
        ("I love New York!", ["new york"], True),
        ("a New Yorker", ["new york"], False),
        ("C++ is old", ["c++"], True),
        ("dogs and cats", ["cat", "dogs"], True),
        ("", ["cat"], False),
    ],
)
def test_topic_words_match_whole_words_ignoring_case(text, words, expected):
    assert mentions_topic(text, words) is expected


def test_an_empty_topic_is_refused():
    with pytest.raises(ValueError, match="at least one non-empty word"):
        mentions_topic("text", [" ", ""])


# -- sampling and steering on a saved model with a tokenizer -------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("steer")
    save_tiny_lm(root / "lm", family="llama")
    base = AutoModelForCausalLM.from_pretrained(str(root / "lm"))
    cfg = CodebookModelConfig([SiteSpec("mlp", CodebookConfig(num_codes=32, k=2))])
    model = CodebookModel(base, cfg)
    with torch.no_grad():
        model.codebooks["layer1_mlp"].weight.mul_(4.0)
    model.save_pretrained(root / "cb", include_base=True)
    AutoTokenizer.from_pretrained(str(root / "lm")).save_pretrained(str(root / "cb" / "base"))
    return root / "cb"


@pytest.fixture(scope="module")
def loaded(saved):
    return load_codebook_model(saved)


PROMPTS = ["In May 1950, the cat", "she paints"]


def test_generate_is_seeded_and_leaves_the_global_rng_alone(loaded):
    state = torch.get_rng_state()
    first = generate(loaded, PROMPTS, samples=3, max_new_tokens=6, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert generate(loaded, PROMPTS, samples=3, max_new_tokens=6, seed=3) == first
    assert generate(loaded, PROMPTS, samples=3, max_new_tokens=6, seed=4) != first
    assert [len(row) for row in first] == [3, 3]
    # a CodebookModel with a transformers tokenizer samples the same as the Loaded bundle
    assert (
        generate(loaded.model, PROMPTS, loaded.tokenizer, samples=3, max_new_tokens=6, seed=3)
        == first
    )
    greedy = generate(loaded, PROMPTS[:1], samples=2, max_new_tokens=6, temperature=0)
    assert greedy[0][0] == greedy[0][1]


def test_prompts_of_different_lengths_sample_together_as_alone(loaded, monkeypatch):
    import codebook_lens.steering.sampling as sampling

    # greedy decoding: a prompt's continuation in a left-padded batch is the one it gets
    # alone, with and without an intervention (its positions count from the prompt)
    prompts = [*PROMPTS, "the"]
    lengths = {len(loaded.tokenizer(p, add_special_tokens=False).input_ids) for p in prompts}
    assert len(lengths) == 3, "the prompts must differ in length"
    intervention = Intervention(["layer1_mlp:3"], mode="append", positions=slice(2, None))
    for iv in (None, intervention):
        together = generate(loaded, prompts, max_new_tokens=6, temperature=0, intervention=iv)
        alone = [
            generate(loaded, [p], max_new_tokens=6, temperature=0, intervention=iv)[0]
            for p in prompts
        ]
        assert together == alone
    # batches of at most MAX_ROWS samples, each prompt whole, in order
    monkeypatch.setattr(sampling, "MAX_ROWS", 4)
    assert sampling._batches(prompts, 2) == [prompts[:2], prompts[2:]]
    assert sampling._batches(prompts, 5) == [[p] for p in prompts]
    split = generate(loaded, prompts, samples=2, max_new_tokens=6, seed=5)
    assert [len(row) for row in split] == [2, 2, 2]
    # the first batch is drawn with the seed of a call that holds only its prompts
    assert split[:2] == generate(loaded, prompts[:2], samples=2, max_new_tokens=6, seed=5)


def test_steering_eval_counts_and_saves_what_it_sampled(loaded, tmp_path):
    settings = dict(samples=4, max_new_tokens=8, seed=1)
    baseline = generate(loaded, PROMPTS, **settings)
    words = re.findall(r"[A-Za-z]+", " ".join(baseline[0]))[:2]
    assert words, "the baseline holds no word to count"
    topic = [w.upper() for w in words]
    result = steering_eval(
        loaded,
        None,
        ["layer1_mlp:3"],
        PROMPTS,
        samples_per_prompt=4,
        words=topic,
        mode="replace_all",
        max_new_tokens=8,
        seed=1,
        progress=False,
    )
    assert result.baseline == baseline
    steered = generate(
        loaded, PROMPTS, intervention=Intervention(["layer1_mlp:3"], mode="replace_all"), **settings
    )
    assert result.steered == steered
    assert result.steered != result.baseline

    saved = json.loads(result.save(tmp_path / "out" / "steer.json").read_text())
    lowered = {w.lower() for w in words}

    def hand(text: str) -> bool:
        return any(w.lower() in lowered for w in re.findall(r"\w+", text))

    for kind in ("baseline", "steered"):
        samples = [s for p in saved["per_prompt"] for s in p[kind]]
        assert len(samples) == 8
        assert [s["mentions"] for s in samples] == [hand(s["text"]) for s in samples]
        count = sum(hand(s["text"]) for s in samples)
        assert saved[f"{kind}_mentions"] == count
        assert saved[f"{kind}_fraction"] == pytest.approx(count / 8)
        assert getattr(result, f"{kind}_fraction") == pytest.approx(count / 8)
    assert saved["baseline_mentions"] >= 1
    assert saved["force"] == ["layer1_mlp:3"] and saved["mode"] == "replace_all"
    assert [p["prompt"] for p in saved["per_prompt"]] == PROMPTS


# -- command line --------------------------------------------------------------------------


def test_cli_steer_prints_json_and_text(saved, loaded, capsys):
    args = ["steer", str(saved), "--prompt", PROMPTS[0], "--code", "layer1_mlp:3"]
    args += ["--mode", "append", "--samples", "2", "--max-new-tokens", "5", "--seed", "7"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    intervention = Intervention(["layer1_mlp:3"], mode="append")
    assert (
        report["baseline"] == generate(loaded, PROMPTS[:1], samples=2, max_new_tokens=5, seed=7)[0]
    )
    assert (
        report["steered"]
        == generate(
            loaded, PROMPTS[:1], samples=2, max_new_tokens=5, seed=7, intervention=intervention
        )[0]
    )
    assert report["force"] == ["layer1_mlp:3"] and report["positions"] == "all"
    assert report["strength"] == 1.0
    assert main([*args, "--strength", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    strong = Intervention(["layer1_mlp:3"], mode="append", strength=4.0)
    assert report["strength"] == 4.0
    assert (
        report["steered"]
        == generate(loaded, PROMPTS[:1], samples=2, max_new_tokens=5, seed=7, intervention=strong)[
            0
        ]
    )
    assert main([*args, "--from-position", "3"]) == 0
    text = capsys.readouterr().out
    assert "positions: from 3" in text
    assert text.count("baseline:") == 2 and text.count("steered:") == 2


@pytest.mark.parametrize(
    "code,message",
    [
        ("layer1mlp3", "'layer1mlp3' does not name a code"),
        ("layer7_mlp:1", "no codebook 'layer7_mlp'; present: layer0_mlp, layer1_mlp"),
        ("layer1_mlp:99", "layer1_mlp has 32 codes; code 99 does not exist"),
    ],
)
def test_cli_steer_rejects_bad_codes_in_one_line(saved, capsys, code, message):
    assert main(["steer", str(saved), "--prompt", "x", "--code", code]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"codebook: error: {message}")


def test_cli_steer_rejects_a_bad_mode(saved, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["steer", str(saved), "--prompt", "x", "--code", "layer1_mlp:1", "--mode", "swap"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'swap'" in capsys.readouterr().err


def test_cli_steer_eval_with_codes(saved, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")
    out = tmp_path / "eval.json"
    args = ["steer-eval", str(saved), "--words", "cat, dog", "--code", "layer1_mlp:3"]
    args += ["--prompts-file", str(prompts), "--samples", "2", "--max-new-tokens", "4"]
    assert main([*args, "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["words"] == ["cat", "dog"] and summary["samples"] == 4
    assert summary["out"] == str(out)
    saved_json = json.loads(out.read_text())
    assert [p["prompt"] for p in saved_json["per_prompt"]] == PROMPTS
    assert saved_json["steered_fraction"] == summary["steered_fraction"]
    assert main(args) == 0
    assert "baseline" in capsys.readouterr().out


def _fake_cache_search(monkeypatch, calls):
    """A stand-in cache and search module: two codes of layer0_mlp and one of layer1_mlp,
    best first, from either selection."""
    from codebook_lens.analysis.search import per_codebook

    class CodeCache:
        @staticmethod
        def open(directory):
            calls.append(("open", directory))
            return cache

    class Cache(str):
        def set_model(self, loaded) -> None:
            """The real cache checks that the model is its own first."""
            calls.append(("set_model", type(loaded).__name__))

    cache = Cache("cache")

    hit = types.SimpleNamespace
    refs = [CodeRef("layer1_mlp", 3), CodeRef("layer0_mlp", 5), CodeRef("layer0_mlp", 6)]

    def topic_codes(cache, text, **limits):
        calls.append(("topic", cache, text, limits))
        return [hit(ref=r, coverage=0.9 - i / 10, frequency=0.01) for i, r in enumerate(refs)]

    def effect_codes(cache, words, **limits):
        calls.append(("effect", cache, list(words), limits))
        return [hit(ref=r, score=5.0 - i, frequency=0.02) for i, r in enumerate(refs)]

    monkeypatch.setitem(
        sys.modules, "codebook_lens.cache.store", types.SimpleNamespace(CodeCache=CodeCache)
    )
    search = types.SimpleNamespace(
        topic_codes=topic_codes, effect_codes=effect_codes, per_codebook=per_codebook
    )
    monkeypatch.setitem(sys.modules, "codebook_lens.analysis.search", search)


def test_cli_steer_eval_picks_codes_from_a_cache(saved, monkeypatch, capsys):
    calls = []
    _fake_cache_search(monkeypatch, calls)
    args = ["steer-eval", str(saved), "--words", "cat", "--cache", "C", "--topic-text", "cats"]
    args += ["--max-codes", "2", "--max-frequency", "0.05", "--prompt", "she", "--samples", "1"]
    assert main([*args, "--max-new-tokens", "3", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    limits = {"max_frequency": 0.05, "limit": None}
    assert calls == [("open", "C"), ("set_model", "Loaded"), ("topic", "cache", "cats", limits)]
    assert summary["force"] == ["layer1_mlp:3", "layer0_mlp:5"]
    assert [s["code"] for s in summary["selected"]] == summary["force"]
    assert [s["coverage"] for s in summary["selected"]] == [0.9, 0.8]
    assert main(["steer-eval", str(saved), "--words", "cat", "--cache", "C", "--prompt", "x"]) == 2
    assert "--cache needs --topic-text" in capsys.readouterr().err


def test_cli_steer_eval_selects_by_effect_and_per_codebook(saved, monkeypatch, capsys):
    calls = []
    _fake_cache_search(monkeypatch, calls)
    args = ["steer-eval", str(saved), "--words", "cat,dog", "--cache", "C", "--select", "effect"]
    args += ["--per-codebook", "1", "--prompt", "she", "--samples", "1", "--max-new-tokens", "3"]
    assert main([*args, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert calls == [
        ("open", "C"),
        ("set_model", "Loaded"),
        ("effect", "cache", ["cat", "dog"], {"limit": None}),
    ]
    # the best code of each codebook: layer0_mlp:6 is the second of its book
    assert summary["force"] == ["layer1_mlp:3", "layer0_mlp:5"]
    assert [s["score"] for s in summary["selected"]] == [5.0, 4.0]
    assert main(args) == 0
    assert "selected layer1_mlp:3: logit score 5.00" in capsys.readouterr().out
    assert main([*args, "--min-fraction", "0.2"]) == 2
    assert "--min-fraction applies to --select topic" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses it before any work
        main([*args, "--per-codebook", "0"])
    assert exit_info.value.code == 2
    assert "--per-codebook: must be an integer >= 1, got '0'" in capsys.readouterr().err


def test_token_positions_prefer_position_ids():
    ids = torch.zeros(2, 1, dtype=torch.long)

    class Past:
        def get_seq_length(self) -> int:
            return 5

    # newer transformers pass the KV cache as ``cache`` and the positions themselves
    assert token_positions((), {"input_ids": ids, "cache": Past()}).tolist() == [[5], [5]]
    pos = torch.tensor([[3], [5]])
    got = token_positions((), {"input_ids": ids, "cache": Past(), "position_ids": pos})
    assert got.tolist() == [[3], [5]]
    mask = torch.tensor([[0, 0, 1], [1, 1, 1]])
    ids3 = torch.zeros(2, 3, dtype=torch.long)
    pos3 = torch.tensor([[1, 1, 0], [0, 1, 2]])  # generate's left-padded positions
    got = token_positions((), {"input_ids": ids3, "position_ids": pos3, "attention_mask": mask})
    assert got.tolist() == [[-1, -1, 0], [0, 1, 2]]
