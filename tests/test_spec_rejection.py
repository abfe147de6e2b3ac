"""Speculative Rejection: exact rows kept per round for scores we set (ties, alpha = 0, alpha near 1,
a pool of one, finished rows competing), the returned best, the decision schedule, exact cost
counts (pruned rows stop costing compute after their round), alpha = 0 == Best-of-N, every scorer
kind, the decode API and bad input."""

import pytest
import torch

from specalign.decode import SamplingGenerator, SamplingParams
from specalign.decode.api import DecodeConfig, Decoder, build_selector
from specalign.decode.best_of_n import BestOfN
from specalign.decode.spec_rejection import SpeculativeRejection
from specalign.errors import SpecError
from specalign.models.loading import chat_prompt
from specalign.models.scorers import build_scorer

FORCED_EOS = 10_000  # outside the vocabulary: never sampled, never fed to the model
P = 20  # len(chat_prompt(char_tokenizer, "hi"))


class ScriptedEnds(SamplingGenerator):
    """Plain sampling on a real tiny model, except row i emits EOS as its ``ends[i]``-th token."""

    def __init__(self, model, tok, max_new_tokens, ends=None):
        super().__init__(model, tok, SamplingParams(1.0), max_new_tokens, eos_ids={FORCED_EOS})
        self.ends = ends or {}

    def _emit(self, new_tokens, logps=None):
        new_tokens = [[FORCED_EOS] if self.ends.get(i) == len(self.rows[i].tokens) + 1 else t
                      for i, t in zip(self.active, new_tokens)]
        super()._emit(new_tokens, logps)


class Scripted:
    """A scorer callable returning the score lists we set, one list per call; records what it saw."""

    def __init__(self, *calls):
        self.calls = [list(c) for c in calls]
        self.seen = []

    def __call__(self, prompts, responses, finished):
        self.seen.append(list(finished))
        return self.calls.pop(0)


def _run(tiny, tok, spr, scorer, max_new_tokens, ends=None, seed=0):
    gen = ScriptedEnds(tiny, tok, max_new_tokens, ends)
    ids = chat_prompt(tok, "hi")
    assert len(ids) == P
    result = spr.run(gen, build_scorer(scorer), "hi", ids, torch.Generator().manual_seed(seed))
    return gen, result


def _kept(result):
    return [r["kept_ids"] for r in result["rounds"]]


# -- the rejection rule ---------------------------------------------------------------------------
@pytest.mark.parametrize("alpha,pool,keep", [(0.5, 4, 2), (0.5, 5, 3), (0.5, 1, 1), (0.0, 7, 7), (0.25, 8, 6),
                                             (0.25, 6, 5), (0.75, 8, 2), (0.9, 10, 1), (0.99, 128, 1),
                                             (0.999, 3, 1), (0.7, 10, 3), (0.3, 10, 7)])
def test_keep_count(alpha, pool, keep):
    assert SpeculativeRejection(n=8, alpha=alpha).keep_count(pool) == keep


def test_select_ranks_by_score_ties_to_lower_row():
    spr = SpeculativeRejection(n=6, alpha=0.5)
    scores = {0: 0.5, 1: 0.9, 2: 0.5, 3: 0.5, 4: 0.1, 5: 0.9}
    assert spr.select([0, 1, 2, 3, 4, 5], scores) == [1, 5, 0]
    assert spr.select([3, 2, 4], scores) == [2, 3]  # pool order does not matter, row id does
    assert SpeculativeRejection(n=6, alpha=0.0).select([4, 0, 2], scores) == [0, 2, 4]


def test_next_decision_fills_the_budget():
    # budget 4 x (20 + 3) = 92: 2 survivors reach 92 // 2 - 20 = 26 tokens; at least 3 more than now
    assert SpeculativeRejection.next_decision(3, 2, 20, 92, 3) == 26
    assert SpeculativeRejection.next_decision(3, 4, 20, 92, 3) == 6  # nobody left: K more tokens
    assert SpeculativeRejection.next_decision(30, 3, 20, 92, 3) == 33
    spr = SpeculativeRejection(n=8, decision="budget", max_batch_tokens=200)
    assert spr.schedule(20) == (5, 200)
    assert SpeculativeRejection(n=8, decision="budget", max_batch_tokens=100).schedule(20) == (1, 100)
    assert SpeculativeRejection(n=8, decision="tokens:3").schedule(20) == (3, 184)


