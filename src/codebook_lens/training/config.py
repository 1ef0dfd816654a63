"""Dataclass configs from YAML with strict keys.

Every section is a dataclass; :func:`from_dict` builds one from plain data and
rejects unknown keys with a suggestion (``optim.lr_codebok`` -> did you mean
``codebook_lr``?) and values of the wrong type with the expected type named, at
every level: a codebook site is a :class:`SiteSection` (the model's own
:class:`~codebook_lens.core.model.SiteSpec`) and its options a
:class:`~codebook_lens.core.codebook.CodebookConfig`, so that
``codebooks.sites[0].codebook.num_code`` is refused, with ``num_codes`` suggested,
before any model loads. Values are checked by the sections themselves (steps and
batch sizes at least 1, learning rates finite and positive, ...); NaN and infinity
are refused everywhere. ``key=value`` overrides address nested keys with dots; values
are parsed as YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from codebook_lens.core.codebook import CodebookConfig
from codebook_lens.core.errors import CodebookLensError
from codebook_lens.core.model import SiteSpec

T = TypeVar("T")


class ConfigError(CodebookLensError):
    """A config value or key that is not allowed; the message says what is."""


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} (known keys: {', '.join(sorted(known))})"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# the words that YAML 1.1 reads as each boolean
_YAML_BOOL_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {_type_name(tp)}"
        )
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool):
            # YAML 1.1 reads no/off/false (yes/on/true) as booleans: back to the word
            words = [w for w in _YAML_BOOL_WORDS[value] if w in allowed]
            value = words[0] if words else value
        if value not in allowed:
            raise ConfigError(
                f"{where} must be one of {', '.join(map(repr, allowed))}, got {value!r}"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _looks_numeric(value):
            value = float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(
                f"{where} must be finite, got {value!r} (NaN and infinity are refused)"
            )
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, strictly."""
    label = where or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"unknown key {path!r}{_suggest(str(key), list(fields))}")
        kwargs[key] = _convert(value, hints[key], path)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{label}: missing required key(s) {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{label}: {err}") from None


def to_dict(obj: Any) -> Any:
    """Plain data (for YAML/JSON) from nested dataclasses."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to nested plain data."""
    import yaml

    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=3e-4)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------------------
