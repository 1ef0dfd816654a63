"""The natural-language experiment's config: tokenizer, data, network, the training
stages and the measurements, with presets (``cpu``, ``demo``, ``paper``, ``smollm2``,
``tiny``; :mod:`codebook_lens.experiments.language.presets`) and ``key=value``
overrides.

Keys are strict (a misspelt key is refused with a suggestion) and values are checked
when the config is built, before any model exists. Each training stage becomes a
:class:`~codebook_lens.training.config.TrainConfig` of the project's training loop
(:func:`stage_config`).
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from pathlib import Path

from codebook_lens.core.codebook import SIMILARITIES, CodebookConfig
from codebook_lens.core.sites import SITES
from codebook_lens.experiments.language.presets import PRESETS
from codebook_lens.steering.intervene import MODES
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

PACKAGE_DIR = Path(__file__).resolve().parent
REGEX_FILE = PACKAGE_DIR / "regexes.yaml"
TOPIC_FILE = PACKAGE_DIR / "topics.yaml"
SOURCES = ("scratch", "smollm2-135m")


@dataclasses.dataclass
class TokenizerSection:
    """The BPE tokenizer trained on the training split (a network trained from scratch)."""

    vocab_size: int = 4096
    max_chars: int | None = None  # train on the first characters only (None: all)

    def __post_init__(self) -> None:
        at_least("tokenizer", self, 257, "vocab_size")
        at_least("tokenizer", self, 1, "max_chars")


@dataclasses.dataclass
class TextSection:
    """corpus: ``offline`` (the packaged corpus) or a local corpus (see
    :func:`codebook_lens.data.documents.iter_documents`)."""

    corpus: str = "offline"
    seq_len: int = 128
    max_train_tokens: int | None = None

    def __post_init__(self) -> None:
        at_least("data", self, 2, "seq_len")
        at_least("data", self, 1, "max_train_tokens")


@dataclasses.dataclass
class NetSection:
    """The network. ``source: scratch`` builds a GPT-NeoX of this shape with the trained
    tokenizer. A pretrained causal LM (``smollm2-135m``, the offline SmolLM2 asset, or
    the directory of any model saved with ``save_pretrained``) keeps its first
    ``layers`` decoder layers and its own tokenizer (the shape keys are then unused);
    with ``base.steps = 0`` it is the base as it is.

    ``embeddings``: the input token embeddings, ``learned`` (random, trained with the
    network) or ``cooccurrence``: set before training from the training split's
    co-occurrence statistics within ``embedding_window`` tokens
    (:func:`codebook_lens.data.cooccurrence.cooccurrence_embeddings`) and frozen in every
    stage, so that tokens of one subject enter the network near one another. With
    ``tie_embeddings`` the output embeddings are the same frozen matrix; untied, they
    are learned, from a random start (``output_embeddings: random``) or from the same
    co-occurrence matrix (``output_embeddings: cooccurrence``), so that the rare words
    of one subject also leave the network near one another before training has seen
    them often."""

    source: str = "scratch"
    layers: int = 2
    hidden: int = 256
    heads: int = 4
    mlp: int = 1024
    rotary_fraction: float = 0.25
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    embeddings: typing.Literal["learned", "cooccurrence"] = "learned"
    embedding_window: int = 8
    output_embeddings: typing.Literal["random", "cooccurrence"] = "random"

    def __post_init__(self) -> None:
        all_finite("net", self)
        ok = self.source in SOURCES or (Path(self.source) / "config.json").is_file()
        require(ok, "net.source", self.source, f"one of {', '.join(SOURCES)}, or a model directory")
        at_least("net", self, 1, "layers", "hidden", "heads", "mlp")
        ok = self.hidden % self.heads == 0
        require(ok, "net.heads", self.heads, f"a divisor of net.hidden ({self.hidden})")
        ok = 0 < self.rotary_fraction <= 1
        require(ok, "net.rotary_fraction", self.rotary_fraction, "in (0, 1]")
        positive("net", self, "rope_theta")
        at_least("net", self, 1, "embedding_window")
        ok = self.embeddings == "learned" or self.source == "scratch"
        require(ok, "net.embeddings", self.embeddings, "learned for a pretrained network")
        if self.output_embeddings == "cooccurrence":
            ok = self.source == "scratch" and not self.tie_embeddings
            require(
                ok,
                "net.output_embeddings",
                self.output_embeddings,
                "random for a pretrained network or tied embeddings",
            )


@dataclasses.dataclass
class StageSection:
    """One training stage."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 100
    scheduler: typing.Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.01
    seed: int = 0
    log_every: int = 25
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_every: int = 200

    def check(self, name: str, min_steps: int = 1) -> None:
        all_finite(name, self)
        at_least(name, self, min_steps, "steps")
        at_least(name, self, 1, "batch_size", "log_every", "eval_every")
        at_least(name, self, 1, "eval_batches", "checkpoint_every")
        at_least(name, self, 0, "warmup_steps")
        positive(name, self, "lr")
        non_negative(name, self, "weight_decay")


