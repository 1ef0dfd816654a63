"""CodebookModel: a transformers causal LM with codebooks at chosen sites.

base = AutoModelForCausalLM.from_config(...)           # or from_pretrained(local dir)
model = CodebookModel(base, CodebookModelConfig([SiteSpec("mlp", CodebookConfig(1024, k=8))]))
out = model(input_ids, labels=input_ids)
(out.loss).backward()                                  # LM loss + reconstruction loss
model.save_pretrained("run/")                          # codebooks (+ base with include_base)
model = CodebookModel.from_pretrained("run/", base_model=base)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from codebook_lens.core import sites as S
from codebook_lens.core.codebook import Codebook, CodebookConfig
from codebook_lens.core.errors import CodebookLensError, ModelLoadError
from codebook_lens.core.files import make_readable, save_safetensors

FORMAT_NAME = "codebook-lens"
FORMAT_VERSION = 1
CONFIG_FILE = "codebook_config.json"
WEIGHTS_FILE = "codebooks.safetensors"
BASE_DIR = "base"


def site_key(site: str, layer: int) -> str:
    """Name of the codebook at ``site`` of ``layer``, e.g. ``layer3_mlp``."""
    return f"layer{layer}_{site}"


@dataclass
class SiteSpec:
    """Codebooks of one kind of site on chosen layers (None: every layer)."""

    site: str
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    layers: list[int] | None = None

    def __post_init__(self) -> None:
        S.check_site(self.site)
        if isinstance(self.codebook, dict):
            self.codebook = CodebookConfig.from_dict(self.codebook)
        if self.layers is not None:
            self.layers = list(self.layers)
            if len(set(self.layers)) != len(self.layers):
                raise CodebookLensError(
                    f"layers for site {self.site!r} repeat a layer: {self.layers}"
                )

    def to_dict(self) -> dict:
        return {"site": self.site, "layers": self.layers, "codebook": self.codebook.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> SiteSpec:
        if not isinstance(data, dict):
            raise CodebookLensError(f"a codebook site must be a mapping, got {data!r}")
        unknown = sorted(set(data) - {"site", "layers", "codebook"})
        if unknown:
            raise CodebookLensError(
                f"unknown site option(s) {', '.join(unknown)}; known: codebook, layers, site"
            )
        return cls(
            site=data["site"],
            layers=data.get("layers"),
            codebook=CodebookConfig.from_dict(data.get("codebook", {})),
        )


@dataclass
class CodebookModelConfig:
    sites: list[SiteSpec]

    def __post_init__(self) -> None:
        # no sites at all is allowed: the model is then the base LM (trained alone)
        self.sites = [SiteSpec.from_dict(s) if isinstance(s, dict) else s for s in self.sites]

    def to_dict(self) -> dict:
        return {"sites": [s.to_dict() for s in self.sites]}

    @classmethod
    def from_dict(cls, data: dict) -> CodebookModelConfig:
        sites = data.get("sites") if isinstance(data, dict) else None
        if not isinstance(sites, list):
            raise CodebookLensError(f"a codebook model config needs a list of sites, got {sites!r}")
        return cls(sites=[SiteSpec.from_dict(s) for s in sites])


@dataclass
class CodebookModelOutput:
    """LM outputs plus what the codebooks contributed.

    loss: lm_loss + reconstruction_loss when labels were given, else None.
    reconstruction_loss: sum of every codebook's weighted loss (a scalar tensor).
    site_mse: unweighted reconstruction MSE per codebook (detached), for logging.
    site_var: variance of each codebook's input (detached): explained variance is
        ``1 - site_mse / site_var``.
    codes: code ids per codebook, ``(batch, seq, groups, k)``, when asked for.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None
    lm_loss: torch.Tensor | None
    reconstruction_loss: torch.Tensor
    site_mse: dict[str, torch.Tensor]
    site_var: dict[str, torch.Tensor]
    codes: dict[str, torch.Tensor] | None
    lm_output: Any


class _Run:
    """What the hooks record during one CodebookModel.forward."""

    def __init__(self, capture_codes: bool) -> None:
        self.capture_codes = capture_codes
        self.losses: list[torch.Tensor] = []
        self.mse: dict[str, torch.Tensor] = {}
        self.var: dict[str, torch.Tensor] = {}
        self.codes: dict[str, torch.Tensor] = {}


