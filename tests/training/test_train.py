"""The training loop on a tiny local model: metrics, exact resume, clear errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import corpus_text, save_tiny_training_dir, tiny_bert_config, tiny_train_args
from safetensors.torch import load_file

from codebook_lens.cli.main import main as cli_main
from codebook_lens.training.config import load_train_config
from codebook_lens.training.loop import TrainError, distill_loss, train
from codebook_lens.training.optim import lr_lambda


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_training_dir(tmp_path_factory.mktemp("tiny"))


def make_cfg(tiny_dir, out, *extra):
    return load_train_config(None, tiny_train_args(tiny_dir, out, *extra))


def test_train_writes_metrics_and_model(tiny_dir, tmp_path):
    result = train(make_cfg(tiny_dir, tmp_path / "run"))
    assert {"codebook.lm_loss", "base.lm_loss", "codebook.accuracy", "base.accuracy"} <= set(result)
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    train_records = [r for r in records if "lm_loss" in r]
    assert [r["step"] for r in train_records] == [2, 4, 6]
    site = train_records[-1]["sites"]["layer1_mlp"]
    assert set(site) == {"mse", "explained_variance", "dead_fraction", "usage_perplexity"}
    assert 0 <= site["dead_fraction"] <= 1 and site["usage_perplexity"] >= 1
    assert train_records[-1]["tokens_per_s"] > 0
    assert any("eval" in r for r in records)
    assert (tmp_path / "run" / "model" / "codebooks.safetensors").is_file()
    assert (tmp_path / "run" / "model" / "base" / "tokenizer.json").is_file()


def test_interrupted_then_resumed_equals_uninterrupted(tiny_dir, tmp_path):
    train(make_cfg(tiny_dir, tmp_path / "full"))
    train(make_cfg(tiny_dir, tmp_path / "cut"), stop_at_step=3)
    ckpts = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert ckpts == ["step-0000003"]
    train(make_cfg(tiny_dir, tmp_path / "cut"), resume=True)
    a = load_file(str(tmp_path / "full" / "model" / "codebooks.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "codebooks.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    base_a = load_file(str(tmp_path / "full" / "model" / "base" / "model.safetensors"))
    base_b = load_file(str(tmp_path / "cut" / "model" / "base" / "model.safetensors"))
    for key in base_a:
        assert torch.equal(base_a[key], base_b[key]), key
    last = lambda p: [json.loads(x) for x in p.read_text().splitlines()][-1]  # noqa: E731
    assert last(tmp_path / "full" / "metrics.jsonl") == last(tmp_path / "cut" / "metrics.jsonl")


def test_freeze_base_trains_codebooks_only(tiny_dir, tmp_path):
    cfg = make_cfg(tiny_dir, tmp_path / "frozen", "optim.freeze_base=true", "schedule.max_steps=2")
    train(cfg)
    model_dir = tmp_path / "frozen" / "model"
    assert (model_dir / "codebooks.safetensors").is_file()
    assert not (model_dir / "base").exists()


def test_distill_loss_is_the_mean_kl_over_predicted_positions():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 7, (2, 5), generator=gen)
    labels[0, 2] = labels[1, 4] = -100  # their predicting positions (0, 1) and (1, 3) drop out
    kept = [(b, t) for b in range(2) for t in range(4) if labels[b, t + 1] != -100]
    assert len(kept) == 6

    def kl(b, t):  # by hand, from the definition
        p = [math.exp(v) for v in teacher[b, t].tolist()]
        q = [math.exp(v) for v in logits[b, t].tolist()]
        p = [v / sum(p) for v in p]
        q = [v / sum(q) for v in q]
        return sum(pv * math.log(pv / qv) for pv, qv in zip(p, q, strict=True))

    loss = distill_loss(logits, teacher, labels)
    assert loss.item() == pytest.approx(sum(kl(b, t) for b, t in kept) / 6, rel=1e-12)
    everything = [(b, t) for b in range(2) for t in range(4)]
    unmasked = distill_loss(logits, teacher)
    assert unmasked.item() == pytest.approx(sum(kl(b, t) for b, t in everything) / 8, rel=1e-12)
    # gradient: (softmax(logits) - softmax(teacher)) / count at kept positions, 0 elsewhere
    loss.backward()
    expected = torch.zeros_like(logits)
    for b, t in kept:
        expected[b, t] = (logits[b, t].softmax(-1) - teacher[b, t].softmax(-1)).detach() / 6
    assert torch.allclose(logits.grad, expected, atol=1e-14)
    assert distill_loss(teacher, teacher.clone(), labels).item() == pytest.approx(0, abs=1e-12)


def test_distillation_pulls_the_codebook_model_toward_the_base(tiny_dir, tmp_path):
    """Trained on the KL alone (no LM, no reconstruction term), the codebooks of a frozen
    model move toward the base model's predictions."""
    sites = (
        "codebooks.sites=[{site: mlp, codebook: {num_codes: 32, k: 1, "
        "reconstruction_weight: 0, commitment_weight: 0}}]"
    )
    extra = ["optim.freeze_base=true", "optim.lm_weight=0", "optim.distill_weight=1", sites]
    extra += ["schedule.max_steps=40", "schedule.grad_accum=1", "logging.every=10"]
    extra += ["optim.codebook_lr=0.01", "schedule.scheduler=constant", "eval.every=1000"]
    train(make_cfg(tiny_dir, tmp_path / "distill", *extra))
    records = [
        json.loads(line)
        for line in (tmp_path / "distill" / "metrics.jsonl").read_text().splitlines()
    ]
    kls = [r["distill_kl"] for r in records if "distill_kl" in r]
    assert len(kls) == 4 and all(math.isfinite(v) and v > 0 for v in kls)
    assert kls[-1] < 0.5 * kls[0], kls


