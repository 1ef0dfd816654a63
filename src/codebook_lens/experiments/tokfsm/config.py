"""The TokFSM experiment's config: the task, the network, the two training stages and
the analysis, with presets (``cpu``, ``demo``, ``paper``) and ``key=value`` overrides.

Keys are strict (a misspelt key is refused with a suggestion) and values are checked
when the config is built, before any model exists: ``net.heads`` must divide
``net.hidden``, batch sizes and logging intervals are at least 1, and so on. Each stage
becomes a :class:`~codebook_lens.training.config.TrainConfig` of the project's training
loop (:func:`stage_config`), its codebook sites the same typed
:class:`~codebook_lens.training.config.SiteSection` that a YAML config holds.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from pathlib import Path

from codebook_lens.core.codebook import SIMILARITIES, CodebookConfig
from codebook_lens.core.sites import SITES
from codebook_lens.training.config import (
    CheckpointSection,
    CodebooksSection,
    ConfigError,
    DataSection,
    EvalSection,
    LoggingSection,
    OptimSection,
    ScheduleSection,
    SiteSection,
    TrainConfig,
    all_finite,
    apply_overrides,
    at_least,
    from_dict,
    non_negative,
    positive,
    require,
)


@dataclasses.dataclass
class TaskSection:
    num_states: int = 100
    out_degree: int = 10
    base: int = 10
    seed: int = 0
    seq_len: int = 128
    # training walks jump to a random state at this rate; jumped-to digits are not
    # targets (so the model never learns to jump, but learns to recover from a jump)
    jump_rate: float = 0.0

    def __post_init__(self) -> None:
        all_finite("task", self)
        at_least("task", self, 2, "num_states", "base")
        n = self.num_states
        ok = 1 <= self.out_degree <= n
        require(ok, "task.out_degree", self.out_degree, f"in 1..task.num_states ({n})")
        # a walk must hold BOS and two states (each state is `digits` tokens)
        digits = max(1, math.ceil(math.log(n, self.base) - 1e-9))
        at_least("task", self, 1 + 2 * digits, "seq_len")
        require(0 <= self.jump_rate < 1, "task.jump_rate", self.jump_rate, "in [0, 1)")


@dataclasses.dataclass
class NetSection:
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    mlp: int = 512
    rotary_fraction: float = 0.25
    rope_theta: float = 10000.0
    # rotary base chosen so that the fastest frequency is pi (overrides rope_theta):
    # heads can score the parity of a distance, i.e. which digit of a state a token is
    parity_rotary: bool = False

    def __post_init__(self) -> None:
        all_finite("net", self)
        at_least("net", self, 1, "layers", "hidden", "heads", "mlp")
        ok = self.hidden % self.heads == 0
        require(ok, "net.heads", self.heads, f"a divisor of net.hidden ({self.hidden})")
        ok = 0 < self.rotary_fraction <= 1
        require(ok, "net.rotary_fraction", self.rotary_fraction, "in (0, 1]")
        positive("net", self, "rope_theta")
        if self.parity_rotary:
            dims = int(self.hidden // self.heads * self.rotary_fraction)
            require(
                dims >= 4,
                "net.rotary_fraction",
                self.rotary_fraction,
                f"large enough for 4 rotary dimensions per head with net.parity_rotary "
                f"(head size {self.hidden // self.heads} gives {dims})",
            )


@dataclasses.dataclass
class StageSection:
    """One training stage (the base model, or the codebook model)."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    scheduler: typing.Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.0
    seed: int = 0
    log_every: int = 25
    eval_every: int = 250
    eval_batches: int = 4
    checkpoint_every: int = 250

    def check(self, name: str) -> None:
        """Check the values of the stage that the config calls ``name``."""
        all_finite(name, self)
        at_least(name, self, 1, "steps", "batch_size", "log_every", "eval_every")
        at_least(name, self, 1, "eval_batches", "checkpoint_every")
        at_least(name, self, 0, "warmup_steps")
        positive(name, self, "lr")
        non_negative(name, self, "weight_decay")