# -- exact rounds, best and costs on a tiny model --------------------------------------------------
def test_two_rounds_exact_rows_best_and_cost(tiny, tok):
    scorer = Scripted([0.1, 0.9, 0.5, 0.9], [0.2, 0.7])
    gen, result = _run(tiny, tok, SpeculativeRejection(n=4, alpha=0.5, decision="tokens:3"), scorer, 10)
    assert _kept(result) == [[1, 3], [3]]
    assert [r["row_ids"] for r in result["rounds"]] == [[0, 1, 2, 3], [1, 3]]
    assert [r["decision_tokens"] for r in result["rounds"]] == [3, 10]  # next = max(6, 92 // 2 - 20 = 26)
    assert scorer.seen == [[False] * 4, [True, True]]  # partial, then final
    assert [len(r.tokens) for r in gen.rows] == [3, 10, 3, 10]
    assert [r.reason for r in gen.rows] == ["pruned", "length", "pruned", "length"]
    assert result["best"] == 3 and result["scores"] == [0.1, 0.2, 0.5, 0.7]
    assert [c.finished for c in result["candidates"]] == [False, True, False, True]
    # prefill 20; steps 1-3 feed 4 rows; steps 4-9 feed the 2 survivors (token 10 ends them)
    cost = gen.cost["target"]
    assert (cost.positions, cost.calls) == (P + 4 * 3 + 2 * 6, 1 + 3 + 6)
    assert [r["positions"]["target"] for r in result["rounds"]] == [P + 12, 12]
    assert [r["tokens"] for r in result["rounds"]] == [12, 14]
    assert [(r["rows"], r["pool"], r["kept"], r["continuing"], r["finished"]) for r in result["rounds"]] == \
        [(4, 4, 2, 2, 0), (2, 2, 1, 0, 2)]
    bon = ScriptedEnds(tiny, tok, 10)
    BestOfN(n=4).run(bon, build_scorer(lambda p, r, f: [0.0] * len(r)), "hi", chat_prompt(tok, "hi"),
                     torch.Generator().manual_seed(0))
    assert bon.cost["target"].positions == P + 4 * 9  # what Best-of-4 pays for the same rows


def test_many_rounds_schedule_rows_and_cost(tiny, tok):
    value = {0: 0.3, 1: 0.8, 2: 0.1, 3: 0.6, 4: 0.9, 5: 0.2, 6: 0.5, 7: 0.7}
    rounds = [[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 3, 4, 6, 7], [1, 3, 4, 6, 7], [1, 3, 4, 7], [1, 4, 7], [1, 4]]
    final = {1: 1.0, 4: 0.95}
    scorer = Scripted(*[[final.get(i, value[i]) if k == 5 else value[i] for i in rows]
                        for k, rows in enumerate(rounds)])
    gen, result = _run(tiny, tok, SpeculativeRejection(n=8, alpha=0.25, decision="tokens:2"), scorer, 40)
    # budget 8 x (20 + 2) = 176: keep 6, 5 (4.5 rounds up), 4, 3, 2 of pools 8, 6, 5, 4, 3
    assert [r["row_ids"] for r in result["rounds"]] == rounds
    assert [r["decision_tokens"] for r in result["rounds"]] == [2, 9, 15, 24, 38, 40]
    assert _kept(result) == [[4, 1, 7, 3, 6, 0], [4, 1, 7, 3, 6], [4, 1, 7, 3], [4, 1, 7], [4, 1], [1, 4]]
    assert [len(r.tokens) for r in gen.rows] == [9, 40, 2, 24, 40, 2, 15, 38]
    assert result["best"] == 1
    fed = 2 + 2 + 9 + 15 + 24 + 38 + 39 + 39  # pruned rows: their decision length; survivors: 40 - 1
    assert gen.cost["target"].positions == P + fed
    assert sum(r["positions"]["target"] for r in result["rounds"]) == P + fed


