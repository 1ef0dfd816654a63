"""`codebook demo` prints where its time went and the CPU it ran on (tiny override)."""

from __future__ import annotations

import json
import re

from codebook_lens.cli.main import main
from codebook_lens.core.cpu import cpu_info, describe_cpu

TINY = [
    "task.num_states=12",
    "task.out_degree=3",
    "task.seq_len=33",
    "net.layers=2",
    "net.hidden=32",
    "net.heads=2",
    "net.mlp=64",
    "base.steps=4",
    "base.batch_size=8",
    "base.eval_every=2",
    "codebook.steps=2",
    "codebook.batch_size=8",
    "codebook.eval_every=2",
    "codebook.attn_num_codes=16",
    "codebook.mlp_num_codes=32",
    "codebook.kmeans_tokens=256",
    "analysis.sequences=8",
    "analysis.sample_sequences=4",
    "analysis.eval_batches=1",
    "analysis.pairs=4",
    "analysis.prefix_states=3",
]


def test_demo_table_shows_stage_times_and_cpu_features(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("state accuracy") :]
    metrics = json.loads((out / "metrics.json").read_text())
    line = next(row for row in table.splitlines() if row.strip().startswith("time (min)"))
    match = re.search(
        r"base ([\d.]+), codebook ([\d.]+), measuring ([\d.]+); end to end ([\d.]+)", line
    )
    assert match, line
    base, codebook, measuring, total = (float(v) for v in match.groups())
    assert base == round(metrics["seconds.base"] / 60, 1)
    assert codebook == round(metrics["seconds.codebook"] / 60, 1)
    assert measuring == round(metrics["seconds.analysis"] / 60, 1)
    assert (
        total
        >= round(sum(metrics[f"seconds.{k}"] for k in ("base", "codebook", "analysis")) / 60, 1)
        - 0.1
    )
    cpu = next(row for row in table.splitlines() if row.strip().startswith("CPU"))
    assert cpu.strip().endswith(describe_cpu())
    info = cpu_info()
    for flag in info.features:
        assert flag in cpu
    assert info.kind in cpu
