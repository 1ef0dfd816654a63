"""Building code caches: a codebook model over a corpus, written in the format that
:mod:`codebook_lens.cache.store` describes and reads.

The corpus is tokenized into one stream (:func:`tokenize_stream`), cut into blocks,
run through the model in batches, and its codes, counts, inverted index, logit
effects and code vectors are written into ``OUT.partial``, renamed to ``OUT`` at the
end (:func:`build_cache`). One build at a time writes ``OUT.partial`` (see
:mod:`.lock`); with ``overwrite`` the old ``OUT`` is moved aside, the new one moved in,
and only then the old one removed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from codebook_lens.cache.lock import BuildLock, check_target, install
from codebook_lens.cache.store import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    CacheError,
    CodebookInfo,
    code_counts,
    code_dtype,
    stored_ids,
)
from codebook_lens.core import sites as S
from codebook_lens.core.files import check_output_dir, save_safetensors
from codebook_lens.core.loading import Loaded, TextCodec, check_positions
from codebook_lens.core.model import FORMAT_NAME as MODEL_FORMAT
from codebook_lens.data.documents import iter_documents
from codebook_lens.data.fsm import FSM

PROGRESS = "progress.json"
EFFECT_TOP = 20  # promoted and suppressed tokens stored per code

# ----------------------------------------------------------------------------------------
# corpus -> token stream


@dataclass
class TokenStream:
    """The corpus as one token stream with provenance for every token."""

    docs: list[str]
    token_ids: np.ndarray  # (T,) int32
    doc_ids: np.ndarray  # (T,) int32
    starts: np.ndarray  # (T,) int32, character offsets into the document
    ends: np.ndarray  # (T,) int32

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])


def tokenize_stream(
    texts: Iterable[str], codec: TextCodec, max_tokens: int | None = None
) -> TokenStream:
    """Tokenize documents in order until ``max_tokens`` (the last one is cut there).

    A document without tokens of its own (an empty text) is left out, EOS included: a
    corpus of empty documents holds no text, and is refused.
    """
    docs: list[str] = []
    ids_parts, doc_parts, start_parts, end_parts = [], [], [], []
    total = 0
    for text in tqdm(texts, desc="tokenizing", unit="doc", leave=False):
        if max_tokens is not None and total >= max_tokens:
            break
        ids, offsets = codec.encode(text)
        if not ids:
            continue
        if codec.eos_id is not None:
            ids = [*ids, codec.eos_id]
            offsets = [*offsets, (len(text), len(text))]
        if max_tokens is not None:
            ids, offsets = ids[: max_tokens - total], offsets[: max_tokens - total]
        doc_id = len(docs)
        docs.append(text)
        off = np.asarray(offsets, dtype=np.int32).reshape(-1, 2)
        ids_parts.append(np.asarray(ids, dtype=np.int32))
        doc_parts.append(np.full(len(ids), doc_id, dtype=np.int32))
        start_parts.append(off[:, 0])
        end_parts.append(off[:, 1])
        total += len(ids)
    if not docs:
        raise CacheError("the corpus holds no text to cache")

    def cat(parts):
        return np.concatenate(parts)

    return TokenStream(docs, cat(ids_parts), cat(doc_parts), cat(start_parts), cat(end_parts))


def fsm_documents(fsm: Any, count: int, seq_len: int, seed: int = 0) -> Iterator[str]:
    """``count`` TokFSM sequences (BOS then a random walk) as text, ``|`` for BOS."""
    gen = torch.Generator().manual_seed(seed)
    remaining = count
    while remaining > 0:
        n = min(remaining, 1024)
        seqs = fsm.sequences(n, seq_len, generator=gen)
        for row in seqs.tolist():
            yield "".join("|" if t == fsm.bos else str(t) for t in row)
        remaining -= n


def corpus_documents(
    corpus: str, loaded: Loaded, split: str, max_tokens: int | None, seq_len: int
) -> Iterable[str]:
    """Documents of a corpus spec: ``offline``, a local path (see ``data.iter_documents``)
    or ``fsm`` (fresh walks of a TokFSM model's machine)."""
    if corpus == "fsm":
        if "fsm" not in loaded.task:
            raise CacheError("corpus 'fsm' needs a TokFSM model (RUN/codebook/model)")
        if max_tokens is None:
            raise CacheError("corpus 'fsm' is endless: give max_tokens")
        return fsm_documents(FSM.load(loaded.task["fsm"]), math.ceil(max_tokens / seq_len), seq_len)
    if loaded.kind == "tokfsm":
        raise CacheError("a TokFSM model reads only its own walks: use corpus 'fsm'")
    return iter_documents(corpus, split)


# ----------------------------------------------------------------------------------------
# building


def _write_parquet(path: Path, columns: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), str(path), compression="zstd")


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _plan_id(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def final_norm(base: torch.nn.Module) -> torch.nn.Module:
    """The normalisation applied to the residual stream before the unembedding."""
    for path in ("model.norm", "gpt_neox.final_layer_norm", "transformer.ln_f"):
        try:
            return base.get_submodule(path)
        except AttributeError:
            continue
    raise CacheError(f"no final norm found in {type(base).__name__}")


@torch.no_grad()
def code_logit_effects(
    loaded: Loaded, key: str, top: int = EFFECT_TOP, chunk: int = 1024
) -> dict[str, np.ndarray]:
    """Each code's direct effect on the logits: its vector written into the residual
    stream (through the head's slice of the output projection for ``attn_heads``), the
    final norm, the unembedding; logits centred over the vocabulary.

    Returns ``promoted``/``suppressed`` token ids ``(G, C, top)`` and their centred logits
    ``promoted_logit``/``suppressed_logit``.
    """
    model = loaded.model
    base = model.model
    cb = model.codebooks[key]
    site, layer = model.placement[key]
    weight = cb.weight.detach().float()  # (G, C, d)
    if site == "attn_heads":
        _, family = S.family_of(base)
        proj = S.decoder_layers(base)[layer].get_submodule(family.attn_out).weight.float()
        d = cb.dim
        vectors = torch.stack(
            [weight[g] @ proj[:, g * d : (g + 1) * d].T for g in range(cb.groups)]
        )  # (G, C, hidden)
    else:
        vectors = weight
    norm = final_norm(base).float()
    unembed = base.get_output_embeddings().weight.float()  # (V, hidden)
    groups, num_codes, _ = vectors.shape
    top = min(top, unembed.shape[0])
    out = {
        name: np.zeros((groups, num_codes, top), dtype=dtype)
        for name, dtype in (
            ("promoted", np.int32),
            ("suppressed", np.int32),
            ("promoted_logit", np.float32),
            ("suppressed_logit", np.float32),
        )
    }
    for g in range(groups):
        for s in range(0, num_codes, chunk):
            logits = norm(vectors[g, s : s + chunk]) @ unembed.T
            logits = logits - logits.mean(-1, keepdim=True)
            hi = logits.topk(top, dim=-1)
            lo = logits.topk(top, dim=-1, largest=False)
            for name, t in (
                ("promoted", hi.indices),
                ("promoted_logit", hi.values),
                ("suppressed", lo.indices),
                ("suppressed_logit", lo.values),
            ):
                out[name][g, s : s + chunk] = t.cpu().numpy()  # from a GPU too
    return out


def build_index(codes: np.ndarray, num_codes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T, G, k) code ids -> (counts (G, C), offsets (G, C+1), rows) with, for each group
    and code, the sorted token positions where it fires (each token once per code).
    Empty slots (id C) are neither counted nor indexed."""
    tokens, groups, k = codes.shape
    row_dtype = np.uint32 if tokens <= np.iinfo(np.uint32).max else np.uint64
    counts = np.zeros((groups, num_codes), dtype=np.int64)
    offsets = np.zeros((groups, num_codes + 1), dtype=np.int64)
    parts = []
    base = 0
    for g in range(groups):
        flat = np.asarray(codes[:, g, :]).reshape(-1)
        order = np.argsort(flat, kind="stable")  # stable: positions ascend within a code
        counts[g] = code_counts(flat, num_codes)
        filled = int(counts[g].sum())  # empty slots sort last: drop them
        offsets[g, 1:] = np.cumsum(counts[g])
        offsets[g] += base
        parts.append((order[:filled] // k).astype(row_dtype))
        base += filled
    rows = np.concatenate(parts) if parts else np.empty(0, dtype=row_dtype)
    return counts, offsets, rows


@dataclass
class BuildResult:
    path: Path
    tokens: int
    seconds: float
    forward_seconds: float  # time inside the model's forward passes
    resumed_from: int = 0  # tokens already cached by an earlier, interrupted build
    bytes_per_token: dict[str, float] = field(default_factory=dict)


def build_cache(
    loaded: Loaded,
    texts: Iterable[str],
    out: str | Path,
    *,
    corpus_name: str = "",
    max_tokens: int | None = None,
    seq_len: int = 128,
    batch_size: int = 8,
    restart: bool = False,
    overwrite: bool = False,
    stop_after_batches: int | None = None,
) -> BuildResult:
    """Run ``loaded.model`` over ``texts`` and write a code cache to ``out``.

    ``stop_after_batches`` stops early and leaves the partial build (for tests and for
    splitting a long build over sessions); the same call again resumes it.

    Everything that can be checked is checked before any work: the sizes, ``seq_len``
    against the model's positions, and ``out`` (a directory that is not a code cache is
    never replaced, not even with ``overwrite``).
    """
    if seq_len < 1 or batch_size < 1:
        raise CacheError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise CacheError(f"max_tokens must be positive, got {max_tokens}")
    check_positions(loaded, seq_len, f"seq_len {seq_len}")
    out = Path(out)
    check_target(out, overwrite)
    partial = out.with_name(out.name + ".partial")
    check_output_dir(partial, "build directory")
    with BuildLock(out.with_name(out.name + ".partial.lock")):
        check_target(out, overwrite)  # another build may have finished meanwhile
        if restart and partial.exists():
            shutil.rmtree(partial)
        return _build(
            loaded,
            texts,
            out,
            partial,
            corpus_name,
            max_tokens,
            seq_len,
            batch_size,
            stop_after_batches,
        )


def _build(
    loaded: Loaded,
    texts: Iterable[str],
    out: Path,
    partial: Path,
    corpus_name: str,
    max_tokens: int | None,
    seq_len: int,
    batch_size: int,
    stop_after_batches: int | None,
) -> BuildResult:
    """The build proper, under the lock of ``partial``."""
    t_start = time.perf_counter()
    model = loaded.model
    device = next(model.parameters()).device
    infos = []
    for key, cb in model.codebooks.items():
        site, layer = model.placement[key]
        infos.append(
            CodebookInfo(
                key, site, layer, cb.groups, cb.k, cb.num_codes, code_dtype(cb.num_codes).name
            )
        )

    stream = tokenize_stream(texts, loaded.codec, max_tokens)
    total = len(stream)
    plan = {
        "model": str(Path(loaded.source).resolve()),
        "corpus": corpus_name,
        "tokens": total,
        "token_digest": hashlib.sha256(stream.token_ids.tobytes()).hexdigest(),
        "seq_len": seq_len,
        "codebooks": [i.to_dict() for i in infos],
        "codebook_digest": model.codebook_digests(),
    }
    plan_id = _plan_id(plan)
    done_tokens = 0
    if partial.exists():
        try:
            progress = json.loads((partial / PROGRESS).read_text())
        except (OSError, ValueError):
            progress = {}
        progress = progress if isinstance(progress, dict) else {}
        done = progress.get("done_tokens")
        if (
            progress.get("plan_id") == plan_id
            and isinstance(done, int)
            and not isinstance(done, bool)
            and 0 <= done <= total
        ):
            done_tokens = done
        else:
            shutil.rmtree(partial)
    resumed_from = done_tokens
    if done_tokens == 0:
        partial.mkdir(parents=True)
        for sub in ("codes", "counts", "index", "effects"):
            (partial / sub).mkdir()
        _write_parquet(
            partial / "docs.parquet",
            {"doc_id": np.arange(len(stream.docs), dtype=np.int32), "text": stream.docs},
        )
        texts_per_token = _token_texts(stream)
        _write_parquet(
            partial / "tokens.parquet",
            {
                "doc_id": stream.doc_ids,
                "token_id": stream.token_ids,
                "text": texts_per_token,
                "start": stream.starts,
                "end": stream.ends,
            },
        )
        for info in infos:
            np.lib.format.open_memmap(
                partial / "codes" / f"{info.key}.npy",
                mode="w+",
                dtype=info.dtype,
                shape=(total, info.groups, info.k),
            ).flush()
        _atomic_json(partial / PROGRESS, {"plan_id": plan_id, "done_tokens": 0})

    arrays = {
        info.key: np.load(partial / "codes" / f"{info.key}.npy", mmap_mode="r+") for info in infos
    }
    tokens = torch.from_numpy(stream.token_ids.astype(np.int64))
    step = seq_len * batch_size
    forward_seconds = 0.0
    batches = 0
    bar = tqdm(total=total, initial=done_tokens, desc="caching codes", unit="tok")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(done_tokens, total, step):
                chunk = tokens[start : min(start + step, total)]
                full = chunk.numel() // seq_len
                parts = []
                if full:
                    parts.append(chunk[: full * seq_len].view(full, seq_len))
                if chunk.numel() % seq_len:
                    parts.append(chunk[full * seq_len :].view(1, -1))
                at = start
                for ids in parts:
                    t0 = time.perf_counter()
                    result = model(ids.to(device), return_codes=True, use_cache=False)
                    codes = {k: v.to("cpu") for k, v in result.codes.items()}
                    forward_seconds += time.perf_counter() - t0
                    n = ids.numel()
                    for info in infos:
                        arrays[info.key][at : at + n] = stored_ids(
                            codes[info.key].reshape(n, info.groups, info.k).numpy(),
                            info.num_codes,
                        )
                    at += n
                for arr in arrays.values():
                    arr.flush()
                done_tokens = at
                _atomic_json(partial / PROGRESS, {"plan_id": plan_id, "done_tokens": done_tokens})
                bar.update(chunk.numel())
                batches += 1
                if stop_after_batches is not None and batches >= stop_after_batches:
                    if done_tokens < total:
                        return BuildResult(
                            partial,
                            done_tokens,
                            time.perf_counter() - t_start,
                            forward_seconds,
                            resumed_from,
                        )
    finally:
        bar.close()
        model.train(was_training)
    del arrays

    sizes = {}
    for info in tqdm(infos, desc="indexing", unit="codebook", leave=False):
        codes = np.load(partial / "codes" / f"{info.key}.npy", mmap_mode="r")
        counts, offsets, rows = build_index(codes, info.num_codes)
        np.save(partial / "counts" / f"{info.key}.npy", counts)
        np.save(partial / "index" / f"{info.key}.offsets.npy", offsets)
        np.save(partial / "index" / f"{info.key}.rows.npy", rows)
        effects = code_logit_effects(loaded, info.key)
        np.savez(partial / "effects" / f"{info.key}.npz", **effects)
        sizes[info.key] = {
            "codes_bytes_per_token": codes.dtype.itemsize * info.groups * info.k,
            "index_bytes_per_token": rows.dtype.itemsize * info.groups * info.k,
        }
    vocab_size = model.model.get_output_embeddings().weight.shape[0]
    known = min(vocab_size, loaded.codec.vocab_size)
    vocab = loaded.codec.token_texts(list(range(known)))
    vocab += [f"<{i}>" for i in range(known, vocab_size)]
    (partial / "vocab.json").write_text(json.dumps(vocab))
    vectors = {k: v.detach().contiguous().cpu() for k, v in model.codebooks.state_dict().items()}
    save_safetensors(vectors, partial / "codebooks.safetensors", {"format": MODEL_FORMAT})
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": plan["model"],
        "model_kind": loaded.kind,
        "model_config": model.config.to_dict(),
        "tokenizer": loaded.codec.name,
        "corpus": corpus_name,
        "num_tokens": total,
        "num_docs": len(stream.docs),
        "seq_len": seq_len,
        "codebooks": {i.key: i.to_dict() for i in infos},
        "codebook_digest": plan["codebook_digest"],
        "sizes": sizes,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (partial / PROGRESS).unlink()
    _atomic_json(partial / MANIFEST, manifest)
    install(partial, out)
    return BuildResult(
        out,
        total,
        time.perf_counter() - t_start,
        forward_seconds,
        resumed_from,
        {k: v["codes_bytes_per_token"] for k, v in sizes.items()},
    )


def _token_texts(stream: TokenStream) -> list[str]:
    docs = stream.docs
    return [
        docs[d][s:e]
        for d, s, e in zip(
            stream.doc_ids.tolist(), stream.starts.tolist(), stream.ends.tolist(), strict=True
        )
    ]
