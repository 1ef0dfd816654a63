"""The training loop: finetune a causal LM with codebooks (one process or many).

    codebook train CONFIG.yaml [key=value ...] [--resume]

Loss = LM cross-entropy + the codebooks' reconstruction loss (+ optionally the KL
divergence from the base model's next-token distribution). The optimiser, its schedule
and which parameters train when are in :mod:`codebook_lens.training.optim`. Runs under
``accelerate launch`` / ``torchrun`` as well as alone: usage statistics are
all-reduced and revived codes broadcast from rank 0, so every rank holds identical
codebooks. Metrics go to ``OUTPUT/metrics.jsonl`` (and W&B / TensorBoard when
asked); checkpoints to ``OUTPUT/checkpoints`` (atomic); the final model to
``OUTPUT/model``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from codebook_lens.core import sites as S
from codebook_lens.core.errors import CodebookLensError
from codebook_lens.core.files import check_output_dir
from codebook_lens.core.model import CodebookModel, CodebookModelConfig
from codebook_lens.data.assets import smollm2_dir
from codebook_lens.data.documents import Blocks, DataError, iter_documents, tokenize_documents
from codebook_lens.training import checkpoint as ckpt
from codebook_lens.training.config import TrainConfig, to_dict
from codebook_lens.training.metrics import MetricsLog, Window, codebook_metrics, evaluate
from codebook_lens.training.optim import lr_lambdas, make_optimizer, set_network_trainable


class TrainError(CodebookLensError):
    """A training setup that cannot work; the message says why."""


# ----------------------------------------------------------------------------------------
# setup


def resolve_model_path(path: str) -> str:
    """``smollm2-135m`` (the offline asset) as its local directory; other paths unchanged."""
    return str(smollm2_dir()) if path == "smollm2-135m" else path


def load_base(path: str, dtype: str = "float32"):
    """(model, tokenizer) from ``smollm2-135m`` (the offline asset) or a local directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    path = resolve_model_path(path)
    directory = Path(path)
    if not directory.is_dir():
        raise TrainError(f"model directory {path} does not exist (or use model.path=smollm2-135m)")
    if not (directory / "config.json").is_file():
        raise TrainError(f"{path} is not a transformers model directory: config.json is missing")
    config = AutoConfig.from_pretrained(path)
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        raise TrainError(
            f"{path} is not a causal language model (architectures: {', '.join(archs)})"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except ValueError as err:
        raise TrainError(f"{path} cannot be loaded as a causal language model: {err}") from None
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def build_model(cfg: TrainConfig, base) -> CodebookModel:
    """The codebook model of ``cfg.codebooks.sites`` (checked when the config was built)
    around ``base``."""
    return CodebookModel(base, CodebookModelConfig(list(cfg.codebooks.sites)))


@torch.no_grad()
def kmeans_init(
    model: CodebookModel, blocks: Blocks, tokens: int, batch_size: int, seed: int
) -> None:
    """Initialise every codebook to k-means centroids of its site's activations.

    Activations are collected with the codebooks off (the base model's own
    activations) from the first ``tokens`` tokens of the training stream.
    """
    samples: dict[str, list[torch.Tensor]] = {k: [] for k in model.codebooks}
    handles = []
    for key, (site, layer) in model.placement.items():

        def grab(x, key=key):
            samples[key].append(x.detach().reshape(-1, x.shape[-1]).float().cpu())

        handles.append(S.attach(model.model, site, layer, grab))
    try:
        with model.codebooks_disabled():
            seen, index = 0, 0
            while seen < tokens:
                batch, _ = _inputs_and_labels(blocks.batch(seed + 7919, index, batch_size))
                model(batch.to(next(model.parameters()).device))
                seen += batch.numel()
                index += 1
    finally:
        for h in handles:
            h.remove()
    gen = torch.Generator().manual_seed(seed)
    for key, cb in tqdm(model.codebooks.items(), desc="k-means init", leave=False):
        cb.kmeans_init_(torch.cat(samples[key])[:tokens].to(cb.weight.device), generator=gen)


def distill_loss(
    logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over predicted positions of KL(teacher || model) between next-token
    distributions: ``sum_v p_t(v) (log p_t(v) - log p(v))``. Positions whose next label
    is -100 (masked out of the LM loss) are left out here too; the last position, which
    predicts nothing, is always left out."""
    dtype = torch.promote_types(logits.dtype, torch.float32)  # at least float32
    student = logits[:, :-1].to(dtype).log_softmax(-1)
    target = teacher[:, :-1].to(dtype).log_softmax(-1)
    per_token = (target.exp() * (target - student)).sum(-1)
    if labels is not None:
        keep = labels[:, 1:] != -100
        return per_token[keep].sum() / keep.sum().clamp(min=1)
    return per_token.mean()


# ----------------------------------------------------------------------------------------
# distributed helpers


class UsageSync:
    """Keeps every rank's usage statistics identical and revives dead codes identically.

    After each optimizer step: usage counts of the step are summed over ranks, the
    "used this step" flags are OR-ed, idle counters advance, dead codes are re-seeded
    with a generator seeded by the step, and the revived weights are broadcast from
    rank 0 (whose recent inputs seeded them). With one process these are no-ops
    around :meth:`Codebook.step_idle` and :meth:`Codebook.revive_dead_codes`.
    """

    def __init__(self, model: CodebookModel, world: int) -> None:
        self.model = model
        self.world = world
        self.synced = {k: cb.usage.clone() for k, cb in model.codebooks.items()}

    @torch.no_grad()
    def after_step(self, cfg: TrainConfig, optimizer, step: int) -> int:
        revived = 0
        gen = torch.Generator().manual_seed(cfg.schedule.seed * 7_777_777 + step)
        for key, cb in self.model.codebooks.items():
            if self.world > 1:
                delta = cb.usage - self.synced[key]
                dist.all_reduce(delta)
                cb.usage.copy_(self.synced[key] + delta)
                used = cb._used.to(torch.int32)
                dist.all_reduce(used, op=dist.ReduceOp.MAX)
                cb._used.copy_(used.bool())
            self.synced[key] = cb.usage.clone()
            cb.step_idle()
            if cfg.codebooks.revive_after_steps:
                count = cb.revive_dead_codes(
                    cfg.codebooks.revive_after_steps, optimizer, generator=gen
                )
                if count and self.world > 1:
                    dist.broadcast(cb.weight.data, src=0)
                revived += count
        return revived

    @torch.no_grad()
    def check_identical(self) -> bool:
        """True when every rank holds the same codebooks and statistics (checked by sums)."""
        if self.world == 1:
            return True
        parts = []
        for cb in self.model.codebooks.values():
            parts += [
                cb.weight.double().sum(),
                (cb.weight.double() ** 2).sum(),
                cb.usage.double().sum(),
                (cb.usage.double() * torch.arange(cb.usage.numel()).view_as(cb.usage)).sum(),
                cb.idle_steps.double().sum(),
            ]
        mine = torch.stack(parts)
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine)
        return all(torch.equal(g, gathered[0]) for g in gathered)


# ----------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainData:
    """Where batches come from: ``train`` and ``eval`` each have ``batch(seed, index,
    batch_size)``, ``first(count, batch_size)`` and ``len()`` (see :class:`Blocks`)."""

    train: Any
    eval: Any


def train(
    cfg: TrainConfig,
    resume: bool = False,
    stop_at_step: int | None = None,
    *,
    base=None,
    tokenizer=None,
    data: TrainData | None = None,
    desc: str = "training",
    source: dict | None = None,
) -> dict:
    """Run training as configured; returns the last eval metrics (and the output paths).

    By default the base model comes from ``cfg.model.path`` and the text from
    ``cfg.data.corpus``; a caller can hand in its own ``base`` model (and
    ``tokenizer``, saved with the model when given) and its own ``data`` source
    instead (the TokFSM experiment does both). With ``cfg.codebooks.sites`` empty
    the base model trains alone. ``stop_at_step`` ends the run right after that
    step's checkpoint, as an interruption would (used to test resuming). ``source``
    is the saved model's loading record (see ``CodebookModel.save_pretrained``); by
    default a frozen base is recorded by its resolved local path.

    A run never mixes with another: a fresh run refuses an ``output_dir`` that holds
    checkpoints, and ``resume`` refuses checkpoints written with other settings (see
    :func:`codebook_lens.training.checkpoint.check_run`) or past ``max_steps``, and
    falls back from a damaged newest checkpoint to the newest complete one. All of this
    is checked before the base model loads.
    """
    check_output_dir(cfg.output_dir, "output_dir")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    mp = cfg.schedule.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # buffers (usage statistics) are synchronised by UsageSync, not broadcast by DDP
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    # each run sets its own precision: accelerate keeps the first run's settings for the
    # whole process and refuses a later run's others (the process group stays)
    AcceleratorState._reset_state()
    # without a GPU, run on the CPU (several CPU processes then use gloo)
    accelerator = Accelerator(
        mixed_precision=mp, kwargs_handlers=[ddp], cpu=not torch.cuda.is_available()
    )
    world, main = accelerator.num_processes, accelerator.is_main_process
    ckpt_root = Path(cfg.output_dir) / "checkpoints"
    existing = ckpt.resumable(
        ckpt_root, ckpt.run_record(to_dict(cfg)), resume, cfg.schedule.max_steps
    )
    set_seed(cfg.schedule.seed)

    source = dict(source or {})
    if base is None:
        base, tokenizer = load_base(cfg.model.path, cfg.model.dtype)
        source.setdefault("base", str(Path(resolve_model_path(cfg.model.path)).resolve()))
    if cfg.optim.freeze_base_steps and world > 1:
        raise TrainError(
            "optim.freeze_base_steps is not supported across processes (DDP fixes the "
            "trainable parameters when it wraps the model); run on one process"
        )
    # the teacher of distillation: the frozen network run without codebooks, or a frozen
    # copy of the base when the network trains
    teacher = None
    if cfg.optim.distill_weight > 0 and not cfg.optim.freeze_base:
        teacher = copy.deepcopy(base).eval().to(accelerator.device)
        teacher.requires_grad_(False)
    model = build_model(cfg, base)
    seq = cfg.data.seq_len
    max_pos = getattr(base.config, "max_position_embeddings", None)
    if max_pos is not None and seq > max_pos:
        raise TrainError(
            f"data.seq_len={seq} exceeds the model's max_position_embeddings={max_pos}"
        )
    if data is None:
        data = _corpus_data(cfg, tokenizer)
    train_blocks, eval_blocks = data.train, data.eval
    per_step = cfg.schedule.batch_size * world
    if len(train_blocks) < per_step:
        raise TrainError(
            f"the training corpus has {len(train_blocks)} blocks of {seq} tokens, fewer than one "
            f"batch ({cfg.schedule.batch_size} x {world} process(es))"
        )

    start_step = 0
    # on the training device already for the k-means init: its forward passes and its
    # k-means (C codes x kmeans_tokens per codebook) would otherwise run on the CPU
    model.to(accelerator.device)
    if cfg.codebooks.kmeans_init and model.codebooks and not (resume and existing):
        kmeans_init(
            model,
            train_blocks,
            cfg.codebooks.kmeans_tokens,
            cfg.schedule.batch_size,
            cfg.schedule.seed,
        )
    model.track_usage(True)
    if not model.codebooks and cfg.optim.freeze_base:
        raise TrainError("nothing to train: no codebook sites and optim.freeze_base is true")
    optimizer = make_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambdas(cfg, optimizer))
    if resume and existing:
        path, start_step = ckpt.restore(
            existing, model, optimizer, scheduler, print if main else lambda _: None
        )
        if main:
            print(f"resuming from {path} at step {start_step}")
    elif resume and main:
        print(f"no checkpoint in {ckpt_root}; starting from scratch")
    return _loop(
        cfg,
        accelerator,
        model,
        optimizer,
        scheduler,
        train_blocks,
        eval_blocks,
        tokenizer,
        start_step,
        resume and bool(existing),
        stop_at_step,
        desc,
        source,
        teacher,
    )


def _corpus_data(cfg: TrainConfig, tokenizer) -> TrainData:
    """Training and eval blocks from the configured text corpus."""
    seq = cfg.data.seq_len
    try:
        train_tokens = tokenize_documents(
            iter_documents(cfg.data.corpus, "train", cfg.data.text_field, cfg.data.eval_fraction),
            tokenizer,
            cfg.data.max_train_tokens,
            desc="tokenizing train",
        )
        eval_tokens = tokenize_documents(
            iter_documents(cfg.data.corpus, "eval", cfg.data.text_field, cfg.data.eval_fraction),
            tokenizer,
            None,
            desc="tokenizing eval",
        )
        return TrainData(
            Blocks(train_tokens, seq, "training corpus"), Blocks(eval_tokens, seq, "eval split")
        )
    except DataError as err:
        raise TrainError(str(err)) from None


def _loop(
    cfg,
    accelerator,
    model,
    optimizer,
    scheduler,
    train_blocks,
    eval_blocks,
    tokenizer,
    start_step,
    resumed,
    stop_at_step,
    desc,
    source,
    teacher=None,
) -> dict:
    """The optimisation loop proper (after setup and any resume). ``teacher``: the
    distillation teacher when it is not the model itself with its codebooks off."""
    world, rank, main = (
        accelerator.num_processes,
        accelerator.process_index,
        accelerator.is_main_process,
    )
    out_dir = Path(cfg.output_dir)
    ckpt_root = out_dir / "checkpoints"
    seq = cfg.data.seq_len
    per_step = cfg.schedule.batch_size * world
    model, optimizer = accelerator.prepare(model, optimizer)
    raw: CodebookModel = accelerator.unwrap_model(model)
    usage_sync = UsageSync(raw, world)
    device = accelerator.device
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    log = MetricsLog(out_dir / "metrics.jsonl", cfg, main, resumed)
    eval_batches = eval_blocks.first(cfg.eval.batches, cfg.schedule.batch_size)

    accum = cfg.schedule.grad_accum
    distill = cfg.optim.distill_weight > 0
    window = Window()
    usage_before = {k: cb.usage.clone() for k, cb in raw.codebooks.items()}
    mse: dict[str, list[float]] = {k: [] for k in raw.codebooks}
    var: dict[str, list[float]] = {k: [] for k in raw.codebooks}
    last_eval: dict = {}
    model.train()
    bar = tqdm(
        range(start_step, cfg.schedule.max_steps),
        initial=start_step,
        total=cfg.schedule.max_steps,
        desc=desc,
        unit="step",
        disable=not main,
    )
    for step in bar:
        t0 = time.perf_counter()
        if cfg.optim.freeze_base_steps and step in (start_step, cfg.optim.freeze_base_steps):
            set_network_trainable(raw, cfg, step)  # where a run (or its resume) starts or thaws
        for micro in range(accum):
            index = (step * accum + micro) * world + rank
            batch, labels = _inputs_and_labels(
                train_blocks.batch(cfg.schedule.seed, index, cfg.schedule.batch_size)
            )
            batch, labels = batch.to(device), labels.to(device)
            sync = micro == accum - 1
            ctx = accelerator.no_sync(model) if not sync and world > 1 else contextlib.nullcontext()
            with ctx, accelerator.autocast():
                if distill:
                    with torch.no_grad(), raw.codebooks_disabled():
                        if teacher is None:
                            target = model(batch, return_codes=False).logits
                        else:
                            target = teacher(batch).logits
                out = model(batch, labels=labels, return_codes=False)
                loss = out.reconstruction_loss + cfg.optim.lm_weight * out.lm_loss
                if distill:
                    kl = distill_loss(out.logits, target, labels)
                    loss = loss + cfg.optim.distill_weight * kl
                    window.kl += kl.item() / accum
                loss = loss / accum
            accelerator.backward(loss)
            window.lm += out.lm_loss.item() / accum
            window.rec += out.reconstruction_loss.item() / accum
            for key, value in out.site_mse.items():
                mse[key].append(value.item())
                var[key].append(out.site_var[key].item())
        if cfg.optim.grad_clip:
            accelerator.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], cfg.optim.grad_clip
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        revived = usage_sync.after_step(cfg, optimizer, step)
        window.steps += 1
        window.tokens += accum * per_step * seq
        window.seconds += time.perf_counter() - t0
        done = step + 1
        if main:
            shown = {"lm": out.lm_loss.item(), "rec": out.reconstruction_loss.item()}
            if distill:
                shown["kl"] = kl.item()
            bar.set_postfix(
                **{name: f"{value:.3f}" for name, value in shown.items()},
                tok_s=f"{window.tokens / max(window.seconds, 1e-9):.0f}",
            )
        if done % cfg.logging.every == 0 or done == cfg.schedule.max_steps:
            record = {
                "step": done,
                "lm_loss": window.lm / window.steps,
                "reconstruction_loss": window.rec / window.steps,
                **({"distill_kl": window.kl / window.steps} if distill else {}),
                "tokens_per_s": window.tokens / max(window.seconds, 1e-9),
                **{g["name"]: g["lr"] for g in optimizer.param_groups},
                "revived": revived,
                "sites": codebook_metrics(raw, usage_before, mse, var),
            }
            log.write(record)
            window.reset()
            usage_before = {k: cb.usage.clone() for k, cb in raw.codebooks.items()}
            mse = {k: [] for k in raw.codebooks}
            var = {k: [] for k in raw.codebooks}
        if done % cfg.eval.every == 0 or done == cfg.schedule.max_steps:
            last_eval = evaluate(raw, eval_batches, device)
            log.write({"step": done, "eval": last_eval})
        if (
            done % cfg.checkpoint.every == 0
            or done == cfg.schedule.max_steps
            or done == stop_at_step
        ):
            accelerator.wait_for_everyone()
            if main:
                ckpt.write_checkpoint(
                    ckpt_root,
                    done,
                    _trainable_state(raw, cfg),
                    optimizer,
                    scheduler,
                    cfg.checkpoint.keep,
                    ckpt.run_record(to_dict(cfg)),
                )
            accelerator.wait_for_everyone()
        if stop_at_step is not None and done >= stop_at_step:
            log.close()
            return {"stopped_at": done, **last_eval}
    identical = usage_sync.check_identical()
    if not identical:
        raise RuntimeError("ranks ended with different codebooks; usage synchronisation failed")
    if main:
        log.write(
            {"step": cfg.schedule.max_steps, "processes": world, "ranks_identical": identical}
        )
        raw.save_pretrained(
            out_dir / "model", include_base=not cfg.optim.freeze_base, source=source
        )
        if not cfg.optim.freeze_base and tokenizer is not None:
            tokenizer.save_pretrained(str(out_dir / "model" / "base"))
    log.close()
    accelerator.wait_for_everyone()
    return {"output_dir": str(out_dir), "processes": world, **last_eval}


def _inputs_and_labels(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """A data source gives input ids (their own labels) or (input_ids, labels), e.g. with
    some targets masked to -100."""
    return batch if isinstance(batch, tuple) else (batch, batch)


def _trainable_state(model: CodebookModel, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold: codebooks (+ buffers), and the base unless frozen.

    Tied weights are stored once (safetensors refuses shared storage).
    """
    state = model.state_dict()
    if cfg.optim.freeze_base:
        state = {k: v for k, v in state.items() if k.startswith("codebooks.")}
    seen: set[int] = set()
    unique = {}
    for k, v in state.items():
        ptr = v.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        unique[k] = v
    return unique
