"""CodebookModel on every family x site: placement, exactness when off, save/load, errors."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FAMILY_NAMES, tiny_bert_config, tiny_model

from codebook_lens.core import sites as S
from codebook_lens.core.codebook import CodebookConfig
from codebook_lens.core.errors import ModelLoadError
from codebook_lens.core.model import CodebookModel, CodebookModelConfig, SiteSpec

SITE_NAMES = list(S.SITES)


def wrap(base, site, layers=None, num_codes=24, k=2, similarity="cosine"):
    cfg = CodebookModelConfig(
        [SiteSpec(site, CodebookConfig(num_codes=num_codes, k=k, similarity=similarity), layers)]
    )
    return CodebookModel(base, cfg)


@pytest.mark.parametrize("site", SITE_NAMES)
def test_site_is_replaced_by_sum_of_codes(family, site, tokens):
    base = tiny_model(family)
    reference = base(tokens).logits
    model = wrap(base, site)
    seen = {}
    for layer in range(2):  # an observer hooked after the codebook sees what flows on
        S.attach(base, site, layer, lambda x, layer=layer: seen.__setitem__(layer, x.detach()))
    out = model(tokens, labels=tokens, return_codes=True)
    assert set(out.codes) == {f"layer0_{site}", f"layer1_{site}"}
    for layer in range(2):
        cb = model.codebook(site, layer)
        codes = out.codes[f"layer{layer}_{site}"]
        groups = 4 if site == "attn_heads" else 1
        assert codes.shape == (2, 12, groups, 2)
        w = cb.weight.detach()
        expect = torch.stack([w[g][codes[..., g, :]].sum(-2) for g in range(groups)], -2)
        assert torch.allclose(seen[layer], expect.flatten(-2), atol=1e-5)
    assert out.reconstruction_loss > 0
    assert torch.allclose(out.loss, out.lm_loss + out.reconstruction_loss)
    assert not torch.allclose(out.logits, reference)
    # the loss trains both the codebooks and the base model
    out.loss.backward()
    assert model.codebook(site, 0).weight.grad.abs().sum() > 0
    assert base.get_input_embeddings().weight.grad.abs().sum() > 0


@pytest.mark.parametrize("site", SITE_NAMES)
def test_codebooks_off_reproduces_base_exactly(family, site, tokens):
    base = tiny_model(family)
    reference = base(tokens).logits
    model = wrap(base, site)
    with model.codebooks_disabled():
        assert torch.equal(model(tokens).logits, reference)
    assert not torch.equal(model(tokens).logits, reference)
    model.remove_hooks()
    assert torch.equal(base(tokens).logits, reference)


@pytest.mark.parametrize("site", SITE_NAMES)
@pytest.mark.parametrize("with_base", [False, True])
def test_save_load_round_trip_is_bit_exact(family, site, with_base, tokens, tmp_path):
    base = tiny_model(family)
    model = wrap(base, site)
    with torch.no_grad():
        for cb in model.codebooks.values():
            cb.weight.mul_(1.7).add_(0.1)  # not the init: the load must really restore them
    model.track_usage()
    expected = model(tokens).logits
    model.save_pretrained(tmp_path, include_base=with_base)
    meta = json.loads((tmp_path / "codebook_config.json").read_text())
    assert meta["model_type"] == family and meta["base_included"] == with_base
    if with_base:
        loaded = CodebookModel.from_pretrained(tmp_path)
    else:
        fresh = tiny_model(family)
        fresh.load_state_dict(base.state_dict())
        loaded = CodebookModel.from_pretrained(tmp_path, base_model=fresh)
    loaded.eval()
    assert torch.equal(loaded(tokens).logits, expected)
    for key, cb in model.codebooks.items():
        assert torch.equal(loaded.codebooks[key].usage, cb.usage)


def test_outlier_rule_round_trips_and_keeps_outliers_dense(tokens, tmp_path):
    """The reference norm of an outlier rule is saved with the codes: a loaded model
    computes the same logits and codes, outliers (no code) included."""
    base = tiny_model("llama")
    cfg = CodebookModelConfig(
        [SiteSpec("mlp", CodebookConfig(num_codes=24, k=2, outlier_factor=1.1), [0, 1])]
    )
    model = CodebookModel(base, cfg)
    seen: dict[int, torch.Tensor] = {}
    handles = [
        S.attach(base, "mlp", layer, lambda x, layer=layer: seen.__setitem__(layer, x.detach()))
        for layer in (0, 1)
    ]
    with model.codebooks_disabled():
        model(tokens)
    for h in handles:
        h.remove()
    with torch.no_grad():
        cb = model.codebook("mlp", 0)
        cb.kmeans_init_(seen[0].reshape(-1, seen[0].shape[-1]))
    out = model(tokens, return_codes=True)
    empty = (out.codes["layer0_mlp"] < 0).all(-1).squeeze(-1)  # (batch, seq)
    assert 0 < empty.float().mean() < 1
    assert model.codebook("mlp", 1).ref_norm > 0  # set by its first batch
    model.save_pretrained(tmp_path, include_base=True)
    loaded = CodebookModel.from_pretrained(tmp_path)
    loaded.eval()
    for key in model.codebooks:
        assert torch.equal(loaded.codebooks[key].ref_norm, model.codebooks[key].ref_norm)
    again = loaded(tokens, return_codes=True)
    assert torch.equal(again.logits, out.logits)
    assert torch.equal(again.codes["layer0_mlp"], out.codes["layer0_mlp"])


def test_layers_and_mixed_sites(tokens):
    base = tiny_model("gpt_neox")
    cfg = CodebookModelConfig(
        [
            SiteSpec("attn_heads", CodebookConfig(num_codes=30, k=1)),
            SiteSpec("mlp", CodebookConfig(num_codes=50, k=3, similarity="euclidean"), layers=[1]),
        ]
    )
    model = CodebookModel(base, cfg)
    assert list(model.codebooks) == ["layer0_attn_heads", "layer1_attn_heads", "layer1_mlp"]
    assert model.codebook("attn_heads", 0).weight.shape == (4, 30, 8)
    assert model.codebook("mlp", 1).weight.shape == (1, 50, 32)
    out = model(tokens, return_codes=True)
    assert out.codes["layer1_mlp"].shape == (2, 12, 1, 3)
    assert set(out.site_mse) == set(model.codebooks)


def test_generate_runs_through_codebooks(tokens):
    base = tiny_model("llama")
    model = wrap(base, "mlp")
    model.track_usage()
    out = model.generate(tokens[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=1)
    assert out.shape == (1, 9)
    assert model.codebook("mlp", 0).usage.sum() > 0


def test_training_steps_reduce_reconstruction_loss(tokens):
    base = tiny_model("gpt2")
    model = wrap(base, "mlp", num_codes=64, k=4)
    opt = torch.optim.Adam(model.codebooks.parameters(), lr=3e-2)
    first = None
    for _ in range(30):
        out = model(tokens, labels=tokens)
        opt.zero_grad()
        out.reconstruction_loss.backward()
        opt.step()
        first = first if first is not None else out.reconstruction_loss.item()
    assert out.reconstruction_loss.item() < 0.5 * first


# -- errors -----------------------------------------------------------------------------


def test_unsupported_family_names_supported_ones():
    from transformers import BertLMHeadModel

    bert = BertLMHeadModel(tiny_bert_config(is_decoder=True))
    with pytest.raises(
        ValueError,
        match="'bert' is not supported; supported families: gpt2, gpt_neo, gpt_neox, llama",
    ):
        wrap(bert, "mlp")


def test_bad_site_and_layers():
    base = tiny_model("gpt2")
    with pytest.raises(
        ValueError, match="site 'ffn' is not supported; choose from attn_heads, attn, mlp, residual"
    ):
        wrap(base, "ffn")
    with pytest.raises(ValueError, match=r"layer 2 is out of range: the model has layers 0..1"):
        wrap(base, "mlp", layers=[2])
    with pytest.raises(ValueError, match="repeat a layer"):
        wrap(base, "mlp", layers=[0, 0])
    with pytest.raises(ValueError, match="k must be"):
        wrap(base, "mlp", num_codes=4, k=4)


def test_loading_into_a_mismatched_model_fails_clearly(tokens, tmp_path):
    model = wrap(tiny_model("gpt2"), "mlp", num_codes=24)
    model.save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match="trained on a gpt2 model, but the base model given is 'llama'"
    ):
        CodebookModel.from_pretrained(tmp_path, base_model=tiny_model("llama"))
    with pytest.raises(ValueError, match="holds codebooks only; pass base_model="):
        CodebookModel.from_pretrained(tmp_path)
    from helpers import tiny_config
    from transformers import AutoModelForCausalLM

    wide = tiny_config("gpt2")
    wide.n_embd = 64
    with pytest.raises(ValueError, match="need hidden_size=32, the base model has 64"):
        CodebookModel.from_pretrained(tmp_path, base_model=AutoModelForCausalLM.from_config(wide))
    # wrong dims / missing keys in the weights file itself
    other = wrap(tiny_model("gpt2"), "mlp", num_codes=30)
    with pytest.raises(
        ValueError,
        match=r"layer0_mlp.weight has shape \(1, 24, 32\), this model needs \(1, 30, 32\)",
    ):
        other.load_codebooks(tmp_path / "codebooks.safetensors")
    other = wrap(tiny_model("gpt2"), "attn", num_codes=24)
    with pytest.raises(ValueError, match="missing .*layer0_attn.weight"):
        other.load_codebooks(tmp_path / "codebooks.safetensors")
    with pytest.raises(ModelLoadError, match="is not a saved codebook model"):
        CodebookModel.from_pretrained(tmp_path / "nowhere", base_model=tiny_model("gpt2"))


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_site_shapes(name):
    base = tiny_model(name)
    assert S.site_shape(base, "attn_heads", 0) == S.SiteShape(groups=4, dim=8)
    for site in ("attn", "mlp", "residual"):
        assert S.site_shape(base, site, 1) == S.SiteShape(groups=1, dim=32)
