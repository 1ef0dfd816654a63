"""Time one codebook implementation on one shape, in its own process; print one JSON line.

Started by ``benchmarks/peers.py`` with the Python of the environment that holds the
implementation (our venv for ``ours``, ``benchmarks/.peers/<name>`` for the peers), so
this file may import only the standard library, torch, ``memtime`` (next to it, also
standard library only) and the implementation being measured.

Implementations (``--impl``):

ours     ``codebook_lens.core.codebook.Codebook``, inner-product similarity; the step is
         ``(out.output.sum() + out.loss).backward()``.
orig     ``codebook_features.models`` 0.1.2 (the original codebook-features code):
         ``GroupCodebookLayer`` (groups > 1) or ``CodebookLayer`` with
         ``InnerProductSnapFunction`` and ``BaseSnapFunction.loss = "aeloss"`` (codes learn
         from the downstream gradient plus the reconstruction MSE, the default of its
         ``CodebookModelConfig``); k is the ``kcodes`` constructor argument. The
         reconstruction gradient is computed inside its backward, so the step is
         ``out.sum().backward()``.
vqtorch  ``vector_quantize_pytorch.VectorQuantize`` with ``use_cosine_sim=True`` (codes then
         learn by EMA during the forward, not by gradient) and plain straight-through
         gradients (``rotation_trick=False``); top-k through ``forward(x, topk=k)``, which
         the library allows only with one head. The step is
         ``(quantized.sum() + loss.sum()).backward()``.

Each measurement uses ``memtime.measure``: the forward alone (gradients enabled, graph
built and dropped, as in training) and forward + backward, each with the median time
over ``--repeats`` calls after ``--warmup`` calls, and the peak extra resident memory of
one more call. A failure (out of memory included: the address space is capped with
``--mem-limit-mib`` so that a too-large allocation raises instead of waking the kernel's
OOM killer) is reported in the JSON line's ``error`` field.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from memtime import measure  # noqa: E402  (found through the sys.path line above)

IMPLS = ("ours", "orig", "vqtorch")

# (groups, width of one group's code) of each shape case; C and N come from the command line.
CASES = {
    "heads": (16, 64),  # 16 attention heads of 64 dims, one codebook each
    "vanilla": (1, 768),  # one codebook over a 768-dim residual stream
}


class Unsupported(Exception):
    """The implementation has no mode matching the requested case."""


def _vm_size_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmSize not found in /proc/self/status")


def cap_memory(limit_mib: float) -> None:
    """Let the process grow by at most ``limit_mib`` MiB of address space from here on."""
    limit = int((_vm_size_mib() + limit_mib) * (1 << 20))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


# ----------------------------------------------------------------------------------------
# one builder per implementation: returns (step, constructor description, notes)
#
# step(backward) runs one forward (and backward when asked) on the fixed input and
# returns None, so that nothing it made outlives the call.

Step = Callable[[bool], None]


def build_ours(torch, x, groups: int, dim: int, num_codes: int, k: int):
    src = HERE.parent / "src"
    sys.path.insert(0, str(src))  # benchmark the working tree, installed or not
    from codebook_lens.core.codebook import Codebook, CodebookConfig

    cb = Codebook(
        dim=dim,
        config=CodebookConfig(num_codes=num_codes, k=k, similarity="inner_product"),
        groups=groups,
    )
    notes = []
    try:  # build (or load from cache) the compiled search kernel now, outside the timings
        from codebook_lens.core import _native
    except ImportError:  # a tree without it: the PyTorch search is all there is
        notes.append("ours: PyTorch search (no compiled kernel in this tree)")
    else:
        kernel = _native.load()
        notes.append(
            "ours: compiled search kernel (codebook_lens.core._native)"
            if kernel is not None
            else "ours: PyTorch search (compiled kernel disabled or failed to build)"
        )
    x = x.view(-1, groups * dim).detach().requires_grad_()
    params = list(cb.parameters())

    def step(backward: bool) -> None:
        out = cb(x)
        if backward:
            for p in params:
                p.grad = None
            x.grad = None
            (out.output.sum() + out.loss).backward()

    call = (
        f"Codebook(dim={dim}, config=CodebookConfig(num_codes={num_codes}, k={k}, "
        f"similarity='inner_product'), groups={groups})"
    )
    return step, call, notes


def build_orig(torch, x, groups: int, dim: int, num_codes: int, k: int):
    from codebook_features import models

    models.BaseSnapFunction.loss = "aeloss"  # class attribute, read by every snap backward
    width = groups * dim
    if groups > 1:
        layer = models.GroupCodebookLayer(
            dim=width,
            num_codes=num_codes,
            key="bench",
            num_codebooks=groups,
            snap_fn=models.InnerProductSnapFunction,
            kcodes=k,
        )
        call = (
            f"GroupCodebookLayer(dim={width}, num_codes={num_codes}, key='bench', "
            f"num_codebooks={groups}, snap_fn=InnerProductSnapFunction, kcodes={k})"
        )
    else:
        layer = models.CodebookLayer(
            dim=width,
            num_codes=num_codes,
            key="bench",
            snap_fn=models.InnerProductSnapFunction,
            kcodes=k,
        )
        call = (
            f"CodebookLayer(dim={width}, num_codes={num_codes}, key='bench', "
            f"snap_fn=InnerProductSnapFunction, kcodes={k})"
        )
    call += "; BaseSnapFunction.loss = 'aeloss'"
    layer.train()
    x = x.view(1, -1, width).detach().requires_grad_()  # it wants (batch, seq, dim)
    params = list(layer.parameters())

    def step(backward: bool) -> None:
        out = layer(x)
        if backward:
            for p in params:
                p.grad = None
            x.grad = None
            out.sum().backward()

    notes = [
        "orig: its layer also applies a LayerNorm to the input and, in training mode, "
        "updates its logging metrics (code counts, MSE, norms) on every forward; both left "
        "as constructed"
    ]
    return step, call, notes


def build_vqtorch(torch, x, groups: int, dim: int, num_codes: int, k: int):
    from vector_quantize_pytorch import VectorQuantize

    if groups > 1 and k > 1:
        raise Unsupported(
            "vector-quantize-pytorch allows forward(topk=...) only with heads=1 "
            "(assert in VectorQuantize.forward)"
        )
    width = groups * dim
    kwargs = dict(
        dim=width,
        codebook_size=num_codes,
        use_cosine_sim=True,
        rotation_trick=False,  # plain straight-through, as ours and orig
    )
    if groups > 1:
        # codebook_dim = width of one head, so that heads * codebook_dim == dim and the
        # layer adds no input/output projections
        kwargs.update(codebook_dim=dim, heads=groups, separate_codebook_per_head=True)
    vq = VectorQuantize(**kwargs)
    vq.train()
    call = "VectorQuantize(" + ", ".join(f"{key}={val!r}" for key, val in kwargs.items()) + ")"
    fwd_kwargs = {"topk": k} if k > 1 else {}
    if fwd_kwargs:
        call += f"; forward(x, topk={k})"
    x = x.view(1, -1, width).detach().requires_grad_()
    params = [p for p in vq.parameters() if p.requires_grad]

    def step(backward: bool) -> None:
        quantized, _ids, loss = vq(x, **fwd_kwargs)
        if backward:
            for p in params:
                p.grad = None
            x.grad = None
            (quantized.sum() + loss.sum()).backward()

    notes = [
        "vqtorch: with use_cosine_sim=True the codebook is a buffer updated by EMA in the "
        "forward (no codebook gradient); the backward only carries the straight-through and "
        "commitment gradients to the input"
    ]
    if k > 1:
        notes.append(
            "vqtorch: top-k mode returns the k codes separately (N, k, d), does no EMA "
            "update (the codebook does not learn) and builds an (N, k, C) one-hot"
        )
    return step, call, notes


BUILDERS = {"ours": build_ours, "orig": build_orig, "vqtorch": build_vqtorch}


# ----------------------------------------------------------------------------------------


def _version(impl: str) -> str | None:
    from importlib import metadata

    dist = {"orig": "codebook-features", "vqtorch": "vector-quantize-pytorch"}.get(impl)
    if dist is None:
        return None
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=IMPLS, required=True)
    parser.add_argument("--case", choices=sorted(CASES), required=True)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--num-codes", type=int, default=10000)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--mem-limit-mib",
        type=float,
        default=None,
        help="address space the run may add, in MiB (default: no cap)",
    )
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    groups, dim = CASES[args.case]
    result = {
        "impl": args.impl,
        "version": _version(args.impl),
        "case": args.case,
        "tokens": args.tokens,
        "groups": groups,
        "dim": dim,
        "num_codes": args.num_codes,
        "k": args.k,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.executable,
        "call": None,
        "notes": [],
        "forward": None,
        "forward_backward": None,
        "error": None,
        "unsupported": None,
    }
    try:
        x = torch.randn(args.tokens, groups * dim)
        step, result["call"], result["notes"] = BUILDERS[args.impl](
            torch, x, groups, dim, args.num_codes, args.k
        )
        if args.mem_limit_mib:
            cap_memory(args.mem_limit_mib)
        result["forward"] = measure(lambda: step(False), args.repeats, args.warmup)
        result["forward_backward"] = measure(lambda: step(True), args.repeats, args.warmup)
    except Unsupported as exc:
        result["unsupported"] = str(exc)
    except (RuntimeError, MemoryError) as exc:  # torch reports a failed allocation as RuntimeError
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        result["error"] = f"{type(exc).__name__}: {text}"
        if "allocate" in text or isinstance(exc, MemoryError):
            result["error"] = f"out of memory ({result['error']})"
        traceback.print_exc(file=sys.stderr)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