@dataclasses.dataclass
class CodebookStageSection(StageSection):
    """The codebook stage: codebooks on ``sites`` of every layer, initialised from the base."""

    sites: list[str] = dataclasses.field(default_factory=lambda: ["attn_heads", "mlp"])
    attn_num_codes: int = 1024
    # measured on the cpu preset's base: with more MLP codes a state's activations split
    # over several pure codes, and the best single code catches fewer of them (code
    # precision for states 99.5% at 1,024 codes, 91.1% at 2,048, 84.6% at 8,192)
    mlp_num_codes: int = 1024
    k: int = 1
    similarity: str = "cosine"
    codebook_lr: float = 1e-3
    commitment_weight: float = 0.0
    kmeans_init: bool = True
    kmeans_tokens: int = 32768
    revive_after_steps: int | None = None
    from_base: bool = True
    # with k = 1 the straight-through gradient moved a finetuned base away from its
    # codes and the LM loss rose (measured); the codes alone learn stably
    freeze_base: bool = True

    def check(self, name: str) -> None:
        super().check(name)
        sites = self.sites
        ok = bool(sites) and set(sites) <= set(SITES) and len(set(sites)) == len(sites)
        require(ok, f"{name}.sites", sites, f"a list of distinct sites from {', '.join(SITES)}")
        at_least(name, self, 2, "attn_num_codes", "mlp_num_codes")
        ok = self.similarity in SIMILARITIES
        require(ok, f"{name}.similarity", self.similarity, f"one of {', '.join(SIMILARITIES)}")
        positive(name, self, "codebook_lr")
        non_negative(name, self, "commitment_weight")
        at_least(name, self, 1, "kmeans_tokens", "revive_after_steps")
        fewest = min(self.num_codes(site) for site in sites)
        ok = 1 <= self.k < fewest
        require(ok, f"{name}.k", self.k, f"in 1..{fewest - 1} (below the sites' number of codes)")

    def num_codes(self, site: str) -> int:
        """Codes per codebook at ``site``: ``attn_num_codes`` per head for ``attn_heads``,
        ``mlp_num_codes`` for the other sites."""
        return self.attn_num_codes if site == "attn_heads" else self.mlp_num_codes

    def site_sections(self) -> list[SiteSection]:
        """The stage's codebook sites, as a training config holds them (every layer)."""
        return [
            SiteSection(
                site,
                CodebookConfig(
                    num_codes=self.num_codes(site),
                    k=self.k,
                    similarity=self.similarity,
                    commitment_weight=self.commitment_weight,
                ),
            )
            for site in self.sites
        ]


@dataclasses.dataclass
class AnalysisSection:
    sequences: int = 256  # walks for purity, classification and frequencies
    sample_sequences: int = 256  # sequences sampled from BOS for state accuracy
    eval_batches: int = 8  # held-out batches for LM loss and accuracy
    pairs: int = 200  # intervention (source, target) pairs
    prefix_states: int = 6  # states in each intervention walk
    purity_threshold: float = 1.0
    seed: int = 1234

    def __post_init__(self) -> None:
        all_finite("analysis", self)
        at_least("analysis", self, 1, "sequences", "sample_sequences", "eval_batches", "pairs")
        at_least("analysis", self, 1, "prefix_states")
        value = self.purity_threshold
        require(0 < value <= 1, "analysis.purity_threshold", value, "in (0, 1]")


@dataclasses.dataclass
class FSMExperimentConfig:
    preset: str = "cpu"
    task: TaskSection = dataclasses.field(default_factory=TaskSection)
    net: NetSection = dataclasses.field(default_factory=NetSection)
    base: StageSection = dataclasses.field(default_factory=StageSection)
    codebook: CodebookStageSection = dataclasses.field(default_factory=CodebookStageSection)
    analysis: AnalysisSection = dataclasses.field(default_factory=AnalysisSection)

    def __post_init__(self) -> None:
        self.base.check("base")
        self.codebook.check("codebook")


