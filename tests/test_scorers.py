"""Scorers: built-in judges, log-likelihood, reward models from disk, callables, and their checks."""

import math
import sys
import types

import pytest
import torch

from specalign.errors import SpecError
from specalign.models.scorers import Candidate, build_scorer


def cands(*responses, prompt="Say something."):
    return [Candidate(prompt, r) for r in responses]


def test_sentiment_judge_orders_by_sentiment():
    scorer = build_scorer("judge:sentiment")
    good, bad, flat = scorer(cands("I love you, you are wonderful!", "I hate this, it is awful.", "The table."))
    assert good > 0.5 and bad < -0.5 and flat == 0.0
    assert scorer.cost.calls == 1


def test_inoffensive_judge():
    scorer = build_scorer("judge:inoffensive")
    polite, rude = scorer(cands("Thank you for your help.", "you are a stupid f***ing idiot"))
    assert 0 <= rude < 0.5 < polite <= 1


def _module_with(name, fn):
    mod = types.ModuleType(name)
    mod.score = fn
    sys.modules[name] = mod
    return f"python:{name}:score"


def test_python_callable_and_its_checks():
    spec = _module_with("sa_test_len", lambda p, r, f: [len(x) + (10 if done else 0) for x, done in zip(r, f)])
    scorer = build_scorer(spec)
    c = cands("ab", "abcd")
    c[0].finished = False
    assert scorer(c) == [2.0, 14.0]
    nan = build_scorer(_module_with("sa_test_nan", lambda p, r, f: [float("nan")] * len(r)))
    with pytest.raises(SpecError, match="sa_test_nan.*non-finite"):
        nan(cands("a"))
    inf = build_scorer(lambda p, r, f: [float("inf")])
    with pytest.raises(SpecError, match="non-finite"):
        inf(cands("a"))
    short = build_scorer(_module_with("sa_test_short", lambda p, r, f: [1.0]))
    with pytest.raises(SpecError, match="returned 1 scores for 2"):
        short(cands("a", "b"))


@pytest.mark.parametrize("spec", ["judge:nope", "nonsense", "python:only_module", "python:no_such_mod_xyz:f",
                                  "rm:/no/such/dir/anywhere"])
def test_unknown_or_broken_specs(spec):
    with pytest.raises(SpecError):
        build_scorer(spec)


def test_loglik_self_uses_generator_logps(tiny, tok):
    from specalign.decode import SamplingGenerator, SamplingParams
    gen = SamplingGenerator(tiny, tok, SamplingParams(), max_new_tokens=6, eos_ids=set())
    gen.start(tok("abc")["input_ids"], 2, torch.Generator().manual_seed(0))
    gen.advance()
    c = [gen.candidate(i, "abc") for i in range(2)]
    scores = build_scorer("loglik:self")(c)
    # recompute by hand with one forward over prompt + response
    for i in range(2):
        ids = torch.tensor([tok("abc")["input_ids"] + gen.rows[i].tokens])
        logp = torch.log_softmax(tiny(ids).logits[0, :-1].double(), -1)
        n = len(gen.rows[i].tokens)
        picked = logp[-n:].gather(1, ids[0, -n:, None]).squeeze(1)
        assert math.isclose(scores[i], float(picked.mean()), abs_tol=1e-4)
    with pytest.raises(SpecError, match="loglik:self needs"):
        build_scorer("loglik:self")(cands("x"))


def test_loglik_model_matches_self(tiny_dir, tok):
    from specalign.decode import SamplingGenerator, SamplingParams
    from specalign.models.loading import load_model
    model = load_model(tiny_dir)
    gen = SamplingGenerator(model, tok, SamplingParams(), max_new_tokens=8, eos_ids=set())
    prompt_ids = tok("hello")["input_ids"]
    gen.start(prompt_ids, 3, torch.Generator().manual_seed(1))
    gen.advance()
    c = [gen.candidate(i, "hello") for i in range(3)]
    by_self = build_scorer("loglik:self")(c)
    by_model = build_scorer(f"loglik:{tiny_dir}", max_batch_tokens=20)(c)  # forces several batches
    assert by_model == pytest.approx(by_self, abs=1e-4)


def test_reward_model_from_disk(tmp_path, tok):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(config)
    rm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    scorer = build_scorer(f"rm:{tmp_path}", max_batch_tokens=64)
    c = cands("short", "a much longer response here", "mid length")
    scores = scorer(c)
    # each score equals the model run on that conversation alone (batching and padding change nothing)
    for cand, s in zip(c, scores):
        text = scorer._text(cand)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")
        assert s == pytest.approx(float(rm(**ids).logits[0, 0]), abs=1e-4)
    assert scorer.cost.positions > 0 and scorer.cost.calls == 1
