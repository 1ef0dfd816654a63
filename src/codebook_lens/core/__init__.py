"""The bottleneck and the model around it: codebooks, nearest-code search, k-means,
where codebooks go in each family (sites), the codebook model, loading a saved one,
code references and the user-error base class. Imports nothing above it."""

from codebook_lens.core.codebook import (
    EMPTY_SLOT,
    SIMILARITIES,
    Codebook,
    CodebookConfig,
    CodebookOutput,
    topk_codes,
)
from codebook_lens.core.errors import CodebookLensError, ModelLoadError
from codebook_lens.core.loading import Loaded, load_codebook_model
from codebook_lens.core.model import (
    CodebookModel,
    CodebookModelConfig,
    CodebookModelOutput,
    SiteSpec,
    site_key,
)
from codebook_lens.core.refs import CodeRef
from codebook_lens.core.sites import (
    FAMILIES,
    SITES,
    Family,
    attach,
    attach_mlp_hidden,
    family_of,
    num_layers,
    site_shape,
)

__all__ = [
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
    "Family",
    "Loaded",
    "ModelLoadError",
    "SiteSpec",
    "attach",
    "attach_mlp_hidden",
    "family_of",
    "load_codebook_model",
    "num_layers",
    "site_key",
    "site_shape",
    "topk_codes",
]
