"""Best-of-N: sample N complete responses, score the finished ones, return the argmax.

    for each chunk of rows that fits the token budget:
        start(prompt, chunk)            # one prefill, fanned out
        advance()                       # until every row ends
    scores = scorer(all N responses)
    return argmax(scores)
"""

from __future__ import annotations

from dataclasses import dataclass

from .generators import Generator


@dataclass
class BestOfN:
    n: int = 4
    max_batch_tokens: int = 32768  # rows x (prompt + max_new_tokens) per chunk
    name: str = "best-of-n"

    def chunk_size(self, prompt_len: int, max_new_tokens: int) -> int:
        return max(1, min(self.n, self.max_batch_tokens // (prompt_len + max_new_tokens)))

    def run(self, generator: Generator, scorer, prompt: str, prompt_ids: list[int], rng) -> dict:
        chunk = self.chunk_size(len(prompt_ids), generator.max_new_tokens)
        candidates = []
        for first in range(0, self.n, chunk):
            generator.start(prompt_ids, min(chunk, self.n - first), rng)
            generator.advance()
            candidates += [generator.candidate(i, prompt) for i in range(len(generator.rows))]
        scores = scorer(candidates) if scorer is not None else [0.0] * len(candidates)
        best = max(range(len(candidates)), key=lambda i: scores[i])
        return {"candidates": candidates, "scores": scores, "best": best}
