"""Reward-Shifted Speculative Sampling: the exact rule follows t = norm(p (qr/q0)^lambda) (chi-square,
1e5 draws as one batch), Qr = Q0 and lambda = 0 reduce to speculative sampling of P sample for
sample, the paper's rule produces the law derived in docs/sss.md (not t), zero-probability
corners, Q0 = the adapter-disabled PEFT model, greedy SSS, implicit reward, exact costs, CLI."""

import json

import numpy as np
import pytest
import torch

from specalign.decode.sampling import SamplingParams, processed_logprobs
from specalign.decode.speculative import SpeculativeGenerator
from specalign.decode.sss import LOG_FLOOR, SSSGenerator, tilted_target
from specalign.errors import SpecError
from specalign.models.testing import perturbed_copy, tiny_llama
from test_speculative import (DRAWS, PROMPT, V, assert_conditionals, assert_law, draw, joint_law,  # noqa: F401
                               next_logits, one_thread, small)


@pytest.fixture(scope="module")
def trio():
    """P; Q0 a perturbed copy of P; Qr a perturbed copy of Q0. At the prompt Z = sum p qr/q0 ~ 1.8,
    sum min(qr, t) ~ 0.77 and TV(t, p) ~ 0.75: the shift is strong and the paper's rule is off."""
    target = small(0)
    q0 = perturbed_copy(target, scale=0.5, seed=5)
    qr = perturbed_copy(q0, scale=1.5, seed=4)
    return target, qr, q0


def tilt_law(target, qr, q0, params, lam=1.0):
    """Exact law of SSS's next token after each prefix: processed(log p + lam * log(qr/q0))."""
    def law(prefixes):
        rows = [PROMPT + list(p) for p in prefixes]
        lp, lr, l0 = (torch.log_softmax(next_logits(m, rows), -1) for m in (target, qr, q0))
        tilted = lp + lam * (lr.clamp(min=LOG_FLOOR) - l0.clamp(min=LOG_FLOOR))
        return processed_logprobs(tilted.float(), params).double().exp().numpy()
    return law


def paper_parts(target, qr, q0):
    """At temperature 1: the paper rule's pieces after each prefix (docs/sss.md):
    a = min(qr, w) (accepted mass per token), rejected = (1 - beta) * normalize(max(0, w - qr)),
    u = a + rejected (law of a drafted position), t = w / Z (law of the bonus token); w = p qr / q0."""
    def parts(prefixes):
        rows = [PROMPT + list(p) for p in prefixes]
        p, r, z = (torch.softmax(next_logits(m, rows), -1) for m in (target, qr, q0))
        w = p * r / z
        t = w / w.sum(-1, keepdim=True)
        accepted = torch.minimum(r, w)
        residual = (w - r).clamp(min=0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual / residual.sum(-1, keepdim=True), t)
        rejected = (1 - accepted.sum(-1, keepdim=True)) * residual
        return accepted.numpy(), rejected.numpy(), (accepted + rejected).numpy(), t.numpy()
    return parts


def sss(trio, tok, params=SamplingParams(), gamma=1, new=2, **kw):
    target, qr, q0 = trio
    return SSSGenerator(target, qr, q0, tok, params, max_new_tokens=new, gamma=gamma, eos_ids=set(), **kw)


