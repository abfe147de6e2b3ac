"""The Monte Carlo oracle: continuations follow the target's distribution (exact one-step
probabilities), respect EOS and the total length, cost exactly what they compute; finished prefixes
cost nothing; the split-half correction recovers a known correlation; the oracle scorer's cache."""

import math
import random

import pytest
import torch

from specalign.decode.oracle import OracleScorer, corrected_r, mc_values, parse_oracle, split_half
from specalign.decode.cost import ModelCost
from specalign.errors import SpecError
from specalign.models.loading import chat_prompt
from specalign.models.scorers import Scorer, build_scorer

EOS = 2


def _last_token_is(t):
    def f(prompts, responses, finished):
        return [float(r.endswith(t)) for r in responses]
    return f


def test_one_step_continuation_matches_the_model_distribution(tiny, tok):
    """max_new_tokens = k + 1: each value is 1[the sampled token is t]; its mean over M rows is the
    model's probability of t after prompt + prefix (within 5 standard errors), and the cost is one
    prefill of each distinct prefix (no decode step: every row ends at the length cap)."""
    ids = chat_prompt(tok, "hi")
    prefixes = [tok.encode("ab", add_special_tokens=False), tok.encode("ba", add_special_tokens=False)]
    m = 3000
    cost = ModelCost()
    probs = []
    with torch.inference_mode():
        for p in prefixes:
            logits = tiny(torch.tensor([ids + p])).logits[0, -1].float()
            probs.append(torch.softmax(logits, -1))
    t = max(range(3, probs[0].numel()), key=lambda i: float(probs[0][i] * (1 - probs[0][i])))  # a likely char
    char = tok.convert_ids_to_tokens(t)
    scorer = build_scorer(_last_token_is(char))
    values = mc_values(tiny, tok, ids, prefixes, scorer, m, 3, torch.Generator().manual_seed(0), eos_ids={EOS},
                       max_batch_tokens=10**6,
                       cost=cost)
    assert [len(v) for v in values] == [m, m]
    for v, pr in zip(values, probs):
        p = float(pr[t])
        assert abs(sum(v) / m - p) < 5 * math.sqrt(p * (1 - p) / m) + 1e-9
    assert cost.positions == 2 * (len(ids) + 2)


class Recording(Scorer):
    """Scores a candidate by its token count and keeps every candidate it saw."""
    name = "recording"

    def __init__(self):
        super().__init__()
        self.seen = []

    def _score(self, candidates):
        self.seen += candidates
        return [float(len(c.response_ids)) for c in candidates]


def test_continuations_respect_eos_and_the_total_length(tiny, tok):
    """Scored responses are prefix + continuation (EOS stripped), finished, at most max_new_tokens in all;
    positions = one prefill of the prefix + every sampled token but each row's last (fed back)."""
    ids = chat_prompt(tok, "hi")
    pre = tok.encode("abc", add_special_tokens=False)
    cost = ModelCost()
    scorer = Recording()
    ends = {t for t in range(3, len(tok)) if t % 3 == 0} - set(pre)  # many "EOS" ids: some rows end early
    values = mc_values(tiny, tok, ids, [pre], scorer, 8, 10, torch.Generator().manual_seed(1), eos_ids=ends,
                       cost=cost)
    assert len(values[0]) == 8 and len(scorer.seen) == 8
    sampled = 0
    for c in scorer.seen:
        assert c.finished and c.response_ids[:3] == pre and not ends & set(c.response_ids)
        assert c.reason in ("eos", "length") and len(c.response_ids) <= 10
        assert (c.reason == "length") == (len(c.response_ids) == 10)
        sampled += len(c.response_ids) - 3 + (c.reason == "eos")
    assert any(c.reason == "eos" for c in scorer.seen)  # the tiny model ends some rows early
    assert cost.positions == len(ids) + 3 + sampled - 8


def test_finished_prefixes_score_themselves_at_no_target_cost(tiny, tok):
    ids = chat_prompt(tok, "hi")
    cost = ModelCost()
    done_eos = tok.encode("ab", add_special_tokens=False) + [EOS]
    done_len = tok.encode("abcd", add_special_tokens=False)
    values = mc_values(tiny, tok, ids, [done_eos, done_len], build_scorer(lambda p, r, f: [len(x) for x in r]), 4, 4,
                       torch.Generator().manual_seed(0), eos_ids={EOS}, cost=cost)
    assert values == [[2.0] * 4, [4.0] * 4]
    assert cost.positions == 0