@dataclasses.dataclass
class CodebookStageSection(StageSection):
    """The codebook stage: codebooks on ``sites`` of ``layers`` (None: every layer),
    trained from a copy of the base (``from_base``) or from scratch with the codebooks in
    place. The network is frozen (``freeze_base``), trains along, or trains along after
    the first ``freeze_base_steps`` steps, in which only the codes train; with
    ``distill_weight`` the loss adds the KL from the base to the codebook model.
    ``control`` also trains a copy of the base for the same steps without codebooks, so
    that the codebook model is compared with a base of the same training budget."""

    sites: list[str] = dataclasses.field(default_factory=lambda: ["attn_heads", "mlp"])
    layers: list[int] | None = None
    attn_num_codes: int = 1024
    attn_k: int = 8
    mlp_num_codes: int = 2048
    mlp_k: int = 16
    similarity: str = "cosine"
    codebook_lr: float = 1e-3
    commitment_weight: float = 0.0
    kmeans_init: bool = True
    kmeans_tokens: int = 32768
    revive_after_steps: int | None = 50
    from_base: bool = True
    freeze_base: bool = False
    freeze_base_steps: int = 0  # the network trains along after these steps
    distill_weight: float = 0.0
    control: bool = True

    def check(self, name: str) -> None:
        super().check(name)
        sites = self.sites
        ok = bool(sites) and set(sites) <= set(SITES) and len(set(sites)) == len(sites)
        require(ok, f"{name}.sites", sites, f"a list of distinct sites from {', '.join(SITES)}")
        at_least(name, self, 2, "attn_num_codes", "mlp_num_codes")
        ok = self.similarity in SIMILARITIES
        require(ok, f"{name}.similarity", self.similarity, f"one of {', '.join(SIMILARITIES)}")
        positive(name, self, "codebook_lr")
        non_negative(name, self, "commitment_weight", "distill_weight")
        at_least(name, self, 1, "kmeans_tokens", "revive_after_steps")
        if self.layers is not None:
            ok = bool(self.layers) and all(isinstance(i, int) and i >= 0 for i in self.layers)
            ok = ok and len(set(self.layers)) == len(self.layers)
            require(ok, f"{name}.layers", self.layers, "distinct layer numbers >= 0, or null")
        for site in sites:
            codes, k = self.num_codes(site), self.k(site)
            key = f"{name}.{'attn' if site == 'attn_heads' else 'mlp'}_k"
            require(1 <= k < codes, key, k, f"in 1..{codes - 1} (below the number of codes)")
        at_least(name, self, 0, "freeze_base_steps")
        ok = self.freeze_base_steps < self.steps
        require(ok, f"{name}.freeze_base_steps", self.freeze_base_steps, f"below {name}.steps")
        if self.freeze_base_steps:
            require(
                not self.freeze_base, f"{name}.freeze_base", True, "false with freeze_base_steps"
            )
        if not self.from_base:
            require(not self.freeze_base, f"{name}.freeze_base", True, "false without from_base")

    def num_codes(self, site: str) -> int:
        return self.attn_num_codes if site == "attn_heads" else self.mlp_num_codes

    def k(self, site: str) -> int:
        return self.attn_k if site == "attn_heads" else self.mlp_k

    def site_sections(self) -> list[SiteSection]:
        """The stage's codebook sites (every layer), as a training config holds them."""
        return [
            SiteSection(
                site,
                CodebookConfig(
                    num_codes=self.num_codes(site),
                    k=self.k(site),
                    similarity=self.similarity,
                    commitment_weight=self.commitment_weight,
                ),
                self.layers,
            )
            for site in self.sites
        ]


