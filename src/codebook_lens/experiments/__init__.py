"""The paper's experiments, each a subpackage with its config, run and report
(:mod:`codebook_lens.experiments.tokfsm`: the algorithmic task)."""
