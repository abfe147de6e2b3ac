"""Tiny, fully synthetic inputs for the training steps (tests and smoke runs; nothing downloaded).

- ``save_tiny_model(dir)``: a random tiny Llama + the character tokenizer, saved as a model directory.
- ``prompt_file(path, prompts)``: a JSON prompt list.
- ``ab_text(rng, p, n)``: n characters, each 'a' with probability p, else 'b'; ``a_share(text)`` is the
  task's reward (the share of 'a' among a/b characters): a prefix of such a text predicts its final
  reward, which is what the value-head test needs, and "more a" is an easy preference to learn.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("apple bird cat dog egg fish goat hat ice jam kite lamp moon nest owl pig queen rat sun tree "
         "cup door fan gum ink jar key leg map net").split()


def save_tiny_model(directory, num_layers: int = 3, hidden_size: int = 32, init_scale: float = 4.0, seed: int = 0):
    from ..models.testing import char_tokenizer, tiny_llama
    model = tiny_llama(num_layers=num_layers, hidden_size=hidden_size, init_scale=init_scale, seed=seed)
    tok = char_tokenizer()
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def prompt_file(path, prompts: list[str]) -> str:
    Path(path).write_text(json.dumps([{"prompt": p} for p in prompts]))
    return str(path)


def template_prompts(n: int, offset: int = 0) -> list[str]:
    """``tell me X Y`` prompts; different ``offset`` ranges give disjoint sets of the same kind."""
    pairs = [(a, b) for a in WORDS for b in WORDS if a != b]
    return [f"tell me {a} {b}" for a, b in pairs[offset:offset + n]]


def ab_text(rng: random.Random, p: float, n: int) -> str:
    return "".join("a" if rng.random() < p else "b" for _ in range(n))


def a_share(text: str) -> float:
    ab = [c for c in text if c in "ab"]
    return sum(c == "a" for c in ab) / len(ab) if ab else 0.0


def a_share_scorer(prompts, responses, finished):
    """``python:specalign.train.testing:a_share_scorer``: the synthetic reward of every response."""
    return [a_share(r) for r in responses]


def ab_samples(path, prompts: list[str], k: int, length: int = 24, seed: int = 0) -> str:
    """Scored samples (JSONL of prompt/response/score/finished): per response p ~ U(0, 1), chars ~ Bernoulli(p)."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for prompt in prompts:
            for _ in range(k):
                text = ab_text(rng, rng.random(), length)
                fh.write(json.dumps({"prompt": prompt, "response": text, "score": a_share(text),
                                     "finished": True}) + "\n")
    return str(path)


def ab_preferences(path, prompts: list[str], length: int = 16, seed: int = 0) -> str:
    """Preference pairs (JSONL, plain-text form): chosen is mostly 'a', rejected mostly 'b'."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for prompt in prompts:
            chosen = ab_text(rng, 0.85, length)
            rejected = ab_text(rng, 0.15, length)
            fh.write(json.dumps({"question": prompt, "good": chosen, "bad": rejected}) + "\n")
    return str(path)


def write_named_data(directory) -> str:
    """Synthetic local copies of the named data sets (``specalign.data``) in ``directory``: 805
    template prompts as ``alpaca_farm_eval.json`` and 12 conversation pairs as ``saferlhf_200.jsonl``
    (chosen mostly 'a', rejected mostly 'b'). Point ``$SPECALIGN_DATA`` at it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    prompts = template_prompts(805)
    (directory / "alpaca_farm_eval.json").write_text(json.dumps([{"JSON_idx": i, "prompt": p}
                                                                 for i, p in enumerate(prompts)]))
    rng = random.Random(0)
    with open(directory / "saferlhf_200.jsonl", "w") as fh:
        for prompt in template_prompts(12, offset=805):
            user = {"role": "user", "content": prompt}
            fh.write(json.dumps({"real": [user, {"role": "assistant", "content": ab_text(rng, 0.85, 16)}],
                                 "generated": [user, {"role": "assistant", "content": ab_text(rng, 0.15, 16)}]}) + "\n")
    return str(directory)
