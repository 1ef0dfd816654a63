"""Training metrics: the logging window, per-codebook statistics, held-out evaluation
of the codebook model and of its base (codebooks off), and the metrics log
(``OUTPUT/metrics.jsonl``, mirrored to W&B or TensorBoard when asked)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from codebook_lens.core.model import CodebookModel
from codebook_lens.training.config import TrainConfig, to_dict


@dataclass
class Window:
    """Running sums over one logging window."""

    steps: int = 0
    lm: float = 0.0
    rec: float = 0.0
    kl: float = 0.0
    tokens: int = 0
    seconds: float = 0.0

    def reset(self) -> None:
        self.steps, self.lm, self.rec, self.kl, self.tokens, self.seconds = 0, 0.0, 0.0, 0.0, 0, 0.0


def codebook_metrics(
    model: CodebookModel, usage_before: dict[str, torch.Tensor], mse: dict, var: dict
) -> dict:
    """Per site: reconstruction MSE, explained variance, dead-code fraction, usage perplexity."""
    out = {}
    for key, cb in model.codebooks.items():
        window = (cb.usage - usage_before[key]).double()  # (G, C) counts this window
        total = window.sum(-1, keepdim=True).clamp(min=1)
        p = window / total
        entropy = -(p * torch.log(p.clamp(min=1e-30))).sum(-1)
        m = sum(mse[key]) / max(1, len(mse[key]))
        v = sum(var[key]) / max(1, len(var[key]))
        out[key] = {
            "mse": m,
            "explained_variance": 1.0 - m / v if v > 0 else float("nan"),
            "dead_fraction": float((window == 0).double().mean()),
            "usage_perplexity": float(entropy.exp().mean()),
        }
    return out


@torch.no_grad()
def evaluate(model: CodebookModel, batches: list[torch.Tensor], device) -> dict:
    """LM loss and next-token accuracy of the codebook model and of the base model.

    Usage tracking is paused: evaluation must not count toward training usage or
    dead-code revival.
    """
    tracking = {k: cb.tracking for k, cb in model.codebooks.items()}
    model.track_usage(False)
    model.eval()
    sums = {"codebook": [0.0, 0, 0], "base": [0.0, 0, 0]}
    for batch in batches:
        batch = batch.to(device)
        for name in ("codebook", "base"):
            if name == "base":
                with model.codebooks_disabled():
                    out = model(batch, labels=batch)
            else:
                out = model(batch, labels=batch)
            n = batch[:, 1:].numel()
            pred = out.logits[:, :-1].argmax(-1)
            sums[name][0] += out.lm_loss.item() * n
            sums[name][1] += int((pred == batch[:, 1:]).sum())
            sums[name][2] += n
    model.train()
    for key, cb in model.codebooks.items():
        cb.track_usage(tracking[key])
    return {
        f"{name}.{metric}": value
        for name, (loss, correct, n) in sums.items()
        for metric, value in (("lm_loss", loss / n), ("accuracy", correct / n))
    }


class MetricsLog:
    """JSON lines on the main process, mirrored to W&B / TensorBoard when asked."""

    def __init__(self, path: Path, cfg: TrainConfig, main: bool, resume: bool) -> None:
        self.main = main
        self.path = path
        self.tb = self.wandb = None
        if not main:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if not resume and path.exists():
            path.unlink()
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tensorboard"))
        if cfg.logging.wandb:
            import wandb

            self.wandb = wandb.init(
                project="codebook-lens", config=to_dict(cfg), dir=str(path.parent)
            )

    def write(self, record: dict) -> None:
        if not self.main:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        flat = _flatten(record)
        step = record.get("step", 0)
        if self.tb is not None:
            for k, v in flat.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(flat, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out
