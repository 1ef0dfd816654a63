#!/usr/bin/env bash
# Create the virtual environments of the peer implementations that benchmarks/peers.py
# compares against, under benchmarks/.peers/ (gitignored):
#
#   orig     - PyPI codebook-features==0.1.2 (the original codebook-features code)
#   vqtorch  - PyPI vector-quantize-pytorch (latest that installs next to torch 2.13.0)
#
# Every pip command pins torch==2.13.0 (the local CPU wheel) so that pip never swaps in
# a CUDA build. Idempotent: a venv that finished setting up (marker file .setup-done)
# is left alone; delete benchmarks/.peers/NAME to rebuild it.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
peers="$here/.peers"
torch_pin="torch==2.13.0"
mkdir -p "$peers"

make_venv() {  # make_venv NAME -> creates (or recreates, if half-done) the venv
    local dir="$peers/$1"
    rm -rf "$dir"
    python3 -m venv "$dir"
    "$dir/bin/python" -m pip install --quiet --upgrade pip "$torch_pin"
}

# --- orig: codebook-features 0.1.2 ---------------------------------------------------
# codebook-features and transformer-lens 1.7.0 pin old versions of many packages
# (and CUDA torch through them), so both go in with --no-deps, after a hand-picked set
# of dependencies with which `import codebook_features.models` works.
orig="$peers/orig"
if [[ -f "$orig/.setup-done" ]]; then
    echo "orig: already set up ($orig)"
else
    echo "orig: creating $orig"
    make_venv orig
    "$orig/bin/python" -m pip install --quiet "$torch_pin" \
        "transformers==4.40.2" "typeguard==2.13.3" "beartype<0.15" "plotly<6" \
        einops fancy-einsum jaxtyping datasets wandb rich pandas tqdm scikit-learn termcolor
    "$orig/bin/python" -m pip install --quiet --no-deps "$torch_pin" \
        "transformer-lens==1.7.0" "codebook-features==0.1.2"
    "$orig/bin/python" -c "import codebook_features.models"
    touch "$orig/.setup-done"
fi

# --- vqtorch: vector-quantize-pytorch ---------------------------------------------------
vq="$peers/vqtorch"
if [[ -f "$vq/.setup-done" ]]; then
    echo "vqtorch: already set up ($vq)"
else
    echo "vqtorch: creating $vq"
    make_venv vqtorch
    "$vq/bin/python" -m pip install --quiet "$torch_pin" vector-quantize-pytorch
    "$vq/bin/python" -c "import vector_quantize_pytorch"
    touch "$vq/.setup-done"
fi

for name in orig vqtorch; do
    echo "$name: torch $("$peers/$name/bin/python" -c 'import torch; print(torch.__version__)')"
done
"$orig/bin/python" -m pip show codebook-features | sed -n 's/^Version: /orig: codebook-features /p'
"$vq/bin/python" -m pip show vector-quantize-pytorch | sed -n 's/^Version: /vqtorch: vector-quantize-pytorch /p'
