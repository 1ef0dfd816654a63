"""The neuron baseline's counts by sorted columns equal a pass over every position."""

from __future__ import annotations

import math

import torch

from codebook_lens.data.fsm import FSM
from codebook_lens.experiments.tokfsm import classify as C


def brute_force(fsm, tokens, acts, recalls, trigram=False):
    """The definition, one class at a time: threshold each neuron (either sign) where
    the class's ``recall`` is reached; precision = class positions over it / all over it."""
    labels, _ = C._class_labels(fsm, tokens, trigram)
    mask = labels >= 0
    states = labels[mask]
    names = list(acts)
    matrix = torch.cat([acts[n][mask] for n in names], dim=1)
    matrix = torch.cat([matrix, -matrix], dim=1)
    out = []
    for s, recall in enumerate(recalls):
        pos = states == s
        if int(pos.sum()) == 0 or recall <= 0:
            out.append(None)
            continue
        need = max(1, math.ceil(recall * int(pos.sum()) - 1e-9))
        precision = []
        for f in range(matrix.shape[1]):
            threshold = sorted(matrix[pos, f].tolist(), reverse=True)[need - 1]
            over = matrix[:, f] >= threshold
            precision.append(int((over & pos).sum()) / max(1, int(over.sum())))
        out.append(max(precision))
    return out


def test_count_at_least_matches_comparisons_with_ties():
    gen = torch.Generator().manual_seed(0)
    matrix = torch.randint(-3, 4, (50, 7), generator=gen).float()  # many ties
    thresholds = torch.randint(-4, 5, (9, 14), generator=gen).float()
    # columns 7..13 are the same neurons negated
    signed = torch.cat([matrix, -matrix], dim=1)
    expected = (signed.unsqueeze(0) >= thresholds.unsqueeze(1)).sum(1)
    assert torch.equal(C._count_at_least(matrix, thresholds, chunk=3), expected)


def test_precision_at_recalls_matches_brute_force():
    fsm = FSM.random(12, 3, 4, seed=0)  # 2 digits per state
    gen = torch.Generator().manual_seed(1)
    walks = fsm.walks(24, 6, gen)
    tokens = torch.cat([torch.full((24, 1), fsm.bos), fsm.encode_states(walks)], dim=1)
    # coarse values: ties at thresholds are common
    acts = {
        "layer0_attn": torch.randint(-2, 3, (24, tokens.shape[1], 3), generator=gen).float(),
        "layer0_mlp": torch.randn(24, tokens.shape[1], 4, generator=gen),
    }
    for trigram, classes in ((False, fsm.num_states), (True, (fsm.num_states + 1) * fsm.base)):
        recall_sets = [
            torch.rand(classes, generator=gen).tolist(),
            [1.0] * classes,
            [0.0] * classes,
        ]
        results = C.neuron_precision_at_recalls(fsm, tokens, acts, recall_sets, trigram)
        for recalls, got in zip(recall_sets, results, strict=True):
            want = brute_force(fsm, tokens, acts, recalls, trigram)
            assert len(got) == classes
            for g, w in zip(got, want, strict=True):
                if w is None:
                    assert g["neuron"] is None and math.isnan(g["precision"])
                else:
                    assert abs(g["precision"] - w) < 1e-12
        assert any(w is not None for w in brute_force(fsm, tokens, acts, [1.0] * classes, trigram))
