"""codebook-lens: codebook features for transformer language models.

Sparse, discrete vector-quantization bottlenecks inserted into the layers of a
transformers causal LM, so that every hidden state is the sum of a few codes.

Everything the guides teach is importable from here (``from codebook_lens import
CodebookModel, train, CodeCache, regex_codes, intervene``). Each name comes from the
subpackage that re-exports it and is imported on first use (PEP 562), so that
``import codebook_lens`` itself loads nothing heavy; the subpackages (``core``,
``data``, ``training``, ``cache``, ``analysis``, ``steering``) hold more.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# subpackage -> the public names taken from it (each is in that subpackage's __all__,
# except ``intervene``, which its subpackage leaves to the module of the same name)
_EXPORTS: dict[str, tuple[str, ...]] = {
    "codebook_lens.core": (
        "EMPTY_SLOT",
        "FAMILIES",
        "SIMILARITIES",
        "SITES",
        "CodeRef",
        "Codebook",
        "CodebookConfig",
        "CodebookLensError",
        "CodebookModel",
        "CodebookModelConfig",
        "CodebookModelOutput",
        "CodebookOutput",
        "Loaded",
        "ModelLoadError",
        "SiteSpec",
        "attach_mlp_hidden",
        "load_codebook_model",
        "topk_codes",
    ),
    "codebook_lens.data": ("FSM", "FSMData", "DataError", "iter_documents"),
    "codebook_lens.training": (
        "ConfigError",
        "SiteSection",
        "TrainConfig",
        "TrainError",
        "load_train_config",
        "train",
    ),
    "codebook_lens.cache": ("CacheError", "CodeCache", "build_cache"),
    "codebook_lens.analysis": (
        "SearchError",
        "codes_vs_neurons",
        "effect_codes",
        "frequency_by_rank",
        "logit_effect",
        "matching_tokens",
        "neuron_baseline",
        "neuron_curve",
        "regex_codes",
        "score_codes",
        "similar_codes",
        "topic_codes",
    ),
    "codebook_lens.steering": ("Intervention", "generate", "steering_eval"),
    "codebook_lens.steering.intervene": ("intervene",),
}
_SOURCE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_SOURCE)


def __getattr__(name: str) -> Any:
    module = _SOURCE.get(name)
    if module is None:
        raise AttributeError(f"module 'codebook_lens' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
