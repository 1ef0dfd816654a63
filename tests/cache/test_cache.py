"""Code caches: exact round trip, index and counts against a scan, atomic and resumable
builds; search: regex precision/recall by hand, multi-byte offsets, RE2 safety, the
neuron baseline, topic search, similar codes and logit effects against brute force."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import torch
from helpers import corpus_text, save_tiny_codebook_model

from codebook_lens.analysis.neurons import (
    code_curve,
    codes_vs_neurons,
    neuron_baseline,
    neuron_curve,
)
from codebook_lens.analysis.search import (
    CodeScore,
    SearchError,
    effect_codes,
    frequency_by_rank,
    logit_effect,
    matching_tokens,
    per_codebook,
    regex_codes,
    score_codes,
    similar_codes,
    text_codes,
    topic_codes,
)
from codebook_lens.cache.build import build_cache, build_index, tokenize_stream
from codebook_lens.cache.store import CacheError, CodeCache, code_dtype
from codebook_lens.core.loading import load_codebook_model
from codebook_lens.core.refs import CodeRef

DOCS = [
    "In January 1999 the café opened. Über naïve résumé — 東京 and 1984!",
    corpus_text(12, seed=3),
    "May 2001: a small boat, the big tree.\nJune 1950 → the blue house.",
    corpus_text(9, seed=4),
]
TOPIC_TEXT = "In March 1950, the old man paints a red apple."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_codebook_model(tmp_path_factory.mktemp("cbmodel"))


@pytest.fixture(scope="module")
def built(model_dir, tmp_path_factory):
    loaded = load_codebook_model(model_dir)
    out = tmp_path_factory.mktemp("caches") / "cache"
    result = build_cache(loaded, DOCS, out, corpus_name="test", seq_len=16, batch_size=3)
    return loaded, CodeCache.open(out), result


def _reference_codes(loaded, seq_len=16):
    stream = tokenize_stream(DOCS, loaded.codec)
    ids = torch.from_numpy(stream.token_ids.astype(np.int64))
    out: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for s in range(0, ids.numel(), seq_len):
            r = loaded.model(ids[s : s + seq_len].view(1, -1), return_codes=True)
            for key, codes in r.codes.items():
                out.setdefault(key, []).append(codes[0].numpy())
    return stream, {k: np.concatenate(v) for k, v in out.items()}


def test_code_dtype_is_the_smallest_that_fits():
    # ids 0 .. C - 1 and C itself (an empty slot)
    assert code_dtype(255) == np.uint8
    assert code_dtype(256) == np.uint16
    assert code_dtype(65535) == np.uint16
    assert code_dtype(65536) == np.uint32


def test_cache_round_trips_what_the_model_computed(built):
    loaded, cache, result = built
    stream, ref = _reference_codes(loaded)
    assert cache.num_tokens == len(stream) == result.tokens
    assert cache.num_docs == len(DOCS)
    for key, codes in ref.items():
        got = cache.codes(key)
        assert got.dtype == np.uint8  # 16 and 8 codes
        assert isinstance(got, np.memmap)
        np.testing.assert_array_equal(np.asarray(got, dtype=np.int64), codes)
    np.testing.assert_array_equal(cache.token_ids, stream.token_ids)
    # the token table opens as a plain table; texts are the document slices
    import pyarrow.parquet as pq

    table = pq.read_table(cache.path / "tokens.parquet").to_pydict()
    assert set(table) == {"doc_id", "token_id", "text", "start", "end"}
    for d, s, e, t in zip(
        table["doc_id"], table["start"], table["end"], table["text"], strict=True
    ):
        assert DOCS[d][s:e] == t
    eos = loaded.codec.eos_id
    assert [i for i, t in enumerate(table["token_id"]) if t == eos] == [
        i for i, (s, e) in enumerate(zip(table["start"], table["end"], strict=True)) if s == e
    ]
    manifest = json.loads((cache.path / "manifest.json").read_text())
    assert manifest["num_tokens"] == cache.num_tokens and manifest["format_version"] == 1
    assert manifest["codebooks"]["layer1_attn_heads"]["groups"] == 4


def test_storage_is_k_small_ints_per_token(built):
    _, cache, result = built
    for key, info in cache.codebooks.items():
        path = cache.path / "codes" / f"{key}.npy"
        payload = cache.num_tokens * info.groups * info.k * np.dtype(info.dtype).itemsize
        assert path.stat().st_size - payload < 256  # the .npy header only
        assert result.bytes_per_token[key] == info.groups * info.k  # one byte per id here


def test_index_and_counts_agree_with_a_scan(built):
    _, cache, _ = built
    for key, info in cache.codebooks.items():
        codes = np.asarray(cache.codes(key))
        counts = cache.counts(key)
        for g in range(info.groups):
            for c in range(info.num_codes):
                scan = np.flatnonzero((codes[:, g, :] == c).any(axis=1))
                got = cache.occurrences(CodeRef(key, c, g))
                np.testing.assert_array_equal(got, scan)
                assert counts[g, c] == scan.size
        assert cache.dead_fraction(key) == pytest.approx((counts == 0).mean())
        ranked = frequency_by_rank(cache, key)
        assert list(ranked) == sorted(counts.reshape(-1).tolist(), reverse=True)


def test_contexts_mark_the_firing_token(built):
    _, cache, _ = built
    ref = CodeRef("layer0_mlp", int(cache.counts("layer0_mlp")[0].argmax()))
    total, page = cache.top_contexts(ref, limit=5, window=3)
    assert total == cache.counts("layer0_mlp")[0, ref.code]
    ranks = [c.rank for c in cache.top_contexts(ref, limit=total, window=1)[1]]
    assert ranks == sorted(ranks)  # best-match slot first
    codes = np.asarray(cache.codes("layer0_mlp"))
    for ctx in page:
        assert ref.code in codes[ctx.position, 0]
        assert codes[ctx.position, 0, ctx.rank] == ref.code
        doc = DOCS[ctx.doc_id]
        s, e = int(cache.starts[ctx.position]), int(cache.ends[ctx.position])
        assert ctx.token == doc[s:e]
        assert doc.find(ctx.left + ctx.token + ctx.right) >= 0
    _, second = cache.top_contexts(ref, limit=2, offset=2, window=3)
    assert [c.position for c in second] == [c.position for c in page[2:4]]
    with pytest.raises(ValueError, match="group"):
        cache.occurrences(CodeRef("layer1_attn_heads", 0, 9))
    with pytest.raises(ValueError, match="no codebook"):
        cache.occurrences(CodeRef("layer5_mlp", 0))


def test_interrupted_build_leaves_no_cache_and_resumes(model_dir, built, tmp_path):
    loaded, full, _ = built
    out = tmp_path / "cache"
    part = build_cache(loaded, DOCS, out, seq_len=16, batch_size=1, stop_after_batches=2)
    assert not out.exists() and part.path.name == "cache.partial"
    with pytest.raises(CacheError, match="unfinished build"):
        CodeCache.open(out)
    again = build_cache(loaded, DOCS, out, seq_len=16, batch_size=1)
    assert again.resumed_from == 32
    resumed = CodeCache.open(out)
    for key in full.codebooks:
        np.testing.assert_array_equal(resumed.codes(key), full.codes(key))
        np.testing.assert_array_equal(resumed.counts(key), full.counts(key))
    with pytest.raises(CacheError, match="exists"):
        build_cache(loaded, DOCS, out, seq_len=16)


def test_regex_tokens_handle_multibyte_text(built):
    _, cache, _ = built
    for pattern in [r"é", r"東京", r"[A-Z][a-z]+uary", r"\b(1[5-9]|20)\d\d\b", r"→ the"]:
        mask = matching_tokens(cache, pattern)
        expected = np.zeros(cache.num_tokens, dtype=bool)
        for d, doc in enumerate(DOCS):
            for m in re.finditer(pattern, doc):
                last = m.end() - 1
                hit = np.flatnonzero(
                    (cache.doc_ids == d) & (cache.starts <= last) & (cache.ends > last)
                )
                # a character split over byte tokens belongs to the token that completes it
                expected[hit[-1]] = True
        assert mask.sum() > 0
        np.testing.assert_array_equal(mask, expected)
        for pos in np.flatnonzero(mask):
            assert cache.ends[pos] > cache.starts[pos]


def test_precision_and_recall_by_hand(built, tmp_path):
    """Hand-set codes on the real token table: every number below is counted by hand."""
    import shutil

    _, cache, _ = built
    path = tmp_path / "hand"
    shutil.copytree(cache.path, path)
    n = cache.num_tokens
    hand = np.zeros((n, 1, 2), dtype=np.uint8)
    hand[:, 0, 0] = 1  # code 1 fires everywhere
    hand[:, 0, 1] = 2  # code 2 fires everywhere except where code 3 does
    positives = np.flatnonzero(matching_tokens(cache, r"\d{4}"))
    assert positives.size >= 4
    # code 3: on the first 3 matching tokens and 2 other tokens
    others = [i for i in range(n) if i not in set(positives.tolist())][:2]
    hand[positives[:3], 0, 1] = 3
    hand[others, 0, 1] = 3
    np.save(path / "codes" / "layer0_mlp.npy", hand)
    counts, offsets, rows = build_index(hand, 16)
    np.save(path / "counts" / "layer0_mlp.npy", counts)
    np.save(path / "index" / "layer0_mlp.offsets.npy", offsets)
    np.save(path / "index" / "layer0_mlp.rows.npy", rows)
    hacked = CodeCache.open(path)
    result = regex_codes(hacked, r"\d{4}", codebooks=["layer0_mlp"], limit=None)
    p = positives.size
    by_code = {s.ref.code: s for s in result.codes}
    assert result.matches == p
    assert by_code[3].precision == pytest.approx(3 / 5) and by_code[3].recall == pytest.approx(
        3 / p
    )
    assert by_code[1].precision == pytest.approx(p / n) and by_code[1].recall == 1.0
    assert by_code[2].precision == pytest.approx((p - 3) / (n - 5))
    assert by_code[2].recall == pytest.approx((p - 3) / p)
    # 3/5 > p/n > (p-3)/(n-5) whenever p < 0.6 n
    assert p < 0.6 * n and [s.ref.code for s in result.codes] == [3, 1, 2]
    strict = regex_codes(hacked, r"\d{4}", codebooks=["layer0_mlp"], min_recall=0.99)
    assert [s.ref.code for s in strict.codes] == [1]
    with pytest.raises(SearchError, match="min_precision"):
        score_codes(hacked, np.zeros(n, bool), min_precision=2)


def test_bad_and_catastrophic_patterns(built, tmp_path):
    _, cache, _ = built
    with pytest.raises(SearchError, match="invalid pattern"):
        regex_codes(cache, "(unclosed")
    with pytest.raises(SearchError, match="backreferences"):
        regex_codes(cache, r"(a)\1")
    with pytest.raises(SearchError, match="empty"):
        regex_codes(cache, "")
    # a pattern that takes exponential time with backtracking engines, on a long document
    from codebook_lens.cache.build import build_cache as build

    loaded = cache.model()
    evil_doc = "a" * 30000 + "!"
    out = tmp_path / "evil"
    build(loaded, [evil_doc], out, seq_len=64, batch_size=16, max_tokens=2000)
    evil = CodeCache.open(out)
    t0 = time.perf_counter()
    result = regex_codes(evil, r"(a+)+$")
    assert time.perf_counter() - t0 < 2.0
    assert result.matches == 0


def _brute_force_neurons(loaded, cache, positives, recall) -> dict[str, float]:
    """Per site, the best neuron precision at ``recall`` with every activation in memory."""
    from codebook_lens.analysis.neurons import _Grabber

    ids = torch.from_numpy(cache.token_ids.astype(np.int64))
    acts: dict[str, list[torch.Tensor]] = {}
    grab = _Grabber(loaded.model.model)
    with torch.no_grad(), loaded.model.codebooks_disabled():
        for s in range(0, ids.numel(), 16):
            grab.current.clear()
            loaded.model.model(input_ids=ids[s : s + 16].view(1, -1))
            for name, a in grab.current.items():
                acts.setdefault(name, []).append(a.clone())
    grab.remove()
    pos = torch.from_numpy(positives)
    need = int(np.ceil(recall * positives.sum()))
    best = {}
    for name, parts in acts.items():
        a = torch.cat(parts)
        top = 0.0
        for sign in (1, -1):
            x = a * sign
            thr = x[pos].sort(0, descending=True).values[need - 1]
            over = x >= thr
            prec = (over & pos[:, None]).sum(0).double() / over.sum(0).double()
            top = max(top, float(prec.max()))
        best[name] = top
    return best


def test_neuron_baseline_matches_brute_force(built):
    loaded, cache, _ = built
    positives = matching_tokens(cache, r"[0-9]")
    recall = 0.5
    scores = neuron_baseline(cache, positives, recall, batch_size=2, sample_positives=10_000)
    best = _brute_force_neurons(loaded, cache, positives, recall)
    assert {s.site for s in scores} == set(best)
    for s in scores:
        assert s.precision == pytest.approx(best[s.site], abs=1e-9)
        assert s.recall >= recall - 1e-9
    assert scores[0].precision == max(best.values())


def test_neuron_curve_equals_the_baseline_at_each_recall(built):
    loaded, cache, _ = built
    positives = matching_tokens(cache, r"[aeiou]")
    recalls = [0.1, 0.5, 0.9, 1.0]
    curve = neuron_curve(cache, positives, recalls, batch_size=3, sample_positives=10_000)
    assert len(curve) == len(recalls)
    for recall, scores in zip(recalls, curve, strict=True):
        best = _brute_force_neurons(loaded, cache, positives, recall)
        assert {s.site: s.precision for s in scores} == pytest.approx(best, abs=1e-9)
        assert all(s.recall >= recall - 1e-9 for s in scores)
        single = neuron_baseline(cache, positives, recall, batch_size=3, sample_positives=10_000)
        assert [s.to_dict() for s in single] == [s.to_dict() for s in scores]
    with pytest.raises(SearchError, match="recall must be in"):
        neuron_curve(cache, positives, [0.5, 1.5])
    with pytest.raises(SearchError, match="at least one"):
        neuron_curve(cache, positives, [])


def test_code_curve_takes_the_most_precise_code_at_each_recall():
    def score(code, precision, recall):
        return CodeScore(CodeRef("layer0_mlp", code), precision, recall, 0, 0)

    scores = [score(0, 1.0, 0.2), score(1, 0.9, 0.6), score(2, 0.5, 0.95), score(3, 0.9, 0.7)]
    picked = code_curve(scores, [0.1, 0.2, 0.5, 0.65, 0.9, 0.96])
    # ties in precision go to the larger recall; nothing reaches recall 0.96
    assert [None if p is None else p.ref.code for p in picked] == [0, 0, 3, 3, 2, None]


def test_codes_vs_neurons_pairs_each_recall_with_its_code_and_neuron(built):
    _, cache, _ = built
    positives = matching_tokens(cache, r"[aeiou]")
    every = score_codes(cache, positives, limit=None)
    recalls = [0.2, 0.6, 1.0]
    points = codes_vs_neurons(cache, positives, every, recalls, sample_positives=10_000)
    curve = neuron_curve(cache, positives, recalls, sample_positives=10_000)
    picks = code_curve(every, recalls)
    for point, sites, code in zip(points, curve, picks, strict=True):
        assert point.sites == sites and point.neuron == sites[0] and point.code == code
        if code is None:
            assert point.lead is None and point.to_dict()["code"] is None
        else:
            assert point.lead == pytest.approx(code.precision - sites[0].precision)
            assert point.to_dict()["lead"] == point.lead


def test_dense_outliers_are_cached_as_empty_slots(tmp_path):
    """A codebook with an outlier rule leaves some tokens without codes: the cache stores
    those slots as id C, and counts, index, regex and topic search skip them."""
    loaded = load_codebook_model(save_tiny_codebook_model(tmp_path, outlier_factor=1.05))
    stream = tokenize_stream(DOCS, loaded.codec)
    with torch.no_grad():  # the reference norm: the median of the first block's norms
        loaded.model(torch.from_numpy(stream.token_ids[:16].astype(np.int64)).view(1, -1))
    build_cache(loaded, DOCS, tmp_path / "cache", corpus_name="test", seq_len=16, batch_size=3)
    cache = CodeCache.open(tmp_path / "cache")
    _, ref = _reference_codes(loaded)
    for key in ("layer0_mlp", "layer1_mlp"):
        info = cache.info(key)
        empty = (ref[key] < 0).all(axis=-1)[:, 0]
        assert 0.1 < empty.mean() < 0.9  # tokens on both sides of the rule
        codes = np.asarray(cache.codes(key), dtype=np.int64)
        np.testing.assert_array_equal(codes, np.where(ref[key] < 0, info.num_codes, ref[key]))
        counts = cache.counts(key)
        assert counts.shape == (1, info.num_codes)
        for c in range(info.num_codes):
            scan = np.flatnonzero((codes[:, 0, :] == c).any(axis=1))
            np.testing.assert_array_equal(cache.occurrences(CodeRef(key, c, 0)), scan)
            assert counts[0, c] == scan.size
        assert counts.sum() == 2 * (~empty).sum()  # k = 2 distinct codes per coded token
    positives = matching_tokens(cache, r"[a-z]+")
    scores = regex_codes(cache, r"[a-z]+", min_count=1).codes
    assert scores and all(s.ref.code < cache.info(s.ref.codebook).num_codes for s in scores)
    for s in scores:
        fires = np.zeros(cache.num_tokens, dtype=bool)
        fires[cache.occurrences(s.ref)] = True
        assert s.count == fires.sum()
        assert s.precision == pytest.approx((fires & positives).sum() / fires.sum())
    _checked_topic_hits(cache, TOPIC_TEXT, min_fraction=0.05)


def _checked_topic_hits(cache, text, min_fraction):
    """Topic hits, each checked against a count over the text's codes (empty slots, id
    C, are never a hit)."""
    ids, codes = text_codes(cache, text)
    hits = topic_codes(cache, text, min_fraction=min_fraction, max_frequency=1.0, limit=None)
    assert hits
    for h in hits:
        assert h.ref.code < cache.info(h.ref.codebook).num_codes
        arr = codes[h.ref.codebook][:, h.ref.group, :]
        n_hit = int((arr == h.ref.code).any(axis=1).sum())
        assert h.hits == n_hit and h.coverage == pytest.approx(n_hit / len(ids))
        assert h.coverage >= min_fraction
        assert h.frequency == pytest.approx(
            cache.counts(h.ref.codebook)[h.ref.group, h.ref.code] / cache.num_tokens
        )
    return hits


def test_topic_codes_count_coverage(built):
    _, cache, _ = built
    hits = _checked_topic_hits(cache, TOPIC_TEXT, min_fraction=0.2)
    covers = [h.coverage for h in hits]
    assert covers == sorted(covers, reverse=True)
    rare = topic_codes(cache, TOPIC_TEXT, min_fraction=0.2, max_frequency=0.3, limit=None)
    assert all(h.frequency <= 0.3 for h in rare) and len(rare) <= len(hits)


def test_per_codebook_keeps_each_books_first_hits_in_order(built):
    _, cache, _ = built
    hits = topic_codes(cache, TOPIC_TEXT, min_fraction=0.05, max_frequency=1.0, limit=None)
    books = {h.ref.codebook for h in hits}
    assert len(books) >= 2 and len(hits) > 2 * len(books)  # the case is not trivial
    for n in (1, 2):
        kept = per_codebook(hits, n)
        expected = [
            h
            for i, h in enumerate(hits)
            if sum(g.ref.codebook == h.ref.codebook for g in hits[:i]) < n
        ]
        assert kept == expected
        assert all(
            sum(h.ref.codebook == b for h in kept) == min(n, sum(h.ref.codebook == b for h in hits))
            for b in books
        )
    assert per_codebook(hits, len(hits)) == hits
    with pytest.raises(SearchError, match=">= 1"):
        per_codebook(hits, 0)


def test_similar_codes_and_logit_effect(built):
    loaded, cache, _ = built
    ref = CodeRef("layer0_mlp", 3)
    w = loaded.model.codebooks["layer0_mlp"].weight.detach()[0]
    sims = torch.nn.functional.cosine_similarity(w, w[3 : 3 + 1], dim=-1)
    sims[3] = -2
    got = similar_codes(cache, ref, top=4)
    assert [r.code for r, _ in got] == sims.topk(4).indices.tolist()
    assert [v for _, v in got] == pytest.approx(sims.topk(4).values.tolist(), abs=1e-5)
    base = loaded.model.model
    with torch.no_grad():
        logits = base.model.norm(w[3]) @ base.lm_head.weight.T
        logits = logits - logits.mean()
    eff = logit_effect(cache, ref, top=5)
    assert [t["token_id"] for t in eff["promoted"]] == logits.topk(5).indices.tolist()
    assert [t["token_id"] for t in eff["suppressed"]] == (-logits).topk(5).indices.tolist()
    assert eff["promoted"][0]["token"] == loaded.codec.decode([eff["promoted"][0]["token_id"]])
    # per-head codes go through their head's slice of the output projection
    head = CodeRef("layer1_attn_heads", 2, group=3)
    hw = loaded.model.codebooks["layer1_attn_heads"].weight.detach()[3, 2]
    o = base.model.layers[1].self_attn.o_proj.weight.detach()
    d = hw.numel()
    with torch.no_grad():
        hl = base.model.norm(o[:, 3 * d : 4 * d] @ hw) @ base.lm_head.weight.T
    got = [t["token_id"] for t in logit_effect(cache, head, top=3)["promoted"]]
    assert got == hl.topk(3).indices.tolist()


def test_effect_codes_rank_codes_by_the_words_they_promote(built):
    """Against a scan of every code's stored promoted tokens (each checked against the
    model by the test above): codes promoting the words, by their summed logits."""
    _, cache, _ = built
    vocab = cache.vocab()
    first = logit_effect(cache, CodeRef("layer0_mlp", 3), top=20)["promoted"]
    words = [first[0]["token"].upper(), f"  {first[1]['token'].strip()} "]  # case, spaces
    wanted = {w.strip().lower() for w in words}
    expected = []
    for key in cache.codebooks:
        info = cache.info(key)
        for g in range(info.groups):
            for c in range(info.num_codes):
                ref = CodeRef(key, c, g)
                rows = logit_effect(cache, ref, top=20)["promoted"]
                hit = [r for r in rows if r["token"].strip().lower() in wanted and r["logit"] > 0]
                if hit:
                    score = sum(r["logit"] for r in hit)
                    expected.append((str(ref), score, [vocab[r["token_id"]] for r in hit]))
    expected.sort(key=lambda e: -e[1])
    hits = effect_codes(cache, words, max_frequency=1.0, limit=None)
    assert "layer0_mlp:3" in [str(h.ref) for h in hits]
    assert [(str(h.ref), h.words) for h in hits] == [(e[0], e[2]) for e in expected]
    assert [h.score for h in hits] == pytest.approx([e[1] for e in expected], rel=1e-5)
    for h in hits:
        assert h.frequency == pytest.approx(
            cache.frequencies(h.ref.codebook)[h.ref.group, h.ref.code]
        )
    rare = effect_codes(cache, words, max_frequency=0.01, limit=2)
    assert len(rare) <= 2 and all(h.frequency <= 0.01 for h in rare)
    assert rare == [h for h in hits if h.frequency <= 0.01][:2]
    with pytest.raises(SearchError, match="at least one word"):
        effect_codes(cache, [" ", ""])
    with pytest.raises(SearchError, match="max_frequency"):
        effect_codes(cache, words, max_frequency=0)


def test_cli_builds_and_queries_a_cache(model_dir, tmp_path, capsys):
    from codebook_lens.cli.main import main

    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": d}) for d in DOCS) + "\n")
    out = tmp_path / "cache"
    assert (
        main(
            [
                "cache",
                str(model_dir),
                "--corpus",
                str(docs),
                "--split",
                "train",
                "--out",
                str(out),
                "--seq-len",
                "16",
                "--json",
            ]
        )
        == 0
    )
    built = json.loads(capsys.readouterr().out)
    cache = CodeCache.open(out)
    assert built["tokens"] == cache.num_tokens > 0
    assert main(["regex", str(out), r"\d", "--json", "--limit", "5"]) == 0
    res = json.loads(capsys.readouterr().out)
    direct = regex_codes(cache, r"\d", limit=5).to_dict()
    assert [c["code"] for c in res["codes"]] == [c["code"] for c in direct["codes"]]
    assert res["matching_tokens"] == direct["matching_tokens"] > 0
    code = res["codes"][0]["code"]
    # the precision-recall comparison: the library's answer, at the best code's recall too
    assert main(["regex", str(out), r"\d", "--json", "--recalls", "0.5,1"]) == 0
    res_curve = json.loads(capsys.readouterr().out)
    positives = matching_tokens(cache, r"\d")
    every = score_codes(cache, positives, limit=None)
    best = regex_codes(cache, r"\d", limit=20).codes[0]
    expected = codes_vs_neurons(cache, positives, every, [best.recall, 0.5, 1.0])
    assert res_curve["curve"] == [p.to_dict() for p in expected[1:]]
    assert res_curve["neuron_baseline"]["sites"] == [s.to_dict() for s in expected[0].sites]
    assert [p["recall"] for p in res_curve["curve"]] == [0.5, 1.0]
    assert main(["regex", str(out), r"\d", "--recalls", "0.5,1"]) == 0
    assert "lead" in capsys.readouterr().out
    assert main(["regex", str(out), r"\d", "--recalls", "0.5,2"]) == 2
    assert "--recalls takes recalls in (0, 1]" in capsys.readouterr().err
    assert main(["contexts", str(out), code, "--json", "--limit", "3"]) == 0
    ctx = json.loads(capsys.readouterr().out)
    assert ctx["total"] == cache.occurrences(CodeRef.parse(code)).size
    assert main(["freq", str(out), "--json", "--plot", str(tmp_path / "f.svg")]) == 0
    freq = json.loads(capsys.readouterr().out)
    assert set(freq["codebooks"]) == set(cache.codebooks)
    assert (tmp_path / "f.svg").read_text().startswith("<svg")
    for cmd in (
        ["similar", str(out), code],
        ["effect", str(out), code],
        ["topic", str(out), "In May 1999", "--min-fraction", "0.1", "--max-frequency", "1"],
    ):
        assert main([*cmd, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)
    words = [t["token"].strip() for t in logit_effect(cache, CodeRef.parse(code))["promoted"][:3]]
    assert (
        main(["promotes", str(out), "--words=" + ",".join(words), "--max-frequency", "1", "--json"])
        == 0
    )
    promoted = json.loads(capsys.readouterr().out)
    direct = effect_codes(cache, words, max_frequency=1.0, limit=20)
    assert promoted["codes"] == [h.to_dict() for h in direct] and promoted["codes"]
    assert main(["promotes", str(out), "--words=" + ",".join(words), "--max-frequency", "1"]) == 0
    assert code in capsys.readouterr().out or len(direct) == 20
    # user mistakes: one clear line, exit 2
    assert main(["regex", str(out), "a(b"]) == 2
    assert "invalid pattern" in capsys.readouterr().err
    assert main(["contexts", str(out), "layer9_mlp:1"]) == 2
    assert "no codebook" in capsys.readouterr().err
    assert main(["contexts", str(tmp_path), "layer0_mlp:1"]) == 2
    assert "not a code cache" in capsys.readouterr().err