class CodebookModel(nn.Module):
    """A causal LM whose activations at chosen sites pass through codebooks."""

    def __init__(self, base_model: nn.Module, config: CodebookModelConfig) -> None:
        super().__init__()
        self.model_type, _ = S.family_of(base_model)
        self.model = base_model
        self.config = config
        self.codebooks = nn.ModuleDict()
        self.placement: dict[str, tuple[str, int]] = {}
        self.enabled = True
        self._run: _Run | None = None
        self._handles = []
        total = S.num_layers(base_model)
        for spec in config.sites:
            for layer in spec.layers if spec.layers is not None else range(total):
                key = site_key(spec.site, layer)
                if key in self.codebooks:
                    raise CodebookLensError(f"codebook {key} is configured twice")
                shape = S.site_shape(base_model, spec.site, layer)
                self.codebooks[key] = Codebook(shape.dim, spec.codebook, groups=shape.groups)
                self.placement[key] = (spec.site, layer)
                self._handles.append(S.attach(base_model, spec.site, layer, self._replacer(key)))

    # -- hooks -----------------------------------------------------------------------------

    def _replacer(self, key: str):
        def replace(x: torch.Tensor) -> torch.Tensor | None:
            if not self.enabled:
                return None
            result = self.codebooks[key](x)
            run = self._run
            if run is not None:
                run.losses.append(result.loss)
                run.mse[key] = result.mse
                run.var[key] = result.variance
                if run.capture_codes:
                    run.codes[key] = result.codes
            return result.output

        return replace

    def remove_hooks(self) -> None:
        """Detach every codebook from the base model (which then runs as before)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- running ---------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_codes: bool = False,
        **kwargs,
    ) -> CodebookModelOutput:
        run = _Run(capture_codes=return_codes)
        self._run = run
        try:
            lm = self.model(input_ids=input_ids, labels=labels, **kwargs)
        finally:
            self._run = None
        logits = lm.logits
        rec = (
            torch.stack(run.losses).sum()
            if run.losses
            else logits.new_zeros((), dtype=torch.float32)
        )
        lm_loss = getattr(lm, "loss", None)
        return CodebookModelOutput(
            logits=logits,
            loss=None if lm_loss is None else lm_loss + rec,
            lm_loss=lm_loss,
            reconstruction_loss=rec,
            site_mse=run.mse,
            site_var=run.var,
            codes=run.codes if return_codes else None,
            lm_output=lm,
        )

    def generate(self, *args, **kwargs):
        """``generate`` of the base model, with the codebooks in place."""
        return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def codebooks_disabled(self) -> Iterator[None]:
        """Within the block the model computes exactly what the base model computes."""
        previous = self.enabled
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = previous

    def track_usage(self, enabled: bool = True) -> None:
        for cb in self.codebooks.values():
            cb.track_usage(enabled)

    def codebook_digests(self) -> dict[str, str]:
        """A SHA-256 digest of every codebook's code vectors (as float32, with their shape):
        equal digests mean the same codes, so that a code cache can tell whether a model
        is the one it was built with."""
        digests = {}
        for key, cb in self.codebooks.items():
            weight = cb.weight.detach().to("cpu", torch.float32).contiguous()
            h = hashlib.sha256(repr(tuple(weight.shape)).encode())
            h.update(weight.numpy().tobytes())
            digests[key] = h.hexdigest()
        return digests

    def codebook(self, site: str, layer: int) -> Codebook:
        key = site_key(site, layer)
        if key not in self.codebooks:
            raise CodebookLensError(
                f"no codebook at {site} of layer {layer}; present: {', '.join(self.codebooks)}"
            )
        return self.codebooks[key]

    # -- save / load -----------------------------------------------------------------------

    def save_pretrained(
        self, directory: str | Path, include_base: bool = False, source: dict | None = None
    ) -> Path:
        """Write codebooks (safetensors) and a JSON config; the base model too if asked.

        ``source`` records how to load the model again (see
        :func:`codebook_lens.core.loading.load_source`): ``base`` (a path relative to
        ``directory``, an absolute path or a Hub name; ``base/`` when it is included),
        ``codec`` and ``task``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.codebooks.state_dict().items()}
        save_safetensors(tensors, directory / WEIGHTS_FILE, metadata={"format": FORMAT_NAME})
        if include_base:
            self.model.save_pretrained(str(directory / BASE_DIR), safe_serialization=True)
            for written in (directory / BASE_DIR).glob("*.safetensors"):
                make_readable(written)
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "model_type": self.model_type,
            "num_layers": S.num_layers(self.model),
            "hidden_size": int(self.model.config.hidden_size),
            "base_name_or_path": getattr(self.model.config, "_name_or_path", "") or "",
            "base_included": include_base,
            "source": _source(self.model, include_base, source),
            "codebooks": {k: {"site": s, "layer": lay} for k, (s, lay) in self.placement.items()},
            **self.config.to_dict(),
        }
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, base_model: nn.Module | None = None
    ) -> CodebookModel:
        """Rebuild a saved codebook model; ``base_model`` is required unless it was saved along."""
        directory = Path(directory)
        meta = read_config(directory)
        if base_model is None:
            if not meta.get("base_included"):
                raise CodebookLensError(
                    f"{directory} holds codebooks only; pass base_model= (a {meta['model_type']} "
                    f"model, saved from {meta.get('base_name_or_path') or 'an unnamed model'})"
                )
            base_model = load_base_weights(directory / BASE_DIR, directory)
        model_type = getattr(getattr(base_model, "config", None), "model_type", None)
        if model_type != meta["model_type"]:
            raise CodebookLensError(
                f"the codebooks in {directory} were trained on a {meta['model_type']} model, "
                f"but the base model given is {model_type!r}"
            )
        for name in ("num_layers", "hidden_size"):
            have = (
                S.num_layers(base_model)
                if name == "num_layers"
                else int(base_model.config.hidden_size)
            )
            if have != meta[name]:
                raise CodebookLensError(
                    f"the codebooks in {directory} need {name}={meta[name]}, the base model has {have}"
                )
        try:
            config = CodebookModelConfig.from_dict(meta)
        except (TypeError, KeyError, AttributeError) as err:
            raise ModelLoadError(f"{directory / CONFIG_FILE} is damaged: {err!r}") from None
        model = cls(base_model, config)
        model.load_codebooks(directory / WEIGHTS_FILE)
        return model

    def load_codebooks(self, path: str | Path) -> None:
        """Load codebook tensors from a safetensors file, checking names and shapes."""
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"no codebook weights at {path}")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ModelLoadError(f"{path} is damaged and cannot be read ({err})") from None
        expected = self.codebooks.state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise CodebookLensError(
                f"{path} does not match this model's codebooks: missing {missing or 'nothing'}, "
                f"unexpected {unexpected or 'nothing'}"
            )
        wrong = [
            f"{name} has shape {tuple(tensor.shape)}, this model needs {tuple(expected[name].shape)}"
            for name, tensor in sorted(
                tensors.items(), key=lambda kv: not kv[0].endswith(".weight")
            )
            if tensor.shape != expected[name].shape
        ]
        if wrong:
            raise CodebookLensError(f"{path} does not fit this model: " + "; ".join(wrong))
        self.codebooks.load_state_dict(tensors, strict=True)