# value checks, shared by the sections (here and in the TokFSM experiment's config)


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ``key must be ALLOWED, got VALUE`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} must be {allowed}, got {value!r}")


def at_least(section: str, obj: Any, minimum: int, *names: str) -> None:
    """Integer fields of ``obj`` that must be at least ``minimum`` (None passes: only
    optional fields can hold it)."""
    for name in names:
        value = getattr(obj, name)
        require(value is None or value >= minimum, f"{section}.{name}", value, f">= {minimum}")


def positive(section: str, obj: Any, *names: str) -> None:
    """Number fields of ``obj`` that must be finite and > 0 (None passes)."""
    for name in names:
        value = getattr(obj, name)
        ok = value is None or (math.isfinite(value) and value > 0)
        require(ok, f"{section}.{name}", value, "a finite number > 0")


def non_negative(section: str, obj: Any, *names: str) -> None:
    """Number fields of ``obj`` that must be finite and >= 0."""
    for name in names:
        value = getattr(obj, name)
        ok = math.isfinite(value) and value >= 0
        require(ok, f"{section}.{name}", value, "a finite number >= 0")


def all_finite(section: str, obj: Any) -> None:
    """No NaN or infinity in any float field of the dataclass ``obj`` (or in a list field)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        items = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            raise ConfigError(
                f"{section}.{f.name} must be finite, got {value!r} (NaN and infinity are refused)"
            )


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------------------
# the training config (``codebook train CONFIG.yaml``)


@dataclasses.dataclass
class ModelSection:
    """path: a local model directory, or ``smollm2-135m`` for the offline SmolLM2 asset."""

    path: str = "smollm2-135m"
    dtype: typing.Literal["float32", "bfloat16", "float16"] = "float32"


@dataclasses.dataclass
class DataSection:
    """corpus: ``offline`` (the packaged corpus), text files / a directory of them, or a
    local ``datasets`` directory (saved with ``save_to_disk``)."""

    corpus: str = "offline"
    text_field: str = "text"
    seq_len: int = 256
    eval_fraction: float = 0.02
    max_train_tokens: int | None = None

    def __post_init__(self) -> None:
        all_finite("data", self)
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be >= 2, got {self.seq_len}")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction must be in (0, 1), got {self.eval_fraction}")
        at_least("data", self, 1, "max_train_tokens")


# One codebook site of the schema: ``{site, layers, codebook: {num_codes, k, ...}}``. It
# is the model's own SiteSpec, so the config holds exactly what the model is built from.
SiteSection = SiteSpec


@dataclasses.dataclass
class CodebooksSection:
    """sites: a list of :class:`SiteSection` (``{site, layers, codebook: {num_codes, k,
    similarity, ...}}``); plain mappings given in Python are checked and converted."""

    sites: list[SiteSection] = dataclasses.field(
        default_factory=lambda: [SiteSection("attn_heads", CodebookConfig(num_codes=1024, k=1))]
    )
    kmeans_init: bool = False
    kmeans_tokens: int = 16384
    revive_after_steps: int | None = 100

    def __post_init__(self) -> None:
        self.sites = [
            _convert(site, SiteSection, f"codebooks.sites[{i}]")
            for i, site in enumerate(self.sites)
        ]
        for i, site in enumerate(self.sites):
            layers = site.layers or []
            require(
                all(layer >= 0 for layer in layers),
                f"codebooks.sites[{i}].layers",
                site.layers,
                "a list of layer numbers >= 0 (or null for every layer)",
            )
        at_least("codebooks", self, 1, "kmeans_tokens", "revive_after_steps")


@dataclasses.dataclass
class OptimSection:
    """lm_weight and distill_weight weigh the two output terms of the loss: the LM
    cross-entropy and the KL divergence from the base model (the network as it was
    before training, without codebooks) to the codebook model, per token. With
    ``freeze_base`` the teacher is the same frozen weights run without codebooks, at no
    memory cost; otherwise a frozen copy of the base is kept as the teacher.

    ``freeze_base_steps``: the network stays frozen for the first steps (only the codes
    train), then trains along with the codes, with its learning rate warmed up and
    scheduled over the remaining steps (``freeze_base`` must be false).

    ``freeze_embeddings``: the network's input token embeddings never train (nor the
    output ones when they are tied), e.g. when they were set from co-occurrence
    statistics before training."""

    lr: float = 1e-4
    codebook_lr: float = 1e-3
    weight_decay: float = 0.0
    freeze_base: bool = False
    freeze_base_steps: int = 0
    freeze_embeddings: bool = False
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float | None = 1.0
    lm_weight: float = 1.0
    distill_weight: float = 0.0

    def __post_init__(self) -> None:
        all_finite("optim", self)
        positive("optim", self, "lr", "codebook_lr", "grad_clip")
        non_negative("optim", self, "weight_decay")
        betas = self.betas
        ok = len(betas) == 2 and all(0 <= b < 1 for b in betas)
        require(ok, "optim.betas", betas, "two numbers in [0, 1)")
        for name in ("lm_weight", "distill_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"optim.{name} must be finite and >= 0, got {value}")
        at_least("optim", self, 0, "freeze_base_steps")
        if self.freeze_base_steps and self.freeze_base:
            raise ConfigError(
                "optim.freeze_base_steps needs optim.freeze_base: false (the network is "
                "frozen for the whole run already)"
            )


@dataclasses.dataclass
class ScheduleSection:
    max_steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 50
    scheduler: typing.Literal["cosine", "linear", "constant"] = "cosine"
    seed: int = 0
    mixed_precision: typing.Literal["auto", "no", "bf16", "fp16"] = "auto"

    def __post_init__(self) -> None:
        at_least("schedule", self, 1, "max_steps", "batch_size", "grad_accum")
        at_least("schedule", self, 0, "warmup_steps")


@dataclasses.dataclass
class LoggingSection:
    every: int = 10
    wandb: bool = False
    tensorboard: bool = False

    def __post_init__(self) -> None:
        at_least("logging", self, 1, "every")


@dataclasses.dataclass
class EvalSection:
    every: int = 200
    batches: int = 20

    def __post_init__(self) -> None:
        at_least("eval", self, 1, "every", "batches")


@dataclasses.dataclass
class CheckpointSection:
    """keep: the newest checkpoints kept (0 keeps every one)."""

    every: int = 200
    keep: int = 2

    def __post_init__(self) -> None:
        at_least("checkpoint", self, 1, "every")
        at_least("checkpoint", self, 0, "keep")


@dataclasses.dataclass
class TrainConfig:
    output_dir: str = "runs/train"
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    codebooks: CodebooksSection = dataclasses.field(default_factory=CodebooksSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    schedule: ScheduleSection = dataclasses.field(default_factory=ScheduleSection)
    logging: LoggingSection = dataclasses.field(default_factory=LoggingSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)

    def __post_init__(self) -> None:
        steps = self.optim.freeze_base_steps
        ok = steps < self.schedule.max_steps
        require(
            ok,
            "optim.freeze_base_steps",
            steps,
            f"below schedule.max_steps ({self.schedule.max_steps})",
        )


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML file (or defaults) plus ``key=value`` overrides."""
    data = load_yaml(path) if path is not None else {}
    return from_dict(TrainConfig, apply_overrides(data, overrides or []))


def train_settings(data: dict) -> dict | None:
    """The settings of a stored training config (a stage's stamp, say) as they read
    today, without ``output_dir``: keys added to the config since it was written take
    their defaults, so that a new option left at its default does not make an old run
    look different. ``None`` when it no longer makes a valid config."""
    try:
        cfg = from_dict(TrainConfig, {**data, "output_dir": "."})
    except ConfigError:
        return None
    settings = to_dict(cfg)
    settings.pop("output_dir")
    return settings