def test_same_seed_same_values_and_a_budget_below_one_prefix_is_an_error(tiny, tok):
    ids = chat_prompt(tok, "hi")
    prefixes = [tok.encode(s, add_special_tokens=False) for s in ("ab", "cd", "ef")]
    scorer = build_scorer(lambda p, r, f: [float(len(x)) + 0.01 * sum(map(ord, x)) for x in r])
    a = mc_values(tiny, tok, ids, prefixes, scorer, 4, 12, torch.Generator().manual_seed(3), eos_ids={EOS})
    b = mc_values(tiny, tok, ids, prefixes, scorer, 4, 12, torch.Generator().manual_seed(3), eos_ids={EOS})
    assert a == b
    with pytest.raises(SpecError, match="max-batch-tokens"):
        mc_values(tiny, tok, ids, prefixes, scorer, 4, 12, None, eos_ids={EOS}, max_batch_tokens=10)


def test_split_half_recovers_a_known_correlation():
    """True value v ~ N(0,1) per prefix, held-out final = v + N(0,1) (corr 1/sqrt 2), M = 4 noisy Monte
    Carlo values v + N(0, 2^2): the raw r is attenuated, the corrected one is back at 0.707."""
    rnd = random.Random(0)
    values, finals = [], []
    for _ in range(300):
        shift = rnd.gauss(0, 5)  # prompt effects must not matter (within-prompt)
        vs = [rnd.gauss(0, 1) for _ in range(16)]
        values.append([[shift + v + rnd.gauss(0, 2) for _ in range(4)] for v in vs])
        finals.append([shift + v + rnd.gauss(0, 1) for v in vs])
    rep = split_half(values, finals)
    truth = 1 / math.sqrt(2)
    # reliability of a mean of 4 values with noise variance 4: 1 / (1 + 4/4) = 0.5
    assert abs(rep["reliability"] - 0.5) < 0.05
    assert rep["r"] < truth - 0.1
    assert abs(rep["r_corrected"] - truth) < 0.05
    assert corrected_r(values, finals) == rep["r_corrected"]
    assert rep["prompts"] == 300 and rep["prefixes"] == 300 * 16


def test_split_half_exact_small_case_and_bad_input():
    # halves identical -> split-half r = 1, reliability 1, corrected = raw
    values = [[[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]]]
    finals = [[1.0, 3.0, 2.0]]
    rep = split_half(values, finals)
    assert rep["split_half_r"] == pytest.approx(1.0)
    assert rep["r_corrected"] == pytest.approx(rep["r"])
    assert rep["r"] == pytest.approx(3 / math.sqrt(84))  # corr([1,2,4],[1,3,2]) by hand
    with pytest.raises(SpecError, match="even"):
        split_half([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]], [[1.0, 2.0]])
    with pytest.raises(SpecError):
        parse_oracle("oracle:3")
    assert parse_oracle("oracle:8") == 8 and parse_oracle("judge:sentiment") is None


def test_oracle_scorer_gold_for_finished_mean_for_partial_and_cache(tiny, tok):
    from specalign.models.scorers import Candidate
    ids = chat_prompt(tok, "hi")
    gold = build_scorer(lambda p, r, f: [float(len(x)) for x in r])
    oracle = OracleScorer(tiny, tok, gold, 4, 6, eos_ids={EOS})
    oracle.reset(torch.Generator().manual_seed(0))
    pre = tok.encode("ab", add_special_tokens=False)
    fin = Candidate("hi", "abcdef", True, ids, tok.encode("abcdef", add_special_tokens=False), {"logp": 0.0}, "length")
    part = Candidate("hi", "ab", False, ids, pre, {"logp": 0.0}, None)
    s = oracle([fin, part, part])
    assert s[0] == 6.0 and s[1] == s[2] and 2.0 <= s[1] <= 6.0
    expected = mc_values(tiny, tok, ids, [pre], gold, 4, 6, torch.Generator().manual_seed(0), prompt="hi",
                         eos_ids={EOS})
    assert s[1] == pytest.approx(sum(expected[0]) / 4)
    spent = oracle.target_cost.positions
    assert spent > 0
    assert oracle([part]) == [s[1]] and oracle.target_cost.positions == spent  # cached: no new target work