def _network(path):
    return load_file(str(path / "model" / "base" / "model.safetensors"))


def test_freeze_base_steps_trains_the_codes_first_then_the_network(tiny_dir, tmp_path):
    """For the first optim.freeze_base_steps steps only the codes move; the network
    trains after them, and a run resumed across that boundary equals one that was not
    interrupted."""
    extra = ["optim.freeze_base_steps=3", "schedule.max_steps=6", "checkpoint.every=1"]
    source = load_file(str(tiny_dir / "model" / "model.safetensors"))
    train(make_cfg(tiny_dir, tmp_path / "cut", *extra), stop_at_step=3)
    frozen = load_file(
        str(tmp_path / "cut" / "checkpoints" / "step-0000003" / "weights.safetensors")
    )
    moved = [k for k in frozen if k.startswith("codebooks.")]
    assert moved
    stored = [k for k in source if f"model.{k}" in frozen]  # tied weights are stored once
    assert len(stored) >= len(source) - 1
    for key in stored:  # the network has not moved in the first three steps
        assert torch.equal(frozen[f"model.{key}"], source[key]), key
    train(make_cfg(tiny_dir, tmp_path / "cut", *extra), resume=True)
    train(make_cfg(tiny_dir, tmp_path / "full", *extra))
    cut, full = _network(tmp_path / "cut"), _network(tmp_path / "full")
    assert any(not torch.equal(full[k], source[k]) for k in source)  # it trained after
    for key in full:
        assert torch.equal(full[key], cut[key]), key
    records = [
        json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    ]
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert lrs[2] == 0.0 and lrs[4] > 0.0  # the network's learning rate: 0 while frozen


def test_runs_in_one_process_may_use_different_precisions(tiny_dir, tmp_path):
    """accelerate keeps one precision per process; each run here sets its own."""
    for i, precision in enumerate(["bf16", "no", "bf16"]):
        out = tmp_path / f"run{i}"
        train(
            make_cfg(tiny_dir, out, "schedule.max_steps=2", f"schedule.mixed_precision={precision}")
        )
        assert (out / "model" / "codebooks.safetensors").is_file()


def test_lr_lambda_with_a_delay_schedules_the_steps_after_it(tiny_dir, tmp_path):
    cfg = make_cfg(tiny_dir, tmp_path / "x", "schedule.max_steps=10", "schedule.warmup_steps=2")
    plain, delayed = lr_lambda(cfg), lr_lambda(cfg, delay=4)
    assert [delayed(s) for s in range(4)] == [0.0] * 4
    assert delayed(4) == pytest.approx(1 / 2) and delayed(5) == pytest.approx(1.0)
    # after the delay: warmup, then a cosine over the 6 - 2 = 4 remaining steps
    assert delayed(7) == pytest.approx(0.5 * (1 + math.cos(math.pi * 1 / 4)))
    assert plain(7) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 8)))


