"""The command line as a careless user meets it: every mistake is one line,
``codebook: error: ...`` with exit status 2 (or argparse's own line for a bad flag
value, also 2), and a bug still shows its traceback. Numbers are checked before any
work, output paths before any model loads, sequences against the model's positions."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from codebook_lens.cli.args import plain, print_json
from codebook_lens.cli.main import main


@pytest.fixture(scope="module")
def model(tiny_code_cache):
    return str(tiny_code_cache[0])


@pytest.fixture(scope="module")
def cache(tiny_code_cache):
    return str(tiny_code_cache[1])


def error_line(capsys) -> str:
    """The single error line of a failed command (model loading may print progress)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0] == err.strip().splitlines()[-1], err
    assert lines[0].startswith("codebook: error: "), err
    return lines[0]


# -- one error style ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["steer", "@M", "--prompt", "x"], "steer needs at least one --code or --disable"),
        (["steer-eval", "@M", "--words", "cat", "--code", "layer0_mlp:1"], "needs prompts"),
        (["steer-eval", "@M", "--words", " , ", "--code", "layer0_mlp:1"], "names no word"),
        (["train", "@TMP/missing.yaml"], "does not exist"),
        (["fsm", "--preset", "enormous"], "unknown preset 'enormous'"),
        (["contexts", "@C", "layer0_mlp"], "does not name a code"),
        (["freq", "@C", "--codebook", "layer9_mlp"], "no codebook 'layer9_mlp'"),
        (["similar", "@C", "layer0_mlp:99"], "code 99 does not exist"),
        (["regex", "@C", "(unclosed"], "invalid pattern"),
        (["serve", "@TMP/nothing"], "not a code cache"),
        (["steer", "@TMP", "--prompt", "x", "--code", "layer0_mlp:1"], "not a saved codebook"),
    ],
)
def test_every_users_mistake_is_one_line_and_exit_2(
    args, message, model, cache, tmp_path, capsys, monkeypatch
):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server started"))
    subst = {"@M": model, "@C": cache}
    argv = [subst.get(a, a.replace("@TMP", str(tmp_path))) for a in args]
    assert main(argv) == 2
    assert message in error_line(capsys)


@pytest.mark.parametrize("bug", [KeyError("an internal key"), ValueError("an internal value")])
def test_a_bug_shows_its_traceback(cache, monkeypatch, bug):
    """Only a CodebookLensError is a user's mistake; a plain ValueError or KeyError raised
    inside is a bug and must not be dressed up as one."""
    from codebook_lens.cache.store import CodeCache

    def broken(path):
        raise bug

    monkeypatch.setattr(CodeCache, "open", broken)
    with pytest.raises(type(bug)):
        main(["freq", cache])


# -- numbers -------------------------------------------------------------------------------

CODE = "layer0_mlp:1"


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["contexts", "@C", CODE, "--window", "-5"], "--window"),
        (["contexts", "@C", CODE, "--limit", "-1"], "--limit"),
        (["contexts", "@C", CODE, "--offset", "-1"], "--offset"),
        (["regex", "@C", "a", "--max-tokens", "-5"], "--max-tokens"),
        (["regex", "@C", "a", "--limit", "-1"], "--limit"),
        (["regex", "@C", "a", "--min-count", "0"], "--min-count"),
        (["regex", "@C", "a", "--min-precision", "nan"], "--min-precision"),
        (["promotes", "@C", "--words", "a", "--limit", "-1"], "--limit"),
        (["promotes", "@C", "--words", "a", "--max-frequency", "0"], "--max-frequency"),
        (["effect", "@C", CODE, "--top", "-3"], "--top"),
        (["similar", "@C", CODE, "--top", "0"], "--top"),
        (["topic", "@C", "text", "--min-fraction", "1.5"], "--min-fraction"),
        (["serve", "@C", "--regex-budget", "nan"], "--regex-budget"),
        (["serve", "@C", "--regex-budget", "0"], "--regex-budget"),
        (["serve", "@C", "--port", "70000"], "--port"),
        (["cache", "@M", "--out", "@TMP/c", "--seq-len", "0"], "--seq-len"),
        (["cache", "@M", "--out", "@TMP/c", "--batch-size", "-1"], "--batch-size"),
        (["cache", "@M", "--out", "@TMP/c", "--max-tokens", "-2"], "--max-tokens"),
        (["steer", "@M", "--prompt", "x", "--code", CODE, "--max-new-tokens", "0"], "--max-new"),
        (["steer", "@M", "--prompt", "x", "--code", CODE, "--temperature", "-1"], "--temperature"),
        (["steer", "@M", "--prompt", "x", "--code", CODE, "--strength", "inf"], "--strength"),
        (["steer", "@M", "--prompt", "x", "--code", CODE, "--from-position", "-1"], "--from"),
        (["steer", "@M", "--prompt", "x", "--code", CODE, "--seed", "-1"], "--seed"),
        (["steer-eval", "@M", "--words", "a", "--code", CODE, "--samples", "0"], "--samples"),
    ],
)
def test_bad_numbers_are_refused_before_any_work(
    args, flag, model, cache, tmp_path, capsys, monkeypatch
):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server started"))
    subst = {"@M": model, "@C": cache}
    argv = [subst.get(a, a.replace("@TMP", str(tmp_path))) for a in args]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "must be" in err


