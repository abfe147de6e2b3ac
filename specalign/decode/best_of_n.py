"""Best-of-N: sample N complete responses, score the finished ones, return the argmax.

    check: one row (prompt + max_new_tokens) fits the token budget, else a one-line error
    for each chunk of rows that fits the token budget:
        start(prompt, chunk)            # one prefill, fanned out
        advance()                       # until every row ends
    scores = scorer(all N responses)
    return argmax(scores)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SpecError
from .generators import Generator


@dataclass
class BestOfN:
    n: int = 4
    max_batch_tokens: int = 32768  # rows x (prompt + max_new_tokens) per chunk
    name: str = "best-of-n"

    def chunk_size(self, prompt_len: int, max_new_tokens: int) -> int:
        return max(1, min(self.n, self.max_batch_tokens // (prompt_len + max_new_tokens)))

    def check(self, prompt_len: int, max_new_tokens: int) -> None:
        """One row (prompt + max_new_tokens) must fit ``max_batch_tokens``: else a one-line error, before any work."""
        if prompt_len + max_new_tokens > self.max_batch_tokens:
            raise SpecError(f"max-batch-tokens {self.max_batch_tokens} is smaller than one row ({prompt_len} prompt + "
                            f"{max_new_tokens} new tokens): raise it or lower --max-new-tokens")

    def run(self, generator: Generator, scorer, prompt: str, prompt_ids: list[int], rng) -> dict:
        self.check(len(prompt_ids), generator.max_new_tokens)
        chunk = self.chunk_size(len(prompt_ids), generator.max_new_tokens)
        candidates = []
        for first in range(0, self.n, chunk):
            generator.start(prompt_ids, min(chunk, self.n - first), rng)
            generator.advance()
            candidates += [generator.candidate(i, prompt) for i in range(len(generator.rows))]
        scores = scorer(candidates) if scorer is not None else [0.0] * len(candidates)
        best = max(range(len(candidates)), key=lambda i: scores[i])
        return {"candidates": candidates, "scores": scores, "best": best}
