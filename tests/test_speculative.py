"""Speculative sampling: exact laws (chi-square, >= 1e5 draws drawn as one batch of rows), batched
rows with different acceptance lengths, greedy == greedy target, exact cost counts, acceptance 1
with draft == target, the compatibility check, and the CLI end to end."""

import copy
import gc
import json

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from specalign.decode.sampling import SamplingParams, processed_logprobs
from specalign.decode.speculative import SpeculativeGenerator, check_compatible, speculative_verify
from specalign.errors import SpecError
from specalign.models.testing import perturbed_copy, tiny_llama

V = 16
PROMPT = [1, 5, 7, 9]
DRAWS = 100_000
SMALL = dict(vocab_size=V, num_layers=1, hidden_size=16, num_heads=2, num_kv_heads=1, intermediate_size=32)
P_MIN = 1e-4  # significance threshold: fixed seeds make every test deterministic


def small(seed, scale=20.0):
    return tiny_llama(seed=seed, init_scale=scale, **SMALL)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: with the machine's cores shared, thread synchronisation costs far more than
    the arithmetic (a 1000-row run: 0.3 s on one thread, 16 s on two under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pair():
    """Target and a draft with a perturbed head: sum_v min(p, q) ~ 0.4-0.6 at the prompt (per setting)."""
    target = small(0)
    return target, perturbed_copy(target, scale=0.5, seed=1)


# -- helpers shared with test_sss.py -------------------------------------------------------------
def draw(gen, prompt, rows, seed=0):
    """Run ``rows`` rows of one prompt to the end in one batch; returns (rows, max_new_tokens) tokens (-1 = none)."""
    gc.disable()  # 1e5 live Row objects make the cyclic GC the bottleneck; nothing here is cyclic
    try:
        gen.start(prompt, rows, torch.Generator().manual_seed(seed))
        gen.advance()
    finally:
        gc.enable()
    out = np.full((rows, gen.max_new_tokens), -1, dtype=np.int64)
    for i, row in enumerate(gen.rows):
        out[i, : len(row.tokens)] = row.tokens
    return out


@torch.no_grad()
def next_logits(model, prefixes):
    """Raw next-token logits (N, V) after each prefix (equal-length prefixes, one forward)."""
    return model(torch.tensor(prefixes)).logits[:, -1].double()


def processed(logits, params):
    return processed_logprobs(logits.float(), params).double().exp()


def assert_law(samples, probs, what=""):
    """Chi-square of category samples against exact probabilities; impossible categories never occur."""
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum()
    counts = np.bincount(samples, minlength=len(probs)).astype(np.float64)
    assert counts[probs == 0].sum() == 0, f"{what}: a zero-probability outcome was drawn"
    stat, dof = _chi2_terms(counts[probs > 0], probs[probs > 0] * len(samples))
    pvalue = chi2.sf(stat, dof) if dof > 0 else 1.0
    assert pvalue > P_MIN, f"{what}: chi-square p = {pvalue:.2e} (stat {stat:.1f}, dof {dof})"
    return pvalue


def _chi2_terms(counts, expected):
    """Chi-square statistic and dof; categories expected < 5 times are pooled into one."""
    low = expected < 5
    if low.any():
        counts = np.append(counts[~low], counts[low].sum())
        expected = np.append(expected[~low], expected[low].sum())
        if expected[-1] < 5 and len(expected) > 1:  # pool still too small: fold it into the largest bin
            big = np.argmax(expected[:-1])
            counts[big] += counts[-1]
            expected[big] += expected[-1]
            counts, expected = counts[:-1], expected[:-1]
    return float(((counts - expected) ** 2 / expected).sum()), len(expected) - 1


def assert_conditionals(tokens, depth, law_of, what="", min_count=200):
    """Token ``depth`` (0-based) given each observed prefix tokens[:depth] follows ``law_of(prefixes)``.

    The chi-square statistics of all prefixes seen >= ``min_count`` times are summed (their dofs too):
    one test of the whole conditional law, over rows whose blocks accepted different numbers of drafts.
    """
    have = tokens[:, depth] >= 0
    prefixes, inverse, counts = np.unique(tokens[have, :depth], axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    keep = np.flatnonzero(counts >= min_count)
    assert len(keep) > 0
    laws = law_of([list(p) for p in prefixes[keep]])
    stat, dof = 0.0, 0
    for j, k in enumerate(keep):
        nxt = tokens[have][inverse == k, depth]
        probs = laws[j] / laws[j].sum()
        obs = np.bincount(nxt, minlength=len(probs)).astype(np.float64)
        assert obs[probs == 0].sum() == 0, f"{what}: impossible token after prefix {prefixes[k]}"
        s, d = _chi2_terms(obs[probs > 0], probs[probs > 0] * len(nxt))
        stat, dof = stat + s, dof + d
    pvalue = chi2.sf(stat, dof)
    assert pvalue > P_MIN, f"{what}: depth {depth} conditional chi-square p = {pvalue:.2e} ({len(keep)} prefixes)"
    return len(keep), int(counts[keep].sum())


def joint_law(first, second_of):
    """Exact law of (token 1, token 2) as a flat V*V vector: first(v) * second(w | v)."""
    second = second_of([[v] for v in range(len(first))])
    return (first[:, None] * second).reshape(-1)


# -- the block rule as a pure function ----------------------------------------------------------
def test_verify_rule_is_exact_on_given_distributions():
    gen = torch.Generator().manual_seed(0)
    rows, v = 200_000, 5
    p = torch.tensor([[0.5, 0.2, 0.0, 0.3, 0.0], [0.1, 0.1, 0.1, 0.1, 0.6], [0.0, 0.0, 0.5, 0.5, 0.0]])
    q = torch.tensor([[0.1, 0.6, 0.2, 0.1, 0.0], [0.3, 0.3, 0.0, 0.2, 0.2]])
    drafts = torch.stack([torch.multinomial(q[i], rows, replacement=True, generator=gen) for i in range(2)], 1)
    n, z = speculative_verify(p.expand(rows, 3, v), q.expand(rows, 2, v), drafts, gen)
    first = torch.where(n >= 1, drafts[:, 0], z).numpy()
    assert_law(first, p[0].numpy(), "first emitted token")
    past_one = (n >= 1).numpy()
    second = torch.where(n >= 2, drafts[:, 1], z).numpy()[past_one]
    assert_law(second, p[1].numpy(), "second token of the block")
    bonus = z.numpy()[(n == 2).numpy()]
    assert_law(bonus, p[2].numpy(), "bonus token")
    # P(accept y_1) = sum_v min(p, q) = 1 - TV
    accept = float(torch.minimum(p[0], q[0]).sum())
    assert abs(past_one.mean() - accept) < 5 * np.sqrt(accept * (1 - accept) / rows)


# -- exact laws of the generator ------------------------------------------------------------------
SETTINGS = [  # (temperature, top_k, top_p, gamma, max_new_tokens); gamma = 1: token 2 is often the bonus token
    (1.0, 0, 1.0, 1, 2),
    (0.7, 6, 0.95, 3, 4),  # tokens 3 and 4: inside the block and at its bonus position
    (1.3, 0, 0.8, 5, 2),
    (1.0, 4, 0.9, 1, 2),
]


@pytest.mark.parametrize("temperature,top_k,top_p,gamma,new", SETTINGS)
def test_output_follows_processed_target(pair, tok, temperature, top_k, top_p, gamma, new):
    target, draft = pair
    params = SamplingParams(temperature, top_k, top_p)
    gen = SpeculativeGenerator(target, draft, tok, params, max_new_tokens=new, gamma=gamma, eos_ids=set())
    tokens = draw(gen, PROMPT, DRAWS, seed=gamma)

    def law(prefixes):
        return processed(next_logits(target, [PROMPT + list(p) for p in prefixes]), params).numpy()

    first = law([[]])[0]
    assert_law(tokens[:, 0], first, "first token")
    assert_law(tokens[:, 0] * V + tokens[:, 1], joint_law(first, law), "two-token joint")
    stats = gen.stats()
    assert 0.05 < stats["acceptance_rate"] < 0.95  # both branches (accept / residual) are exercised
    for depth in range(2, new):  # deeper tokens: inside the block, bonus position, across blocks
        assert_conditionals(tokens, depth, law, f"depth {depth}")


def test_acceptance_counts_follow_sum_of_min(pair, tok):
    """One block of gamma = 2: E[accepted] = a_1 + sum_v min(p_1, q_1)(v) a_2(v), E[evaluated] = 1 + a_1,
    with a = sum_v min(p, q) (the probability that a reached draft token is accepted)."""
    target, draft = pair
    params = SamplingParams(0.9, 0, 1.0)
    gen = SpeculativeGenerator(target, draft, tok, params, max_new_tokens=1, gamma=2, eos_ids=set())
    draw(gen, PROMPT, DRAWS, seed=9)
    p1, q1 = (processed(next_logits(m, [PROMPT]), params)[0] for m in (target, draft))
    nxt = [PROMPT + [v] for v in range(V)]
    a2 = torch.minimum(processed(next_logits(target, nxt), params), processed(next_logits(draft, nxt), params)).sum(1)
    a1 = float(torch.minimum(p1, q1).sum())
    expected_accepted = a1 + float((torch.minimum(p1, q1) * a2).sum())
    stats = gen.stats()
    assert stats["blocks"] == DRAWS and stats["proposed"] == 2 * DRAWS
    assert abs(stats["evaluated"] / DRAWS - (1 + a1)) < 5 * np.sqrt(a1 * (1 - a1) / DRAWS)
    assert abs(stats["accepted"] / DRAWS - expected_accepted) < 5 * np.sqrt(2 / DRAWS)  # n in {0,1,2}: var <= 1
    assert stats["position_acceptance"] == pytest.approx(stats["accepted"] / stats["evaluated"], abs=1e-6)


def test_rows_with_different_acceptance_lengths_keep_exact_caches(pair, tok):
    """Ragged prompts and per-row acceptance: each row's recorded target log-probs equal a fresh forward."""
    target, draft = pair
    gen = SpeculativeGenerator(target, draft, tok, SamplingParams(), max_new_tokens=30, gamma=4, eos_ids=set())
    prompts = [[1, 3], [1, 5, 7, 9, 11, 2], [1, 4, 4, 4], [1, 9, 8, 7, 6, 5, 4, 3, 2]] * 4
    gen.start_batch(prompts, torch.Generator().manual_seed(3))
    seen, blocks = set(), 0
    while gen.active:
        before = {i: len(gen.rows[i].tokens) for i in gen.active}
        gen._step()
        seen |= {len(gen.rows[i].tokens) - before[i] for i in before}
        blocks += 1
        if blocks == 3:
            gen.drop([0, 5, 6, 15])  # pruned in place (a selector's move): survivors go on as if alone
    assert len(seen) >= 4  # rows emitted 1, 2, ... gamma+1 tokens in the same block
    for i, row in enumerate(gen.rows):
        ids = torch.tensor([prompts[i] + row.tokens])
        with torch.no_grad():
            logp = torch.log_softmax(target(ids).logits[0, :-1].double(), -1)
        expected = logp[len(prompts[i]) - 1:].gather(1, ids[0, len(prompts[i]):, None]).sum()
        assert len(row.tokens) == 30 or (i in (0, 5, 6, 15) and row.reason == "pruned")
        assert row.stats["logp"] == pytest.approx(float(expected), abs=1e-3)


# -- greedy ------------------------------------------------------------------------------------------
def _hf_greedy(model, prompt, new, eos=None):
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=0)
    row = out[0, len(prompt):].tolist()
    return row[: row.index(eos) + 1] if eos is not None and eos in row else row


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_equals_greedy_target_ragged(tok, gamma):
    target = tiny_llama(init_scale=20, seed=3)        # char vocabulary (74)
    draft = perturbed_copy(target, scale=2.0, seed=4)  # agrees on some tokens, not all
    prompts = [tok(t)["input_ids"] for t in ("hello world", "hi", "abc def ghi jkl", "x", "qq")]
    free = [_hf_greedy(target, p, 23) for p in prompts]
    eos = free[0][5]                                    # a token row 0 emits early: rows end at different steps
    gen = SpeculativeGenerator(target, draft, tok, SamplingParams(temperature=0), max_new_tokens=23, gamma=gamma,
                               eos_ids={eos})
    gen.start_batch(prompts)
    gen.advance()
    assert [r.tokens for r in gen.rows] == [_hf_greedy(target, p, 23, eos) for p in prompts]
    assert gen.rows[0].reason == "eos"
    assert 0 < gen.stats()["acceptance_rate"] < 1


# -- cost --------------------------------------------------------------------------------------------
def _rolled(model):
    """A draft whose greedy choice is always the target's + 1 (mod V): every draft token is rejected."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.copy_(model.lm_head.weight.roll(1, 0))
    return other


def test_cost_counts_exact(pair, tok):
    target, _ = pair
    greedy = SamplingParams(temperature=0)
    rows, gamma, new, plen = 2, 3, 10, len(PROMPT)

    gen = SpeculativeGenerator(target, target, tok, greedy, max_new_tokens=new, gamma=gamma, eos_ids=set())
    gen.start(PROMPT, rows)
    gen.advance()
    # all accepted: blocks of gamma+1 = 4 tokens -> 4, 8, 10 (truncated): 3 blocks
    assert gen.cost["target"].calls == 1 + 3 and gen.cost["target"].positions == plen + 3 * rows * (gamma + 1)
    # draft: gamma forwards per block; first block reads [x], later blocks re-read [y_gamma, z]
    assert gen.cost["draft"].calls == 1 + 3 * gamma
    assert gen.cost["draft"].positions == plen + rows * gamma + 2 * rows * (gamma + 1)
    assert gen.stats() == {"acceptance_rate": 1.0, "position_acceptance": 1.0, "mean_accepted_per_block": 3.0,
                           "target_calls_per_token": 0.3, "gamma": 3, "blocks": 6, "proposed": 18, "evaluated": 18,
                           "accepted": 18, "tokens": 20}
    reference = [_hf_greedy(target, PROMPT, new)] * rows
    assert [r.tokens for r in gen.rows] == reference

    gen = SpeculativeGenerator(target, _rolled(target), tok, greedy, max_new_tokens=new, gamma=gamma, eos_ids=set())
    gen.start(PROMPT, rows)
    gen.advance()
    assert [r.tokens for r in gen.rows] == reference  # every token comes from the residual
    assert gen.cost["target"].calls == 1 + new and gen.cost["target"].positions == plen + new * rows * (gamma + 1)
    assert gen.cost["draft"].calls == 1 + new * gamma
    assert gen.cost["draft"].positions == plen + rows * gamma + (new - 1) * rows * (gamma + 1)
    stats = gen.stats()
    assert stats["acceptance_rate"] == 0.0 and stats["target_calls_per_token"] == 1.0
    assert stats["evaluated"] == stats["blocks"] == rows * new  # each block tests one draft and stops
    gen.reset_cost()
    assert gen.stats()["blocks"] == 0 and gen.cost["draft"].calls == 0


def test_acceptance_is_one_when_draft_is_target(pair, tok):
    target, _ = pair
    gen = SpeculativeGenerator(target, target, tok, SamplingParams(1.0, 0, 0.9), max_new_tokens=24, gamma=4,
                               eos_ids=set())
    draw(gen, PROMPT, 256)
    stats = gen.stats()
    assert stats["proposed"] > 1000 and stats["acceptance_rate"] >= 0.999  # 1 up to float rounding of p/q


# -- compatibility ------------------------------------------------------------------------------------
def test_compatibility_check(pair, tok):
    target, draft = pair
    assert check_compatible(tok, {"target": target, "draft": draft}) == V
    padded = tiny_llama(vocab_size=80, seed=5)  # head padded beyond the 74-token tokenizer
    chars = tiny_llama(seed=6)
    assert check_compatible(tok, {"target": padded, "draft": chars}) == 74
    with pytest.raises(SpecError, match="draft model has 16 output tokens"):
        SpeculativeGenerator(chars, draft, tok, gamma=2)
    other = copy.deepcopy(tok)
    other.add_tokens(["<extra>"])
    assert check_compatible(tok, {"target": chars, "draft": chars}, {"draft": other}) == 74  # extra ids beyond
    from specalign.models.testing import CHARS, SPECIALS
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    swapped = SPECIALS + CHARS[1:2] + CHARS[:1] + CHARS[2:]
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(swapped)}, unk_token="<pad>"))
    wrong = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>")
    with pytest.raises(SpecError, match="token id 3"):
        SpeculativeGenerator(chars, chars, tok, gamma=2, draft_tokenizer=wrong)
    with pytest.raises(SpecError, match="gamma"):
        SpeculativeGenerator(chars, chars, tok, gamma=0)


# -- end to end ---------------------------------------------------------------------------------------
def test_cli_speculative_end_to_end(tiny_dir, tmp_path, capsys):
    from specalign.cli import main
    out = tmp_path / "spec.jsonl"
    code = main(["decode", "--method", "speculative", "--model", tiny_dir, "--draft", tiny_dir, "--gamma", "3",
                 "--prompt", "Say hi.", "--max-new-tokens", "12", "--scorer", "loglik:self", "--out", str(out)])
    assert code == 0
    record = json.loads(out.read_text().splitlines()[0])
    assert record["method"] == "speculative" and record["params"]["gamma"] == 3
    assert record["cost"]["acceptance_rate"] >= 0.99
    assert set(record["cost"]) >= {"target", "draft", "acceptance_rate", "mean_accepted_per_block",
                                   "target_calls_per_token", "scorer", "wall_s"}
    assert record["cost"]["target"]["calls"] < record["num_tokens"] + 1  # fewer target forwards than tokens

    bare = tmp_path / "checkpoint"  # a model directory saved without tokenizer files: head sizes are checked
    tiny_llama(seed=8).save_pretrained(bare)
    assert main(["decode", "--method", "speculative", "--model", tiny_dir, "--draft", str(bare), "--prompt", "Hi.",
                 "--max-new-tokens", "6", "--scorer", "loglik:self", "--out", str(tmp_path / "bare.jsonl")]) == 0
    small_head = tmp_path / "small-head"
    tiny_llama(vocab_size=40, seed=8).save_pretrained(small_head)
    code = main(["decode", "--method", "speculative", "--model", tiny_dir, "--draft", str(small_head), "--prompt", "x"])
    assert code == 2 and "draft model has 40 output tokens" in capsys.readouterr().err

    code = main(["decode", "--method", "speculative", "--model", tiny_dir, "--draft", str(tmp_path / "nowhere"),
                 "--prompt", "x"])
    assert code == 2 and "model path not found" in capsys.readouterr().err


# -- benchmark -------------------------------------------------------------------------------------------
def test_bench_speculative_on_tiny_models(tiny_dir, tmp_path):
    from specalign.bench import main
    from specalign.bench.speculative import theory
    assert theory(0.5, 3, 0.1) == pytest.approx((1.875, 1.875 / 1.3))
    assert theory(1.0, 3, 0.0) == (4.0, 4.0) and theory(0.5, 3, 0.1, 2.0) == pytest.approx((1.875, 1.875 / 2.3))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["Say hi.", "Name three colors."]))
    out = tmp_path / "bench"
    assert main(["speculative", "--model", tiny_dir, "--draft", tiny_dir, "--prompts", str(prompts),
                 "--num_prompts", "2", "--gammas", "1", "2", "3", "--batch_sizes", "1", "4", "--max_new_tokens",
                 "12", "--temperature", "0", "--eos", "false", "--output_dir", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert [(r["batch"], r["gamma"]) for r in report["results"]] == [(b, g) for b in (1, 4) for g in (1, 2, 3)]
    for r in report["results"]:
        # draft = target, greedy: every draft accepted, blocks of gamma+1 tokens (12 is a multiple of 2, 3, 4)
        assert r["acceptance"] == 1.0 and r["tokens_per_target_call"] == r["gamma"] + 1
        assert r["tokens_per_target_call_theory"] == r["gamma"] + 1
        assert r["speculative"]["tokens"] == r["plain"]["tokens"] == 2 * r["batch"] * 12
        assert r["speculative"]["target"]["calls"] == 2 * 12 // (r["gamma"] + 1)  # decode phase, per prompt summed
        g, c, v = r["gamma"], r["cost_ratio_c"], r["verify_over_step"]
        assert r["speedup_theory"] == pytest.approx((g + 1) / (g * c + 1), rel=1e-3)
        assert r["speedup_theory_verify"] == pytest.approx((g + 1) / (g * c + v), rel=1e-3)
        assert r["accepted_over_proposed"] == 1.0
    table = (out / "table.md").read_text()
    assert table.count("\n| ") == 1 + 6 and "tokens/target call" in table
