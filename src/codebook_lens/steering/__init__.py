"""Steering a codebook model: interventions that force codes on or off, sampling with
them, and the steering evaluation.

The context manager ``intervene`` shares its name with its module, so it is imported
from there (``from codebook_lens.steering.intervene import intervene``) or from
``codebook_lens``; re-exporting it here would hide the module behind the function."""

from codebook_lens.steering.intervene import (
    MODES,
    Intervention,
    apply_intervention,
    check_intervention,
)
from codebook_lens.steering.sampling import SteeringResult, generate, steering_eval

__all__ = [
    "MODES",
    "Intervention",
    "SteeringResult",
    "apply_intervention",
    "check_intervention",
    "generate",
    "steering_eval",
]