def test_distillation_with_the_network_training_uses_a_frozen_copy_of_the_base(tiny_dir, tmp_path):
    """With the network training along, the teacher is the base as it was before the
    first step. Without codebooks the KL is then 0 at the first step and grows as the
    LM loss moves the network away (a teacher that moved with the network, the model with
    its codebooks off, would keep it at 0)."""
    extra = ["codebooks.sites=[]", "optim.distill_weight=1", "optim.lr=0.01"]
    extra += ["schedule.max_steps=4", "schedule.grad_accum=1", "logging.every=1"]
    extra += ["schedule.scheduler=constant", "schedule.warmup_steps=0"]
    train(make_cfg(tiny_dir, tmp_path / "d", *extra))
    records = [json.loads(x) for x in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    kls = [r["distill_kl"] for r in records if "distill_kl" in r]
    assert len(kls) == 4 and kls[0] == 0.0
    assert kls[1] > 1e-3 and kls[3] > kls[1], kls


@pytest.mark.parametrize(
    "extra, match",
    [
        (["optim.freeze_base_steps=6"], "optim.freeze_base_steps must be below schedule"),
        (["optim.freeze_base_steps=2", "optim.freeze_base=true"], "needs optim.freeze_base: false"),
        (["model.path=/nonexistent/model"], "does not exist"),
        (
            ["data.corpus=/nonexistent/corpus"],
            "neither one of offline, offline-wide nor an existing",
        ),
        (["codebooks.sites=[{site: ffn}]"], "site 'ffn' is not supported"),
        (["codebooks.sites=[{site: mlp, layers: [5]}]"], "layer 5 is out of range"),
        (["codebooks.sites=[{site: mlp, codebook: {num_codes: 8, k: 8}}]"], "k must be"),
        (["data.seq_len=4096"], "exceeds the model's max_position_embeddings"),
        (["schedule.batch_size=100000"], "fewer than one batch"),
    ],
)
def test_bad_setups_fail_clearly_without_output(tiny_dir, tmp_path, extra, match):
    out = tmp_path / "bad"
    with pytest.raises((TrainError, ValueError), match=match):
        train(make_cfg(tiny_dir, out, *extra))
    assert not out.exists()


def test_not_a_causal_lm(tmp_path):
    from transformers import BertModel

    BertModel(tiny_bert_config()).save_pretrained(tmp_path / "bert")
    cfg = load_train_config(
        None, [f"model.path={tmp_path / 'bert'}", f"output_dir={tmp_path / 'o'}"]
    )
    with pytest.raises(TrainError, match="is not a causal language model"):
        train(cfg)


def test_cli_reports_config_errors(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  codebok_lr: 1\n")
    assert cli_main(["train", str(path)]) == 2
    assert "did you mean 'codebook_lr'" in capsys.readouterr().err


def test_two_processes_hold_identical_codebooks(tiny_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo): usage synced, revived codes identical."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    args = [
        f"output_dir={out}",
        f"model.path={tiny_dir / 'model'}",
        f"data.corpus={tiny_dir / 'corpus'}",
        "data.seq_len=32",
        "data.eval_fraction=0.1",
        "codebooks.sites=[{site: mlp, codebook: {num_codes: 64, k: 2}}]",
        "codebooks.revive_after_steps=1",
        "schedule.max_steps=4",
        "schedule.batch_size=2",
        "schedule.grad_accum=2",
        "logging.every=2",
        "eval.every=4",
        "eval.batches=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CODEBOOK_LENS_NATIVE": "0"}
    config = tmp_path / "ddp.yaml"
    config.write_text("logging:\n  every: 2\n")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "codebook_lens.cli.main",
        "train",
        str(config),
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "ranks_identical" in r]
    assert final == [{"step": 4, "processes": 2, "ranks_identical": True}]
    revived = sum(r.get("revived", 0) for r in records)
    assert revived > 0  # revival happened and was synchronised
    usage = load_file(str(out / "model" / "codebooks.safetensors"))["layer0_mlp.usage"]
    # both ranks' tokens are counted: 4 steps x 2 micro x 2 ranks x 2 rows x 32 tokens x k=2
    assert int(usage.sum()) == 4 * 2 * 2 * 2 * 32 * 2