# -- the exact rule -------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature,top_k,top_p,gamma,new", [(1.0, 0, 1.0, 1, 2), (0.8, 6, 0.95, 3, 3)])
def test_exact_rule_follows_tilted_target(trio, tok, temperature, top_k, top_p, gamma, new):
    params = SamplingParams(temperature, top_k, top_p)
    gen = sss(trio, tok, params, gamma, new)
    tokens = draw(gen, PROMPT, DRAWS, seed=10 + gamma)
    law = tilt_law(*trio, params)
    first = law([[]])[0]
    assert_law(tokens[:, 0], first, "first token")
    assert_law(tokens[:, 0] * V + tokens[:, 1], joint_law(first, law), "two-token joint")
    for depth in range(2, new):
        assert_conditionals(tokens, depth, law, f"depth {depth}")
    # t is not p: the test above would catch an SSS that ignored the drafts
    target_first = torch.softmax(next_logits(trio[0], [PROMPT]), -1)[0].numpy()
    if temperature == 1.0:
        assert 0.5 * np.abs(first - target_first).sum() > 0.2
    stats = gen.stats()
    assert 0.05 < stats["acceptance_rate"] < 0.95
    assert stats["mean_implicit_reward"] == pytest.approx(
        np.mean([r.stats["implicit"] for r in gen.rows]), abs=1e-4)


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(0.7, 5, 0.9)])
def test_reductions_to_speculative_sampling_sample_for_sample(trio, tok, params):
    """Qr = Q0, or lambda = 0, gives t = processed p: the same samples as speculative sampling of P with
    draft Qr under the same seed (same random stream). Only float rounding differs (the ratio is ~1e-7
    from 1; the draft reads different widths), which can flip a draw on a boundary: <= 0.5% of rows."""
    target, qr, q0 = trio
    spec = draw(SpeculativeGenerator(target, qr, tok, params, max_new_tokens=10, gamma=3, eos_ids=set()),
                PROMPT, 2000, seed=7)
    same = draw(SSSGenerator(target, qr, qr, tok, params, max_new_tokens=10, gamma=3, eos_ids=set()), PROMPT, 2000,
                seed=7)
    assert _rows_differing(same, spec) <= 10
    zero = draw(SSSGenerator(target, qr, q0, tok, params, max_new_tokens=10, gamma=3, eos_ids=set(), shift_lambda=0.0),
                PROMPT, 2000, seed=7)
    assert _rows_differing(zero, spec) <= 10
    one = draw(SSSGenerator(target, qr, q0, tok, params, max_new_tokens=10, gamma=3, eos_ids=set()), PROMPT, 2000,
               seed=7)
    assert _rows_differing(one, spec) > 1000


def _rows_differing(a, b):
    return int((a != b).any(1).sum())


# -- the paper's rule -------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [1, 3])
def test_paper_rule_produces_its_derived_law_not_t(trio, tok, gamma):
    """Without Z the paper rule emits u = min(qr, w) + (1 - beta) norm(max(0, w - qr)) at drafted
    positions and t only for the bonus token (docs/sss.md); here Z ~ 1.8, so u is far from t."""
    gen = sss(trio, tok, SamplingParams(), gamma, 2, rule="paper")
    tokens = draw(gen, PROMPT, DRAWS, seed=20 + gamma)
    parts = paper_parts(*trio)
    accepted, rejected, u, t = (x[0] for x in parts([[]]))
    assert_law(tokens[:, 0], u, "paper rule, first token")
    follows = [[v] for v in range(V)]
    _, _, u2, t2 = parts(follows)
    if gamma == 1:  # token 2 is the bonus (from t) after an accepted y_1, a new block's draft (u) after a residual
        joint = accepted[:, None] * t2 + rejected[:, None] * u2
    else:
        joint = u[:, None] * u2
    assert_law(tokens[:, 0] * V + tokens[:, 1], joint.reshape(-1), "paper rule, two-token joint")
    assert 0.5 * np.abs(u - t).sum() > 0.05
    counts = np.bincount(tokens[:, 0], minlength=V)
    from scipy.stats import chisquare
    assert chisquare(counts, t / t.sum() * len(tokens)).pvalue < 1e-12  # not the tilted target


