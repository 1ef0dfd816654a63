"""codebook-lens: codebook features for transformer language models.

Sparse, discrete vector-quantization bottlenecks inserted into the layers of a
transformers causal LM, so that every hidden state is the sum of a few codes.
"""

from codebook_lens.core.codebook import Codebook, CodebookConfig, CodebookOutput, topk_codes
from codebook_lens.core.model import (
    CodebookModel,
    CodebookModelConfig,
    CodebookModelOutput,
    SiteSpec,
)
from codebook_lens.core.sites import FAMILIES, SITES

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "SITES",
    "Codebook",
    "CodebookConfig",
    "CodebookModel",
    "CodebookModelConfig",
    "CodebookModelOutput",
    "CodebookOutput",
    "SiteSpec",
    "topk_codes",
]
