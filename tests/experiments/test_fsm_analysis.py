"""TokFSM analyses on constructed cases with hand-computed answers, and the CLI end to end."""

from __future__ import annotations

import collections
import json
import types

import pytest
import torch
from torch import nn

from codebook_lens.core.codebook import Codebook, CodebookConfig
from codebook_lens.data.fsm import FSM
from codebook_lens.experiments.tokfsm import analysis as A
from codebook_lens.experiments.tokfsm import classify as C


def tokens_of(*seqs: list[int]) -> torch.Tensor:
    return torch.tensor(seqs, dtype=torch.long)


def test_position_labels_hand_computed():
    fsm = FSM.random(100, 10, 10, seed=0)
    # BOS 37 12 (states 37, 12)
    tok = tokens_of([10, 3, 7, 1, 2])
    bigram, trigram = A.position_labels(fsm, tok)
    assert bigram.tolist() == [[-1, -1, 37, -1, 12]]
    # first digit 3 after BOS (prev = 100 stands for BOS); first digit 1 after state 37
    assert trigram.tolist() == [[-1, 100 * 10 + 3, -1, 37 * 10 + 1, -1]]


def test_purity_hand_computed():
    fsm = FSM.random(100, 10, 10, seed=0)
    tok = tokens_of([10, 3, 7, 1, 2], [10, 3, 7, 1, 5])  # states 37 12 / 37 15
    # one codebook, one group, k = 1; code per position chosen by hand:
    #   code 1: both last digits of state 37            -> pure (bigram)
    #   code 2: first digit "1" after 37, twice         -> pure (trigram: 37 then 1)
    #   code 3: last digits of 12 and 15                -> impure
    #   code 4: first digit after BOS in both rows      -> pure (trigram: BOS then 3)
    #   code 0 fires only on BOS, which is not a state token: not counted as active
    codes = torch.tensor([[0, 4, 1, 2, 3], [0, 4, 1, 2, 3]]).view(2, 5, 1, 1)
    out = A.purity(fsm, tok, {"layer0_mlp": codes}, {"layer0_mlp": 8})["layer0_mlp"]
    assert out["active_codes"] == 4
    assert out["purity"] == pytest.approx(3 / 4)
    assert out["bigram"] == pytest.approx(1 / 4)
    assert out["trigram"] == pytest.approx(2 / 4)
    # a lenient threshold makes code 3 (half 12, half 15) pure
    lenient = A.purity(fsm, tok, {"k": codes}, {"k": 8}, threshold=0.5)["k"]
    assert lenient["purity"] == 1.0


def test_groups_do_not_share_codes_in_purity():
    fsm = FSM.random(100, 10, 10, seed=0)
    tok = tokens_of([10, 3, 7, 1, 2])
    # group 0 fires code 5 on 37 and on 12; group 1 fires code 5 on 37 only and code 6 on 12
    codes = torch.zeros(1, 5, 2, 1, dtype=torch.long)
    codes[0, 2, 0, 0] = 5
    codes[0, 4, 0, 0] = 5
    codes[0, 2, 1, 0] = 5
    codes[0, 4, 1, 0] = 6
    out = A.purity(fsm, tok, {"k": codes}, {"k": 8})["k"]
    # active: g0 code0 (trigrams 103 and 371: impure), g0 code5 (impure),
    #         g1 code0 (impure), g1 code5 (pure), g1 code6 (pure)
    assert out["active_codes"] == 5
    assert out["purity"] == pytest.approx(2 / 5)


