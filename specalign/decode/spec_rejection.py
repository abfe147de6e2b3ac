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
        """(first decision in new tokens, token budget rows x (prompt + generated))."""
        if self.first_tokens is not None:
            return self.first_tokens, self.n * (prompt_len + self.first_tokens)
        return max(1, self.max_batch_tokens // self.n - prompt_len), self.max_batch_tokens

    @staticmethod
    def next_decision(generated: int, alive: int, prompt_len: int, budget: int, min_step: int) -> int:
        """Survivors generate until ``alive x (prompt + generated)`` fills the budget, and >= min_step more."""
        return max(generated + min_step, budget // max(1, alive) - prompt_len)

    # -- the algorithm ---------------------------------------------------------------------------
    def run(self, generator: Generator, scorer, prompt: str, prompt_ids: list[int], rng) -> dict:
        if scorer is None:
            raise SpecError("spec-rejection needs a scorer to rank partial responses: pass --scorer")
        prompt_len = len(prompt_ids)
        first, budget = self.schedule(prompt_len)
        positions = {name: c.positions for name, c in generator.cost.items()}
        generator.start(prompt_ids, self.n, rng)
        rows = generator.rows
        scores: dict[int, float] = {}
        kept: list[int] = []
        rounds = []
        target = first
        while generator.active:
            this_round = list(generator.active)
            tokens_before = sum(len(rows[i].tokens) for i in this_round)
            generator.advance(max(1, target - min(len(rows[i].tokens) for i in this_round)))
            round_scores = scorer([generator.candidate(i, prompt) for i in this_round])
            scores.update(zip(this_round, round_scores))
            pool = kept + this_round
            top = self.select(pool, scores)
            survivors = set(top)
            generator.drop([i for i in this_round if i not in survivors and not rows[i].done])
            kept = [i for i in top if rows[i].finished]
            rounds.append({
                "round": len(rounds) + 1,
                "decision_tokens": max(len(rows[i].tokens) for i in this_round),
                "rows": len(this_round),
                "finished": sum(rows[i].finished for i in this_round),
                "pool": len(pool),
                "kept": len(top),
                "continuing": len(generator.active),
                "tokens": sum(len(rows[i].tokens) for i in this_round) - tokens_before,
                "positions": {name: c.positions - positions.get(name, 0) for name, c in generator.cost.items()},
                "row_ids": this_round,
                "scores": [round(s, 6) for s in round_scores],
                "kept_ids": top,
            })
            positions = {name: c.positions for name, c in generator.cost.items()}
            if generator.active:
                generated = max(len(rows[i].tokens) for i in generator.active)
                target = self.next_decision(generated, len(generator.active), prompt_len, budget, first)
        finished = [i for i in range(len(rows)) if rows[i].finished]
        best = max(finished, key=lambda i: scores[i])  # first maximum: lowest row id on ties
        return {"candidates": [generator.candidate(i, prompt) for i in range(len(rows))],
                "scores": [scores[i] for i in range(len(rows))], "best": best, "rounds": rounds}
