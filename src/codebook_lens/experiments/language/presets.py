"""The presets of the natural-language experiment (``codebook lm --preset NAME``): each
a partial config, as nested dicts of the keys of
:class:`codebook_lens.experiments.language.config.LMExperimentConfig`, that
:func:`~codebook_lens.experiments.language.config.load_lm_config` completes with the
defaults and checks. Why each value is what it is, with the runs that measured it, is
in the comments (figures in docs/results/language.md).
"""

from __future__ import annotations

# the network of the cpu and demo presets: input embeddings from co-occurrence counts,
# frozen; output embeddings untied, started from the same matrix and trained
NET = {
    "layers": 1,
    "heads": 8,
    "embeddings": "cooccurrence",
    "tie_embeddings": False,
    "output_embeddings": "cooccurrence",
}

PRESETS: dict[str, dict] = {
    # sized for this project's 2-core CPU: at most an hour end to end. The codebook
    # stage's settings are those of the measured run r3 (docs/results/language.md):
    # fewer codes per activation (k = 4 per head, 8 per MLP) from larger codebooks, and
    # a lower learning rate for the network than for the codes (r2, at 1e-3 / 3e-3,
    # diverged). The base trains for 2,800 steps (800 took 8.1 min alone and left a
    # model whose samples ignore their context). Trained along from the start, the
    # network diverged on this base (the activations ran away from the codes); frozen,
    # the codes alone left +0.48 nats (150 steps) or +0.40 (400 steps). So the codes
    # train alone for 250 steps, then the network along with them for 250 more, with a
    # commitment loss (without it the second half diverged) and the KL to the base:
    # +0.30 in the probe, +0.292 end to end (38 min 53 s alone). Codebooks sit on the
    # attention heads of every layer, as on the paper's TinyStories steering model (an
    # attention-only codebook model): with the MLPs quantized too the stage levelled off
    # near +0.28 to +0.30 nats over the base; on the heads alone it reached +0.09
    # (+0.092 end to end, 36 min 31 s alone; `codebook.sites=[attn_heads,mlp]` puts the
    # MLP codebooks back). The network: one layer of 8 heads, as the paper's steering
    # model has one layer (2026-12-03, on a 2-core AVX2 machine at the same budget: base
    # 3.963 against 4.169 for two layers of 4 heads, topics 1-32% on topic against 0-19%),
    # its input embeddings set from co-occurrence counts and frozen, the output ones
    # learned (base 3.931, topics 1-53% on topic: docs/results/language.md), started
    # from the same co-occurrence matrix (base 3.850 in 13% fewer steps, topics 0-59% on
    # topic, mean 28.8% against 19.7%, with steer.objective: both)
    "cpu": {
        "budget_minutes": 50,
        # the offline corpus plus WordNet's definitions and usage examples (2026-12-04, on
        # a 2-core AVX2 machine, alone, at full size: 6 of 6 topics steered, where the last
        # run on the offline corpus, its base at 54% of its steps on a slower day, steered
        # 5; held-out topics 3 of 6 with either corpus; the corpus's share in the gain is
        # not separated from the budget's). At 500 codebook steps the model stayed +0.153
        # nats over its base; at 700, +0.131
        "data": {"corpus": "offline-wide"},
        # a vocabulary of 8,192 tokens (4,096 before): the topics left unsteered on held-out
        # files were those whose words the tokenizer split (at 4,096 tokens sickness, school,
        # crime, science, sport, clothing and travel had 1-4 words of one token, the steered
        # ones 3-9); at 8,192 they have 4-9, and a one-layer network writes a word of one
        # token far more readily than one of two or three. The base step costs 1.5 times as
        # much (the unembedding), so the budget shortens the stages; on a 2-core AVX2 machine,
        # alone, 2026-12-04 (`tokenizer.vocab_size=8192` with the preset before): loss +0.125
        # over the base (+0.131 at 4,096), 97.5% of the gap, codes ahead on 12 of 14
        # regexes by a median 30.2 points (13, 22.7), 6 of 6 topics, primed shares 15-42%
        # (8-34%). The preset as it is, alone: 50 min 2 s, +0.123, 97.5%, 12 of 14 by a
        # median 22.6, 6 of 6 topics; held-out topics 8 of 12 (5 at 4,096 tokens), 13 of 18
        # with a fourth file: docs/results/language.md
        "tokenizer": {"vocab_size": 8192},
        "net": NET,
        "base": {"steps": 2800, "eval_every": 400, "eval_batches": 16, "checkpoint_every": 400},
        "codebook": {
            "sites": ["attn_heads"],
            "steps": 700,
            "freeze_base_steps": 250,
            "lr": 3e-4,
            "codebook_lr": 1e-3,
            "warmup_steps": 25,
            "attn_num_codes": 2048,
            "attn_k": 4,
            "mlp_num_codes": 4096,
            "mlp_k": 8,
            "kmeans_tokens": 16384,
            "commitment_weight": 0.25,
            "distill_weight": 1.0,
            "eval_every": 125,
            "checkpoint_every": 125,
            # the control (the base trained on without codebooks for the same steps) took
            # 219 s of 36 min on the AVX-512 machine: the budget goes to the stages that
            # make the model (codebook.control=true puts it back)
            "control": False,
        },
        # the measured selection may spend most of the target's fluency budget (1 nat):
        # on the cpu preset's model it raised the steered shares from 6-18% (target_rate
        # 0.03, max_cost 0.5) to 9-44% at costs of 0.41-0.88 nats; the forced codes are
        # added to the k the search chose (append) rather than put in place of the last
        # ones: 4-63% at 0.54-0.83 nats
        # the measured path is sampled at four prefixes from held-out seeds and the one
        # with the largest share within 0.8 nats (measured) is kept (select: calibrated);
        # the prefixes are found by bisection on their measured costs, from the longest
        # predicted within 0.8 (on the full-size model: war 29% at 0.66 nats against 23%
        # at 0.32 with prefixes spread evenly by predicted cost, the others the same);
        # two paths are calibrated, one per objective (on the model with output
        # embeddings from co-occurrence counts: mean share 28.8% against 25.2% with the
        # log_prob path alone, war 47% against 27%; on the model before, 18.2% against
        # 19.7%: the gain is partly the calibration's noise)
        # samples of 96 new tokens (the paper's protocol sampled 200; the network has 128
        # positions), where they were 32: on the model of the run before, war 13% -> 65%,
        # food 4% -> 98%, animals 4% -> 60% (sea 25%, music 23%; at 32 tokens 0 of 6
        # topics reached 60%). With samples that long the calibration samples 10 per
        # prompt (with 5, the share it measured at a prefix missed the measurement's by up
        # to 18 points), tries 5 prefixes of each path and keeps one within 0.9 nats (on
        # 100 held-out samples its cost was never below the measurement's; 0.8 before)
        # the path is the greedy one (steer.search: greedy), each step the candidate that
        # gains the most per fluency cost given the codes already chosen, where it was the
        # candidates in the order of what each gains alone: on the model of the run before,
        # the six topics of topics-heldout.yaml went from 2 of 6 steered (weather 27%, fire
        # 97%, plants 70%, sickness 13%, school 5%, crime 11%) to 3 of 6 (weather 82%, fire
        # 99%, plants 99%, sickness 14%, school 20%, crime 10%); it measures each candidate
        # about 3.5 times per path, so it measures on 8 blocks of the held-out samples (16
        # before). The greedy path's cost rises faster near its end, so the kept prefix is
        # one within 0.8 held-out nats (0.9 before): at 0.9 the run /tmp/lm/G1 kept war at
        # 0.896 held-out nats and measured 1.0002 (animals 0.881 -> 0.9997)
        # the candidates are screened from a wider pool (steer.screen_per_group: each head's
        # 64 codes of largest first-order effect forced alone on 2 measuring blocks, the 8
        # that gain the most per fluency cost kept), and a path may force up to 8 codes of
        # one head (steer.max_per_group; the codebook's k = 4 before): on the models of
        # /tmp/lm/W2 the six topics of topics-heldout.yaml went from a mean share of 60.5%
        # (weather 91%, fire 99%, plants 100%, sickness 22%, school 28%, crime 23%) to
        # 68.2% (74, 100, 99, 32, 46, 58), still 3 of 6 steered (docs/results/language.md)
        "steer": {
            "select": "calibrated",
            # one path, the topic rate's (objective: both before): in the 30 topic runs
            # of 2026-12-04 (five runs of six topics, three files, two tokenizers) the rate
            # path's best prefix within 0.8 held-out nats cleared 60% wherever the log_prob
            # path's did, and the second path took half the steering stage
            "objective": "rate",
            "screen_per_group": 64,
            "max_per_group": 8,
            "target_rate": 0.3,
            "explore_cost": 2.4,
            "calibration_points": 5,
            "calibration_search": "bisect",
            "calibration_samples": 10,
            "max_cost": 0.8,
            "mode": "append",
            "max_new_tokens": 96,
            "measure_blocks": 8,
        },
    },
    # the same experiment on a shorter budget (at most 15 minutes here): half-size
    # batches, shorter stages, no control, fewer measuring batches and a smaller cache.
    # The stages are twice as long as they were (base 600 steps, codebook 150), with the
    # cpu preset's steering path (the topic rate's, from a screened pool, up to 8 codes a
    # head): on a 2-core AVX2 machine, alone, 2026-12-05, the demo as it was took 5 min
    # 50 s (its budget predicted 7.7 min) and steered 1 of 6 topics (mean share 30.5%,
    # base loss 4.907); with the longer stages 8 min 23 s, 2 of 6 (56.3%, base 4.424);
    # with the cpu preset's path as well 8 min 34 s, 4 of 6 (60.3%): the same models, so
    # the path made the last step (docs/results/language.md). On a slower machine the
    # budget shortens the stages to fit its 12 minutes
    "demo": {
        "budget_minutes": 12,
        "net": NET,
        "base": {"steps": 1200, "batch_size": 16, "eval_every": 200, "eval_batches": 8},
        "codebook": {
            "sites": ["attn_heads"],
            "steps": 250,
            "batch_size": 16,
            "lr": 3e-4,
            "codebook_lr": 1e-3,
            "warmup_steps": 15,
            "attn_num_codes": 1024,
            "attn_k": 4,
            "mlp_num_codes": 2048,
            "mlp_k": 8,
            "kmeans_tokens": 8192,
            "eval_every": 50,
            "checkpoint_every": 50,
            "control": False,
        },
        "measure": {"eval_batches": 8, "ablation_batches": 8, "cache_tokens": 60_000},
        # one path (with two, the demo's steering took 368 s of its 12 minutes and left
        # its base 71% of its steps, mean share 8.5%; with one, 223 s, 83%, 10.7%): the
        # topic rate's, as the cpu preset's, from each head's 32 codes of largest
        # first-order effect screened down to 4, up to 8 codes of one head
        "steer": {
            "select": "calibrated",
            "objective": "rate",
            "candidates_per_group": 4,
            "screen_per_group": 32,
            "max_per_group": 8,
            "target_rate": 0.3,
            "explore_cost": 1.6,
            "calibration_points": 3,
            "calibration_search": "bisect",
            "calibration_samples": 5,
            "max_cost": 0.8,
            "mode": "append",
            "max_new_tokens": 96,
            "measure_blocks": 8,  # as the cpu preset's greedy path
        },
    },
    # SmolLM2-135M (the offline asset) as it is, with codebooks on the attention heads of
    # some of its layers, trained with the network frozen on the LM loss plus the KL to
    # SmolLM2 (route c' of docs/results/language.md: it meets the loss target; no topic
    # steered)
    "smollm2": {
        "net": {"source": "smollm2-135m", "layers": 30},
        "data": {"max_train_tokens": 2_000_000},
        "base": {"steps": 0, "batch_size": 8},
        "codebook": {
            "sites": ["attn_heads"],
            "layers": [6, 10, 14, 18],
            "steps": 100,
            "batch_size": 8,
            "codebook_lr": 1e-3,  # the network is frozen: its lr is unused
            "warmup_steps": 10,
            "attn_num_codes": 1024,
            "attn_k": 8,
            "kmeans_tokens": 16384,
            "freeze_base": True,
            "distill_weight": 1.0,
            "control": False,
            "eval_every": 50,
            "eval_batches": 4,
            "checkpoint_every": 50,
            "log_every": 10,
        },
        "measure": {"eval_batches": 16, "ablation_batches": 8, "cache_tokens": 40_000},
        "steer": {"select": "text"},
    },
    # a larger network, meant for a GPU. On the offline corpus (about 3 M tokens) the base
    # overfits past 1,200 steps of 64 x 256 tokens (an H200, 2026-12-04: held-out loss
    # 3.649 at step 1,200, 3.863 at 2,000, 5.861 at 4,000; docs/benchmarks.md), so the
    # stages are sized to the corpus; with a larger data.corpus, raise base.steps and
    # codebook.steps with it. The codebook stage's length was not measured on a GPU.
    "paper": {
        "tokenizer": {"vocab_size": 8192},
        "data": {"seq_len": 256},
        "net": {"layers": 4, "hidden": 512, "heads": 8, "mlp": 2048},
        "base": {"steps": 1200, "batch_size": 64, "lr": 1e-3, "warmup_steps": 500},
        "codebook": {
            "steps": 600,
            "batch_size": 64,
            "lr": 3e-4,
            "attn_num_codes": 4096,
            "mlp_num_codes": 8192,
        },
        "measure": {"cache_tokens": 1_000_000},
    },
    # seconds, for tests: every stage runs, nothing is meaningful
    "tiny": {
        "tokenizer": {"vocab_size": 300, "max_chars": 200_000},
        "data": {"seq_len": 32, "max_train_tokens": 20_000},
        "net": {"layers": 1, "hidden": 32, "heads": 2, "mlp": 64},
        "base": {"steps": 6, "batch_size": 4, "warmup_steps": 2, "log_every": 3},
        "codebook": {
            "steps": 4,
            "batch_size": 4,
            "warmup_steps": 1,
            "log_every": 2,
            "attn_num_codes": 32,
            "attn_k": 2,
            "mlp_num_codes": 64,
            "mlp_k": 4,
            "kmeans_tokens": 512,
        },
        "measure": {
            "eval_batches": 2,
            "ablation_batches": 2,
            "cache_tokens": 3000,
            "min_count": 2,
            "neuron_sample": 64,
        },
        "steer": {
            "samples_per_prompt": 2,
            "max_new_tokens": 8,
            "min_count": 2,
            "select": "calibrated",
            "calibration_points": 2,
            "calibration_samples": 2,
        },
    },
}
