"""Attacks on code caches, each written as the attack: a manifest that names files outside
the cache, manifests and arrays that disagree or are damaged, a cache used with another
model, an empty corpus, a sequence longer than the model's positions, `--overwrite`
and two builds of the same cache at once. Each must end in one clear CacheError (one
line and exit 2 at the command line), never in a traceback or a wrong answer."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading

import numpy as np
import pytest
import torch
from helpers import WEB_DOCS
from safetensors.torch import load_file, save_file

from codebook_lens.cache import build as build_module
from codebook_lens.cache.build import build_cache
from codebook_lens.cache.store import CacheError, CodeCache
from codebook_lens.cli.main import main
from codebook_lens.core.errors import CodebookLensError
from codebook_lens.core.loading import load_codebook_model
from codebook_lens.core.refs import CodeRef


@pytest.fixture
def cache_copy(tiny_code_cache, tmp_path):
    """A copy of the tiny cache, free to damage, in tmp/share/cache."""
    out = tmp_path / "share" / "cache"
    shutil.copytree(tiny_code_cache[1], out)
    return out


@pytest.fixture(scope="module")
def loaded(tiny_code_cache):
    return load_codebook_model(tiny_code_cache[0])


def edit_manifest(cache_dir, change) -> None:
    path = cache_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest = change(manifest) or manifest
    path.write_text(json.dumps(manifest))


def one_line_error(capsys) -> str:
    """The one error line (progress bars of model loading may come before it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("codebook: error: ") and err.count("error:") == 1, err
    return last


# -- item 1: file names from the manifest ---------------------------------------------------


def test_a_codebook_key_that_climbs_out_of_the_cache_reads_nothing(cache_copy, capsys):
    """The manifest of a shared cache names `../../outside/secret` as a codebook, with a
    secret .npy planted there: neither the library nor `codebook freq` may read it."""
    outside = cache_copy.parent.parent / "outside"
    outside.mkdir()
    secret = np.arange(16, dtype=np.int64).reshape(1, 16)
    np.save(outside / "secret.npy", secret)
    key = "../../outside/secret"

    def plant(manifest):
        info = dict(manifest["codebooks"]["layer0_mlp"], key=key, groups=1, num_codes=16, k=1)
        manifest["codebooks"][key] = info

    edit_manifest(cache_copy, plant)
    with pytest.raises(CacheError, match="names a codebook '../../outside/secret'"):
        CodeCache.open(cache_copy)
    assert main(["freq", str(cache_copy), "--json"]) == 2
    assert "codebook names look like layer12_mlp" in one_line_error(capsys)


def test_a_file_linked_to_outside_the_cache_is_not_read(cache_copy, tmp_path):
    """A cache whose codes file is a symbolic link to a file elsewhere (same bytes even)."""
    target = tmp_path / "elsewhere.npy"
    shutil.copy(cache_copy / "codes" / "layer0_mlp.npy", target)
    (cache_copy / "codes" / "layer0_mlp.npy").unlink()
    (cache_copy / "codes" / "layer0_mlp.npy").symlink_to(target)
    with pytest.raises(CacheError, match="points outside the cache"):
        CodeCache.open(cache_copy)


# -- item 5 (and 4: "a manifest claiming 100 tokens"): manifests and arrays that disagree ----


def _set(path: list, value):
    def change(manifest):
        node = manifest
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: [m], "is not a codebook-lens-cache manifest"),
        (_set(["format_version"], "1"), "format_version must be an integer"),
        (_set(["num_tokens"], 100), "the manifest says uint8 of shape (100,"),
        (_set(["num_tokens"], -3), "num_tokens must be an integer >= 1"),
        (_set(["codebooks", "layer0_mlp", "num_codes"], 32), "shape (1, 32)"),
        (_set(["codebooks", "layer1_attn_heads", "groups"], 2), "shape"),
        (_set(["codebooks", "layer0_mlp", "k"], "2"), "k must be an integer"),
        (_set(["codebooks", "layer0_mlp", "dtype"], "float64"), "dtype must be uint8"),
        (_set(["codebooks", "layer0_mlp", "layer"], 1), "is not codebook layer0_mlp"),
        (_set(["codebooks"], []), "codebooks must be a mapping"),
        (_set(["num_docs"], 10**9), "num_docs=1000000000 exceeds num_tokens"),
    ],
)
def test_manifests_that_disagree_with_their_arrays_fail_at_open(
    cache_copy, capsys, change, message
):
    edit_manifest(cache_copy, change)
    with pytest.raises(CacheError) as info:
        CodeCache.open(cache_copy)
    assert message in str(info.value)
    assert main(["freq", str(cache_copy)]) == 2
    one_line_error(capsys)


def test_a_manifest_that_is_not_json(cache_copy, capsys):
    (cache_copy / "manifest.json").write_bytes(b"\xff\xfe{not json")
    assert main(["contexts", str(cache_copy), "layer0_mlp:1"]) == 2
    assert "is not readable JSON" in one_line_error(capsys)