def test_finished_rows_compete_for_slots(tiny, tok):
    # rows 0 and 1 end (EOS) before the first decision; row 0 takes a slot, so only row 3 runs on
    scorer = Scripted([0.95, 0.2, 0.5, 0.6], [0.9])
    gen, result = _run(tiny, tok, SpeculativeRejection(n=4, alpha=0.5, decision="tokens:4"), scorer, 12,
                       ends={0: 2, 1: 3})
    assert _kept(result) == [[0, 3], [0]]
    assert [r["row_ids"] for r in result["rounds"]] == [[0, 1, 2, 3], [3]]
    assert [r["pool"] for r in result["rounds"]] == [4, 2]
    assert scorer.seen == [[True, True, False, False], [True]]
    assert [r.reason for r in gen.rows] == ["eos", "eos", "pruned", "length"]
    assert result["best"] == 0  # 0.95 > row 3's final 0.9
    assert gen.cost["target"].positions == P + 1 + 2 + 4 + 11  # the EOS token is never fed


def test_finished_rows_can_take_every_slot(tiny, tok):
    scorer = Scripted([0.95, 0.9, 0.5, 0.6])
    gen, result = _run(tiny, tok, SpeculativeRejection(n=4, alpha=0.5, decision="tokens:4"), scorer, 12,
                       ends={0: 2, 1: 3})
    assert _kept(result) == [[0, 1]] and len(result["rounds"]) == 1
    assert [r.reason for r in gen.rows] == ["eos", "eos", "pruned", "pruned"]
    assert result["best"] == 0
    assert gen.cost["target"].positions == P + 1 + 2 + 4 + 4


def test_answer_is_best_over_every_finished_row_even_one_left_out_of_the_pool(tiny, tok):
    scorer = Scripted([0.7, 0.1, 0.9, 0.8], [0.3, 0.4])
    gen, result = _run(tiny, tok, SpeculativeRejection(n=4, alpha=0.5, decision="tokens:4"), scorer, 12,
                       ends={0: 2})
    assert _kept(result) == [[2, 3], [3]]
    assert result["best"] == 0 and result["candidates"][0].finished


def test_ties_keep_lower_rows_and_best_is_lowest_tied_row(tiny, tok):
    scorer = Scripted([0.5] * 6, [0.5] * 3)
    gen, result = _run(tiny, tok, SpeculativeRejection(n=6, alpha=0.5, decision="tokens:2"), scorer, 6)
    assert _kept(result) == [[0, 1, 2], [0, 1]]
    assert result["best"] == 0


def test_alpha_close_to_one_keeps_a_single_row(tiny, tok):
    scorer = Scripted([0.1, 0.3, 0.2, 0.9, 0.4], [0.2])
    gen, result = _run(tiny, tok, SpeculativeRejection(n=5, alpha=0.99, decision="tokens:2"), scorer, 8)
    assert _kept(result) == [[3], [3]]
    assert [r.reason for r in gen.rows] == ["pruned", "pruned", "pruned", "length", "pruned"]
    assert result["best"] == 3
    assert gen.cost["target"].positions == P + 5 * 2 + 5


def test_pool_of_one_is_best_of_one(tiny, tok):
    scorer = Scripted([0.4], [0.3], [0.2])
    spr = SpeculativeRejection(n=1, alpha=0.9, decision="tokens:3")
    gen, result = _run(tiny, tok, spr, scorer, 9)
    assert [r["decision_tokens"] for r in result["rounds"]] == [3, 6, 9]  # budget 23: 3 more each time
    assert _kept(result) == [[0], [0], [0]] and result["best"] == 0 and result["scores"] == [0.2]
    bon = ScriptedEnds(tiny, tok, 9)
    out = BestOfN(n=1).run(bon, build_scorer(lambda p, r, f: [0.0] * len(r)), "hi", chat_prompt(tok, "hi"),
                           torch.Generator().manual_seed(0))
    assert gen.rows[0].tokens == bon.rows[0].tokens
    assert gen.cost["target"].positions == bon.cost["target"].positions == P + 8


