"""Where codebooks go in each architecture family.

A site is a place in a decoder layer whose activation a codebook replaces:

- ``attn_heads``: the per-head attention outputs just before the output projection,
  one codebook per head (a group of ``num_heads`` codebooks);
- ``attn``: the attention block output (the output projection's output);
- ``mlp``: the MLP block output;
- ``residual``: the decoder layer output (the residual stream after the layer).

The MLP hidden neurons (:func:`attach_mlp_hidden`, read by the neuron baselines) are the
input of the MLP's output projection: ``act_fn(gate_proj(x)) * up_proj(x)`` on gated MLPs
(Llama, Mistral, Qwen2), ``act(fc(x))`` otherwise (GPT-2, GPT-Neo, GPT-NeoX).

Codebooks are attached with PyTorch forward hooks on the framework's own modules;
no forward code of any framework is copied. Adding a family is one row of
:data:`FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from codebook_lens.core.errors import CodebookLensError

SITES: tuple[str, ...] = ("attn_heads", "attn", "mlp", "residual")


@dataclass(frozen=True)
class Family:
    """Module paths of one architecture family.

    layers: path from the causal LM to the list of decoder layers.
    attn_out: path from a decoder layer to the attention output projection (its input is
        the concatenation of the per-head outputs, head-major; its output is the block output).
    mlp: path from a decoder layer to the MLP block.
    mlp_out: path from a decoder layer to the MLP's output projection (its input is the
        MLP hidden neurons; its output is the MLP block output).
    """

    layers: str
    attn_out: str
    mlp: str
    mlp_out: str


_LLAMA_LIKE = Family(
    layers="model.layers", attn_out="self_attn.o_proj", mlp="mlp", mlp_out="mlp.down_proj"
)

FAMILIES: dict[str, Family] = {
    "gpt2": Family(layers="transformer.h", attn_out="attn.c_proj", mlp="mlp", mlp_out="mlp.c_proj"),
    "gpt_neo": Family(
        layers="transformer.h",
        attn_out="attn.attention.out_proj",
        mlp="mlp",
        mlp_out="mlp.c_proj",
    ),
    "gpt_neox": Family(
        layers="gpt_neox.layers",
        attn_out="attention.dense",
        mlp="mlp",
        mlp_out="mlp.dense_4h_to_h",
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
}


def family_of(model: nn.Module) -> tuple[str, Family]:
    """The ``(model_type, Family)`` of a transformers causal LM, or a clear error."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise CodebookLensError(
            f"model type {model_type!r} is not supported; supported families: "
            f"{', '.join(sorted(FAMILIES))}"
        )
    return model_type, FAMILIES[model_type]


def check_site(site: str) -> None:
    if site not in SITES:
        raise CodebookLensError(f"site {site!r} is not supported; choose from {', '.join(SITES)}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    _, family = family_of(model)
    return model.get_submodule(family.layers)


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def _in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    weight = getattr(module, "weight", None)  # GPT-2's Conv1D keeps weight as (in, out)
    if weight is not None and weight.dim() == 2 and hasattr(module, "nf"):
        return weight.shape[0]
    raise TypeError(f"cannot read the input width of {type(module).__name__}")


def num_heads(model: nn.Module) -> int:
    config = model.config
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", None)
    if not heads:
        raise CodebookLensError(
            f"cannot find the number of attention heads in {type(config).__name__}"
        )
    return int(heads)


@dataclass(frozen=True)
class SiteShape:
    """Shape of the activation at a site: ``groups`` codebooks of width ``dim``."""

    groups: int
    dim: int


def site_shape(model: nn.Module, site: str, layer: int) -> SiteShape:
    """The ``(groups, dim)`` of the codebook that fits ``site`` of ``layer``."""
    check_site(site)
    layers = decoder_layers(model)
    if not isinstance(layer, int) or not 0 <= layer < len(layers):
        raise CodebookLensError(
            f"layer {layer!r} is out of range: the model has layers 0..{len(layers) - 1}"
        )
    hidden = int(model.config.hidden_size)
    if site == "attn_heads":
        _, family = family_of(model)
        width = _in_features(layers[layer].get_submodule(family.attn_out))
        heads = num_heads(model)
        if width % heads:
            raise CodebookLensError(f"attention width {width} is not divisible by {heads} heads")
        return SiteShape(groups=heads, dim=width // heads)
    return SiteShape(groups=1, dim=hidden)


Replace = Callable[[torch.Tensor], torch.Tensor | None]


def attach(
    model: nn.Module, site: str, layer: int, replace: Replace
) -> torch.utils.hooks.RemovableHandle:
    """Hook ``replace`` onto ``site`` of ``layer``: the activation there becomes its result.

    ``replace`` receives the activation (last dim = groups * dim) and returns the new
    activation, or None to leave it untouched. Returns the hook handle.
    """
    check_site(site)
    _, family = family_of(model)
    block = decoder_layers(model)[layer]

    if site == "attn_heads":

        def pre_hook(_module, args):
            new = replace(args[0])
            return None if new is None else (new, *args[1:])

        return block.get_submodule(family.attn_out).register_forward_pre_hook(pre_hook)

    def post_hook(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        new = replace(hidden)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    target = {"attn": family.attn_out, "mlp": family.mlp}.get(site)
    module = block if target is None else block.get_submodule(target)
    return module.register_forward_hook(post_hook)


def attach_mlp_hidden(
    model: nn.Module, layer: int, grab: Callable[[torch.Tensor], None]
) -> torch.utils.hooks.RemovableHandle:
    """Hand ``grab`` the MLP hidden neurons of ``layer`` at every forward pass.

    The MLP hidden neurons are the input of the MLP's output projection
    (:attr:`Family.mlp_out`), one per intermediate unit, ``(..., intermediate_size)``:

    - gated MLPs (Llama, Mistral, Qwen2; SmolLM2 is a Llama):
      ``act_fn(gate_proj(x)) * up_proj(x)``;
    - GPT-2, GPT-Neo, GPT-NeoX: ``act(fc(x))``.

    The activation function's own output is not it: on a gated MLP it misses the up
    projection's factor. ``grab`` only reads; the forward pass is unchanged. Returns
    the hook handle.
    """
    _, family = family_of(model)
    out_proj = decoder_layers(model)[layer].get_submodule(family.mlp_out)

    def pre_hook(_module, args):
        grab(args[0])

    return out_proj.register_forward_pre_hook(pre_hook)