def _truncate(path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


@pytest.mark.parametrize(
    ("damage", "command", "message"),
    [
        (lambda c: _truncate(c / "codes" / "layer0_mlp.npy"), ["freq"], "is truncated"),
        (
            lambda c: np.save(c / "codes" / "layer0_mlp.npy", np.zeros((3, 1, 2), np.uint8)),
            ["freq"],
            "the manifest says uint8 of shape",
        ),
        (lambda c: (c / "index" / "layer0_mlp.rows.npy").unlink(), ["freq"], "is missing"),
        (
            lambda c: _truncate(c / "codebooks.safetensors"),
            ["similar", "@CODE"],
            "codebooks.safetensors cannot be read",
        ),
        (
            lambda c: _truncate(c / "effects" / "layer0_mlp.npz"),
            ["effect", "@CODE"],
            "layer0_mlp.npz cannot be read",
        ),
        (lambda c: (c / "vocab.json").write_text("[]"), ["effect", "@CODE"], "non-empty list"),
        (lambda c: (c / "vocab.json").write_text(""), ["effect", "@CODE"], "cannot be read"),
        (
            lambda c: _truncate(c / "tokens.parquet", 100),
            ["contexts", "@CODE"],
            "tokens.parquet cannot be read",
        ),
        (
            lambda c: _truncate(c / "docs.parquet", 100),
            ["regex", "a"],
            "docs.parquet cannot be read",
        ),
    ],
)
def test_damaged_files_give_one_line_errors(cache_copy, capsys, damage, command, message):
    code = f"layer0_mlp:{int(CodeCache.open(cache_copy).counts('layer0_mlp')[0].argmax())}"
    damage(cache_copy)
    args = [command[0], str(cache_copy), *(code if a == "@CODE" else a for a in command[1:])]
    assert main(args) == 2
    assert message in one_line_error(capsys)


def test_a_damaged_index_is_an_error_not_a_wrong_answer(cache_copy):
    """Offsets pointing past the rows, and rows past the tokens."""
    ref = CodeRef("layer0_mlp", int(CodeCache.open(cache_copy).counts("layer0_mlp")[0].argmax()))
    offsets = np.load(cache_copy / "index" / "layer0_mlp.offsets.npy")
    offsets[0, ref.code + 1] = 10**9
    np.save(cache_copy / "index" / "layer0_mlp.offsets.npy", offsets)
    with pytest.raises(CacheError, match="index of layer0_mlp .* is damaged"):
        CodeCache.open(cache_copy).occurrences(ref)
    counts = np.load(cache_copy / "counts" / "layer0_mlp.npy")
    counts[0, 0] = 10**6
    np.save(cache_copy / "counts" / "layer0_mlp.npy", counts)
    with pytest.raises(CacheError, match="counts must lie in"):
        CodeCache.open(cache_copy).frequencies("layer0_mlp")


# -- item 3: a cache used with a model other than its own -----------------------------------


@pytest.fixture(scope="module")
def other_model(tiny_code_cache, tmp_path_factory):
    """The tiny model with one code vector of layer0_mlp changed: same names and shapes,
    other codes."""
    other = tmp_path_factory.mktemp("other") / "model"
    shutil.copytree(tiny_code_cache[0], other)
    weights = load_file(str(other / "codebooks.safetensors"))
    weights["layer0_mlp.weight"] = weights["layer0_mlp.weight"].clone()
    weights["layer0_mlp.weight"][0, 3] += 1.0
    save_file(weights, str(other / "codebooks.safetensors"))
    return other


def test_steer_eval_refuses_the_codes_of_another_models_cache(tiny_code_cache, other_model, capsys):
    cache_dir = tiny_code_cache[1]
    args = ["steer-eval", str(other_model), "--cache", str(cache_dir), "--select", "effect"]
    args += ["--words", "the", "--max-frequency", "1", "--prompt", "In May", "--samples", "1"]
    assert main([*args, "--max-new-tokens", "2"]) == 2
    line = one_line_error(capsys)
    assert "is not the one the cache" in line and "layer0_mlp" in line


def test_serve_refuses_a_model_other_than_the_caches(tiny_code_cache, other_model):
    from codebook_lens.web import create_app

    with pytest.raises(CacheError, match="code vectors of layer0_mlp differ"):
        create_app(tiny_code_cache[1], other_model)
    create_app(tiny_code_cache[1], tiny_code_cache[0])  # its own model is welcome


def test_a_cache_whose_model_was_retrained_in_place(tiny_code_cache, other_model, tmp_path):
    """The model directory named in the manifest now holds other codebooks."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_code_cache[0], model_dir)
    out = tmp_path / "cache"
    build_cache(load_codebook_model(model_dir), WEB_DOCS[:1], out, seq_len=32)
    shutil.copy(other_model / "codebooks.safetensors", model_dir / "codebooks.safetensors")
    with pytest.raises(CacheError, match="not the one the cache"):
        CodeCache.open(out).model()


# -- item 4: an empty corpus ----------------------------------------------------------------


def test_an_empty_corpus_builds_no_cache(loaded, tmp_path, tiny_code_cache, capsys):
    with pytest.raises(CacheError, match="holds no text"):
        build_cache(loaded, ["", ""], tmp_path / "cache", seq_len=16)
    assert not (tmp_path / "cache").exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    args = ["cache", str(tiny_code_cache[0]), "--corpus", str(empty), "--out", str(tmp_path / "c")]
    assert main([*args, "--seq-len", "32"]) == 2
    assert "holds no text" in one_line_error(capsys)


# -- item 7: sequences past the model's positions --------------------------------------------


def test_a_sequence_past_the_models_positions_is_refused_before_any_work(
    tiny_code_cache, tmp_path, capsys
):
    out = tmp_path / "cache"
    args = ["cache", str(tiny_code_cache[0]), "--out", str(out), "--seq-len", "1000"]
    args += ["--max-tokens", "3000"]
    assert main(args) == 2
    assert "--seq-len 1000 needs 1000 positions" in one_line_error(capsys)
    assert not out.exists() and not (tmp_path / "cache.partial").exists()


# -- item 14: overwriting, concurrent builds, file modes --------------------------------------


def test_overwrite_moves_the_new_cache_in_before_removing_the_old(loaded, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    build_cache(loaded, WEB_DOCS[:1], out, seq_len=32)
    old_tokens = CodeCache.open(out).num_tokens
    seen = []
    real_rmtree = shutil.rmtree

    def watching_rmtree(path, *args, **kwargs):
        # whatever is removed, OUT must already be a complete cache: the new one
        seen.append(json.loads((out / "manifest.json").read_text())["num_tokens"])
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(build_module.shutil, "rmtree", watching_rmtree)
    build_cache(loaded, WEB_DOCS[:2], out, seq_len=32, overwrite=True)
    new_tokens = CodeCache.open(out).num_tokens
    assert new_tokens > old_tokens
    assert seen == [new_tokens]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_overwrite_never_removes_a_directory_that_is_not_a_cache(loaded, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(CacheError, match="is not a code cache; refusing to replace it"):
        build_cache(loaded, WEB_DOCS[:1], home, seq_len=32, overwrite=True)
    assert (home / "thesis.tex").read_text() == "years of work"
    with pytest.raises(CodebookLensError, match="is a file"):
        build_cache(loaded, WEB_DOCS[:1], home / "thesis.tex", seq_len=32, overwrite=True)


def test_two_identical_builds_do_not_share_the_partial_directory(loaded, tmp_path):
    """A first build is running (held inside its corpus); a second identical one starts."""
    out = tmp_path / "cache"
    started, release = threading.Event(), threading.Event()
    results = {}

    def slow_docs():
        started.set()
        release.wait(60)
        yield from WEB_DOCS[:2]

    def first():
        results["first"] = build_cache(loaded, slow_docs(), out, seq_len=32)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert started.wait(60)
        with pytest.raises(CacheError, match="another build .* is writing"):
            build_cache(loaded, WEB_DOCS[:2], out, seq_len=32)
    finally:
        release.set()
        thread.join(120)
    assert results["first"].tokens == CodeCache.open(out).num_tokens
    assert not (tmp_path / "cache.partial.lock").exists()
    # a lock left by a killed build (file present, nobody holding it) does not block
    (tmp_path / "again.partial.lock").write_text("12345")
    build_cache(loaded, WEB_DOCS[:1], tmp_path / "again", seq_len=32)
    # but one held by a live process does
    fd = os.open(tmp_path / "third.partial.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(CacheError, match="another build"):
            build_cache(loaded, WEB_DOCS[:1], tmp_path / "third", seq_len=32)
    finally:
        os.close(fd)


def test_every_file_of_a_cache_is_readable_by_others(tiny_code_cache):
    expected = 0o666 & ~_umask()
    for path in tiny_code_cache[1].rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o777 == expected, path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_the_model_and_the_cache_agree_on_the_digest(tiny_code_cache, loaded):
    manifest = json.loads((tiny_code_cache[1] / "manifest.json").read_text())
    assert manifest["codebook_digest"] == loaded.model.codebook_digests()
    changed = loaded.model.codebook_digests()
    with torch.no_grad():
        weight = loaded.model.codebooks["layer1_mlp"].weight
        original = weight.clone()
        weight[0, 0, 0] += 1e-3
        try:
            assert loaded.model.codebook_digests()["layer1_mlp"] != changed["layer1_mlp"]
            assert loaded.model.codebook_digests()["layer0_mlp"] == changed["layer0_mlp"]
        finally:
            weight.copy_(original)
    assert loaded.model.codebook_digests() == manifest["codebook_digest"]