def test_budget_decision_first_rejects_when_the_batch_fills_it(tiny, tok):
    scorer = Scripted([0.1, 0.9, 0.5, 0.9], [0.2, 0.7])
    spr = SpeculativeRejection(n=4, alpha=0.5, decision="budget", max_batch_tokens=4 * (P + 3))
    gen, result = _run(tiny, tok, spr, scorer, 10)
    assert [r["decision_tokens"] for r in result["rounds"]] == [3, 10]
    assert _kept(result) == [[1, 3], [3]]
    assert gen.cost["target"].positions == P + 4 * 3 + 2 * 6


# -- alpha = 0 is Best-of-N -------------------------------------------------------------------------
def _vowels(prompts, responses, finished):
    return [sum(ch in "aeiou" for ch in r) for r in responses]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alpha_zero_returns_best_of_n(tiny, tok, seed):
    ids = chat_prompt(tok, "hi")
    outs = []
    for selector in (BestOfN(n=8), SpeculativeRejection(n=8, alpha=0.0, decision="tokens:3")):
        gen = SamplingGenerator(tiny, tok, SamplingParams(1.0), 16, eos_ids={tok.eos_token_id})
        result = selector.run(gen, build_scorer(_vowels), "hi", ids, torch.Generator().manual_seed(seed))
        outs.append((result, gen))
    (bon, bon_gen), (spr, spr_gen) = outs
    assert [c.response for c in spr["candidates"]] == [c.response for c in bon["candidates"]]
    assert spr["scores"] == bon["scores"] and spr["best"] == bon["best"]
    assert spr["candidates"][spr["best"]].response == bon["candidates"][bon["best"]].response
    assert spr_gen.cost["target"].positions == bon_gen.cost["target"].positions
    assert all(r["kept"] == r["pool"] for r in spr["rounds"]) and len(spr["rounds"]) >= 2


# -- every scorer kind -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory, tok):
    """A tiny sequence-classification reward model + tokenizer saved as a model directory."""
    from transformers import LlamaConfig, LlamaForSequenceClassification
    d = tmp_path_factory.mktemp("tiny-rm")
    config = LlamaConfig(vocab_size=74, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, num_labels=1, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).eval().save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.mark.parametrize("spec", ["loglik:self", "judge:sentiment", "judge:inoffensive", "rm", "callable"])
def test_every_scorer_kind(tiny, tok, tiny_rm_dir, spec):
    seen = []

    def length(prompts, responses, finished):
        seen.append(list(finished))
        return [len(r) for r in responses]

    scorer = build_scorer(length if spec == "callable" else f"rm:{tiny_rm_dir}" if spec == "rm" else spec)
    gen = SamplingGenerator(tiny, tok, SamplingParams(1.0), 12, eos_ids={tok.eos_token_id})
    ids = chat_prompt(tok, "hi")
    result = SpeculativeRejection(n=6, alpha=0.5, decision="tokens:4").run(gen, scorer, "hi", ids,
                                                                         torch.Generator().manual_seed(0))
    finished = [i for i, c in enumerate(result["candidates"]) if c.finished]
    assert result["best"] == max(finished, key=lambda i: result["scores"][i])
    final = scorer([result["candidates"][i] for i in finished])  # final scores are what ranked the answer
    # (a reward model's scores move by ~1e-8 with the padding of the batch they are read in)
    assert [result["scores"][i] for i in finished] == pytest.approx(final, abs=1e-6)
    assert result["rounds"][0]["rows"] == 6 and result["rounds"][0]["kept"] == 3
    assert scorer.cost.calls == len(result["rounds"]) + 1
    if spec == "callable":
        assert not all(seen[0])  # partial responses reach the scorer unfinished
    if spec == "rm":
        assert scorer.cost.positions > 0  # the reward model read every partial and final response


# -- the decode API and bad input -------------------------------------------------------------------
def test_decoder_record_has_rounds_and_cost(tiny, tok):
    config = DecodeConfig(method="spec-rejection", n=4, alpha="0.5", decision="tokens:3", max_new_tokens=10,
                          scorer="")
    gen = ScriptedEnds(tiny, tok, 10)
    decoder = Decoder(config, generator=gen, scorer=Scripted([0.1, 0.9, 0.5, 0.9], [0.2, 0.7]))
    assert isinstance(decoder.selector, SpeculativeRejection) and decoder.method_name == "spec-rejection"
    record = decoder.decode_one("hi")
    assert record["score"] == 0.7 and record["method"] == "spec-rejection"
    assert record["params"]["alpha"] == "0.5" and record["params"]["decision"] == "tokens:3"
    assert [r["kept_ids"] for r in record["rounds"]] == [[1, 3], [3]]
    assert record["cost"]["target"]["positions"] == P + 4 * 3 + 2 * 6
    assert record["cost"]["scorer"]["calls"] == 2