def test_json_output_is_valid_json(capsys):
    """JSON has no NaN: a non-finite number prints as null, never as NaN."""
    data = {"loss": math.nan, "curve": [1.5, math.inf, -math.inf], "name": "x"}
    assert plain(data) == {"loss": None, "curve": [1.5, None, None], "name": "x"}
    print_json(data)

    def refuse(constant):
        raise AssertionError(f"{constant} in the JSON output")

    assert json.loads(capsys.readouterr().out, parse_constant=refuse) == plain(data)


# -- output paths, checked before any work ---------------------------------------------------


def test_output_paths_of_the_wrong_kind_fail_before_any_work(
    model, cache, tmp_path, capsys, monkeypatch
):
    import codebook_lens.core.loading as loading
    import codebook_lens.steering.sampling as sampling

    monkeypatch.setattr(loading, "load_codebook_model", lambda *a, **k: pytest.fail("loaded"))
    monkeypatch.setattr(sampling, "steering_eval", lambda *a, **k: pytest.fail("sampled"))
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    cases = [
        (["freq", cache, "--plot", str(a_dir)], f"--plot file {a_dir} is a directory"),
        (
            ["steer-eval", model, "--words", "a", "--code", CODE, "--prompt", "x", "--out"]
            + [str(a_dir)],
            f"--out file {a_dir} is a directory",
        ),
        (["fsm", "--out", str(a_file)], f"--out directory {a_file} is a file"),
        (["demo", "--out", str(a_file / "run")], f"{a_file} is a file, not a directory"),
        (["cache", model, "--out", str(a_file)], f"--out directory {a_file} is a file"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        assert message in error_line(capsys)
    assert a_file.read_text() == "keep me" and not any(a_dir.iterdir())


# -- sequences past the model's positions (the tiny model has 64) ----------------------------


def test_generation_past_the_models_positions_is_refused_before_sampling(
    model, capsys, monkeypatch
):
    import codebook_lens.steering.sampling as sampling

    monkeypatch.setattr(sampling, "_sample", lambda *a, **k: pytest.fail("sampled"))
    args = ["steer", model, "--prompt", "In May", "--code", CODE, "--max-new-tokens", "100"]
    assert main(args) == 2
    assert "plus 100 new tokens needs" in error_line(capsys)
    args = ["steer-eval", model, "--words", "a", "--code", CODE, "--prompt", "In May"]
    assert main([*args, "--max-new-tokens", "63"]) == 2
    assert "the model" in error_line(capsys)


# -- damaged model directories ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda m: _cut(m / "codebooks.safetensors"), "codebooks.safetensors is damaged"),
        (lambda m: _cut(m / "base" / "model.safetensors"), "cannot load the base model"),
        (lambda m: (m / "codebook_config.json").write_text("[]"), "must hold a JSON object"),
        (lambda m: (m / "base" / "tokenizer.json").unlink(), "cannot load the tokenizer"),
    ],
)
def test_a_damaged_model_directory_is_one_line(model, tmp_path, capsys, damage, message):
    damaged = tmp_path / "model"
    shutil.copytree(model, damaged)
    damage(damaged)
    assert main(["steer", str(damaged), "--prompt", "x", "--code", CODE]) == 2
    assert message in error_line(capsys)


def _cut(path) -> None:
    path.write_bytes(path.read_bytes()[:64])
