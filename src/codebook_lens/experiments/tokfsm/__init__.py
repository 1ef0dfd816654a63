"""TokFSM, the paper's algorithmic task: the config and presets, the model and its
metrics, the analyses (purity, state classification, interventions) and the report.

The experiment end to end is :func:`codebook_lens.experiments.tokfsm.run.run` (the
``codebook fsm`` command); it is not re-exported here, where its name would hide the
``run`` module."""

from codebook_lens.experiments.tokfsm.classify import neuron_activations, state_classification
from codebook_lens.experiments.tokfsm.config import (
    PRESETS,
    FSMExperimentConfig,
    load_fsm_config,
    stage_config,
)
from codebook_lens.experiments.tokfsm.metrics import METRIC_KEYS
from codebook_lens.experiments.tokfsm.report import fsm_report
from codebook_lens.experiments.tokfsm.run import build_base, model_metrics
from codebook_lens.experiments.tokfsm.task import (
    lm_metrics,
    neox_config,
    parity_rope_theta,
    state_metrics,
)

__all__ = [
    "METRIC_KEYS",
    "PRESETS",
    "FSMExperimentConfig",
    "build_base",
    "fsm_report",
    "lm_metrics",
    "load_fsm_config",
    "model_metrics",
    "neox_config",
    "neuron_activations",
    "parity_rope_theta",
    "stage_config",
    "state_classification",
    "state_metrics",
]