def test_paper_rule_equals_exact_when_z_is_one(trio, tok):
    """lambda = 0 makes Z = 1 (w = p): the two rules coincide sample for sample."""
    target, qr, q0 = trio
    a = draw(SSSGenerator(target, qr, q0, tok, max_new_tokens=8, gamma=2, eos_ids=set(), shift_lambda=0.0,
                          rule="paper"), PROMPT, 1000, seed=4)
    b = draw(SSSGenerator(target, qr, q0, tok, max_new_tokens=8, gamma=2, eos_ids=set(), shift_lambda=0.0),
             PROMPT, 1000, seed=4)
    assert _rows_differing(a, b) <= 2  # w = t * exp(logsumexp(log p)) = t up to float rounding


# -- zero-probability corners, adapter-disabled Q0 ----------------------------------------------------
class MaskedHead(torch.nn.Module):
    """A model whose logits are -inf (probability exactly 0) at some token ids."""

    def __init__(self, inner, tokens):
        super().__init__()
        self.inner, self.tokens, self.config = inner, list(tokens), inner.config

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids=None, **kw):
        out = self.inner(input_ids=input_ids, **kw)
        out.logits[..., self.tokens] = float("-inf")
        return out


def test_zero_probability_corners_give_no_nan():
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]]))
    lr = torch.log(torch.tensor([[0.1, 0.2, 0.0, 0.7]]))
    l0 = torch.log(torch.tensor([[0.4, 0.0, 0.0, 0.6]]))
    for rule in ("exact", "paper"):
        for params in (SamplingParams(), SamplingParams(0.5, 2, 0.9), SamplingParams(0)):
            t, log_ratio = tilted_target(lp, lr, l0, params, 1.0, rule)
            assert torch.isfinite(t).all() and torch.isfinite(log_ratio).all()
    t, log_ratio = tilted_target(lp, lr, l0, SamplingParams())
    # token 1: q0 = 0 < qr -> log-ratio log(0.2) - LOG_FLOOR (bounded), token 2: qr = q0 = 0 -> ratio 1,
    # token 3: p = 0 -> t = 0 whatever the ratio
    assert log_ratio[0, 1] == pytest.approx(float(np.log(0.2)) - LOG_FLOOR) and log_ratio[0, 2] == 0
    assert t[0, 3] == 0 and t[0, 1] > 0.999 and t.sum() == pytest.approx(1.0)


def test_zero_probability_tokens_and_truncation_follow_t(trio, tok):
    """P forbids token 3, both drafts forbid token 4 (ratio 1: only the residual can emit it), top-k 8."""
    target, qr, q0 = trio
    models = (MaskedHead(target, [3]), MaskedHead(qr, [4]), MaskedHead(q0, [4]))
    params = SamplingParams(1.0, 8, 1.0)
    gen = SSSGenerator(*models, tok, params, max_new_tokens=2, gamma=2, eos_ids=set(), shift_lambda=0.5)
    tokens = draw(gen, PROMPT, DRAWS, seed=5)
    law = tilt_law(*models, params, lam=0.5)
    first = law([[]])[0]
    assert first[3] == 0 and first[4] > 0.01 and (first == 0).sum() == V - 8
    assert_law(tokens[:, 0], first, "first token")
    assert_law(tokens[:, 0] * V + tokens[:, 1], joint_law(first, law), "two-token joint")
    assert all(np.isfinite(r.stats["implicit"]) for r in gen.rows)


def _adapter(base, seed=0):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    model.eval()
    return model


def test_q0_is_the_adapter_disabled_draft(tok):
    target = small(0)
    peft = _adapter(small(2))
    params = SamplingParams(1.0, 0, 0.9)
    gen = SSSGenerator(target, peft, None, tok, params, max_new_tokens=2, gamma=2, eos_ids=set(), shift_lambda=0.5)
    tokens = draw(gen, PROMPT, DRAWS, seed=6)

    def law(prefixes):
        rows = [PROMPT + list(p) for p in prefixes]
        lp, lr = torch.log_softmax(next_logits(target, rows), -1), torch.log_softmax(next_logits(peft, rows), -1)
        with peft.disable_adapter():
            l0 = torch.log_softmax(next_logits(peft, rows), -1)
        assert (lr - l0).abs().max() > 0.1  # the adapter changes the draft
        return processed_logprobs((lp + 0.5 * (lr - l0)).float(), params).double().exp().numpy()

    first = law([[]])[0]
    assert_law(tokens[:, 0], first, "first token")
    assert_law(tokens[:, 0] * V + tokens[:, 1], joint_law(first, law), "two-token joint")
    assert set(gen.cost) == {"target", "draft", "draft_ref"}
    assert gen.cost["draft"].params == gen.cost["draft_ref"].params