def test_best_code_and_neuron_precision_hand_computed():
    fsm = FSM.random(100, 10, 10, seed=0)
    # last digits of 4 state tokens: 37, 37, 12, 15
    tok = tokens_of([10, 3, 7, 3, 7], [10, 1, 2, 1, 5])
    codes = torch.zeros(2, 5, 1, 1, dtype=torch.long)
    codes[0, 2] = 1  # 37
    codes[0, 4] = 1  # 37
    codes[1, 2] = 1  # 12 -> code 1 has precision 2/3, recall 1 for state 37
    codes[1, 4] = 2  # 15
    best = C.best_codes_per_state(fsm, tok, {"k": codes}, {"k": 4})
    assert best[37]["precision"] == pytest.approx(2 / 3) and best[37]["recall"] == 1.0
    assert best[15]["precision"] == 1.0 and best[15]["recall"] == 1.0
    # a neuron equal to 3, 1, 2, 0 on those positions (37, 37, 12, 15), at recall 1 for 37:
    # threshold 1 -> fires on 37, 37, 12 -> precision 2/3; at recall 0.5: threshold 3 -> 1/1
    acts = torch.zeros(2, 5, 1)
    acts[0, 2, 0], acts[0, 4, 0], acts[1, 2, 0], acts[1, 4, 0] = 3.0, 1.0, 2.0, 0.0
    recalls = [0.0] * 100
    recalls[37] = 1.0
    recalls[12] = 1.0
    res = C.neuron_precision_at_recall(fsm, tok, {"layer0_mlp": acts}, recalls)
    assert res[37]["precision"] == pytest.approx(2 / 3)
    # state 12 (value 2): +neuron at threshold 2 fires on 37(3) and 12(2): 1/2;
    # -neuron at threshold -2 fires on values <= 2: 12, 15, 37(1): 1/3 -> best is 1/2
    assert res[12]["precision"] == pytest.approx(1 / 2)
    assert res[12]["neuron"] == "+layer0_mlp[0]"
    recalls[37] = 0.5
    res = C.neuron_precision_at_recall(fsm, tok, {"layer0_mlp": acts}, recalls)
    assert res[37]["precision"] == 1.0
    # state_classification: the paper's neurons (outputs) and, separately, hidden units
    hidden = torch.zeros(2, 5, 1)
    hidden[0, 2, 0] = hidden[0, 4, 0] = 5.0  # fires on 37 only
    res = C.state_classification(
        fsm, tok, {"k": codes}, {"k": 4}, {"layer0_mlp": acts, "layer0_mlp_hidden": hidden}
    )
    by_state = {p["state"]: p for p in res["per_state"]}
    assert by_state[37]["neuron"]["precision"] == pytest.approx(2 / 3)
    assert by_state[37]["neuron_hidden"] == {"precision": 1.0, "neuron": "+layer0_mlp_hidden[0]"}
    assert res["neuron_precision_hidden"] >= res["neuron_precision"]
    # codes at recall 1 for every state: the full-recall neurons are the matched ones
    assert res["neuron_precision_full_recall"] == pytest.approx(res["neuron_precision"])
    # a code on one of 37's two positions only (precision 1, recall 1/2): the neuron at
    # that recall is 1/1 (threshold 3), at recall 1 still 2/3 (threshold 1)
    half = codes.clone()
    half[0, 4] = 3
    res = C.state_classification(fsm, tok, {"k": half}, {"k": 4}, {"layer0_mlp": acts})
    by_state = {p["state"]: p for p in res["per_state"]}
    assert by_state[37]["code"]["recall"] == 0.5 and by_state[37]["code"]["precision"] == 1.0
    assert by_state[37]["neuron"]["precision"] == 1.0
    # states 37, 12, 15 at recall 1: 2/3, 1/2 and 15 (value 0, the lowest): -neuron 1/1
    assert res["neuron_precision_full_recall"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_trigram_code_and_neuron_precision_hand_computed():
    fsm = FSM.random(100, 10, 10, seed=0)
    # first digits: row 0 BOS,3 (class 1003) and 37,1 (371); row 1 BOS,3 (1003) and 37,2 (372)
    tok = tokens_of([10, 3, 7, 1, 2], [10, 3, 7, 2, 5])
    codes = torch.zeros(2, 5, 1, 1, dtype=torch.long)
    codes[0, 1] = codes[1, 1] = 1  # BOS then 3, both rows: precision 1, recall 1
    codes[0, 3] = codes[1, 3] = 2  # 37 then 1 and 37 then 2: precision 1/2 for each
    codes[:, 2] = codes[:, 4] = 3  # last digits are not trigram positions: never counted
    best = C.best_codes_per_state(fsm, tok, {"k": codes}, {"k": 4}, trigram=True)
    assert len(best) == 101 * 10
    assert best[1003] == {"f1": 1.0, "precision": 1.0, "recall": 1.0, "key": "k", "code": 1}
    assert best[371]["precision"] == 0.5 and best[371]["recall"] == 1.0
    assert best[372]["precision"] == 0.5
    # a neuron 0 at BOS-3, 4 at 37-1, 1 at 37-2: at recall 1 for 371 its threshold 4 fires
    # on 371 only; for 372 (threshold 1) it fires on 371 and 372, the -neuron on all four
    acts = torch.zeros(2, 5, 1)
    acts[0, 3, 0], acts[1, 3, 0] = 4.0, 1.0
    res = C.state_classification(fsm, tok, {"k": codes}, {"k": 4}, {"layer1_attn": acts}, True)
    by_class = {p["state"]: p for p in res["per_state"]}
    assert sorted(by_class) == [371, 372, 1003]
    assert by_class[371]["neuron"]["precision"] == 1.0
    assert by_class[372]["neuron"]["precision"] == pytest.approx(1 / 2)
    # 1003 (value 0 twice): the -neuron (0, 0, -4, -1) at threshold 0 fires on them only
    assert by_class[1003]["neuron"]["precision"] == 1.0
    assert res["code_precision"] == pytest.approx((1.0 + 0.5 + 0.5) / 3)
    assert res["neuron_precision"] == pytest.approx((1.0 + 0.5 + 1.0) / 3)


def test_jensen_shannon_hand_computed():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.5, 0.5]])
    q = torch.tensor([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    # third: m = (0.75, 0.25); 0.5*KL(p||m) + 0.5*KL(q||m)
    third = 0.5 * (0.5 * torch.log2(torch.tensor(0.5 / 0.75)) + 0.5 * torch.log2(torch.tensor(2.0)))
    third = third + 0.5 * torch.log2(torch.tensor(1 / 0.75))
    torch.testing.assert_close(
        A.jensen_shannon(p, q), torch.stack([torch.tensor(1.0), torch.tensor(0.0), third])
    )


class TableModel(nn.Module):
    """A model that predicts exactly the FSM's next token from one k=1 codebook whose
    codes are the states: at a state's last digit the code is that state; the next
    digits follow the code's true successor distribution. Swapping the code swaps the
    state, exactly."""

    def __init__(self, fsm: FSM) -> None:
        super().__init__()
        self.fsm = fsm
        n = fsm.num_states
        cb = Codebook(n, CodebookConfig(num_codes=n, k=1, similarity="inner_product"))
        with torch.no_grad():
            cb.weight.copy_(torch.eye(n).unsqueeze(0))
        self.codebooks = nn.ModuleDict({"layer0_mlp": cb})
        self.placement = {"layer0_mlp": ("mlp", 0)}
        succ_digits = fsm.encode_states(fsm.successors).view(n, fsm.out_degree, 2)
        first = torch.zeros(n, fsm.vocab_size)
        second = torch.zeros(n, fsm.base, fsm.vocab_size)
        for s in range(n):
            for d1, d2 in succ_digits[s].tolist():
                first[s, d1] += 1
                second[s, d1, d2] += 1
        self.first = torch.log(first / first.sum(-1, keepdim=True) + 1e-12)
        self.second = torch.log(second / second.sum(-1, keepdim=True).clamp(min=1) + 1e-12)

    def forward(self, input_ids, return_codes=False, **_):
        b, t = input_ids.shape
        n, base = self.fsm.num_states, self.fsm.base
        prev = torch.cat([torch.zeros(b, 1, dtype=torch.long), input_ids[:, :-1]], 1)
        number = (prev.clamp(max=base - 1) * base + input_ids.clamp(max=base - 1)).clamp(max=n - 1)
        out = self.codebooks["layer0_mlp"](nn.functional.one_hot(number, n).float())
        code = out.codes.view(b, t)
        logits = torch.zeros(b, t, self.fsm.vocab_size)
        pos = torch.arange(t)
        last = (pos % 2 == 0) & (pos >= 2)
        logits[:, last] = self.first[code[:, last]]
        firsts = pos % 2 == 1
        firsts[1] = False
        before = code[:, pos[firsts] - 1]
        logits[:, firsts] = self.second[before, input_ids[:, firsts]]

        class Out:
            pass

        o = Out()
        o.logits = logits
        o.codes = {"layer0_mlp": out.codes.view(b, t, 1, 1)} if return_codes else None
        return o


def test_interventions_on_a_constructed_model():
    fsm = FSM.random(100, 10, 10, seed=0)
    model = TableModel(fsm)
    res = A.intervention_jsd(model, fsm, {"layer0_mlp": ["layer0_mlp"]}, pairs=40, seed=3)
    # the swap makes the model act exactly as in the target state
    assert res["jsd"]["none"] == 1.0
    assert res["jsd_bits"]["layer0_mlp"] < 1e-6
    assert res["target_mass"]["layer0_mlp"] == pytest.approx(1.0, abs=1e-6)
    # no intervention: JSD between uniform distributions over the source's and the
    # target's successors = (10 - overlap) / 10 bits
    src, tgt = torch.tensor(res["sources"]), torch.tensor(res["targets"])
    adj = fsm.adjacency()
    overlap = (adj[src] & adj[tgt]).sum(-1).double()
    expected = ((10 - overlap) / 10).mean().item()
    assert res["jsd_bits"]["none"] == pytest.approx(expected, abs=1e-5)
    assert res["target_mass"]["none"] == pytest.approx((overlap / 10).mean().item(), abs=1e-5)


class TrigramTableModel(TableModel):
    """TableModel whose second digit is read from a second codebook at the first digit
    itself: its codes are (state, digit) pairs, so swapping the state codes alone leaves
    the second digit to the source state, and swapping the state-plus-digit codes too
    makes the model act as the target exactly."""

    def __init__(self, fsm: FSM) -> None:
        super().__init__(fsm)
        m = fsm.num_states * fsm.base
        cb = Codebook(m, CodebookConfig(num_codes=m, k=1, similarity="inner_product"))
        with torch.no_grad():
            cb.weight.copy_(torch.eye(m).unsqueeze(0))
        self.codebooks["layer1_mlp"] = cb
        self.placement["layer1_mlp"] = ("mlp", 1)

    def forward(self, input_ids, return_codes=False, **_):
        o = super().forward(input_ids, return_codes=True)
        b, t = input_ids.shape
        n, base = self.fsm.num_states, self.fsm.base
        tok = input_ids.clamp(max=base - 1)
        pad = torch.zeros(b, 2, dtype=torch.long)
        prev = torch.cat([pad, tok], 1)
        number = ((prev[:, :-2] * base + prev[:, 1:-1]) * base + tok).clamp(max=n * base - 1)
        tri = self.codebooks["layer1_mlp"](nn.functional.one_hot(number, n * base).float())
        code = tri.codes.view(b, t)
        pos = torch.arange(t)
        firsts = (pos % 2 == 1) & (pos >= 3)
        c = code[:, firsts]
        o.logits[:, firsts] = self.second[c // base, c % base]
        o.codes = {**o.codes, "layer1_mlp": tri.codes.view(b, t, 1, 1)} if return_codes else None
        return o


def test_interventions_swap_state_plus_digit_codes():
    fsm = FSM.random(100, 10, 10, seed=0)
    model = TrigramTableModel(fsm)
    sets = {"mlp": ["layer0_mlp", "layer1_mlp"]}
    both = A.intervention_jsd(model, fsm, sets, pairs=30, seed=5)
    assert both["jsd_bits"]["mlp"] < 1e-6
    assert both["target_mass"]["mlp"] == pytest.approx(1.0, abs=1e-6)
    # the state codes alone fix the first digit but the second still follows the source
    state_only = A.intervention_jsd(model, fsm, sets, pairs=30, seed=5, next_digits=False)
    assert state_only["jsd_bits"]["none"] == pytest.approx(both["jsd_bits"]["none"])
    assert state_only["jsd_bits"]["mlp"] > 0.05
    assert state_only["target_mass"]["mlp"] < 0.95


def test_purity_over_all_inputs_hand_computed():
    fsm = FSM.random(100, 10, 10, seed=0)
    bigrams, every = A.all_inputs(fsm, every_digit=True)
    assert bigrams.shape == (100, 3) and every.shape == (1000, 4)
    assert bigrams[37].tolist() == [10, 3, 7]
    assert every[37 * 10 + 4].tolist() == [10, 3, 7, 4]
    # by default the next digit is one the machine can produce: a first digit of a
    # successor of the state, counted here by hand
    _, trigrams = A.all_inputs(fsm)
    expected = [
        [10, s // 10, s % 10, d]
        for s in range(100)
        for d in sorted({int(t) // 10 for t in fsm.successors[s]})
    ]
    assert trigrams.tolist() == expected
    assert 100 < len(expected) < 1000
    # TableModel's code at a token is the number its last two digits spell: on BOS + a
    # state that is the state (100 codes, one input each: all pure); on BOS + state +
    # digit it is (second digit, digit), shared by the states with that second digit
    out = A.purity_all_inputs(TableModel(fsm), fsm)["layer0_mlp"]
    assert out["bigram"] == 1.0 and out["bigram_active_codes"] == 100
    pairs = collections.Counter((row[2], row[3]) for row in expected)
    assert out["trigram_inputs"] == len(expected)
    assert out["trigram_active_codes"] == len(pairs)
    assert out["trigram"] == pytest.approx(sum(c == 1 for c in pairs.values()) / len(pairs))
    both = A.purity_all_inputs(TrigramTableModel(fsm), fsm)["layer1_mlp"]
    # the trigram codebook: (state, digit) codes are all distinct on the trigrams;
    # on bigrams it reads (BOS->0, d1, d2): 100 distinct codes
    assert both["trigram"] == 1.0 and both["trigram_active_codes"] == len(expected)
    assert both["bigram"] == 1.0


def test_code_frequencies_sorted_per_codebook():
    codes = torch.tensor([[0, 0, 0, 2, 2, 1]]).view(1, 6, 1, 1)
    counts = A.code_frequencies({"k": codes}, {"k": 5})["k"]
    assert counts.tolist() == [3, 2, 1, 0, 0]
    summary = A.frequency_summary(counts)
    assert summary["active_codes"] == 3 and summary["dead_fraction"] == pytest.approx(0.4)


def test_fsm_command_end_to_end(tmp_path, capsys):
    from codebook_lens.cli.main import main

    out = tmp_path / "run"
    tiny = [
        "task.num_states=12",
        "task.out_degree=3",
        "task.seq_len=33",
        "net.layers=2",
        "net.hidden=32",
        "net.heads=2",
        "net.mlp=64",
        "base.steps=6",
        "base.batch_size=8",
        "base.eval_every=3",
        "codebook.steps=4",
        "codebook.batch_size=8",
        "codebook.eval_every=2",
        "codebook.attn_num_codes=16",
        "codebook.mlp_num_codes=32",
        "codebook.kmeans_tokens=512",
        "analysis.sequences=16",
        "analysis.sample_sequences=8",
        "analysis.eval_batches=1",
        "analysis.pairs=6",
        "analysis.prefix_states=3",
    ]
    assert main(["fsm", "--preset", "cpu", "--out", str(out), *tiny]) == 0
    printed = capsys.readouterr().out
    assert "state accuracy" in printed and "report.html" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "base.state_accuracy",
        "codebook.state_accuracy",
        "base.lm_loss",
        "codebook.lm_loss",
        "code_precision",
        "neuron_precision",
        "jsd.none",
        "jsd.attn",
        "jsd.mlp",
        "jsd.all",
        "jsd.layer0_mlp",
        "purity.mlp.0",
        "purity.attn_heads.1",
        "base.valid_transition_mass",
        "base.valid_mass_after_jump",
        "codebook.valid_mass_after_jump",
        "codebook.shifted_state_accuracy",
        "trigram_code_precision",
        "trigram_neuron_precision",
    ):
        assert key in metrics, key
    for key, value in metrics.items():
        if key.startswith(("purity.", "target_mass.", "jsd.")) or any(
            word in key for word in ("accuracy", "precision", "mass")
        ):
            assert 0.0 <= value <= 1.0, (key, value)
    assert metrics["jsd.none"] == 1.0
    html = (out / "report.html").read_text()
    assert html.count("<svg") >= 5 and "Interventions" in html
    assert (out / "base" / "model").is_dir() and (out / "codebook" / "model").is_dir()
    # a rerun with the same settings loads both models instead of training them
    assert main(["fsm", "--preset", "cpu", "--out", str(out), *tiny]) == 0
    assert "loading the trained model" in capsys.readouterr().out
    again = json.loads((out / "metrics.json").read_text())
    assert again["codebook.lm_loss"] == metrics["codebook.lm_loss"]
    # a moved run is the same run; a changed codebook setting retrains that stage only
    moved = tmp_path / "moved"
    out.rename(moved)
    assert main(["fsm", "--preset", "cpu", "--out", str(moved), *tiny, "codebook.k=2"]) == 0
    printed = capsys.readouterr().out
    assert "base: loading the trained model" in printed
    assert "codebook: settings changed" in printed


def test_fsm_command_rejects_bad_settings(capsys):
    from codebook_lens.cli.main import main

    assert main(["fsm", "--preset", "gpu"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["fsm", "base.stepz=3"]) == 2
    assert "did you mean 'steps'" in capsys.readouterr().err


class UniformModel(nn.Module):
    """Equal logits for every token: every state gets 1 / N after any prefix."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, **_):
        b, t = input_ids.shape
        return types.SimpleNamespace(logits=torch.zeros(b, t, self.vocab) + self.dummy)


def test_valid_mass_with_and_after_a_jump_hand_computed():
    from codebook_lens.experiments.tokfsm.run import valid_transition_mass

    fsm = FSM.random(100, 10, 10, seed=0)
    # the exact table model follows the machine from whatever state it reads
    table = TableModel(fsm)
    assert valid_transition_mass(table, fsm, 33) == pytest.approx(1.0, abs=1e-6)
    assert valid_transition_mass(table, fsm, 33, after_jump=True) == pytest.approx(1.0, abs=1e-6)
    # uniform over 100 states, 10 of them successors of any state
    uniform = UniformModel(fsm.vocab_size)
    assert valid_transition_mass(uniform, fsm, 33) == pytest.approx(0.1)
    assert valid_transition_mass(uniform, fsm, 33, after_jump=True) == pytest.approx(0.1)
