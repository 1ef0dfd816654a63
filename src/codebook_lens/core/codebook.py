"""The codebook bottleneck.

An activation ``a`` (a vector of width ``d``) is replaced by the sum of the ``k``
rows of a learned codebook (``C x d``) that are most similar to it. A group of
``G`` independent codebooks (one per attention head, say) is held as one
``(G, C, d)`` parameter and searched with batched matmuls.

Gradients: the input receives the upstream gradient unchanged (straight-through
estimator); the codebook receives gradient only on the rows that were selected
(:mod:`codebook_lens.core.lookup`). The reconstruction loss
``MSE(codebook_out, stop_grad(a))`` is returned explicitly in
:class:`CodebookOutput` for the training loop to add and log.

This module knows nothing of transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from codebook_lens.core.errors import CodebookLensError
from codebook_lens.core.kmeans import kmeans
from codebook_lens.core.lookup import (
    EMPTY_SLOT,
    CodebookLookup,
    LookupLoss,
)
from codebook_lens.core.topk import (
    SIMILARITIES,
    Similarity,
    flat_ids,
    search_keys,
    topk_codes,
)

__all__ = [
    "EMPTY_SLOT",
    "SIMILARITIES",
    "Codebook",
    "CodebookConfig",
    "CodebookLookup",
    "CodebookOutput",
    "Similarity",
    "search_keys",
    "topk_codes",
]


@dataclass
class CodebookConfig:
    """Options of one codebook (or one group of codebooks).

    num_codes: rows C of each codebook.
    k: codes summed per activation (1 <= k < num_codes).
    similarity: how codes are ranked against an activation.
    reconstruction_weight: weight of MSE(codebook_out, stop_grad(a)), which trains the codes.
    commitment_weight: weight of MSE(a, stop_grad(codebook_out)), which pulls activations
        toward their codes (0 disables it).
    lm_grad_to_codes: whether the downstream (language-model) gradient also reaches the
        selected codes, besides the reconstruction gradient.
    chunk_mib: most memory the similarity matrix may hold at once, in MiB; None: by the
        device (256 on the CPU, up to 4096 on a GPU: ``topk.default_chunk_mib``).
    outlier_factor: None (every activation is quantized), or a factor F: an activation
        whose norm exceeds F times the codebook's reference norm (``ref_norm``: the
        median norm of its k-means samples, else of the first batch it sees) passes
        through dense, with every code slot empty (:data:`EMPTY_SLOT`), and is left out
        of the reconstruction loss. This is for the attention-sink positions of
        pretrained models, whose activations no sum of k codes reproduces: SmolLM2's
        layer-11 MLP writes a vector of norm ~24,000 at the first position of a
        sequence, against a median of ~31.
    """

    num_codes: int = 1024
    k: int = 1
    similarity: str = "cosine"
    reconstruction_weight: float = 1.0
    commitment_weight: float = 0.0
    lm_grad_to_codes: bool = True
    chunk_mib: float | None = None
    outlier_factor: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_codes, int) or self.num_codes < 2:
            raise CodebookLensError(f"num_codes must be an integer >= 2, got {self.num_codes!r}")
        if not isinstance(self.k, int) or not 1 <= self.k < self.num_codes:
            raise CodebookLensError(
                f"k must be an integer with 1 <= k < num_codes ({self.num_codes}), got {self.k!r}"
            )
        if self.similarity not in SIMILARITIES:
            raise CodebookLensError(
                f"similarity must be one of {', '.join(SIMILARITIES)}, got {self.similarity!r}"
            )
        for name in ("reconstruction_weight", "commitment_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise CodebookLensError(f"{name} must be a finite number >= 0, got {value!r}")
        m = self.chunk_mib
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0):
            raise CodebookLensError(f"chunk_mib must be None or a number > 0, got {m!r}")
        f = self.outlier_factor
        if f is not None and (
            isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 1
        ):
            raise CodebookLensError(
                f"outlier_factor must be None or a finite number > 1, got {f!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CodebookConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CodebookLensError(
                f"unknown codebook option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**data)


@dataclass
class CodebookOutput:
    """What one codebook forward produces.

    output: the quantized activation, same shape as the input.
    codes: chosen code ids, shape ``(*batch, G, k)``, best first.
    loss: weighted reconstruction (+ commitment) loss, a scalar to add to the LM loss.
    mse: unweighted MSE between output and input (detached), for logging.
    variance: mean per-dimension variance of the input over tokens (detached), so that
        ``1 - mse / variance`` is the explained variance.
    """

    output: torch.Tensor
    codes: torch.Tensor
    loss: torch.Tensor
    mse: torch.Tensor
    variance: torch.Tensor


# ----------------------------------------------------------------------------------------
# the module


# (ids, activations) -> ids, or (ids, scales) where ``scales`` (the shape of ids) weighs
# each slot's code in the output (1: as usual)
IdsHook = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]


class Codebook(nn.Module):
    """G independent codebooks of C codes of width d, held as one (G, C, d) parameter.

    ``forward`` takes activations of shape ``(..., G * d)`` and returns a
    :class:`CodebookOutput`. Usage statistics are off until
    :meth:`track_usage` is called.
    """

    recent_rows = 512  # inputs kept per group (when tracking) to re-seed dead codes

    def __init__(self, dim: int, config: CodebookConfig, groups: int = 1) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise CodebookLensError(f"dim must be a positive integer, got {dim!r}")
        if not isinstance(groups, int) or groups < 1:
            raise CodebookLensError(f"groups must be a positive integer, got {groups!r}")
        self.config = config
        self.dim = dim
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(groups, config.num_codes, dim))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(dim))
        self.register_buffer("usage", torch.zeros(groups, config.num_codes, dtype=torch.long))
        self.register_buffer("idle_steps", torch.zeros(groups, config.num_codes, dtype=torch.long))
        self.register_buffer(
            "_used", torch.zeros(groups, config.num_codes, dtype=torch.bool), persistent=False
        )
        if config.outlier_factor is not None:
            # 0 until k-means or the first batch sets it; saved with the codes
            self.register_buffer("ref_norm", torch.zeros((), dtype=torch.float32))
        self._recent: torch.Tensor | None = None
        self.tracking = False
        self.ids_hook: IdsHook | None = None

    @property
    def num_codes(self) -> int:
        return self.config.num_codes

    @property
    def k(self) -> int:
        return self.config.k

    def extra_repr(self) -> str:
        c = self.config
        return f"groups={self.groups}, num_codes={c.num_codes}, dim={self.dim}, k={c.k}, similarity={c.similarity}"

    # -- forward ------------------------------------------------------------------------

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.groups * self.dim:
            raise CodebookLensError(
                f"activation width {x.shape[-1]} does not match the codebook "
                f"({self.groups} group(s) x {self.dim} = {self.groups * self.dim})"
            )
        return x.reshape(-1, self.groups, self.dim)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Ids of the chosen codes for ``x`` of shape ``(..., G*d)``: ``(..., G, k)``
        (:data:`EMPTY_SLOT` for an activation that passes through dense)."""
        ids, dense = self._search(self._split(x))
        if dense is not None:
            ids = ids.masked_fill(dense.unsqueeze(-1), EMPTY_SLOT)
        return ids.view(*x.shape[:-1], self.groups, self.k)

    def _search(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The top-k ids of ``a`` (``(N, G, d)``) and the ``(N, G)`` mask of outliers
        (None when the codebook has no outlier rule or ``a`` has no outlier)."""
        c = self.config
        ids = topk_codes(a.detach(), self.weight.detach(), c.k, c.similarity, c.chunk_mib)
        dense = self.outliers(a)
        return ids, (dense if dense is not None and dense.any() else None)

    @torch.no_grad()
    def outliers(self, a: torch.Tensor) -> torch.Tensor | None:
        """``(N, G)`` mask of the activations that pass through dense (see
        ``outlier_factor``), or None when the codebook has no outlier rule."""
        factor = self.config.outlier_factor
        if factor is None:
            return None
        if self.ref_norm > 0:
            norms = a.detach().float().norm(dim=-1)
        else:  # no k-means: the first batch sets the reference
            norms = self._set_ref_norm(a)
        return norms > factor * self.ref_norm

    @torch.no_grad()
    def _set_ref_norm(self, a: torch.Tensor) -> torch.Tensor:
        """Set ``ref_norm`` to the median norm of ``a`` (``(N, G, d)``); return the norms."""
        norms = a.detach().float().norm(dim=-1)
        if norms.numel():
            self.ref_norm.fill_(float(norms.median()))
        return norms

    def forward(self, x: torch.Tensor) -> CodebookOutput:
        a = self._split(x)
        c = self.config
        ids, dense = self._search(a)
        hooked = self.ids_hook is not None
        scales = None
        if hooked:  # (N, G, k) ids and (N, G, d) activations -> (N, G, slots), EMPTY_SLOT allowed
            edited = self.ids_hook(ids, a)
            ids, scales = edited if isinstance(edited, tuple) else (edited, None)
        if dense is not None:  # after the hook: an intervention cannot quantize an outlier
            ids = ids.masked_fill(dense.unsqueeze(-1), EMPTY_SLOT)
        empty = hooked or dense is not None
        # outliers keep their activation and stay out of the losses
        keep = None if dense is None else ~dense
        out, mse = LookupLoss.apply(a, self.weight, ids, c.lm_grad_to_codes, empty, scales, keep)
        target = a.detach()
        if dense is not None:
            out = torch.where(dense.unsqueeze(-1), a, out)
            a_in, out_in = a[keep], out[keep]
        else:
            a_in, out_in = a, out
        loss = c.reconstruction_weight * mse
        if c.commitment_weight > 0 and a_in.numel():
            loss = loss + c.commitment_weight * F.mse_loss(a_in.float(), out_in.detach().float())
        quantized = target if dense is None else target[~dense.any(-1)]
        if self.tracking:
            self._record(ids, quantized, empty)
        with torch.no_grad():
            variance = (
                quantized.float().reshape(-1, self.groups * self.dim).var(0, unbiased=False).mean()
            )
        return CodebookOutput(
            output=out.view(x.shape),
            codes=ids.view(*x.shape[:-1], self.groups, ids.shape[-1]),
            loss=loss,
            mse=mse.detach(),
            variance=variance,
        )

    # -- usage statistics and dead-code revival --------------------------------------------

    def track_usage(self, enabled: bool = True) -> None:
        """Count code activations in the ``usage`` buffer and remember recent inputs."""
        self.tracking = enabled

    def reset_usage(self) -> None:
        self.usage.zero_()
        self._used.zero_()
        self.idle_steps.zero_()

    @torch.no_grad()
    def _record(self, ids: torch.Tensor, a: torch.Tensor, empty: bool = False) -> None:
        flat = flat_ids(ids, self.num_codes).view(-1)
        if empty:  # a hook or the outlier rule may leave slots empty: count filled slots only
            flat = flat[(ids >= 0).view(-1)]
        counts = torch.bincount(flat, minlength=self.groups * self.num_codes)
        counts = counts.view(self.groups, self.num_codes)
        self.usage += counts
        self._used |= counts > 0
        stride = max(1, a.shape[0] // self.recent_rows)
        self._recent = a[::stride][: self.recent_rows].transpose(0, 1).to(self.weight.dtype).clone()

    @torch.no_grad()
    def step_idle(self) -> torch.Tensor:
        """Close one optimizer step of usage: codes unused since the last call age by one.

        Returns the ``(G, C)`` idle-step counts. Call once per optimizer step (after
        synchronising ``_used`` across processes, when there are several).
        """
        self.idle_steps += 1
        self.idle_steps[self._used] = 0
        self._used.zero_()
        return self.idle_steps

    @torch.no_grad()
    def revive_dead_codes(
        self,
        max_idle_steps: int,
        optimizer: torch.optim.Optimizer | None = None,
        noise: float = 0.01,
        generator: torch.Generator | None = None,
    ) -> int:
        """Re-initialise codes idle for ``max_idle_steps`` steps from recent inputs.

        New codes are recent activations (of the same group) plus Gaussian noise of
        ``noise`` times their scale; with k > 1 summed codes (cosine and inner product)
        they are rescaled to the median norm of the group's live codes; the optimizer's per-element state for those rows
        (Adam's moments, momentum buffers) is zeroed. Returns how many codes were revived.
        Needs usage tracking on (it supplies the recent inputs).
        """
        if max_idle_steps < 1:
            raise CodebookLensError(f"max_idle_steps must be >= 1, got {max_idle_steps!r}")
        dead = self.idle_steps >= max_idle_steps
        count = int(dead.sum())
        if count == 0:
            return 0
        if self._recent is None:
            raise RuntimeError(
                "revive_dead_codes needs recent inputs: call track_usage() and run a forward first"
            )
        recent = self._recent.to(self.weight.device)  # (G, R, d)
        g_idx, c_idx = dead.nonzero(as_tuple=True)
        pick = torch.randint(0, recent.shape[1], (count,), generator=generator, device="cpu").to(
            recent.device
        )
        seeds = recent[g_idx, pick]
        scale = seeds.norm(dim=-1, keepdim=True) / math.sqrt(self.dim)
        jitter = torch.randn(seeds.shape, generator=generator, device="cpu").to(seeds.device)
        seeds = seeds + noise * scale * jitter
        if self.k > 1 and self.config.similarity != "euclidean":
            # a new code takes the typical norm of its group's live codes (which is about
            # 1/k of an activation when k codes are summed), so that it does not
            # overshoot the sum it joins; the direction comes from the recent input.
            # With k = 1 the code is the activation itself.
            norms = self.weight.norm(dim=-1)  # (G, C)
            live = torch.where(dead, torch.nan, norms).nanmedian(dim=-1).values  # (G,)
            fallback = seeds.norm(dim=-1) / self.k
            target = torch.where(live[g_idx].isnan(), fallback, live[g_idx])
            seeds = seeds * (target / seeds.norm(dim=-1).clamp(min=1e-12)).unsqueeze(-1)
        self.weight[g_idx, c_idx] = seeds
        self.idle_steps[g_idx, c_idx] = 0
        if optimizer is not None:
            reset_optimizer_rows(optimizer, self.weight, (g_idx, c_idx))
        return count

    # -- k-means initialisation ------------------------------------------------------------

    @torch.no_grad()
    def kmeans_init_(
        self, samples: torch.Tensor, iters: int = 10, generator: torch.Generator | None = None
    ) -> None:
        """Set the codes to k-means centroids of ``samples`` (``(..., G*d)``), per group.

        Seeds are drawn by k-means++ (D^2 sampling); assignment uses the codebook's own
        similarity (cosine gives spherical assignment); centroids are means. Empty
        clusters are re-seeded from samples. With an ``outlier_factor``, the reference
        norm is set from the samples first and the outliers are left out. With k > 1
        (cosine or inner product) the codes are set to 1/k of the centroids, so that the
        sum of the k chosen codes starts near the activation instead of k times it.
        """

        a = self._split(samples).to(self.weight.dtype)
        if self.config.outlier_factor is not None:  # the reference norm, then the inliers
            norms = self._set_ref_norm(a)
            a = a[~(norms > self.config.outlier_factor * self.ref_norm).any(-1)]
        c = self.config
        cent = kmeans(a, self.num_codes, c.similarity, iters, generator, c.chunk_mib)
        if self.k > 1 and self.config.similarity != "euclidean":
            # the output is the sum of k codes that each resemble the activation: start them
            # at 1/k of the centroid (the ranking is unchanged by a common scale)
            cent = cent / self.k
        self.weight.copy_(cent)


def reset_optimizer_rows(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, index: tuple[torch.Tensor, ...]
) -> None:
    """Zero the optimizer's per-element state of ``param`` at ``index`` (its moments)."""
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value[index] = 0
