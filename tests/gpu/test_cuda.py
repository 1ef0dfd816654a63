"""On a CUDA GPU: the same codes, outputs and gradients as on the CPU, training in bf16,
sampling with an intervention, a code cache, and the language experiment end to end.

Every test here is skipped on a machine without CUDA (the CPU tests cover the same code
there). The CPU answers are the references: the search's result rule (core/rescore.py)
promises the same ids on every device and dtype, so ids must be equal, not close.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    WEB_DOCS,
    corpus_text,
    near_tie_inputs,
    save_tiny_codebook_model,
    save_tiny_training_dir,
    tiny_model,
    tiny_train_args,
)

from codebook_lens.cache.build import build_cache
from codebook_lens.cache.store import CodeCache
from codebook_lens.core.codebook import Codebook, CodebookConfig
from codebook_lens.core.loading import load_codebook_model
from codebook_lens.core.model import CodebookModel, CodebookModelConfig, SiteSpec
from codebook_lens.core.topk import default_chunk_mib, topk_codes
from codebook_lens.experiments.language.config import load_lm_config
from codebook_lens.experiments.language.run import run
from codebook_lens.steering.intervene import Intervention
from codebook_lens.steering.sampling import generate
from codebook_lens.training.config import load_train_config
from codebook_lens.training.loop import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SIMS = ["cosine", "inner_product", "euclidean"]
CUDA = torch.device("cuda")


@pytest.fixture
def tf32(request):
    """Run with TF32 matmuls on or off (param), restoring the setting after."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = request.param
    yield request.param
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("tf32", [False, True], indirect=True)
@pytest.mark.parametrize("similarity", SIMS)
@pytest.mark.parametrize("k", [1, 3])
def test_search_on_cuda_gives_the_cpu_ids_on_near_ties(similarity, k, tf32):
    """Near ties (duplicates, one-ulp differences) in float32, with and without TF32,
    in chunks of every size: the ids equal the CPU's (which the CPU tests hold to a
    brute force)."""
    x, w = near_tie_inputs(seed=k)
    want = topk_codes(x, w, k, similarity)
    for chunk_mib in (1e-6, 0.01, 256.0):
        got = topk_codes(x.to(CUDA), w.to(CUDA), k, similarity, chunk_mib=chunk_mib)
        assert got.device.type == "cuda"
        assert torch.equal(got.cpu(), want), (similarity, k, tf32, chunk_mib)


