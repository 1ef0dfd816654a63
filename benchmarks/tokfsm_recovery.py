"""How a TokFSM model recovers from one slip: valid next-state mass after a forced jump.

Walks of the machine get one random state at state index ``--at``; the walk then goes
on validly from that state. Teacher-forced, the model's probability of valid next
states is measured at the jump and at each later state, next to the same walks
without the jump. A model that follows the machine from whatever state it reads
scores the same with and without; the mass right after the jump is what
``valid_mass_after_jump`` in a run's metrics reports.

    python benchmarks/tokfsm_recovery.py runs/tokfsm-cpu-final/base/model
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from codebook_lens.core.loading import load_codebook_model
from codebook_lens.data.fsm import FSM
from codebook_lens.experiments.tokfsm.run import walk_valid_mass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a TokFSM run's base/model or codebook/model directory")
    ap.add_argument("--walks", type=int, default=256)
    ap.add_argument("--at", type=int, default=10, help="state index of the jump")
    ap.add_argument("--after", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16])
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--fsm", default=None, help="the machine's JSON (default: the run's fsm.json)")
    ap.add_argument("--out", default=None, help="JSON file (default: benchmarks/…-latest.json)")
    args = ap.parse_args()

    loaded = load_codebook_model(args.model)
    model, fsm = loaded.model, loaded.fsm
    if args.fsm:
        fsm = FSM.load(args.fsm)
    if fsm is None:
        raise SystemExit(f"{args.model} is not a stage of a TokFSM run (no fsm.json); pass --fsm")
    length = args.at + max(args.after) + 1
    gen = torch.Generator().manual_seed(args.seed)
    jumps = torch.zeros(args.walks, length, dtype=torch.bool)
    jumps[:, args.at] = True
    walks = {"without jump": fsm.walks(args.walks, length, gen)}
    walks["with jump"] = fsm.walks(args.walks, length, gen, jumps)
    rows: dict[str, list[float]] = {}
    print(f"{'states after the jump':<22}" + "".join(f"{a:>9}" for a in args.after))
    for name, w in walks.items():
        rows[name] = [
            float(walk_valid_mass(model, fsm, w[:, : args.at + a + 1]).mean()) for a in args.after
        ]
        print(f"{name:<22}" + "".join(f"{100 * v:8.2f}%" for v in rows[name]), flush=True)
    out = Path(args.out or Path(__file__).with_name("tokfsm-recovery-latest.json"))
    out.write_text(
        json.dumps(
            {
                "model": args.model,
                "walks": args.walks,
                "at": args.at,
                "after": args.after,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"written {out}")


if __name__ == "__main__":
    main()
