"""The Monte Carlo oracle: how well could *any* scorer of a prefix predict the final score?

The best a prefix scorer can do is E[final | prefix], the expected final score of the responses
that continue that prefix. ``mc_values`` estimates it by sampling M continuations of each prefix
with the target (same sampling settings, EOS and the total ``max_new_tokens`` respected) and
scoring every prefix + continuation as one whole response.

``corrected_r`` turns those M values into the ceiling on the within-prompt correlation between a
prefix score and one held-out final score (the prefix's own recorded continuation, which the M
fresh continuations do not include):

- r   = within-prompt Pearson correlation between the mean of the M values and the held-out final
        score: both centred on their prompt's mean, then pooled over prompts;
- r_h = the same correlation between the means of the two halves (M/2 values each): how well the
        Monte Carlo estimate agrees with an independent copy of itself;
- rho = 2 r_h / (1 + r_h)   (Spearman-Brown: the reliability of the mean of all M values);
- r_corrected = r / sqrt(rho)   (correction for attenuation: only the oracle side is noisy).

r_corrected estimates corr(E[final | prefix], final) = sqrt(Var E[final | prefix] / Var final)
within a prompt: the share of final-score spread a prefix of this length can predict at all.

``OracleScorer`` is the same estimate as a scorer (``oracle:M`` in ``bench spr`` rankers): a
finished candidate scores its gold score, a partial one the mean of M continuations' gold scores,
both on the gold score's scale. Its ``cost.positions`` counts the target positions the
continuations used (prefill of each distinct prefix once, then every sampled token): a measuring
instrument's cost, reported apart from the method's own. Per call it is at most
rows x (prompt + k) + rows x M x (max_new_tokens - k) for prefixes of k tokens.
"""

from __future__ import annotations

import math

import torch

from ..errors import SpecError
from ..models.scorers import Candidate, Scorer


def _finished(prefix: list[int], eos_ids: set[int], max_new_tokens: int) -> bool:
    return len(prefix) >= max_new_tokens or (bool(prefix) and prefix[-1] in eos_ids)


