"""The MLP hidden neurons: one definition (the input of the MLP's output projection),
computed by hand for every family, and read alike by both neuron baselines."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model

from codebook_lens.analysis.neurons import _Grabber
from codebook_lens.core import sites as S
from codebook_lens.experiments.tokfsm import classify as C

GATED = {"llama", "mistral", "qwen2"}


def _mlp_input(model, layer: int, tokens: torch.Tensor) -> torch.Tensor:
    """The input of ``layer``'s MLP block, recorded during a forward pass."""
    mlp = S.decoder_layers(model)[layer].mlp
    seen = []
    handle = mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(input_ids=tokens)
    handle.remove()
    return seen[0]


def _by_hand(family: str, mlp, x: torch.Tensor) -> torch.Tensor:
    """The hidden neurons from the MLP's weights: act(gate) * up, or act(fc)."""
    if family in GATED:  # hidden_act silu, no biases
        return F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
    if family == "gpt_neox":  # hidden_act gelu (exact)
        return F.gelu(x @ mlp.dense_h_to_4h.weight.T + mlp.dense_h_to_4h.bias)
    if family == "gpt2":  # Conv1D keeps its weight as (in, out); gelu_new is gelu's tanh form
        return F.gelu(x @ mlp.c_fc.weight + mlp.c_fc.bias, approximate="tanh")
    assert family == "gpt_neo"
    return F.gelu(x @ mlp.c_fc.weight.T + mlp.c_fc.bias, approximate="tanh")


def test_every_family_names_an_output_projection():
    for name, family in S.FAMILIES.items():
        assert family.mlp_out.startswith(family.mlp + "."), name


def test_mlp_hidden_neurons_by_hand(family, tokens):
    model = tiny_model(family)
    layer = 1
    grabbed = []
    handle = S.attach_mlp_hidden(model, layer, grabbed.append)
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    handle.remove()
    x = _mlp_input(model, layer, tokens)
    expected = _by_hand(family, S.decoder_layers(model)[layer].mlp, x)
    (hidden,) = grabbed
    assert hidden.shape == (*tokens.shape, expected.shape[-1])
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # reading changes nothing
        assert torch.equal(model(input_ids=tokens).logits, logits)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_both_baselines_record_the_same_hidden_neurons(family, tokens):
    model = tiny_model(family)
    acts = C.neuron_activations(model, tokens)  # the TokFSM baseline
    grab = _Grabber(model)  # the regex baseline
    with torch.no_grad():
        model(input_ids=tokens)
    grab.remove()
    for layer in range(S.num_layers(model)):
        name = f"layer{layer}_mlp_hidden"
        mlp = S.decoder_layers(model)[layer].mlp
        expected = _by_hand(family, mlp, _mlp_input(model, layer, tokens))
        torch.testing.assert_close(acts[name], expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(grab.current[name], acts[name].reshape(-1, expected.shape[-1]))
        if family in GATED:
            # the activation function's own output, which the TokFSM baseline read
            # before, is another tensor on a gated MLP: it lacks the up projection
            gate = F.silu(_mlp_input(model, layer, tokens) @ mlp.gate_proj.weight.T)
            assert not torch.allclose(gate, acts[name], atol=1e-3)
