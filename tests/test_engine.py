"""The KV-cache engine and plain sampling generator: exactness against transformers, pruning in
place, fan-out, seeds, processed distributions, per-row EOS / stop / length, exact cost counts."""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from specalign.decode import LMState, SamplingGenerator, SamplingParams
from specalign.models.testing import tiny_llama

GREEDY = SamplingParams(temperature=0)


def _ids(tok, *texts):
    return [tok(t)["input_ids"] for t in texts]


def _hf_greedy(model, rows, new_tokens, pad_id, eos=None):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=pad_id)
    result = []
    for row in out[:, width:].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        result.append(row)
    return result


def test_greedy_equals_generate_ragged_tiny(tiny, tok):
    rows = _ids(tok, "hello world", "hi", "abc def ghi jkl", "x")
    gen = SamplingGenerator(tiny, tok, GREEDY, max_new_tokens=24, eos_ids=set())
    gen.start_batch(rows)
    gen.advance()
    assert [r.tokens for r in gen.rows] == _hf_greedy(tiny, rows, 24, tok.pad_token_id)


def test_per_row_eos_matches_generate(tok):
    # eos = the token a row emits early, so rows finish at different steps
    model = tiny_llama(init_scale=20, seed=3)
    rows = _ids(tok, "hello world", "hi", "abc def ghi jkl", "x", "qq")
    free = SamplingGenerator(model, tok, GREEDY, max_new_tokens=30, eos_ids=set())
    free.start_batch(rows)
    free.advance()
    eos = free.rows[0].tokens[5]
    gen = SamplingGenerator(model, tok, GREEDY, max_new_tokens=30, eos_ids={eos})
    gen.start_batch(rows)
    gen.advance()
    expected = _hf_greedy(model, rows, 30, tok.pad_token_id, eos=eos)
    assert [r.tokens for r in gen.rows] == expected
    assert gen.rows[0].reason == "eos" and len(gen.rows[0].tokens) <= 6
    assert {r.reason for r in gen.rows} <= {"eos", "length"}


def test_greedy_equals_generate_ragged_smollm2(smollm2):
    model, tok = smollm2
    from specalign.models.loading import chat_prompt
    rows = [chat_prompt(tok, p) for p in ("Name a color.", "Write one sentence about the sea and the sky.", "Hi")]
    gen = SamplingGenerator(model, tok, GREEDY, max_new_tokens=12, eos_ids=set())
    gen.start_batch(rows)
    gen.advance()
    assert [r.tokens for r in gen.rows] == _hf_greedy(model, rows, 12, tok.pad_token_id)


def test_select_survivors_continue_as_if_alone(tiny, tok):
    rows = _ids(tok, "hello world", "hi", "abc def ghi jkl", "xyz")
    gen = SamplingGenerator(tiny, tok, GREEDY, max_new_tokens=20, eos_ids=set())
    gen.start_batch(rows)
    gen.advance(6)
    gen.drop([1, 3])
    assert gen.active == [0, 2]
    assert gen.target.batch_size == 2
    assert all(layer.keys.shape[0] == 2 for layer in gen.target.cache.layers)
    # the padding column only the short dropped row needed is trimmed away
    assert gen.target.mask.shape[1] == gen.target.cache.get_seq_length()
    gen.advance()
    assert gen.rows[1].reason == "pruned" and len(gen.rows[1].tokens) == 6
    for i in (0, 2):
        alone = SamplingGenerator(tiny, tok, GREEDY, max_new_tokens=20, eos_ids=set())
        alone.start(rows[i], 1)
        alone.advance()
        assert gen.rows[i].tokens == alone.rows[0].tokens


def test_fan_out_shares_one_prefill(tiny, tok):
    prompt = _ids(tok, "shared prefix")[0]
    gen = SamplingGenerator(tiny, tok, SamplingParams(), max_new_tokens=4, eos_ids=set())
    gen.start(prompt, 5, torch.Generator().manual_seed(0))
    keys = gen.target.cache.layers[0].keys
    assert keys.shape[0] == 5 and all(torch.equal(keys[0], keys[i]) for i in range(5))
    assert gen.target.cost.positions == len(prompt) and gen.target.cost.calls == 1
    assert torch.equal(gen.next_logits[0], gen.next_logits[4])


def test_seeded_sampling_is_reproducible(tiny, tok):
    prompt = _ids(tok, "seed me")[0]

    def run(seed):
        gen = SamplingGenerator(tiny, tok, SamplingParams(temperature=1.0), max_new_tokens=16, eos_ids=set())
        gen.start(prompt, 3, torch.Generator().manual_seed(seed))
        gen.advance()
        return [r.tokens for r in gen.rows]

    assert run(7) == run(7)
    assert run(7) != run(8)


