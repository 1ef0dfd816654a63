"""What each codebook of a TokFSM codebook model costs the model.

Each codebook (and the groups all, MLP, attention) is switched on alone, the others
pass their input through; for each setting the teacher-forced valid transition mass
and the state accuracy of sequences sampled from BOS are measured (the same samples'
seed for every setting).

    python benchmarks/tokfsm_codebook_costs.py runs/tokfsm-cpu12k/codebook/model
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from codebook_lens.core.loading import load_codebook_model
from codebook_lens.experiments.tokfsm.run import valid_transition_mass
from codebook_lens.experiments.tokfsm.task import state_metrics


class PassThrough(nn.Module):
    """Stands in for a codebook that is switched off: its output is its input."""

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        zero = x.new_zeros(())
        return SimpleNamespace(output=x, loss=zero, mse=zero, variance=zero, codes=None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a TokFSM run's codebook/model directory")
    ap.add_argument("--samples", type=int, default=0, help="sampled sequences per setting")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--seq-len", type=int, default=128, help="the run's task.seq_len")
    ap.add_argument("--out", default=None, help="JSON file (default: benchmarks/…-latest.json)")
    args = ap.parse_args()

    loaded = load_codebook_model(args.model)
    model, fsm = loaded.model, loaded.fsm
    if fsm is None:
        raise SystemExit(f"{args.model} is not a TokFSM codebook model")
    seq_len = args.seq_len
    keys = list(model.codebooks)
    real = {k: model.codebooks[k] for k in keys}
    settings = {
        "none": [],
        "all": keys,
        "mlp": [k for k in keys if k.endswith("_mlp")],
        "attention": [k for k in keys if not k.endswith("_mlp")],
        **{k: [k] for k in keys},
    }
    rows = {}
    print(
        f"{'codebooks on':<22}{'valid mass':>12}" + (f"{'state acc':>12}" if args.samples else "")
    )
    with torch.no_grad():
        for name, on in settings.items():
            for k in keys:
                model.codebooks[k] = real[k] if k in on else PassThrough()
            mass = valid_transition_mass(model, fsm, seq_len)
            rows[name] = {"valid_mass": mass}
            line = f"{name:<22}{100 * mass:11.2f}%"
            if args.samples:
                acc = state_metrics(model, fsm, args.samples, seq_len, seed=args.seed)
                rows[name]["state_accuracy"] = acc["state_accuracy"]
                line += f"{100 * acc['state_accuracy']:11.2f}%"
            print(line, flush=True)
    for k in keys:
        model.codebooks[k] = real[k]
    out = Path(args.out or Path(__file__).with_name("tokfsm-codebook-costs-latest.json"))
    out.write_text(
        json.dumps({"model": args.model, "samples": args.samples, "rows": rows}, indent=2)
    )
    print(f"written {out}")


if __name__ == "__main__":
    main()
