"""Finetuning with codebooks: the typed config (YAML with strict keys and checked
values), the training loop, its metrics and its checkpoints."""

from codebook_lens.training.config import (
    CheckpointSection,
    CodebooksSection,
    ConfigError,
    DataSection,
    EvalSection,
    LoggingSection,
    ModelSection,
    OptimSection,
    ScheduleSection,
    SiteSection,
    TrainConfig,
    from_dict,
    load_train_config,
    to_dict,
)
from codebook_lens.training.loop import TrainData, TrainError, build_model, load_base, train

__all__ = [
    "CheckpointSection",
    "CodebooksSection",
    "ConfigError",
    "DataSection",
    "EvalSection",
    "LoggingSection",
    "ModelSection",
    "OptimSection",
    "ScheduleSection",
    "SiteSection",
    "TrainConfig",
    "TrainData",
    "TrainError",
    "build_model",
    "from_dict",
    "load_base",
    "load_train_config",
    "to_dict",
    "train",
]