def _source(base: nn.Module, include_base: bool, given: dict | None) -> dict:
    """The loading record of a saved model: the given one, completed with defaults."""
    source = dict(given or {})
    if include_base:
        source["base"] = BASE_DIR
    else:
        source.setdefault("base", getattr(base.config, "_name_or_path", "") or "")
    source.setdefault("codec", {"kind": "tokenizer"})
    source.setdefault("task", {})
    return source


def load_base_weights(base_dir: str | Path, directory: Path, **kwargs) -> nn.Module:
    """The transformers model in ``base_dir`` (the base of the codebook model in
    ``directory``), or a ModelLoadError when its files are missing or damaged."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(base_dir), **kwargs)
    except (OSError, ValueError, SafetensorError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"cannot load the base model {base_dir} of {directory}: {reason}"
        ) from None


# the keys a saved model's config must hold, and their types
_REQUIRED = {"model_type": str, "num_layers": int, "hidden_size": int, "sites": list}


def read_config(directory: Path) -> dict:
    """The JSON config of a saved codebook model, validated."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ModelLoadError(f"{directory} is not a saved codebook model: {CONFIG_FILE} is missing")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT_NAME:
        raise CodebookLensError(
            f"{path} is not a {FORMAT_NAME} config (format={meta.get('format')!r})"
        )
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ModelLoadError(f"{path} has a format_version that is not an integer: {version!r}")
    if version > FORMAT_VERSION:
        raise CodebookLensError(
            f"{path} has format version {meta['format_version']}; this codebook-lens reads up to {FORMAT_VERSION}"
        )
    for key, kind in _REQUIRED.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise ModelLoadError(
                f"{path} is damaged: {key!r} must be a {kind.__name__}, got {meta.get(key)!r}"
            )
    return meta