@dataclasses.dataclass
class MeasureSection:
    """The measurements. ``eval_batches`` held-out batches (of the stages' batch size)
    for LM quality; the code cache holds ``cache_tokens`` tokens of training documents
    drawn in a seeded order; a regex is scored by its most precise code among those
    firing at least ``min_count`` times with recall at least ``min_recall``, against the
    best single neuron at that recall (and along ``recalls``)."""

    eval_batches: int = 32
    ablation_batches: int = 16  # training batches for the mean activation of each site
    cache_tokens: int = 200_000
    # None: the packaged regexes.yaml; a path, or a packaged file's name (regexes-heldout)
    regex_file: str | None = None
    min_count: int = 10
    min_recall: float = 0.1
    recalls: list[float] = dataclasses.field(default_factory=lambda: [0.1, 0.25, 0.5, 0.75, 0.9])
    neuron_sample: int = 2048  # matching tokens that set each neuron's thresholds
    seed: int = 1234

    def __post_init__(self) -> None:
        all_finite("measure", self)
        at_least("measure", self, 1, "eval_batches", "ablation_batches", "min_count")
        at_least("measure", self, 1, "neuron_sample")
        at_least("measure", self, 1000, "cache_tokens")
        ok = 0 <= self.min_recall <= 1
        require(ok, "measure.min_recall", self.min_recall, "in [0, 1]")
        ok = all(0 < r <= 1 for r in self.recalls)
        require(ok, "measure.recalls", self.recalls, "a list of recalls in (0, 1]")


@dataclasses.dataclass
class SteerSection:
    """Topic steering (paper Table 3 protocol). Codes per topic: ``select: words``
    takes the codes a topic word most often follows within ``window`` tokens
    (:func:`codebook_lens.analysis.topics.word_topic_codes`); ``select: text`` the codes
    that fire on most of the topic's passage (the paper's topic search). The best
    ``codes_per_codebook`` of every codebook (every head of an attention codebook
    counts as one) are forced on at every position at ``strength``."""

    # None: the packaged topics.yaml; a path, or a packaged file's name (topics-heldout)
    topic_file: str | None = None
    select: typing.Literal["words", "text", "effect", "measured", "calibrated"] = "words"
    window: int = 16
    effect_batches: int = 4  # select: effect
    # select: effect, among each group's `effect_candidates` codes a topic word most often
    # follows (None: among all codes)
    effect_candidates: int | None = None
    # select: measured (codebook_lens.steering.topic_codes.measured_topic_codes)
    candidates_per_group: int = 8
    # a wider pool first (None: none): each group's `screen_per_group` codes of largest
    # first-order effect, each forced alone on `screen_blocks` measuring blocks; the
    # `candidates_per_group` that gain the most per fluency cost there are the candidates
    screen_per_group: int | None = None
    screen_blocks: int = 2
    # at most this many codes of one group forced together (None: the codebook's k)
    max_per_group: int | None = None
    # what the greedy search raises: the mean log topic probability or the log of the
    # mean (codebook_lens.steering.topic_codes); `both` (select: calibrated only): a path
    # for each, the calibration samples prefixes of both and keeps the best
    objective: typing.Literal["log_prob", "rate", "both"] = "log_prob"
    # how the path is built: `greedy` adds, at each step, the candidate that gains the most
    # per fluency cost given the codes chosen so far; `ranked` adds candidates in the
    # order of what each gains alone (codebook_lens.steering.topic_codes)
    search: typing.Literal["greedy", "ranked"] = "greedy"
    target_rate: float = 0.03
    max_cost: float = 0.5
    # measure forcing on the unsteered samples of the prompts, or on the cache's text;
    # on at most `measure_blocks` blocks of the samples (evenly spaced along them): every
    # candidate is a forward pass over them, and longer samples would make more
    measure_on: typing.Literal["samples", "cache"] = "samples"
    measure_blocks: int = 16
    # select: calibrated (codebook_lens.experiments.language.steer.calibrated_codes): the
    # measured path runs up to a predicted cost of `explore_cost`; up to
    # `calibration_points` of its prefixes are sampled, `calibration_samples` per prompt,
    # from held-out seeds (seed + calibration_seed), and the prefix with the largest
    # share on topic whose measured fluency cost is at most `max_cost` is kept
    explore_cost: float = 2.0
    calibration_points: int = 6
    # which prefixes: spread evenly by predicted cost up to explore_cost, or a bisection
    # for the longest prefix whose measured cost is within max_cost
    calibration_search: typing.Literal["spread", "bisect"] = "spread"
    calibration_samples: int = 10
    calibration_seed: int = 1000
    min_count: int = 20
    max_frequency: float = 0.02
    min_fraction: float = 0.2  # select: text
    codes_per_codebook: int = 1
    mode: str = "replace_last"
    strength: float = 1.0
    samples_per_prompt: int = 10
    max_new_tokens: int = 32
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        all_finite("steer", self)
        at_least("steer", self, 1, "window", "min_count", "codes_per_codebook", "effect_batches")
        at_least("steer", self, 1, "samples_per_prompt", "max_new_tokens", "effect_candidates")
        at_least("steer", self, 1, "calibration_points", "calibration_samples", "measure_blocks")
        at_least("steer", self, 1, "screen_blocks", "max_per_group")
        ok = self.screen_per_group is None or self.screen_per_group >= self.candidates_per_group
        require(ok, "steer.screen_per_group", self.screen_per_group, ">= candidates_per_group")
        require(self.explore_cost > 0, "steer.explore_cost", self.explore_cost, "> 0")
        require(self.mode in MODES, "steer.mode", self.mode, f"one of {', '.join(MODES)}")
        ok = 0 < self.max_frequency <= 1
        require(ok, "steer.max_frequency", self.max_frequency, "in (0, 1]")
        ok = 0 < self.min_fraction <= 1
        require(ok, "steer.min_fraction", self.min_fraction, "in (0, 1]")
        non_negative("steer", self, "temperature")
        ok = self.objective != "both" or self.select == "calibrated"
        require(ok, "steer.objective", self.objective, "log_prob or rate unless select: calibrated")

    def objectives(self) -> tuple[str, ...]:
        """The objectives whose measured paths are searched: ``objective``, or both of
        them for ``both`` (``select: calibrated`` then samples prefixes of each path)."""
        return ("log_prob", "rate") if self.objective == "both" else (self.objective,)