# -- greedy, implicit reward, cost --------------------------------------------------------------------
def test_greedy_sss_is_greedy_on_the_tilted_target_and_implicit_is_exact(trio, tok):
    target, qr, q0 = trio
    prompts = [[1, 3], [1, 5, 7, 9, 11, 2], [1, 4, 4], [1, 9, 8, 7, 6, 5, 4]]
    gen = SSSGenerator(target, qr, q0, tok, SamplingParams(0), max_new_tokens=13, gamma=3, eos_ids=set())
    gen.start_batch(prompts)
    gen.advance()
    for prompt, row in zip(prompts, gen.rows):
        seq, implicit = list(prompt), 0.0
        for _ in range(13):
            with torch.no_grad():
                lp, lr, l0 = (torch.log_softmax(m(torch.tensor([seq])).logits[0, -1].double(), -1)
                              for m in (target, qr, q0))
            ratio = lr.clamp(min=LOG_FLOOR) - l0.clamp(min=LOG_FLOOR)
            nxt = int((lp + ratio).argmax())
            implicit += float(ratio[nxt])
            seq.append(nxt)
        assert row.tokens == seq[len(prompt):]
        assert row.stats["implicit"] == pytest.approx(implicit, abs=1e-3)
    assert 0 < gen.stats()["acceptance_rate"] < 1


def test_implicit_reward_recorded_while_sampling(trio, tok):
    target, qr, q0 = trio
    gen = SSSGenerator(target, qr, q0, tok, SamplingParams(), max_new_tokens=20, gamma=4, eos_ids=set())
    gen.start(PROMPT, 12, torch.Generator().manual_seed(1))
    gen.advance(8)
    gen.drop([2, 7])  # pruning keeps every state (P, Qr, Q0) consistent for the survivors
    gen.advance()
    assert [r.reason for r in gen.rows].count("pruned") == 2 and all(len(r.tokens) == 20 for r in gen.rows
                                                                    if r.reason != "pruned")
    for row in gen.rows:
        ids = torch.tensor([PROMPT + row.tokens])
        with torch.no_grad():
            lr, l0 = (torch.log_softmax(m(ids).logits[0, :-1].double(), -1) for m in (qr, q0))
        ratio = (lr.clamp(min=LOG_FLOOR) - l0.clamp(min=LOG_FLOOR))[len(PROMPT) - 1:]
        expected = float(ratio.gather(1, ids[0, len(PROMPT):, None]).sum())
        assert row.stats["implicit"] == pytest.approx(expected, abs=1e-3)
    assert gen.stats()["mean_implicit_reward"] == pytest.approx(np.mean([r.stats["implicit"] for r in gen.rows]),
                                                                 abs=1e-4)


def test_cost_counts_exact(trio, tok):
    target = trio[0]
    rows, gamma, new, plen = 3, 2, 7, len(PROMPT)
    gen = SSSGenerator(target, target, target, tok, SamplingParams(0), max_new_tokens=new, gamma=gamma, eos_ids=set())
    gen.start(PROMPT, rows)
    gen.advance()
    blocks = 3  # all accepted: 3 + 3 + 1 (truncated) tokens
    assert gen.cost["target"].calls == 1 + blocks and gen.cost["draft_ref"].calls == 1 + blocks
    assert gen.cost["target"].positions == gen.cost["draft_ref"].positions == plen + blocks * rows * (gamma + 1)
    # Qr reads z, then y_1..y_gamma (it needs qr_{gamma+1} for the bonus token): gamma + 1 forwards of width 1
    assert gen.cost["draft"].calls == 1 + blocks * (gamma + 1)
    assert gen.cost["draft"].positions == plen + blocks * rows * (gamma + 1)
    stats = gen.stats()
    assert (stats["acceptance_rate"], stats["blocks"], stats["tokens"]) == (1.0, blocks * rows, new * rows)
    assert stats["mean_implicit_reward"] == pytest.approx(0.0, abs=1e-4)