def test_from_config_and_bad_input():
    spr = build_selector(DecodeConfig(method="spec-rejection", n=32, alpha="0.75", decision="budget",
                                      max_batch_tokens=4096))
    assert (spr.n, spr.alpha, spr.first_tokens, spr.max_batch_tokens) == (32, 0.75, None, 4096)
    with pytest.raises(SpecError, match="alpha auto is AdaptiveRejection"):  # the fixed-rate class itself
        SpeculativeRejection(n=8, alpha="auto")
    for alpha in ("1", "-0.1", "half"):
        with pytest.raises(SpecError, match="alpha"):
            SpeculativeRejection(alpha=alpha)
    for decision in ("tokens:0", "tokens:x", "tokens", "memory", ""):
        with pytest.raises(SpecError, match="decision must be tokens:K"):
            SpeculativeRejection(decision=decision)
    with pytest.raises(SpecError, match="n must be >= 1"):
        SpeculativeRejection(n=0)


def test_needs_a_scorer(tiny, tok):
    gen = SamplingGenerator(tiny, tok, SamplingParams(1.0), 4)
    with pytest.raises(SpecError, match="needs a scorer"):
        SpeculativeRejection(n=2).run(gen, None, "hi", chat_prompt(tok, "hi"), None)


# -- N beyond one batch: the first round in chunks -----------------------------------------------------
class RowKeyed(SamplingGenerator):
    """Sampling on a real tiny model where every row draws from its own stream (keyed by its index in the
    run; a row continued from its tokens keeps its stream), so the samples do not depend on batching.
    ``ends[key]``: that row emits EOS as that token."""

    def __init__(self, model, tok, max_new_tokens, ends=None):
        super().__init__(model, tok, SamplingParams(1.0), max_new_tokens, eos_ids={FORCED_EOS})
        self.ends, self.streams, self.key_of, self.next_key, self.row_keys = ends or {}, {}, {}, 0, []

    def start(self, prompt_ids, n, rng=None):
        super().start(prompt_ids, n, rng)
        self.row_keys = list(range(self.next_key, self.next_key + n))
        self.next_key += n
        self.streams.update({k: torch.Generator().manual_seed(1000 + k) for k in self.row_keys})

    def start_batch(self, prompts, rng=None):
        super().start_batch(prompts, rng)
        self.row_keys = None  # the caller sets the rows' tokens next: keys are looked up at the first step

    def _step(self):
        from specalign.decode.sampling import processed_logprobs, sample
        if self.row_keys is None:
            self.row_keys = [self.key_of[tuple(r.tokens)] for r in self.rows]
        raw = torch.log_softmax(self.next_logits.float(), dim=-1)
        lp = processed_logprobs(self.next_logits, self.params)
        active = list(self.active)
        toks = [int(sample(lp[pos:pos + 1], self.streams[self.row_keys[i]])) for pos, i in enumerate(active)]
        logps = [[float(raw[pos, t])] for pos, t in enumerate(toks)]
        toks = [FORCED_EOS if self.ends.get(self.row_keys[i]) == len(self.rows[i].tokens) + 1 else t
                for t, i in zip(toks, active)]
        self._emit([[t] for t in toks], logps)
        for i in active:
            self.key_of[tuple(self.rows[i].tokens)] = self.row_keys[i]
        if self.active:
            self.next_logits = self.target.extend(self._last_tokens()[:, None], keep_logits=1)[:, -1, :]


class OneBatch(SpeculativeRejection):
    """The same schedule, with the first round in one batch whatever max_batch_tokens says."""

    def chunk_rows(self, prompt_len, max_new_tokens):
        return self.n


