"""Compare our codebook bottleneck with two peer implementations on the same shapes.

Run with our venv's Python, after ``bash benchmarks/setup_peers.sh``::

    python benchmarks/peers.py --json runs/peers.json          # full size (minutes)
    python benchmarks/peers.py --quick                          # smoke test

Peers (each in its own virtual environment under ``benchmarks/.peers/``):

orig     PyPI codebook-features 0.1.2, the original implementation (inner-product snapping,
         "aeloss": codes learn from the downstream gradient plus reconstruction).
vqtorch  PyPI vector-quantize-pytorch (cosine similarity, EMA codebook; top-k only with
         one head).

Shape cases (C = 10000 codes, N = ``--tokens`` tokens):

heads    16 groups x 64 dims, one codebook per group.
vanilla  one 768-dim codebook.

Each case is run at every k of ``--ks`` (8 and 1 by default; vqtorch has top-k only for
one head, so its heads row exists at k = 1 only). Every (implementation, case, k) runs in a
fresh process (``benchmarks/peer_worker.py``) with the same torch thread count, and is timed
with ``benchmarks/memtime.measure``: the forward with gradients enabled (as in training)
and the forward + backward step. Ratios are peer / ours at the same case and k, so a
ratio above 1 means ours is faster (or uses less memory).

Shared or virtualised CPUs make single timings noisy, so ``--rounds R`` repeats the whole
sweep R times, interleaved (the order of the implementations alternates between rounds),
and reports the median over every timed call of every round, and the largest peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS_DIR = HERE / ".peers"
WORKER = HERE / "peer_worker.py"
IMPLS = ("ours", "orig", "vqtorch")
CASES = ("heads", "vanilla")


def python_of(impl: str) -> Path:
    """The interpreter that runs ``impl``: ours runs in this venv, peers in theirs."""
    if impl == "ours":
        return Path(sys.executable)
    return PEERS_DIR / impl / "bin" / "python"


def tree_state() -> dict:
    """Which version of our code was measured: commit, and whether src/ had local edits."""

    def git(*cmd: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *cmd], cwd=HERE.parent, capture_output=True, text=True, check=True
            )
        except (OSError, subprocess.CalledProcessError):
            return None
        return out.stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "src_changes": git("status", "--porcelain", "--", "src"),
    }


def mem_available_mib() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


def default_threads() -> int:
    """The thread count torch picks by itself on this machine."""
    import torch

    return torch.get_num_threads()


def run_worker(impl: str, case: str, k: int, args: argparse.Namespace) -> dict:
    """One fresh worker process; returns its JSON record (or one describing its failure)."""
    cmd = [
        str(python_of(impl)),
        str(WORKER),
        f"--impl={impl}",
        f"--case={case}",
        f"--k={k}",
        f"--tokens={args.tokens}",
        f"--num-codes={args.num_codes}",
        f"--repeats={args.repeats}",
        f"--warmup={args.warmup}",
        f"--threads={args.threads}",
        f"--mem-limit-mib={args.mem_limit_mib:.0f}",
    ]
    base = {
        "impl": impl,
        "case": case,
        "k": k,
        "tokens": args.tokens,
        "command": cmd,
        "tree": tree_state(),  # our code may change between rounds while others work on it
    }
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timed out after {args.timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        record = json.loads(lines[-1])
        if record.get("error"):
            record["stderr_tail"] = proc.stderr[-2000:]
        return {**base, **record}
    if proc.returncode < 0:
        reason = f"killed by signal {-proc.returncode}"
        if proc.returncode == -9:
            reason += " (most likely the kernel's out-of-memory killer)"
    else:
        tail = proc.stderr.strip().splitlines()
        reason = f"exit status {proc.returncode}: {tail[-1] if tail else 'no output'}"
    return {**base, "error": reason, "stderr_tail": proc.stderr[-2000:]}


def combine_rounds(runs: list[dict]) -> dict:
    """One record from the records of several rounds of the same (impl, case, k)."""
    ok = [r for r in runs if r.get("forward_backward")]
    if not ok:
        return runs[-1] if len(runs) == 1 else {**runs[-1], "rounds": runs}
    record = {**ok[0], "rounds_ok": len(ok), "rounds_total": len(runs)}
    failed = [r.get("error") for r in runs if not r.get("forward_backward")]
    record["error"] = f"{len(failed)} round(s) failed: {failed[0]}" if failed else None
    for phase in ("forward", "forward_backward"):
        times = [t for r in ok for t in r[phase]["times_s"]]
        record[phase] = {
            "time_s": statistics.median(times),
            "times_s": times,
            "peak_extra_mib": max(r[phase]["peak_extra_mib"] for r in ok),
            "peaks_extra_mib": [r[phase]["peak_extra_mib"] for r in ok],
        }
    return record


# ----------------------------------------------------------------------------------------
# reporting


def _get(record: dict | None, phase: str, key: str) -> float | None:
    if not record or not record.get(phase):
        return None
    return record[phase][key]


def _ratio(peer: float | None, ours: float | None) -> float | None:
    if peer is None or ours is None or ours <= 0:
        return None
    return peer / ours


def add_ratios(records: list[dict]) -> None:
    """Attach the fastest call (``min_s``) and peer / ours ratios (same case and k)."""
    for r in records:
        for phase in ("forward", "forward_backward"):
            if r.get(phase):
                r[phase]["min_s"] = min(r[phase]["times_s"])
    ours = {(r["case"], r["k"]): r for r in records if r["impl"] == "ours"}
    for r in records:
        base = ours.get((r["case"], r["k"]))
        r["ratios"] = {
            f"{phase}_{key}": _ratio(_get(r, phase, key), _get(base, phase, key))
            for phase in ("forward", "forward_backward")
            for key in ("time_s", "min_s", "peak_extra_mib")
        }


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return format("-", ">" + spec.split(".")[0])  # same width as a number
    return format(value, spec)


# (header, phase, key, format) of the table's columns, after impl, case and k
COLUMNS = [
    ("fwd s", "forward", "time_s", "8.3f"),
    ("f+b s", "forward_backward", "time_s", "8.3f"),
    ("fwd min", "forward", "min_s", "8.3f"),
    ("f+b min", "forward_backward", "min_s", "8.3f"),
    ("fwd MiB", "forward", "peak_extra_mib", "8.0f"),
    ("f+b MiB", "forward_backward", "peak_extra_mib", "8.0f"),
]
RATIO_COLUMNS = [
    ("fwd x", "forward_time_s"),
    ("f+b x", "forward_backward_time_s"),
    ("fwdmin x", "forward_min_s"),
    ("f+bmin x", "forward_backward_min_s"),
    ("mem x", "forward_backward_peak_extra_mib"),
]


def print_table(records: list[dict]) -> None:
    header = f"{'impl':<8} {'case':<8} {'k':>2} " + " ".join(
        f"{name:>8}" for name, *_ in COLUMNS + RATIO_COLUMNS
    )
    print(header + "  status")
    print("-" * (len(header) + 8))
    for r in records:
        if r.get("unsupported"):
            status = "n/a: " + r["unsupported"]
        elif r.get("error"):
            status = "FAILED: " + r["error"]
        else:
            status = "ok"
        cells = [_fmt(_get(r, phase, key), spec) for _, phase, key, spec in COLUMNS]
        cells += [_fmt(r.get("ratios", {}).get(key), "8.2f") for _, key in RATIO_COLUMNS]
        print(f"{r['impl']:<8} {r['case']:<8} {r['k']:>2} " + " ".join(cells) + f"  {status}")
    print(
        "\nfwd = forward with gradients enabled; f+b = forward + backward. s: median over the "
        "timed calls; min: fastest call (least disturbed by other load). MiB: peak extra "
        "resident memory of one call. x: peer / ours at the same case and k (> 1: ours is "
        "faster or smaller; mem x compares f+b MiB)."
    )
    calls = {}
    notes: list[str] = []
    for r in records:
        if r.get("call"):
            calls.setdefault((r["impl"], r["case"], r["k"]), r["call"])
        for note in r.get("notes") or []:
            if note not in notes:
                notes.append(note)
    print("\nconfigurations:")
    for (impl, case, k), call in calls.items():
        print(f"  {impl:<8} {case:<8} k={k}: {call}")
    if notes:
        print("\nnotes:")
        for note in notes:
            print(f"  - {note}")


# ----------------------------------------------------------------------------------------


def _csv(text: str, kind=str) -> list:
    return [kind(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=None, help="tokens N (default 8192)")
    parser.add_argument("--num-codes", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 3)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--rounds", type=int, default=1, help="times to repeat the whole sweep, interleaved"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 1024 tokens and 1 repeat by default"
    )
    parser.add_argument("--cases", type=_csv, default=list(CASES), help="comma-separated")
    parser.add_argument("--ks", type=lambda s: _csv(s, int), default=[8, 1], help="e.g. 8,1")
    parser.add_argument("--impls", type=_csv, default=list(IMPLS), help="comma-separated")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's default")
    parser.add_argument(
        "--mem-limit-mib",
        type=float,
        default=None,
        help="address space a worker may add (default: 90%% of MemAvailable at start)",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per worker")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.tokens is None:
        args.tokens = 1024 if args.quick else 8192
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.threads is None:
        args.threads = default_threads()
    if args.mem_limit_mib is None:
        args.mem_limit_mib = 0.9 * mem_available_mib()
    for name in args.impls:
        if name not in IMPLS:
            parser.error(f"unknown implementation {name!r}; known: {', '.join(IMPLS)}")
    for name in args.cases:
        if name not in CASES:
            parser.error(f"unknown case {name!r}; known: {', '.join(CASES)}")
    if "ours" not in args.impls:
        args.impls.insert(0, "ours")  # the ratios need it
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [impl for impl in args.impls if not python_of(impl).exists()]
    for impl in missing:
        print(
            f"peer environment {PEERS_DIR / impl} is missing: run `bash benchmarks/setup_peers.sh`"
            f" first (skipping {impl})",
            file=sys.stderr,
        )
    print(
        f"N={args.tokens} tokens, C={args.num_codes} codes, rounds={args.rounds}, "
        f"repeats={args.repeats}, "
        f"warmup={args.warmup}, torch threads={args.threads}, "
        f"worker memory cap={args.mem_limit_mib:.0f} MiB",
        flush=True,
    )
    runs: dict[tuple[str, int, str], list[dict]] = {}
    for rnd in range(args.rounds):
        if args.rounds > 1:
            print(f"round {rnd + 1}/{args.rounds}", flush=True)
        order = args.impls if rnd % 2 == 0 else args.impls[::-1]
        for case in args.cases:
            for k in args.ks:
                for impl in order:
                    key = (case, k, impl)
                    if impl in missing:
                        runs[key] = [
                            {
                                "impl": impl,
                                "case": case,
                                "k": k,
                                "tokens": args.tokens,
                                "error": "environment missing: run bash benchmarks/setup_peers.sh",
                            }
                        ]
                        continue
                    if runs.get(key) and runs[key][-1].get("unsupported"):
                        continue  # no need to ask again
                    start = time.perf_counter()
                    record = run_worker(impl, case, k, args)
                    status = record.get("error") or record.get("unsupported") or "ok"
                    print(
                        f"  {impl:<8} {case:<8} k={k}: {status} "
                        f"({time.perf_counter() - start:.0f} s)",
                        flush=True,
                    )
                    runs.setdefault(key, []).append(record)
    records = [
        combine_rounds(runs[(case, k, impl)])
        for case in args.cases
        for k in args.ks
        for impl in args.impls
    ]
    add_ratios(records)
    print()
    print_table(records)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "settings": {
                key: (str(val) if isinstance(val, Path) else val) for key, val in vars(args).items()
            },
            "machine": {
                "platform": platform.platform(),
                "cpu_count": os.cpu_count(),
                "processor": platform.processor(),
            },
            "tree": tree_state(),
            "results": records,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
