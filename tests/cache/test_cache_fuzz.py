"""Random corruptions of a real cache, fed to ``CodeCache.open`` and to every query.

A corruption is one damage to one file of the tiny cache (``tiny_code_cache``): cut
short, bytes overwritten, removed, replaced by random bytes or by a link to a copy
outside the cache, an array rewritten with another shape, or a manifest value replaced,
removed or a codebook renamed. Then the cache is opened and asked every question the
command line asks (contexts, freq, regex with the neuron baseline, topic, promotes,
similar, effect, summary). Each answer must be a clean CodebookLensError or the
answer of the undamaged cache; a query that reads the damaged file may also answer
differently (the data changed), but never with another exception.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codebook_lens.analysis.neurons import neuron_baseline
from codebook_lens.analysis.search import (
    effect_codes,
    frequency_by_rank,
    logit_effect,
    matching_tokens,
    regex_codes,
    similar_codes,
    topic_codes,
)
from codebook_lens.cache.store import CodeCache
from codebook_lens.core.errors import CodebookLensError
from codebook_lens.core.loading import load_codebook_model
from codebook_lens.core.refs import CodeRef

PATTERN = r"\d+"
TOPIC = "In May 1999 the old man paints a red apple."

# which files (path prefixes) each query reads besides the manifest's structure
READS = {
    "summary": ("manifest.json", "counts/"),
    "counts": ("counts/",),
    "frequency": ("counts/",),
    "occurrences": ("index/",),
    "contexts_rank": ("index/", "codes/", "tokens.parquet", "docs.parquet"),
    "contexts_corpus": ("index/", "codes/", "tokens.parquet", "docs.parquet"),
    "regex": ("docs.parquet", "tokens.parquet", "codes/", "counts/"),
    "neurons": ("manifest.json", "docs.parquet", "tokens.parquet", "vocab.json"),
    "topic": ("manifest.json", "counts/"),
    "promotes": ("effects/", "vocab.json", "counts/"),
    "similar": ("codebooks.safetensors",),
    "effect": ("effects/", "vocab.json"),
}


def refs_of(cache: CodeCache) -> list[CodeRef]:
    """The busiest code of every codebook and head."""
    return [
        CodeRef(key, int(cache.counts(key)[g].argmax()), g)
        for key, info in cache.codebooks.items()
        for g in range(info.groups)
    ]


def ask(cache: CodeCache, name: str, refs: list[CodeRef], loaded):
    """The answer of query ``name`` as plain data."""
    if name == "summary":
        return cache.summary()
    if name == "counts":
        return {k: np.asarray(cache.counts(k)).tolist() for k in cache.codebooks}
    if name == "frequency":
        return {k: frequency_by_rank(cache, k).tolist() for k in cache.codebooks}
    if name == "occurrences":
        return [cache.occurrences(r).tolist() for r in refs]
    if name.startswith("contexts"):
        order = name.split("_")[1]
        return [
            (total, [c.to_dict() for c in page])
            for total, page in (cache.top_contexts(r, 5, 1, 3, order) for r in refs)
        ]
    if name == "regex":
        result = regex_codes(cache, PATTERN, limit=10).to_dict()
        return {k: v for k, v in result.items() if k != "seconds"}
    if name == "neurons":
        cache.set_model(loaded)
        positives = matching_tokens(cache, PATTERN)
        scores = neuron_baseline(cache, positives, 0.5, max_tokens=96, batch_size=3)
        return [s.to_dict() for s in scores]
    if name == "topic":
        cache.set_model(loaded)
        hits = topic_codes(cache, TOPIC, min_fraction=0.1, max_frequency=1.0, limit=10)
        return [h.to_dict() for h in hits]
    if name == "promotes":
        words = ["the", "a", "in", "may"]
        return [h.to_dict() for h in effect_codes(cache, words, max_frequency=1.0, limit=10)]
    if name == "similar":
        return [[(str(c), v) for c, v in similar_codes(cache, r, 5)] for r in refs]
    if name == "effect":
        return [logit_effect(cache, r, 5) for r in refs]
    raise AssertionError(name)


@pytest.fixture(scope="module")
def pristine(tiny_code_cache):
    """(cache dir, its files, manifest, refs, loaded model, every query's answer)."""
    cache_dir = tiny_code_cache[1]
    loaded = load_codebook_model(tiny_code_cache[0])
    cache = CodeCache.open(cache_dir)
    refs = refs_of(cache)
    answers = {name: ask(cache, name, refs, loaded) for name in READS}
    files = sorted(str(p.relative_to(cache_dir)) for p in cache_dir.rglob("*") if p.is_file())
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    return cache_dir, files, manifest, refs, loaded, answers


def json_paths(data, prefix=()) -> list[tuple]:
    """Every key path of a JSON document."""
    paths = [prefix] if prefix else []
    if isinstance(data, dict):
        for key, value in data.items():
            paths += json_paths(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            paths += json_paths(value, (*prefix, i))
    return paths


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 300)
    | st.integers(-(2**63), 2**63)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["uint8", "uint64", "mlp", "attn_heads", "../x", "layer0_mlp", "1"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)
KEY_NAMES = st.text(max_size=24) | st.sampled_from(
    ["../../outside/x", "layer0_mlp/../../x", "layer0_mlp\n", "LAYER0_MLP", "layer٣_mlp", ""]
)


def corrupt(root: Path, files: list[str], manifest: dict, data) -> str:
    """Damage the cache copy in ``root`` once; returns the damaged file's path."""
    kind = data.draw(
        st.sampled_from(
            ["truncate", "overwrite", "delete", "replace", "link", "reshape"]
            + ["manifest_set", "manifest_drop", "rename"]
        ),
        label="kind",
    )
    if kind.startswith("manifest") or kind == "rename":
        changed = copy.deepcopy(manifest)
        if kind == "rename":
            old = data.draw(st.sampled_from(sorted(manifest["codebooks"])), label="codebook")
            new = data.draw(KEY_NAMES, label="new name")
            changed["codebooks"][new] = changed["codebooks"].pop(old)
        else:
            path = data.draw(st.sampled_from(json_paths(manifest)), label="path")
            node = changed
            for part in path[:-1]:
                node = node[part]
            if kind == "manifest_set":
                node[path[-1]] = data.draw(JSON_VALUES, label="value")
            else:
                del node[path[-1]]
        (root / "manifest.json").write_text(json.dumps(changed))
        return "manifest.json"
    name = data.draw(st.sampled_from(files), label="file")
    target = root / name
    raw = target.read_bytes()
    if kind == "truncate":
        target.write_bytes(raw[: data.draw(st.integers(0, max(0, len(raw) - 1)), label="keep")])
    elif kind == "overwrite":
        at = data.draw(st.integers(0, max(0, len(raw) - 1)), label="at")
        patch = data.draw(st.binary(min_size=1, max_size=16), label="bytes")
        target.write_bytes(raw[:at] + patch + raw[at + len(patch) :])
    elif kind == "delete":
        target.unlink()
    elif kind == "replace":
        target.write_bytes(data.draw(st.binary(max_size=256), label="content"))
    elif kind == "link":
        outside = root.parent / "outside"
        outside.mkdir(exist_ok=True)
        (outside / target.name).write_bytes(raw)
        target.unlink()
        target.symlink_to(outside / target.name)
    elif kind == "reshape" and name.endswith(".npy"):
        array = np.load(target)
        shape = data.draw(st.lists(st.integers(1, 8), min_size=1, max_size=3), label="shape")
        size = int(np.prod(shape))
        flat = np.resize(array.reshape(-1), size)
        np.save(target, flat.reshape(shape).astype(array.dtype))
    return name


def reads(name: str, damaged: str) -> bool:
    return any(damaged.startswith(prefix) for prefix in READS[name])


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_a_damaged_cache_answers_correctly_or_with_a_clean_error(pristine, data):
    cache_dir, files, manifest, refs, loaded, answers = pristine
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cache"
        shutil.copytree(cache_dir, root)
        damaged = corrupt(root, files, manifest, data)
        try:
            cache = CodeCache.open(root)
        except CodebookLensError:
            return
        for name in READS:
            try:
                answer = ask(cache, name, refs, loaded)
            except CodebookLensError:
                continue
            if not reads(name, damaged):
                # the damage was elsewhere: the undamaged cache's answer, exactly
                assert _comparable(answer) == _comparable(answers[name]), (name, damaged)


def _comparable(answer):
    """``answer`` with the cache's own path left out (the copy lives elsewhere)."""
    if isinstance(answer, dict) and "path" in answer:
        return {k: v for k, v in answer.items() if k != "path"}
    return answer
