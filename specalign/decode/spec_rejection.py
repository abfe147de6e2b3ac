"""Speculative Rejection (Sun et al., NeurIPS 2024, arXiv 2410.20290): Best-of-N that drops the
worst partial responses early, in place.

    start(prompt, n)                          # one prefill, fanned out to n rows
    kept = []                                 # finished candidates still in the running
    while some row is generating:
        advance to the next decision point    # tokens:K, or when the batch fills its token budget
        score every row of this round         # partial text for running rows, final for finished
        pool = kept + this round's rows
        top = best round((1 - alpha) * |pool|) of pool by score (at least one)
        drop the running rows not in top      # they leave the batch and the KV cache
        kept = finished rows in top
    return argmax of the final score over every finished (or length-capped) row

Decision points. The paper fills GPU memory, then rejects; here a token budget plays memory:
``rows x (prompt + generated) <= budget``. With ``decision="budget"`` the budget is
``max_batch_tokens``; with ``decision="tokens:K"`` the first decision comes after K new tokens and
the budget is what the first round used, ``n x (prompt + K)``. After a decision the survivors
generate until they fill the budget again, and at least K (the first round's length) more tokens.

Ranking ties go to the lower row id (Best-of-N's argmax does the same), and half rounds up in
``round((1 - alpha) * |pool|)``. ``select`` is the one method an adaptive rejection rule overrides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import SpecError
from .generators import Generator


def parse_alpha(alpha) -> float:
    if isinstance(alpha, str) and alpha.strip() == "auto":
        raise SpecError("SpeculativeRejection takes a fixed rejection rate in [0, 1), e.g. alpha=0.5; alpha auto is "
                        "AdaptiveRejection (specalign.decode.adaptive), which --alpha auto selects")
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise SpecError(f"alpha must be a number in [0, 1), got {alpha!r}") from None
    if not 0 <= value < 1:
        raise SpecError(f"alpha must be in [0, 1) (the fraction of the pool rejected per round), got {value}")
    return value


def parse_decision(decision: str) -> int | None:
    """``tokens:K`` -> K; ``budget`` -> None."""
    text = str(decision).strip()
    if text == "budget":
        return None
    kind, _, arg = text.partition(":")
    if kind == "tokens" and arg.strip().isdigit() and int(arg) >= 1:
        return int(arg)
    raise SpecError(f"decision must be tokens:K (K >= 1 new tokens before the first rejection) or budget "
                    f"(driven by --max-batch-tokens), got {decision!r}")


@dataclass
class SpeculativeRejection:
    n: int = 16
    alpha: float | str = 0.5
    decision: str = "tokens:16"
    max_batch_tokens: int = 32768
    name: str = "spec-rejection"

    def __post_init__(self):
        if self.n < 1:
            raise SpecError(f"n must be >= 1, got {self.n}")
        if self.max_batch_tokens < 1:
            raise SpecError(f"max-batch-tokens must be >= 1, got {self.max_batch_tokens}")
        self.alpha = parse_alpha(self.alpha)
        self.first_tokens = parse_decision(self.decision)

    @classmethod
    def from_config(cls, config) -> "SpeculativeRejection":
        return cls(n=config.n, alpha=config.alpha, decision=config.decision,
                   max_batch_tokens=config.max_batch_tokens)

    # -- the rejection rule --------------------------------------------------------------------
    def keep_count(self, pool_size: int) -> int:
        """round((1 - alpha) * pool), half up, at least one."""
        return max(1, min(pool_size, math.floor((1.0 - self.alpha) * pool_size + 0.5 + 1e-9)))

    def select(self, pool: list[int], scores: dict[int, float]) -> list[int]:
        """Rows of ``pool`` that survive this round, best first (ties: lower row id)."""
        ranked = sorted(pool, key=lambda i: (-scores[i], i))
        return ranked[:self.keep_count(len(pool))]

    # -- decision points -------------------------------------------------------------------------
    def schedule(self, prompt_len: int) -> tuple[int, int]:
        """(first decision in new tokens, token budget rows x (prompt + generated)). With ``tokens:K`` the
        budget is what the first round uses, n x (prompt + K), capped at ``max_batch_tokens``."""
        if self.first_tokens is not None:
            return self.first_tokens, min(self.n * (prompt_len + self.first_tokens), self.max_batch_tokens)
        return max(1, self.max_batch_tokens // self.n - prompt_len), self.max_batch_tokens

    @staticmethod
    def next_decision(generated: int, alive: int, prompt_len: int, budget: int, min_step: int) -> int:
        """Survivors generate until ``alive x (prompt + generated)`` fills the budget, and >= min_step more."""
        return max(generated + min_step, budget // max(1, alive) - prompt_len)

    def chunk_rows(self, prompt_len: int, max_new_tokens: int) -> int:
        """Rows per batch of the first round: all n when n x (prompt + first decision) fits
        ``max_batch_tokens``, else as many as fit (the first round then runs in chunks)."""
        first = min(self.schedule(prompt_len)[0], max_new_tokens)
        return max(1, min(self.n, self.max_batch_tokens // (prompt_len + first)))

    def check(self, prompt_len: int, max_new_tokens: int) -> None:
        """A one-line error, before any work, when a prompt cannot run within ``max_batch_tokens``: one row
        to the first decision, or the rows that survive it (no row finishing early, the worst case)
        up to each later decision."""
        first, budget = self.schedule(prompt_len)
        first = min(first, max_new_tokens)
        if prompt_len + first > self.max_batch_tokens:
            raise SpecError(f"max-batch-tokens {self.max_batch_tokens} is smaller than one row to the first decision "
                            f"({prompt_len} prompt + {first} new tokens): raise it")
        numeric = isinstance(self.alpha, float)
        if not numeric and self.chunk_rows(prompt_len, max_new_tokens) < self.n:
            raise SpecError(f"alpha {self.alpha} ranks the first round in one batch, but n={self.n} rows x ({prompt_len} "
                            f"prompt + {first} tokens) exceed max-batch-tokens {self.max_batch_tokens}: raise it, lower "
                            "n, or use a fixed alpha")
        alive, generated = (self.keep_count(self.n) if numeric else self.n), first
        while generated < max_new_tokens:
            nxt = min(max_new_tokens, self.next_decision(generated, alive, prompt_len, budget, first))
            if alive * (prompt_len + nxt) > self.max_batch_tokens:
                raise SpecError(f"spec-rejection n={self.n}, alpha={self.alpha}: the {alive} rows that continue after "
                                f"{generated} tokens need {alive * (prompt_len + nxt)} tokens in one batch, over "
                                f"max-batch-tokens {self.max_batch_tokens}: raise it, raise alpha or lower n")
            generated, alive = nxt, self.keep_count(alive) if numeric else alive

    # -- the algorithm ---------------------------------------------------------------------------
    def run(self, generator: Generator, scorer, prompt: str, prompt_ids: list[int], rng) -> dict:
        if scorer is None:
            raise SpecError("spec-rejection needs a scorer to rank partial responses: pass --scorer")
        prompt_len = len(prompt_ids)
        self.check(prompt_len, generator.max_new_tokens)
        first, budget = self.schedule(prompt_len)
        chunk = self.chunk_rows(prompt_len, generator.max_new_tokens)
        if chunk < self.n:
            return self._run_chunked(generator, scorer, prompt, prompt_ids, rng, first, budget, chunk)
        state = {"ids": list(range(self.n)), "scores": {}, "kept": [], "rounds": [], "saved": {},
                 "first_positions": {name: c.positions for name, c in generator.cost.items()}}
        generator.start(prompt_ids, self.n, rng)
        return self._rounds(generator, scorer, prompt, prompt_ids, first, budget, first, state)

    def _round_record(self, state, this_round, tokens, positions, top, round_scores, **extra) -> dict:
        return {"round": len(state["rounds"]) + 1, "decision_tokens": max(len(t) for t in tokens.values()),
                "rows": len(this_round), "finished": sum(state["finished"][g] for g in this_round),
                "pool": extra.pop("pool"), "kept": len(top), "continuing": extra.pop("continuing"),
                "tokens": extra.pop("new_tokens"), "positions": positions, "row_ids": this_round,
                "scores": [round(x, 6) for x in round_scores], "kept_ids": top, **extra}

    def _rounds(self, generator, scorer, prompt, prompt_ids, first, budget, target, state) -> dict:
        """Decision rounds on the rows in the generator; ``state["ids"]`` maps its rows to global row ids."""
        prompt_len = len(prompt_ids)
        rows, ids = generator.rows, state["ids"]
        local = {g: i for i, g in enumerate(ids)}
        scores, rounds, saved = state["scores"], state["rounds"], state["saved"]
        finished = state.setdefault("finished", {})
        kept = state["kept"]
        positions = {name: c.positions for name, c in generator.cost.items()}
        if "first_positions" in state:  # the prefill (and a chunked first round) belongs to round 1
            positions = state["first_positions"]
        while generator.active:
            this_round = [ids[i] for i in generator.active]
            tokens_before = sum(len(rows[local[g]].tokens) for g in this_round)
            generator.advance(max(1, target - min(len(rows[local[g]].tokens) for g in this_round)))
            round_scores = scorer([generator.candidate(local[g], prompt) for g in this_round])
            scores.update(zip(this_round, round_scores))
            for g in this_round:
                finished[g] = rows[local[g]].finished
            pool = kept + this_round
            top = self.select(pool, scores)
            survivors = set(top)
            generator.drop([local[g] for g in this_round if g not in survivors and not rows[local[g]].done])
            kept = [g for g in top if finished.get(g, False) or g in saved and saved[g]["finished"]]
            rounds.append(self._round_record(
                state, this_round, {g: rows[local[g]].tokens for g in this_round},
                {name: c.positions - positions.get(name, 0) for name, c in generator.cost.items()}, top,
                round_scores, pool=len(pool), continuing=len(generator.active),
                new_tokens=sum(len(rows[local[g]].tokens) for g in this_round) - tokens_before))
            positions = {name: c.positions for name, c in generator.cost.items()}
            if generator.active:
                generated = max(len(rows[i].tokens) for i in generator.active)
                target = self.next_decision(generated, len(generator.active), prompt_len, budget, first)
        n = self.n
        candidates = [saved[g]["candidate"] if g not in local else generator.candidate(local[g], prompt)
                      for g in range(n)]
        done = [g for g in range(n) if (finished[g] if g in finished else saved[g]["finished"])]
        best = max(done, key=lambda g: scores[g])  # first maximum: lowest row id on ties
        return {"candidates": candidates, "scores": [scores[g] for g in range(n)], "best": best, "rounds": rounds}

    def _run_chunked(self, generator, scorer, prompt, prompt_ids, rng, first, budget, chunk) -> dict:
        """The first round in chunks of ``chunk`` rows: each chunk is generated to the first decision and
        scored, its rows' tokens kept (their KV caches are not); the pool is all n rows, and the top
        round((1 - alpha) n) of them -- exactly the unchunked rule -- continue together, re-prefilled as
        prompt + their tokens in one batch. Extra target positions over the unchunked run:
        (chunks - 1) x prompt for the repeated prompt prefill, plus (prompt + tokens) per continuing row."""
        if not hasattr(generator, "start_batch"):
            raise SpecError(f"the {generator.name} generator cannot continue rows from their tokens: run "
                            f"spec-rejection with n x (prompt + first decision) <= max-batch-tokens")
        start_positions = {name: c.positions for name, c in generator.cost.items()}
        scores, finished, saved = {}, {}, {}
        row_scores, new_tokens, decision_tokens, chunks = [], 0, 0, 0
        for offset in range(0, self.n, chunk):
            size = min(chunk, self.n - offset)
            generator.start(prompt_ids, size, rng)
            generator.advance(first)
            chunks += 1
            cands = [generator.candidate(i, prompt) for i in range(size)]
            values = scorer(cands)
            row_scores += values
            for i, (c, v) in enumerate(zip(cands, values)):
                g = offset + i
                row = generator.rows[i]
                scores[g], finished[g] = v, row.finished
                saved[g] = {"candidate": c, "finished": row.finished, "tokens": list(row.tokens),
                            "stats": dict(row.stats), "reason": row.reason}
                new_tokens += len(row.tokens)
                decision_tokens = max(decision_tokens, len(row.tokens))
            generator.drop(list(range(size)))  # this chunk's state is not needed any more
        pool = list(range(self.n))
        top = self.select(pool, scores)
        running = sorted(g for g in top if not finished[g])
        kept = [g for g in top if finished[g]]
        state = {"ids": running, "scores": scores, "kept": kept, "saved": saved, "finished": {},
                 "rounds": []}
        if running:
            generator.start_batch([list(prompt_ids) + saved[g]["tokens"] for g in running], rng)
            generator.prompt_ids = list(prompt_ids)
            generator.row_prompts = [list(prompt_ids) for _ in running]
            for row, g in zip(generator.rows, running):
                row.tokens, row.stats = list(saved[g]["tokens"]), dict(saved[g]["stats"])
        else:
            generator.rows, generator.active = [], []
        state["rounds"].append({
            "round": 1, "decision_tokens": decision_tokens, "rows": self.n,
            "finished": sum(finished.values()), "pool": self.n, "kept": len(top), "continuing": len(running),
            "tokens": new_tokens,
            "positions": {name: c.positions - start_positions.get(name, 0) for name, c in generator.cost.items()},
            "row_ids": pool, "scores": [round(x, 6) for x in row_scores], "kept_ids": top, "chunks": chunks,
            "chunk_rows": chunk})
        state["first_positions"] = {name: c.positions for name, c in generator.cost.items()}
        target = first
        if running:
            generated = max(len(saved[g]["tokens"]) for g in running)
            target = self.next_decision(generated, len(running), len(prompt_ids), budget, first)
        return self._rounds(generator, scorer, prompt, prompt_ids, first, budget, target, state)