@dataclasses.dataclass
class LMExperimentConfig:
    preset: str = "cpu"
    # fit the run to this many minutes on the machine it runs on by scaling its training
    # steps (codebook_lens.experiments.language.budget); None: the steps as they are
    budget_minutes: float | None = None
    tokenizer: TokenizerSection = dataclasses.field(default_factory=TokenizerSection)
    data: TextSection = dataclasses.field(default_factory=TextSection)
    net: NetSection = dataclasses.field(default_factory=NetSection)
    base: StageSection = dataclasses.field(default_factory=StageSection)
    codebook: CodebookStageSection = dataclasses.field(default_factory=CodebookStageSection)
    measure: MeasureSection = dataclasses.field(default_factory=MeasureSection)
    steer: SteerSection = dataclasses.field(default_factory=SteerSection)

    def __post_init__(self) -> None:
        ok = self.budget_minutes is None or self.budget_minutes > 0
        require(ok, "budget_minutes", self.budget_minutes, "> 0 or null")
        # a pretrained network may be used as it is (base.steps = 0)
        self.base.check("base", min_steps=0 if self.net.source != "scratch" else 1)
        self.codebook.check("codebook")
        layers = self.codebook.layers or []
        ok = all(i < self.net.layers for i in layers)
        require(ok, "codebook.layers", layers, f"below net.layers ({self.net.layers})")


def load_lm_config(preset: str = "cpu", overrides: list[str] | None = None) -> LMExperimentConfig:
    """The config of ``preset`` plus ``key=value`` overrides (strict keys, checked values)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    data = copy.deepcopy(PRESETS[preset])
    data["preset"] = preset
    return from_dict(LMExperimentConfig, apply_overrides(data, overrides or []))


def stage_config(cfg: LMExperimentConfig, name: str, out: Path) -> TrainConfig:
    """The :class:`TrainConfig` of stage ``name``: ``base``, ``codebook`` or ``control``
    (the base trained on with the codebook stage's schedule, without codebooks)."""
    stage = cfg.base if name == "base" else cfg.codebook
    codebooks = CodebooksSection(sites=[], kmeans_init=False, revive_after_steps=None)
    optim = OptimSection(
        lr=stage.lr, codebook_lr=stage.lr, weight_decay=stage.weight_decay, grad_clip=1.0
    )
    if name == "codebook":
        c = cfg.codebook
        codebooks = CodebooksSection(
            sites=c.site_sections(),
            kmeans_init=c.kmeans_init,
            kmeans_tokens=c.kmeans_tokens,
            revive_after_steps=c.revive_after_steps,
        )
        optim = OptimSection(
            lr=c.lr,
            codebook_lr=c.codebook_lr,
            weight_decay=c.weight_decay,
            grad_clip=1.0,
            freeze_base=c.freeze_base,
            freeze_base_steps=c.freeze_base_steps,
            distill_weight=c.distill_weight,
        )
    optim.freeze_embeddings = cfg.net.embeddings == "cooccurrence"
    return TrainConfig(
        output_dir=str(out / name),
        data=DataSection(corpus=cfg.data.corpus, seq_len=cfg.data.seq_len),
        codebooks=codebooks,
        optim=optim,
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
