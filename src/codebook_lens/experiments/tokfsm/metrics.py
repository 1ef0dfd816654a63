"""The keys of a TokFSM run's ``metrics.json`` and what each means."""

METRIC_KEYS = {
    "base.lm_loss": "held-out next-token loss of the base model (nats)",
    "base.next_token_accuracy": "held-out next-token accuracy of the base model",
    "base.state_accuracy": "valid transitions among those the base model samples from BOS",
    "base.first_transition_accuracy": "the first sampled transition is valid",
    "base.valid_transition_mass": "teacher-forced: probability of valid next states after "
    "true walks",
    "base.valid_mass_after_jump": "the same when the walk's last state is a random state "
    "(a slip): recovery from the model's own kind of mistake",
    "base.shifted_state_accuracy": "the sampled sequences read with digits paired one token "
    "later (chance ~ out_degree / num_states; higher = the model slipped alignment)",
    "codebook.*": "the same for the codebook model",
    "purity.<site>.<layer>": "bigram purity over all inputs: the model reads every BOS + "
    "state once; fraction of the codes active at the state's last digit that fire on one "
    "state only (paper Figure 5)",
    "purity_trigram.<site>.<layer>": "the same over every BOS + state + next digit, at that digit",
    "purity_walks.<site>.<layer>": "over the analysis walks: fraction of active codes whose "
    "activations all share one state (last digit) or one state plus digit (first digit)",
    "code_precision": "mean over states of the best code's precision (last digit of a state)",
    "code_recall": "mean recall of those codes",
    "neuron_precision": "mean over states of the best base-model neuron's precision at "
    "the code's recall; neurons: attention and MLP outputs of every layer, either sign",
    "neuron_precision_hidden": "the same with the MLP hidden units as neurons too",
    "neuron_precision_full_recall": "the best output neuron's precision at recall 1, mean "
    "over states: a perfect code (precision and recall 1) leads the neurons by 1 minus this",
    "trigram_code_precision": "the same as code_precision for state plus next digit (at "
    "first digits; 1,010 classes): the best code's precision, mean over classes",
    "trigram_code_recall": "mean recall of those codes",
    "trigram_neuron_precision": "the best attention/MLP output neuron's precision at the "
    "trigram code's recall, mean over classes",
    "trigram_neuron_precision_full_recall": "the same at recall 1",
    "jsd.<site set>": "intervention JSD to the target state's successors, / no intervention; "
    "state and state-plus-digit codes swapped (paper Figure 2)",
    "jsd_state_only.<site set>": "the same with only the state's own codes swapped",
    "target_mass.<site set>": "model probability on the target state's successors",
    "frequency.<codebook>.dead_fraction": "codes that never fire on the analysis sequences",
    "seconds.<stage>": "wall-clock time of each stage",
}