def test_the_default_chunk_on_cuda_is_4_gib_or_a_sixteenth_of_the_memory():
    total = torch.cuda.get_device_properties(CUDA).total_memory / 2**20
    assert default_chunk_mib(CUDA) == max(256.0, min(4096.0, total / 16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_search_on_cuda_in_other_dtypes_gives_the_cpu_ids(dtype):
    """The same rule in every dtype: the ids of inputs rounded to ``dtype`` equal the
    CPU's ids of the same rounded values."""
    x, w = near_tie_inputs(seed=7)
    x, w = x.to(dtype), w.to(dtype)
    want = topk_codes(x.double(), w.double(), 2, "cosine")
    got = topk_codes(x.to(CUDA), w.to(CUDA), 2, "cosine")
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("similarity", SIMS)
def test_codebook_forward_and_backward_on_cuda_match_the_cpu(similarity):
    torch.manual_seed(0)
    cpu = Codebook(16, CodebookConfig(num_codes=300, k=4, similarity=similarity), groups=3)
    gpu = Codebook(16, CodebookConfig(num_codes=300, k=4, similarity=similarity), groups=3)
    gpu.load_state_dict(cpu.state_dict())
    gpu.to(CUDA)
    x = torch.randn(2, 50, 48)
    upstream = torch.randn(2, 50, 48)
    grads = []
    outs = []
    for cb, dev in ((cpu, "cpu"), (gpu, CUDA)):
        xi = x.to(dev).detach().requires_grad_(True)  # a leaf on either device
        out = cb(xi)
        ((out.output * upstream.to(dev)).sum() + out.loss).backward()
        outs.append(out)
        grads.append((xi.grad.cpu(), cb.weight.grad.cpu()))
    assert torch.equal(outs[1].codes.cpu(), outs[0].codes)
    torch.testing.assert_close(outs[1].output.cpu(), outs[0].output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1].loss.cpu(), outs[0].loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_codebook_model_on_cuda_gives_the_cpu_codes_and_logits(family, tokens):
    base = tiny_model(family)
    with torch.no_grad():
        plain = base(tokens).logits
    specs = [
        SiteSpec("mlp", CodebookConfig(num_codes=24, k=2)),
        SiteSpec("attn_heads", CodebookConfig(num_codes=16, k=1), layers=[1]),
    ]
    model = CodebookModel(base, CodebookModelConfig(specs)).eval()
    with torch.no_grad():
        want = model(tokens, return_codes=True)
        model.to(CUDA)
        got = model(tokens.to(CUDA), return_codes=True)
        for name, codes in want.codes.items():
            assert torch.equal(got.codes[name].cpu(), codes), name
        torch.testing.assert_close(got.logits.cpu(), want.logits, rtol=1e-4, atol=1e-4)
        # with the codebooks off, the wrapped model is its base on CUDA too
        with model.codebooks_disabled():
            off = model(tokens.to(CUDA)).logits
        torch.testing.assert_close(off.cpu(), plain, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_training_dir(tmp_path_factory.mktemp("tiny"))


def test_training_on_cuda_in_bf16_lowers_the_loss_and_saves_a_model_the_cpu_loads(
    tiny_dir, tmp_path
):
    out = tmp_path / "run"
    cfg = load_train_config(
        None,
        tiny_train_args(
            tiny_dir,
            out,
            "codebooks.sites=[{site: attn_heads, codebook: {num_codes: 32, k: 1}}, "
            "{site: mlp, codebook: {num_codes: 64, k: 2}}]",
            "schedule.max_steps=40",
            "schedule.batch_size=8",
            "schedule.grad_accum=1",
            "schedule.mixed_precision=bf16",
            "logging.every=5",
            "eval.every=20",
        ),
    )
    train(cfg)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["lm_loss"] for r in log if "lm_loss" in r]
    assert len(losses) == 8
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    loaded = load_codebook_model(out / "model")
    batch = torch.randint(2, 90, (2, 16))
    with torch.no_grad():
        cpu_out = loaded.model(batch, return_codes=True)
        loaded.model.to(CUDA)
        gpu_out = loaded.model(batch.to(CUDA), return_codes=True)
    for name, codes in cpu_out.codes.items():
        assert torch.equal(gpu_out.codes[name].cpu(), codes), name


def test_sampling_with_an_intervention_on_cuda_repeats_and_changes_the_samples(tmp_path):
    model_dir = save_tiny_codebook_model(tmp_path)
    loaded = load_codebook_model(model_dir)
    loaded.model.to(CUDA)
    plain = generate(loaded, ["In May", "the cat"], samples=3, max_new_tokens=12, seed=5)
    again = generate(loaded, ["In May", "the cat"], samples=3, max_new_tokens=12, seed=5)
    assert plain == again
    forced = Intervention(["layer1_mlp:3"], mode="append")
    steered = generate(
        loaded, ["In May", "the cat"], samples=3, max_new_tokens=12, seed=5, intervention=forced
    )
    assert steered != plain


def test_a_cache_built_on_cuda_equals_one_built_on_the_cpu(tmp_path):
    model_dir = save_tiny_codebook_model(tmp_path)
    cpu = load_codebook_model(model_dir)
    build_cache(cpu, WEB_DOCS, tmp_path / "cpu", corpus_name="t", seq_len=32)
    gpu = load_codebook_model(model_dir)
    gpu.model.to(CUDA)
    build_cache(gpu, WEB_DOCS, tmp_path / "gpu", corpus_name="t", seq_len=32)
    a, b = CodeCache.open(tmp_path / "cpu"), CodeCache.open(tmp_path / "gpu")
    assert a.num_tokens == b.num_tokens and list(a.codebooks) == list(b.codebooks)
    assert (a.token_ids == b.token_ids).all()
    for key in a.codebooks:
        assert (a.codes(key) == b.codes(key)).all(), key


def test_language_experiment_tiny_preset_runs_on_cuda(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": corpus_text(4, seed=i)}) + "\n" for i in range(400))
    )
    cfg = load_lm_config("tiny", [f"data.corpus={corpus}"])
    metrics = run(cfg, tmp_path / "run", log=lambda *_: None)
    for key in ("base.loss", "codebook.loss", "codebook.kl"):
        assert metrics[key] > 0