@pytest.mark.parametrize("alpha,k,budget_rows,ends,chunks", [
    (0.75, 3, 3, {1: 2, 6: 3}, 3),   # rows 1 and 6 finish by the decision; 2 survivors run to the end
    (0.5, 2, 5, {}, 2),              # 4 survivors, decided again at 7 tokens, then 2 run to the end
])
def test_chunked_first_round_equals_one_batch(tiny, tok, alpha, k, budget_rows, ends, chunks):
    ids = chat_prompt(tok, "hi")
    budget = budget_rows * (P + k)
    runs = []
    for cls in (OneBatch, SpeculativeRejection):
        gen = RowKeyed(tiny, tok, 12, ends)
        spr = cls(n=8, alpha=alpha, decision=f"tokens:{k}", max_batch_tokens=budget)
        runs.append((gen, spr.run(gen, build_scorer("loglik:self"), "hi", ids, None)))
    (g1, one), (g2, many) = runs
    assert many["rounds"][0]["chunks"] == chunks and "chunks" not in one["rounds"][0]
    assert _kept(many) == _kept(one) and [r["row_ids"] for r in many["rounds"]] == [r["row_ids"] for r in one["rounds"]]
    assert [r["decision_tokens"] for r in many["rounds"]] == [r["decision_tokens"] for r in one["rounds"]]
    assert many["best"] == one["best"]
    assert [c.response_ids for c in many["candidates"]] == [c.response_ids for c in one["candidates"]]
    assert [c.finished for c in many["candidates"]] == [c.finished for c in one["candidates"]]
    assert many["scores"] == pytest.approx(one["scores"], abs=1e-5)
    assert sum(c.finished for c in one["candidates"]) >= 2
    if ends:
        assert one["rounds"][0]["finished"] == many["rounds"][0]["finished"] == 2
    # cost: the prompt prefilled once per chunk, and every continuing row re-prefilled (prompt + k tokens)
    resumed = one["rounds"][0]["continuing"]
    extra = (chunks - 1) * P + resumed * (P + k)
    assert g2.cost["target"].positions == g1.cost["target"].positions + extra
    assert [r["positions"]["target"] for r in many["rounds"]] == \
        [one["rounds"][0]["positions"]["target"] + extra] + [r["positions"]["target"] for r in one["rounds"][1:]]
    assert many["rounds"][0]["chunk_rows"] == budget_rows


def test_requests_too_large_are_one_line_errors_before_any_work(tiny, tok, tmp_path):
    ids = chat_prompt(tok, "hi")
    with pytest.raises(SpecError, match="smaller than one row to the first decision"):
        SpeculativeRejection(n=4, decision="tokens:3", max_batch_tokens=P + 2).check(P, 10)
    # 8 rows in chunks of 2, but the 4 survivors of alpha 0.5 need 4 x (P + 4) tokens together
    with pytest.raises(SpecError, match="the 4 rows that continue after 2 tokens need 96 tokens"):
        SpeculativeRejection(n=8, alpha=0.5, decision="tokens:2", max_batch_tokens=60).check(P, 12)
    SpeculativeRejection(n=8, alpha=0.9, decision="tokens:2", max_batch_tokens=60).check(P, 12)  # 1 survivor fits
    gen = SamplingGenerator(tiny, tok, SamplingParams(1.0), 10)
    with pytest.raises(SpecError, match="smaller than one row"):
        BestOfN(n=2, max_batch_tokens=P + 5).run(gen, None, "hi", ids, None)
    assert gen.cost["target"].positions == 0  # refused before any forward
    from specalign.decode.adaptive import AdaptiveRejection
    with pytest.raises(SpecError, match="alpha auto ranks the first round in one batch"):
        AdaptiveRejection(n=8, decision="tokens:2", max_batch_tokens=60).check(P, 12)
    for method in ("sample", "best-of-n", "spec-rejection"):
        out = tmp_path / f"{method}.jsonl"
        decoder = Decoder(DecodeConfig(method=method, n=4, max_new_tokens=10, max_batch_tokens=P + 5, scorer=""),
                          generator=SamplingGenerator(tiny, tok, SamplingParams(1.0), 10),
                          scorer=Scripted([0.0] * 4))
        with pytest.raises(SpecError, match="max-batch-tokens"):
            decoder.run(["hi", "hello"], out=str(out), progress=False)
        assert not out.exists() and decoder.generator.cost["target"].positions == 0