def _expected_processed(logits, temperature, top_k, top_p):
    """Independent of the warpers: softmax(l/T); keep the top-k and renormalize; then keep the
    smallest most-likely set whose mass reaches top_p (as generate's warpers compose)."""
    probs = torch.softmax(logits.double() / temperature, -1)
    order = torch.argsort(probs, descending=True).tolist()
    if top_k:
        order = order[:top_k]
    mass_k = float(probs[order].sum())
    keep, mass = [], 0.0
    for idx in order:
        keep.append(idx)
        mass += float(probs[idx]) / mass_k
        if mass >= top_p - 1e-12:
            break
    out = torch.zeros_like(probs)
    out[keep] = probs[keep]
    return (out / out.sum()).numpy()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0),
                                                     (1.0, 0, 0.8), (0.8, 6, 0.9)])
def test_sampling_matches_processed_distribution(tok, temperature, top_k, top_p):
    model = tiny_llama(vocab_size=12, init_scale=15, seed=5)
    prompt = [1, 4, 7, 3]
    draws = 20000
    gen = SamplingGenerator(model, tok, SamplingParams(temperature, top_k, top_p), max_new_tokens=1, eos_ids=set())
    gen.start(prompt, draws, torch.Generator().manual_seed(11))
    logits = gen.next_logits[0].clone()
    gen.advance()
    counts = np.bincount([r.tokens[0] for r in gen.rows], minlength=12)
    expected = _expected_processed(logits, temperature, top_k, top_p)
    assert counts[expected == 0].sum() == 0  # truncated tokens never appear
    support = expected > 0
    assert support.sum() >= 2
    assert chisquare(counts[support], expected[support] * draws).pvalue > 1e-4


def test_processed_distribution_rejects_a_wrong_one(tok):
    """The chi-square check has power: samples at T=1 fail against the T=0.7 distribution."""
    model = tiny_llama(vocab_size=12, init_scale=15, seed=5)
    gen = SamplingGenerator(model, tok, SamplingParams(1.0), max_new_tokens=1, eos_ids=set())
    gen.start([1, 4, 7, 3], 20000, torch.Generator().manual_seed(11))
    logits = gen.next_logits[0].clone()
    gen.advance()
    counts = np.bincount([r.tokens[0] for r in gen.rows], minlength=12)
    assert chisquare(counts, _expected_processed(logits, 0.7, 0, 1.0) * 20000).pvalue < 1e-6


def test_cost_counts_by_hand(tiny, tok):
    # prefill one 6-token prompt, fan out to 3 rows, 5 new tokens each: the last token of each row is
    # sampled but never fed back (the row ends), so decode = 4 steps x 3 rows.
    gen = SamplingGenerator(tiny, tok, SamplingParams(), max_new_tokens=5, eos_ids=set())
    gen.start([1, 10, 11, 12, 13, 14], 3, torch.Generator().manual_seed(0))
    gen.advance()
    cost = gen.target.cost
    assert cost.positions == 6 + 4 * 3
    assert cost.calls == 1 + 4
    assert cost.flops == 2 * sum(p.numel() for p in tiny.parameters()) * (6 + 12)
    # pruned rows stop costing: drop one row after 2 tokens -> steps 3..5 run on 2 rows
    gen.reset_cost()
    gen.start([1, 10, 11, 12, 13, 14], 3, torch.Generator().manual_seed(0))
    gen.advance(2)
    gen.drop([0])
    gen.advance()
    assert gen.target.cost.positions == 6 + 2 * 3 + 2 * 2  # prefill, 2 steps x 3 rows, 2 steps x 2
    # ragged prefill counts padding: rows of 2 and 5 tokens -> 2 x 5 positions
    state = LMState(tiny)
    state.prefill([[1, 2], [1, 2, 3, 4, 5]])
    assert state.cost.positions == 10 and state.cost.calls == 1


def test_stop_strings_and_length(tiny, tok):
    gen = SamplingGenerator(tiny, tok, GREEDY, max_new_tokens=40, eos_ids=set())
    gen.start(_ids(tok, "hello")[0], 1)
    gen.advance()
    text = gen.response_text(0)
    assert gen.rows[0].reason == "length" and len(gen.rows[0].tokens) == 40
    stop = text[10:12]
    first = text.find(stop)
    gen2 = SamplingGenerator(tiny, tok, GREEDY, max_new_tokens=40, stop=[stop], eos_ids=set())
    gen2.start(_ids(tok, "hello")[0], 1)
    gen2.advance()
    assert gen2.rows[0].reason == "stop"
    assert gen2.response_text(0) == text[:first]
    assert len(gen2.rows[0].tokens) < 40


def test_rollback_masks_rejected_slots(tiny, tok):
    """Appending 4 tokens and keeping 1 for a row equals having appended only that token."""
    prompt = _ids(tok, "roll back")[0]
    a, b = LMState(tiny), LMState(tiny)
    a.prefill([prompt, prompt])
    b.prefill([prompt])
    toks = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8]])
    a.extend(toks)
    a.rollback(torch.tensor([1, 3]), appended=4)
    assert a.lengths.tolist() == [len(prompt) + 1, len(prompt) + 3]
    assert a.mask.shape[1] == len(prompt) + 3  # the column no row kept is cropped
    b.extend(toks[:1, :1])
    nxt = torch.tensor([[9], [9]])
    la = a.extend(nxt)[0, -1]
    lb = b.extend(nxt[:1])[0, -1]
    assert torch.allclose(la, lb, atol=1e-5)
