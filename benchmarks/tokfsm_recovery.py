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

from codebook_lens.fsm import FSM
from codebook_lens.fsm_analysis import next_state_distribution
from codebook_lens.model import CodebookModel


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

    run = Path(args.model).resolve().parent.parent
    fsm_path = Path(args.fsm) if args.fsm else run / "fsm.json"
    if not fsm_path.is_file():
        raise SystemExit(f"no machine for {args.model}: {fsm_path} is missing (pass --fsm)")
    fsm = FSM.load(fsm_path)
    base = CodebookModel.from_pretrained(run / "base" / "model").eval()
    if Path(args.model).resolve() == (run / "base" / "model").resolve():
        model = base
    else:  # a codebook stage saved on a frozen base: its codes load onto the base
        model = CodebookModel.from_pretrained(args.model, base_model=base.model).eval()
    length = args.at + max(args.after) + 1
    gen = torch.Generator().manual_seed(args.seed)
    jumps = torch.zeros(args.walks, length, dtype=torch.bool)
    jumps[:, args.at] = True
    walks = {"without jump": fsm.walks(args.walks, length, gen)}
    walks["with jump"] = fsm.walks(args.walks, length, gen, jumps)
    adj = fsm.adjacency().float()
    rows: dict[str, list[float]] = {}
    print(f"{'states after the jump':<22}" + "".join(f"{a:>9}" for a in args.after))
    with torch.no_grad():
        for name, w in walks.items():
            rows[name] = []
            for a in args.after:
                end = args.at + a
                prefix = torch.cat(
                    [torch.full((args.walks, 1), fsm.bos), fsm.encode_states(w[:, : end + 1])], 1
                )
                p = next_state_distribution(model, fsm, prefix)
                rows[name].append(float((p * adj[w[:, end]]).sum(1).mean()))
            print(f"{name:<22}" + "".join(f"{100 * v:8.2f}%" for v in rows[name]), flush=True)
    out = Path(args.out or Path(__file__).with_name("tokfsm-recovery-latest.json"))
    out.write_text(
        json.dumps(
            {"model": args.model, "walks": args.walks, "at": args.at, "after": args.after, "rows": rows},
            indent=2,
        )
    )
    print(f"written {out}")


if __name__ == "__main__":
    main()
