"""The optimiser of the training loop, its learning-rate schedule, and which parameters
train when: the codes (group ``codebook_lr``) and the network under them (group ``lr``),
frozen for good (``optim.freeze_base``) or for the first ``optim.freeze_base_steps``,
its input token embeddings frozen throughout with ``optim.freeze_embeddings``.
"""

from __future__ import annotations

import math

import torch

from codebook_lens.core.model import CodebookModel
from codebook_lens.training.config import TrainConfig


def lr_lambda(cfg: TrainConfig, delay: int = 0):
    """The learning-rate factor of a step: linear warmup, then the configured decay to the
    last step. With a ``delay`` the factor is 0 for the first ``delay`` steps and the
    schedule runs over the steps after them."""
    warm, kind = cfg.schedule.warmup_steps, cfg.schedule.scheduler
    total = cfg.schedule.max_steps - delay

    def factor(step: int) -> float:
        step -= delay
        if step < 0:
            return 0.0
        if step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return factor


def lr_lambdas(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> list:
    """One factor per parameter group of :func:`make_optimizer`: the network's (``lr``)
    starts after ``optim.freeze_base_steps``."""
    delay = cfg.optim.freeze_base_steps
    return [lr_lambda(cfg, delay if g["name"] == "lr" else 0) for g in optimizer.param_groups]


def embedding_params(model: CodebookModel) -> list[torch.nn.Parameter]:
    """The network's input token embeddings (also its output ones when the two are tied)."""
    module = model.model.get_input_embeddings()
    return [module.weight] if module is not None else []


def network_params(model: CodebookModel, cfg: TrainConfig) -> list[torch.nn.Parameter]:
    """The parameters of the network under the codebooks that may train: without the
    input token embeddings when ``cfg.optim.freeze_embeddings``."""
    skip = {id(p) for p in model.codebooks.parameters()}
    if cfg.optim.freeze_embeddings:
        skip |= {id(p) for p in embedding_params(model)}
    return [p for p in model.parameters() if id(p) not in skip]


def freeze_embeddings(model: CodebookModel, cfg: TrainConfig) -> None:
    """With ``optim.freeze_embeddings``, the input token embeddings get no gradient."""
    if cfg.optim.freeze_embeddings:
        for p in embedding_params(model):
            p.requires_grad_(False)


def set_network_trainable(model: CodebookModel, cfg: TrainConfig, step: int) -> None:
    """Freeze the network before ``optim.freeze_base_steps`` (or for good with
    ``optim.freeze_base``), train it after: frozen weights get no gradient, so the
    optimiser leaves them and their moments alone."""
    trainable = not cfg.optim.freeze_base and step >= cfg.optim.freeze_base_steps
    for p in network_params(model, cfg):
        p.requires_grad_(trainable)


def make_optimizer(cfg: TrainConfig, model: CodebookModel) -> torch.optim.Optimizer:
    """AdamW over the codes (``codebook_lr``, no weight decay) and, unless it is frozen
    for good, the network (``lr``); the network starts frozen when it is to be frozen."""
    code_params = list(model.codebooks.parameters())
    base_params = network_params(model, cfg)
    freeze_embeddings(model, cfg)
    if cfg.optim.freeze_base or cfg.optim.freeze_base_steps:
        set_network_trainable(model, cfg, 0)
    groups = []
    if code_params:
        groups.append(
            {
                "params": code_params,
                "lr": cfg.optim.codebook_lr,
                "weight_decay": 0.0,
                "name": "codebook_lr",
            }
        )
    if not cfg.optim.freeze_base:
        groups.append(
            {
                "params": base_params,
                "lr": cfg.optim.lr,
                "weight_decay": cfg.optim.weight_decay,
                "name": "lr",
            }
        )
    return torch.optim.AdamW(groups, betas=tuple(cfg.optim.betas))
