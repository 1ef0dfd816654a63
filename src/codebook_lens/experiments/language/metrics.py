"""The keys of a language run's ``metrics.json`` and what each means."""

METRIC_KEYS = {
    "base.loss": "held-out next-token loss of the base model (nats per token)",
    "base.accuracy": "held-out next-token accuracy of the base model",
    "codebook.loss": "the same for the codebook model (codebooks on)",
    "codebook.accuracy": "held-out next-token accuracy of the codebook model",
    "codebook.kl": "KL divergence from the base model's next-token distribution to the "
    "codebook model's, mean per held-out token (nats)",
    "codebook_off.loss": "the codebook model's network with its codebooks off",
    "codebook_off.accuracy": "its next-token accuracy",
    "control.loss": "the base trained on for the codebook stage's steps without codebooks "
    "(the same training budget as the codebook model; absent without a control stage)",
    "control.accuracy": "its next-token accuracy",
    "ablated.loss": "the base with every codebook site replaced by its mean activation "
    "(over training text)",
    "ablated.accuracy": "its next-token accuracy",
    "gap_recovered": "(ablated.loss - codebook.loss) / (ablated.loss - base.loss): the share "
    "of the loss gap to mean ablation that the codebooks recover",
    "loss_increase": "codebook.loss - base.loss",
    "loss_increase_vs_control": "codebook.loss - control.loss",
    "frequency.<codebook>.exponent": "power-law exponent b of activation count ~ rank^-b "
    "over the codes that fire on the cache (heads pooled; paper Figure 4)",
    "frequency.<codebook>.r2": "R^2 of that fit on log-log axes",
    "frequency.<codebook>.dead_fraction": "codes that never fire on the cache",
    "regex.regexes": "regular expressions measured (the regex file's)",
    "regex.codes_win_share": "share of regexes whose code (the most precise code firing at "
    "least measure.min_count times with recall >= measure.min_recall) is more precise than "
    "the best single neuron of the same network at the code's recall (paper Figure 3)",
    "regex.median_lead_points": "median over regexes of code precision minus neuron "
    "precision, in points (a regex without a qualifying code counts -100)",
    "regex.mean_code_precision": "mean precision of the regexes' codes",
    "regex.mean_neuron_precision": "mean precision of the best neurons at those recalls",
    "regex_lead.<name>": "that lead for one regex (fraction, not points)",
    "steer.<topic>.baseline_share": "share of unsteered samples that mention the topic "
    "(a topic word as a whole word, ignoring case)",
    "steer.<topic>.steered_share": "the same with the topic's codes forced on at every "
    "position at steer.strength (same prompts and seeds)",
    "steer.<topic>.fluency_cost": "the unsteered model's mean loss per token on the steered "
    "samples minus that on the unsteered samples (nats)",
    "steer.<topic>.primed_share": "share of unsteered samples on topic when the topic's "
    "passage precedes every prompt (same seeds): how far the model carries a topic forward "
    "by itself (absent for a topic without a passage)",
    "steer.<topic>.topic_rate": "mean probability that the next word is a topic word (each "
    "token a topic word starts with, weighted by how often it starts one in the cached "
    "text), over every position of the unsteered samples (absent when no topic word occurs "
    "in the cache or is a token of its own)",
    "steer.<topic>.forced_topic_rate": "the same with the topic's codes forced as in "
    "steering, on the same unsteered text: what forcing does at the first step",
    "steer.topics": "topics measured (the topic file's)",
    "steer.topics_steered": "topics with steered share >= 0.6, unsteered share <= 0.2 and "
    "fluency cost <= 1 nat",
    "steer.mean_baseline_share": "mean unsteered share over topics",
    "steer.mean_steered_share": "mean steered share over topics",
    "steer.mean_fluency_cost": "mean fluency cost over topics",
    "steer.<topic>.calibration_points": "select: calibrated: prefixes of the measured path "
    "sampled from the held-out seeds (absent for other selections)",
    "steer.<topic>.calibration_share": "select: calibrated: the chosen prefix's share on "
    "topic on the held-out samples (absent when no prefix was within steer.max_cost)",
    "steer.<topic>.calibration_cost": "its fluency cost on the held-out samples (nats)",
    "budget.scale": "the factor the base's steps were scaled by to fit budget_minutes on "
    "this machine (1: full size; absent without a budget)",
    "budget.codebook_scale": "the factor the codebook (and control) stage's steps were "
    "scaled by: the square root of budget.scale",
    "budget.step_seconds": "one base training step on this machine, as timed for the budget",
    "budget.forward_seconds": "a forward pass of 32 sequences on this machine, as timed (the "
    "measurements' cost per token)",
    "budget.sample_seconds": "steering samples per prompt (one batch of every prompt, over the prompts), as timed",
    "budget.predicted_minutes": "the run at full size, as the budget's cost model predicted",
    "seconds.<stage>": "wall-clock time of each stage (tokenizer, base, codebook, control, "
    "quality, cache, regex, steer)",
}