def test_killed_process_resumes_to_the_same_result(tiny_dir, tmp_path):
    """SIGKILL a real training process after a checkpoint, resume, compare with a clean run."""
    import signal
    import subprocess
    import sys
    import time

    extra = ["schedule.max_steps=60", "checkpoint.every=5", "checkpoint.keep=3", "eval.every=1000"]
    train(make_cfg(tiny_dir, tmp_path / "clean", *extra))

    out = tmp_path / "killed"
    cfg_args = tiny_train_args(tiny_dir, out, *extra)
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "codebook_lens.cli.main", "train", str(config), *cfg_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpts = out / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpts / "step-0000010").is_dir():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (ckpts / "step-0000010").is_dir(), "the run never reached step 10"
    assert not (out / "model").exists()  # it really was cut short
    train(make_cfg(tiny_dir, out, *extra), resume=True)
    a = load_file(str(tmp_path / "clean" / "model" / "codebooks.safetensors"))
    b = load_file(str(out / "model" / "codebooks.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    base_a = load_file(str(tmp_path / "clean" / "model" / "base" / "model.safetensors"))
    base_b = load_file(str(out / "model" / "base" / "model.safetensors"))
    for key in base_a:
        assert torch.equal(base_a[key], base_b[key]), key


def test_tensorboard_mirrors_the_json_metrics(tiny_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(make_cfg(tiny_dir, out, "logging.tensorboard=true"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"lm_loss", "reconstruction_loss", "tokens_per_s", "eval/codebook.lm_loss"} <= tags
    assert "sites/layer1_mlp/dead_fraction" in tags
    logged = [(e.step, e.value) for e in acc.Scalars("lm_loss")]
    expected = [(r["step"], r["lm_loss"]) for r in records if "lm_loss" in r]
    assert [s for s, _ in logged] == [s for s, _ in expected]
    for (_, a), (_, b) in zip(logged, expected, strict=True):
        assert a == pytest.approx(b, rel=1e-6)  # TensorBoard stores float32


@pytest.mark.parametrize("with_splits", [False, True])
def test_trains_on_a_local_datasets_directory(tiny_dir, tmp_path, with_splits):
    datasets = pytest.importorskip("datasets")
    from codebook_lens.data.documents import DataError, iter_documents

    texts = [corpus_text(30, seed=i) for i in range(40)]
    path = tmp_path / "ds"
    if with_splits:
        datasets.DatasetDict(
            {
                "train": datasets.Dataset.from_dict({"body": texts[:36]}),
                "validation": datasets.Dataset.from_dict({"body": texts[36:]}),
            }
        ).save_to_disk(str(path))
    else:
        datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(path))
    train_docs = list(iter_documents(str(path), "train", "body", 0.1))
    eval_docs = list(iter_documents(str(path), "eval", "body", 0.1))
    assert sorted(train_docs + eval_docs) == sorted(texts)  # every document, once
    assert not set(train_docs) & set(eval_docs)
    if with_splits:
        assert eval_docs == texts[36:]
    with pytest.raises(DataError, match="no column 'text'; columns: body"):
        list(iter_documents(str(path), "train", "text", 0.1))
    result = train(
        make_cfg(tiny_dir, tmp_path / "run", f"data.corpus={path}", "data.text_field=body")
    )
    assert result["codebook.lm_loss"] > 0


def test_freeze_embeddings_keeps_the_input_embeddings_through_a_thaw(tiny_dir, tmp_path):
    """optim.freeze_embeddings: the input token embeddings never move, not even after
    optim.freeze_base_steps thaws the rest of the network, which trains (the untied
    output embeddings of this GPT-NeoX included)."""
    extra = ["optim.freeze_embeddings=true", "optim.freeze_base_steps=2", "optim.lr=0.01"]
    source = load_file(str(tiny_dir / "model" / "model.safetensors"))
    train(make_cfg(tiny_dir, tmp_path / "run", *extra))
    net = _network(tmp_path / "run")
    key = "gpt_neox.embed_in.weight"
    assert torch.equal(net[key], source[key])
    assert not torch.equal(net["embed_out.weight"], source["embed_out.weight"])
    assert all(not torch.equal(net[k], source[k]) for k in source if "dense" in k)