# -- specs, errors, CLI -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter_dir(tiny_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM
    d = tmp_path_factory.mktemp("dpo-adapter")
    _adapter(AutoModelForCausalLM.from_pretrained(tiny_dir), seed=1).save_pretrained(d, save_embedding_layers=False)
    assert json.loads((d / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_dir
    return str(d)


def test_errors(trio, tok, tiny_dir, adapter_dir, tmp_path):
    target, qr, q0 = trio
    with pytest.raises(SpecError, match="unknown SSS rule"):
        SSSGenerator(target, qr, q0, tok, rule="z")
    with pytest.raises(SpecError, match="shift-lambda"):
        SSSGenerator(target, qr, q0, tok, shift_lambda=float("nan"))
    with pytest.raises(SpecError, match="--draft-ref"):
        SSSGenerator(target, qr, None, tok)
    from specalign.decode.api import DecodeConfig, Decoder
    other = tmp_path / "other"
    tiny_llama(seed=9).save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(SpecError, match=f"trained on base '{tiny_dir}' but --draft-ref is '{other}'"):
        Decoder(DecodeConfig(model=tiny_dir, method="sss", draft=adapter_dir, draft_ref=str(other), prompt="x"))
    with pytest.raises(SpecError, match="needs the unaligned draft"):
        Decoder(DecodeConfig(model=tiny_dir, method="sss", draft=str(other), prompt="x"))


def test_cli_sss_and_best_of_n_over_sss(tiny_dir, adapter_dir, tmp_path):
    from specalign.cli import main
    out = tmp_path / "sss.jsonl"
    assert main(["decode", "--method", "sss", "--model", tiny_dir, "--draft", adapter_dir, "--gamma", "3",
                 "--prompt", "Say hi.", "--max-new-tokens", "10", "--scorer", "implicit", "--out", str(out)]) == 0
    record = json.loads(out.read_text().splitlines()[0])
    assert record["method"] == "sss" and record["params"]["sss_rule"] == "exact"
    assert set(record["cost"]) >= {"target", "draft", "draft_ref", "acceptance_rate", "mean_implicit_reward"}
    assert record["score"] == pytest.approx(record["cost"]["mean_implicit_reward"], abs=1e-4)  # one row

    out = tmp_path / "bon.jsonl"
    assert main(["decode", "--method", "best-of-n", "--generator", "sss", "--n", "4", "--model", tiny_dir,
                 "--draft", adapter_dir, "--draft-ref", tiny_dir, "--prompt", "Say hi.", "--max-new-tokens", "10",
                 "--scorer", "implicit", "--return-candidates", "true", "--out", str(out)]) == 0
    record = json.loads(out.read_text().splitlines()[0])
    scores = [c["score"] for c in record["candidates"]]
    assert record["method"] == "best-of-n+sss" and len(scores) == 4 and record["score"] == max(scores)

    out = tmp_path / "same.jsonl"  # draft = draft-ref = target: Qr = Q0 = P, every draft token accepted
    assert main(["decode", "--method", "sss", "--model", tiny_dir, "--draft", tiny_dir, "--draft-ref", tiny_dir,
                 "--prompt", "Say hi.", "--max-new-tokens", "16", "--scorer", "loglik:self", "--out", str(out)]) == 0
    assert json.loads(out.read_text().splitlines()[0])["cost"]["acceptance_rate"] >= 0.99