def mc_values(model, tokenizer, prompt_ids: list[int], prefixes: list[list[int]], scorer, m: int,
              max_new_tokens: int, rng: torch.Generator | None, sampling=None, *, prompt: str | None = None,
              prefix_logps: list[float] | None = None, eos_ids=None, max_batch_tokens: int = 65536,
              cost=None) -> list[list[float]]:
    """M final scores per prefix: each prefix continued M times by ``model`` (``sampling``, default
    temperature 1), the whole response (prefix + continuation) scored by ``scorer``.

    A prefix that already ended (its last token is an EOS, or it has ``max_new_tokens`` tokens) is
    not continued: its M values are its own score. ``prompt`` is the user prompt text the scorer
    sees (default: ``prompt_ids`` decoded); ``prefix_logps`` the prefixes' summed log-probs (for
    ``loglik:self``; default 0). Rows are batched so rows x (prompt + max_new_tokens) fits
    ``max_batch_tokens`` (a prefix's M rows stay in one batch). Target cost is added to ``cost``
    (a ``ModelCost``) when given."""
    from ..decode.generators import SamplingGenerator, eos_ids_of
    from ..decode.sampling import SamplingParams
    if m < 1:
        raise SpecError(f"the oracle needs m >= 1 continuations per prefix, got {m}")
    if max_new_tokens < 1:
        raise SpecError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
    eos = set(eos_ids) if eos_ids is not None else eos_ids_of(model, tokenizer)
    text = prompt if prompt is not None else tokenizer.decode(prompt_ids, skip_special_tokens=True)
    logps = list(prefix_logps) if prefix_logps is not None else [0.0] * len(prefixes)
    prompt_ids = list(prompt_ids)
    width = len(prompt_ids) + max_new_tokens
    if m * width > max_batch_tokens:
        raise SpecError(f"the oracle's {m} continuations of one prefix need {m * width} tokens per batch, over "
                        f"max-batch-tokens {max_batch_tokens}: raise it or lower m")
    out: list[list[float] | None] = [None] * len(prefixes)

    def visible(ids: list[int]) -> list[int]:
        return ids[:-1] if ids and ids[-1] in eos else ids

    done = [j for j, p in enumerate(prefixes) if _finished(list(p), eos, max_new_tokens)]
    if done:
        scores = scorer([Candidate(text, tokenizer.decode(visible(list(prefixes[j])), skip_special_tokens=True), True,
                                   prompt_ids, visible(list(prefixes[j])), {"logp": logps[j]},
                                   "eos" if prefixes[j] and prefixes[j][-1] in eos else "length") for j in done])
        for j, s in zip(done, scores):
            out[j] = [s] * m
    groups: dict[int, list[int]] = {}
    for j, p in enumerate(prefixes):
        if out[j] is None:
            groups.setdefault(len(p), []).append(j)
    per_batch = max(1, max_batch_tokens // (m * width))
    for k, members in sorted(groups.items()):
        for start in range(0, len(members), per_batch):
            chunk = members[start:start + per_batch]
            gen = SamplingGenerator(model, tokenizer, sampling or SamplingParams(), max_new_tokens - k, eos_ids=eos)
            rows = [prompt_ids + list(prefixes[j]) for j in chunk]
            gen._begin([r for r in rows for _ in range(m)], rng)
            logits = gen.target.prefill(rows)  # each distinct prefix once, then fanned out M times
            gen.target.repeat(m)
            gen.next_logits = logits.repeat_interleave(m, dim=0)
            gen.advance()
            candidates = []
            for pos, j in enumerate(chunk):
                for r in range(m):
                    row = gen.rows[pos * m + r]
                    ids = list(prefixes[j]) + gen.response_ids(pos * m + r)
                    candidates.append(Candidate(text, tokenizer.decode(ids, skip_special_tokens=True), True,
                                                prompt_ids, ids, {"logp": logps[j] + row.stats["logp"]}, row.reason))
            scores = scorer(candidates)
            for pos, j in enumerate(chunk):
                out[j] = scores[pos * m:(pos + 1) * m]
            if cost is not None:
                cost.add(gen.target.cost)
    return out  # type: ignore[return-value]


# -- the split-half corrected correlation ------------------------------------------------------------
def _pooled_within(xs: list[list[float]], ys: list[list[float]]) -> float:
    """Pearson r of x and y after centring both on each group's mean, pooled over groups."""
    sxy = sxx = syy = 0.0
    for x, y in zip(xs, ys):
        if len(x) < 2:
            continue
        mx, my = sum(x) / len(x), sum(y) / len(y)
        sxy += sum((a - mx) * (b - my) for a, b in zip(x, y))
        sxx += sum((a - mx) ** 2 for a in x)
        syy += sum((b - my) ** 2 for b in y)
    if sxx <= 0 or syy <= 0:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)


