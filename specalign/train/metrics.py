"""Measurements the steps report: response log-probs of preference pairs under a causal LM, and means
with standard errors over prompts (``mean_se``, ``paired``)."""

from __future__ import annotations

import math
import statistics

import torch

from ..models.loading import chat_prompt
from .data import prompt_text, response_text


def pair_ids(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt ids, chosen ids, rejected ids) per row: chat-template prompt, response tokens + EOS."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for r in rows:
        p = chat_prompt(tokenizer, prompt_text(r["prompt"]))
        c = tokenizer(response_text(r["chosen"]), add_special_tokens=False)["input_ids"] + eos
        j = tokenizer(response_text(r["rejected"]), add_special_tokens=False)["input_ids"] + eos
        out.append((p, c, j))
    return out


@torch.inference_mode()
def sequence_logps(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int = 0,
                   batch_size: int = 8) -> list[float]:
    """Sum of log q(response token | prefix) per row (one forward per batch, left padding)."""
    from ..models.draft import response_logits
    out = []
    for s in range(0, len(prompts), batch_size):
        ps, rs = prompts[s:s + batch_size], responses[s:s + batch_size]
        logits, mask = response_logits(model, ps, rs, pad_id)
        width = mask.shape[1]
        targets = torch.zeros(len(rs), width, dtype=torch.long, device=logits.device)
        for i, r in enumerate(rs):
            targets[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        logp = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None]).squeeze(-1)
        out.extend((logp * mask).sum(-1).tolist())
    return out


def pair_logps(model, tokenizer, rows: list[dict]) -> tuple[list[float], list[float]]:
    """(log q(chosen), log q(rejected)) per preference row."""
    ids = pair_ids(tokenizer, rows)
    pad = tokenizer.pad_token_id or 0
    lc = sequence_logps(model, [p for p, _, _ in ids], [c for _, c, _ in ids], pad)
    lr = sequence_logps(model, [p for p, _, _ in ids], [j for _, _, j in ids], pad)
    return lc, lr


def pair_margins(model, tokenizer, rows: list[dict]) -> list[float]:
    """log q(chosen) - log q(rejected) per preference row."""
    lc, lr = pair_logps(model, tokenizer, rows)
    return [a - b for a, b in zip(lc, lr)]


def mean_se(values) -> dict:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n); NaN below 2 values)."""
    values = [float(v) for v in values]
    if not values:
        return {"mean": float("nan"), "se": float("nan"), "n": 0}
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"mean": statistics.fmean(values), "se": se, "n": len(values)}


def paired(a, b) -> dict:
    """Paired difference a - b over the same units (prompts): its mean, standard error and t = mean / se."""
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"paired difference needs equal lengths, got {len(a)} and {len(b)}")
    d = mean_se([x - y for x, y in zip(a, b)])
    t = d["mean"] / d["se"] if d["se"] and math.isfinite(d["se"]) else float("nan")
    return {"diff": d["mean"], "se": d["se"], "t": t, "n": d["n"]}
