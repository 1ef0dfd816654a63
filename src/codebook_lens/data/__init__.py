"""What models read: documents of a corpus spec as token blocks, the offline corpus and
the offline assets it is built from, token embeddings from co-occurrence counts, and the
TokFSM state machine and its walks."""

from codebook_lens.data.assets import AssetError, load_smollm2, smollm2_dir
from codebook_lens.data.cooccurrence import cooccurrence_embeddings
from codebook_lens.data.corpus import build_corpus, iter_corpus
from codebook_lens.data.documents import Blocks, DataError, iter_documents, tokenize_documents
from codebook_lens.data.fsm import FSM, FSMData

__all__ = [
    "FSM",
    "AssetError",
    "Blocks",
    "DataError",
    "FSMData",
    "build_corpus",
    "cooccurrence_embeddings",
    "iter_corpus",
    "iter_documents",
    "load_smollm2",
    "smollm2_dir",
    "tokenize_documents",
]
