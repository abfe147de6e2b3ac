"""Weak-to-strong compositions: SSS rows pruned by Speculative Rejection (implicit reward = the hand-computed
sum of log(qr/q0) of every emitted token; rows kept = the top of the scores), value-guided pruning keeps
the rows a scripted value head ranks highest, Best-of-N over SSS, adaptive rejection over SSS, and the
decode API / CLI compositions."""

import pytest
import torch

from specalign.decode.adaptive import AdaptiveRejection
from specalign.decode.api import DecodeConfig, Decoder
from specalign.decode.best_of_n import BestOfN
from specalign.decode.sampling import SamplingParams
from specalign.decode.spec_rejection import SpeculativeRejection
from specalign.decode.sss import LOG_FLOOR, SSSGenerator
from specalign.models.loading import chat_prompt
from specalign.models.scorers import Scorer, build_scorer
from specalign.models.testing import char_tokenizer, perturbed_copy, tiny_llama


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    target = tiny_llama(seed=0, init_scale=8.0)
    q0 = perturbed_copy(target, scale=0.5, seed=5)
    qr = perturbed_copy(q0, scale=1.5, seed=4)
    return target, qr, q0, char_tokenizer()


def sss(models, max_new_tokens=16, gamma=3):
    target, qr, q0, tok = models
    return SSSGenerator(target, qr, q0, tok, SamplingParams(1.0), max_new_tokens=max_new_tokens, gamma=gamma)


@torch.inference_mode()
def hand_implicit(qr, q0, prompt_ids, tokens):
    """sum_t log qr(y_t | prefix) - log q0(y_t | prefix), both floored as SSS floors them, by full forwards."""
    seq = torch.tensor([list(prompt_ids) + list(tokens)])
    lr = torch.log_softmax(qr(seq).logits[0].float(), -1).clamp(min=LOG_FLOOR)
    l0 = torch.log_softmax(q0(seq).logits[0].float(), -1).clamp(min=LOG_FLOOR)
    start = len(prompt_ids)
    return sum(float(lr[start - 1 + j, t] - l0[start - 1 + j, t]) for j, t in enumerate(tokens))


def test_implicit_scorer_is_the_hand_computed_log_ratio_sum_under_spec_rejection(models):
    target, qr, q0, tok = models
    gen = sss(models)
    ids = chat_prompt(tok, "hi")
    scorer = build_scorer("implicit")
    seen = []

    class Spy(Scorer):
        name = "spy"

        def _score(self, candidates):
            out = scorer(candidates)  # token lists copied now: a running row's list keeps growing
            seen.append(([(list(gen_tokens(gen, c)), dict(c.stats)) for c in candidates], out))
            return out

    spr = SpeculativeRejection(n=6, alpha=0.5, decision="tokens:5")
    result = spr.run(gen, Spy(), "hi", ids, torch.Generator().manual_seed(1))
    assert len(result["rounds"]) >= 2
    checked = 0
    for candidates, out in seen:  # partial and final responses, every round
        for (tokens, stats), s in zip(candidates, out):
            assert s == stats["implicit"]
            assert s == pytest.approx(hand_implicit(qr, q0, ids, tokens), abs=2e-4)
            checked += 1
    assert checked >= 9
    # every round keeps the top round((1 - alpha) * pool) of the implicit scores
    for r in result["rounds"]:
        assert r["kept"] == max(1, int((r["pool"] * 0.5) + 0.5))


def gen_tokens(gen, candidate):
    """The row's emitted tokens (the EOS included when it ended with one): what the implicit sum covers."""
    return candidate.response_ids + ([next(iter(gen.eos_ids))] if candidate.reason == "eos" else [])


class PrefixValue(Scorer):
    """A scripted value head: v(prefix) = sum of a fixed weight per emitted token, for every prefix."""

    name = "value:scripted"

    def __init__(self, weights):
        super().__init__()
        self.weights = weights

    def value(self, tokens):
        return float(sum(self.weights[t] for t in tokens))

    def _score(self, candidates):
        return [self.value(c.response_ids) for c in candidates]


def test_value_guided_pruning_keeps_the_rows_the_head_ranks_highest(models):
    target, qr, q0, tok = models
    weights = torch.randn(len(tok), generator=torch.Generator().manual_seed(7)).tolist()
    head = PrefixValue(weights)
    gen = sss(models, max_new_tokens=20)
    ids = chat_prompt(tok, "hi")
    spr = SpeculativeRejection(n=8, alpha=0.75, decision="tokens:4")
    result = spr.run(gen, head, "hi", ids, torch.Generator().manual_seed(2))
    rows = gen.rows
    finished_kept = []
    for r in result["rounds"]:
        pool = finished_kept + r["row_ids"]
        # the head's own values of each row's prefix at this decision, recomputed from the recorded scores
        value = dict(zip(r["row_ids"], r["scores"]))
        value.update({i: round(head.value(gen.response_ids(i)), 6) for i in finished_kept})
        expected = sorted(pool, key=lambda i: (-value[i], i))[:max(1, int(len(pool) * 0.25 + 0.5))]
        assert r["kept_ids"] == expected
        finished_kept = [i for i in expected if rows[i].finished]
    # the recorded scores are the head's values of the prefixes (checked on the finished rows' full text)
    finished = [i for i in range(8) if rows[i].finished]
    assert finished
    for i in finished:
        assert result["scores"][i] == pytest.approx(head.value(gen.response_ids(i)))
    assert result["best"] == max(finished, key=lambda i: (result["scores"][i], -i))
    pruned = [i for i in range(8) if rows[i].reason == "pruned"]
    assert len(pruned) >= 4


def test_best_of_n_over_sss_and_adaptive_over_sss(models):
    target, qr, q0, tok = models
    ids = chat_prompt(tok, "hi")
    gen = sss(models, max_new_tokens=12)
    result = BestOfN(n=5).run(gen, build_scorer("implicit"), "hi", ids, torch.Generator().manual_seed(3))
    assert len(result["candidates"]) == 5
    assert all(c.finished for c in result["candidates"])
    assert result["best"] == max(range(5), key=lambda i: (result["scores"][i], -i))
    adaptive = AdaptiveRejection(n=6, decision="tokens:3")
    out = adaptive.run(sss(models, max_new_tokens=12), build_scorer("implicit"), "hi", ids,
                       torch.Generator().manual_seed(3))
    assert out["rounds"][0]["rows"] == 6 and "adaptive" in out["rounds"][0]


def test_compositions_through_the_decode_api(models):
    """DecodeConfig(method=spec-rejection, generator=sss, scorer=implicit) composes with no new code."""
    target, qr, q0, tok = models
    for alpha in ("0.5", "auto"):
        cfg = DecodeConfig(model="unused", method="spec-rejection", generator="sss", draft="unused",
                           scorer="implicit", n=4, alpha=alpha, decision="tokens:4", max_new_tokens=12, seed=0)
        rec = Decoder(cfg, generator=sss(models, max_new_tokens=12)).run(["hi"], progress=False)[0]
        assert rec["method"] == "spec-rejection+sss"
        assert rec["rounds"][0]["rows"] == 4
        assert set(rec["cost"]) >= {"target", "draft", "draft_ref", "scorer", "acceptance_rate"}
        assert rec["score"] == pytest.approx(hand_implicit(qr, q0, chat_prompt(tok, "hi"),
                                                           tok(rec["response"], add_special_tokens=False)[
                                                               "input_ids"] + ([2] if rec["finish_reason"] == "eos"
                                                                               else [])), abs=2e-4)