PRESETS: dict[str, dict] = {
    # sized for a 2-core CPU: under an hour end to end (measured figures in the README)
    "cpu": {
        # parity rotary: base state accuracy 99.8% after 2,000 steps against 59.5%
        # with GPT-NeoX's rotary base (measured, README)
        "net": {"rotary_fraction": 1.0, "parity_rotary": True},
        "base": {
            "steps": 8000,
            "batch_size": 32,
            "lr": 3e-3,
            "warmup_steps": 100,
            "eval_every": 1000,
            "log_every": 50,
            "checkpoint_every": 1000,
        },
        "codebook": {
            "steps": 800,
            "batch_size": 32,
            "eval_every": 200,
            "log_every": 25,
            "checkpoint_every": 200,
        },
    },
    # the demo: the cpu preset's task and model on a shorter budget (at most 15 minutes
    # on a 2-core CPU with AVX2 only). Measured: 2,000 base steps of 16 sequences (half
    # the tokens of 32) gave base / codebook state accuracy 99.57% / 99.07%, 1,000 steps
    # of 32 (the same tokens) 99.36% / 99.01%; k-means on 16,384 tokens instead of
    # 32,768 cost nothing on the same base (99.01% against 98.85%) and takes half the time.
    # Alone on an AVX-512 machine, 250 codebook steps gave 98.94% (under the 99% mark) in
    # 5.0 min end to end, 400 steps 99.06% for 0.7 min more
    "demo": {
        "net": {"rotary_fraction": 1.0, "parity_rotary": True},
        "base": {
            "steps": 2000,
            "batch_size": 16,
            "lr": 3e-3,
            "warmup_steps": 100,
            "eval_every": 500,
            "log_every": 50,
            "checkpoint_every": 500,
        },
        "codebook": {
            "steps": 400,
            "batch_size": 32,
            "kmeans_tokens": 16384,
            "eval_every": 200,
            "log_every": 25,
            "checkpoint_every": 200,
        },
        "analysis": {"pairs": 100, "sequences": 192, "sample_sequences": 192},
    },
    # the paper's Table 1 settings (attn + MLP, k = 1, C = 10k, trained from scratch
    # with the codebooks in place); meant for a GPU
    "paper": {
        "net": {"rotary_fraction": 0.25},
        "base": {
            "steps": 20000,
            "batch_size": 128,
            "lr": 1e-3,
            "warmup_steps": 500,
            "eval_every": 2000,
            "checkpoint_every": 2000,
        },
        "codebook": {
            "steps": 20000,
            "batch_size": 128,
            "lr": 1e-3,
            "warmup_steps": 500,
            "attn_num_codes": 10000,
            "mlp_num_codes": 10000,
            "from_base": False,
            "freeze_base": False,
            "kmeans_init": False,
            "eval_every": 2000,
            "checkpoint_every": 2000,
        },
        "analysis": {"pairs": 500, "sequences": 1024, "sample_sequences": 1024},
    },
}


def load_fsm_config(preset: str = "cpu", overrides: list[str] | None = None):
    """The config of ``preset`` plus ``key=value`` overrides (strict keys, checked values)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    data = copy.deepcopy(PRESETS[preset])
    data["preset"] = preset
    return from_dict(FSMExperimentConfig, apply_overrides(data, overrides or []))


def stage_config(cfg: FSMExperimentConfig, name: str, out: Path) -> TrainConfig:
    """The :class:`TrainConfig` of stage ``name`` (``base`` or ``codebook``)."""
    stage = getattr(cfg, name)
    codebooks = CodebooksSection(sites=[], kmeans_init=False, revive_after_steps=None)
    codebook_lr, freeze_base = stage.lr, False
    if name == "codebook":
        codebooks = CodebooksSection(
            sites=stage.site_sections(),
            kmeans_init=stage.kmeans_init,
            kmeans_tokens=stage.kmeans_tokens,
            revive_after_steps=stage.revive_after_steps,
        )
        codebook_lr, freeze_base = stage.codebook_lr, stage.freeze_base
    return TrainConfig(
        output_dir=str(out / name),
        data=DataSection(corpus="tokfsm", seq_len=cfg.task.seq_len),
        codebooks=codebooks,
        optim=OptimSection(
            lr=stage.lr,
            codebook_lr=codebook_lr,
            weight_decay=stage.weight_decay,
            grad_clip=1.0,
            freeze_base=freeze_base,
        ),
        schedule=ScheduleSection(
            max_steps=stage.steps,
            batch_size=stage.batch_size,
            warmup_steps=stage.warmup_steps,
            scheduler=stage.scheduler,
            seed=stage.seed,
        ),
        logging=LoggingSection(every=stage.log_every),
        eval=EvalSection(every=stage.eval_every, batches=stage.eval_batches),
        checkpoint=CheckpointSection(every=stage.checkpoint_every, keep=1),
    )