def split_half(values: list[list[list[float]]], finals: list[list[float]]) -> dict:
    """The oracle's correlation report over prompts: ``values[p][j]`` = the M Monte Carlo scores of
    prompt p's prefix j, ``finals[p][j]`` = that prefix's held-out final score. Returns r (mean of M
    vs held-out), split_half_r (half means vs each other), reliability (Spearman-Brown
    2 r_h / (1 + r_h)), r_corrected (r / sqrt(reliability); NaN when the reliability is not
    positive), and the counts. M must be even (two halves of M/2)."""
    if len(values) != len(finals):
        raise SpecError(f"{len(values)} prompts of oracle values but {len(finals)} prompts of final scores")
    means, first, second = [], [], []
    for vals, fin in zip(values, finals):
        if len(vals) != len(fin):
            raise SpecError(f"{len(vals)} prefixes of oracle values but {len(fin)} held-out final scores")
        for v in vals:
            if len(v) < 2 or len(v) % 2:
                raise SpecError(f"split-half needs an even number (>= 2) of continuations per prefix, got {len(v)}")
        means.append([sum(v) / len(v) for v in vals])
        first.append([sum(v[:len(v) // 2]) / (len(v) // 2) for v in vals])
        second.append([sum(v[len(v) // 2:]) / (len(v) // 2) for v in vals])
    r = _pooled_within(means, finals)
    r_h = _pooled_within(first, second)
    reliability = 2 * r_h / (1 + r_h) if r_h > -1 and not math.isnan(r_h) else float("nan")
    corrected = r / math.sqrt(reliability) if reliability > 0 and not math.isnan(r) else float("nan")
    return {"r": r, "split_half_r": r_h, "reliability": reliability, "r_corrected": corrected,
            "prompts": sum(len(f) >= 2 for f in finals), "prefixes": sum(len(f) for f in finals)}


def corrected_r(values: list[list[list[float]]], finals: list[list[float]]) -> float:
    """The split-half corrected within-prompt correlation (``split_half(...)["r_corrected"]``)."""
    return split_half(values, finals)["r_corrected"]


def bootstrap_se(values: list[list[list[float]]], finals: list[list[float]], key: str = "r_corrected",
                 resamples: int = 500, seed: int = 0) -> float:
    """Standard error of ``split_half(...)[key]`` over prompts (bootstrap resampling whole prompts)."""
    import random
    rnd = random.Random(seed)
    n = len(values)
    if n < 2:
        return float("nan")
    stats = []
    for _ in range(resamples):
        pick = [rnd.randrange(n) for _ in range(n)]
        x = split_half([values[i] for i in pick], [finals[i] for i in pick])[key]
        if not math.isnan(x):
            stats.append(x)
    if len(stats) < 2:
        return float("nan")
    mean = sum(stats) / len(stats)
    return math.sqrt(sum((s - mean) ** 2 for s in stats) / (len(stats) - 1))


# -- the oracle as a scorer ------------------------------------------------------------------------------
class OracleScorer(Scorer):
    """``oracle:M``: a finished candidate scores ``gold``; a partial one the mean gold score of M sampled
    continuations (``mc_values``). Values are cached per (prompt, prefix) for the current ``rng``
    stream; ``reset(rng)`` starts a prompt. ``cost`` counts the continuations' target positions."""

    def __init__(self, model, tokenizer, gold: Scorer, m: int, max_new_tokens: int, sampling=None, eos_ids=None,
                 max_batch_tokens: int = 65536):
        super().__init__(max_batch_tokens)
        from ..decode.cost import ModelCost, count_params
        self.name = f"oracle:{m}"
        self.model, self.tokenizer, self.gold, self.m = model, tokenizer, gold, m
        self.max_new_tokens, self.sampling, self.eos_ids = max_new_tokens, sampling, eos_ids
        self.target_cost = ModelCost(params=count_params(model))
        self.rng: torch.Generator | None = None
        self.cache: dict[tuple, float] = {}

    def reset(self, rng: torch.Generator | None) -> None:
        self.rng, self.cache = rng, {}

    def _score(self, candidates):
        out: list[float | None] = [None] * len(candidates)
        finished = [i for i, c in enumerate(candidates) if c.finished]
        for i, s in zip(finished, self.gold([candidates[i] for i in finished])):
            out[i] = s
        todo: dict[tuple, list[int]] = {}
        for i, c in enumerate(candidates):
            if out[i] is None:
                key = (tuple(c.prompt_ids), tuple(c.response_ids))
                if key in self.cache:
                    out[i] = self.cache[key]
                else:
                    todo.setdefault(key, []).append(i)
        by_prompt: dict[tuple, list[tuple]] = {}
        for key in todo:
            by_prompt.setdefault(key[0], []).append(key)
        for prompt_ids, keys in by_prompt.items():
            first = candidates[todo[keys[0]][0]]
            values = mc_values(self.model, self.tokenizer, list(prompt_ids), [list(k[1]) for k in keys], self.gold,
                               self.m, self.max_new_tokens, self.rng, self.sampling, prompt=first.prompt,
                               prefix_logps=[candidates[todo[k][0]].stats.get("logp", 0.0) for k in keys],
                               eos_ids=self.eos_ids, max_batch_tokens=self.max_batch_tokens, cost=self.target_cost)
            for key, v in zip(keys, values):
                self.cache[key] = sum(v) / len(v)
                for i in todo[key]:
                    out[i] = self.cache[key]
        return out


def parse_oracle(spec: str) -> int | None:
    """``oracle:M`` -> M (>= 2, even: the split-half needs two halves); anything else -> None."""
    kind, _, arg = str(spec).partition(":")
    if kind != "oracle":
        return None
    if not arg.strip().isdigit() or int(arg) < 2 or int(arg) % 2:
        raise SpecError(f"oracle scorers are oracle:M with M an even number >= 2 of continuations per prefix, "
                        f"got {spec!r}")
    return int(arg)
