#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run, each logged under OUT:
#   tests  the GPU tests (tests/gpu: the CPU's codes, outputs and gradients on CUDA,
#          bf16 training, sampling, a code cache, the language experiment's tiny preset)
#          and the bottleneck's cost on CUDA (benchmarks/snap.py --device cuda);
#   train  TRAIN_SECONDS of the paper-scale training config (configs/paper-gpu.yaml:
#          codebooks of 10,000 codes on every attention head of SmolLM2-135M), evaluated
#          every 250 steps, stopped at the time limit.
#
#   bash benchmarks/gpu_check.sh OUT [tests|train|all] [TRAIN_SECONDS]
#
# Results: OUT/gpu-tests.log, OUT/snap-cuda.json and .log, OUT/paper-gpu/metrics.jsonl
# and OUT/paper-gpu-train.log; docs/benchmarks.md records them. The GPU tests are
# skipped, not failed, on a machine without CUDA; this script refuses to run there.
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT [tests|train|all] [TRAIN_SECONDS]}
what=${2:-all}
secs=${3:-240}
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if ! "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check.sh: PyTorch sees no CUDA GPU here" >&2
    exit 2
fi
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.txt" 2>&1 || true
status=0
if [[ $what == tests || $what == all ]]; then
    "$python" -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$out/gpu-tests.log" || status=1
    "$python" benchmarks/snap.py --device cuda --tokens 32768 --json "$out/snap-cuda.json" 2>&1 |
        tee "$out/snap-cuda.log" || status=1
fi
if [[ $what == train || $what == all ]]; then
    timeout -s INT "$secs" "$python" -m codebook_lens.cli train configs/paper-gpu.yaml \
        output_dir="$out/paper-gpu" eval.every=250 eval.batches=10 checkpoint.every=100000 2>&1 |
        tee "$out/paper-gpu-train.log"
    rc=${PIPESTATUS[0]}
    # 124: stopped at the time limit (SIGINT), as planned
    [[ $rc == 0 || $rc == 124 || $rc == 130 ]] || status=1
fi
exit $status
