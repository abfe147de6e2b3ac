"""Scorers: a reward on (prompt, response, finished?), in batches under a token budget.

Specs (``build_scorer``):

- ``judge:sentiment``   VADER compound sentiment of the response, in [-1, 1] (package vaderSentiment)
- ``judge:inoffensive`` 1 - offensive-language probability (package alt-profanity-check)
- ``loglik:self``       mean log-prob of the response under the generator (free: the generator
                        records it while sampling); the SpR paper's self-score task
- ``loglik:MODEL``      mean log-prob of the response under another causal LM (a forward)
- ``rm:MODEL``          a sequence-classification reward model (Hub id or directory), with its own
                        tokenizer and chat template
- ``implicit``          sum log(qr/q0) of the emitted tokens, computed by the SSS generator (free)
- ``value:DIR``         a value-head model scoring every prefix in one forward (``value_head.py``)
- ``python:module:function``  any callable ``f(prompts, responses, finished) -> list[float]``

Every scorer checks its output: the wrong number of scores, or a NaN/inf, is an error naming the
scorer (never a silent winner). ``cost`` counts the positions it processed and its wall time.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
import math
from dataclasses import dataclass, field

import torch

from ..errors import SpecError
from .loading import clock


@dataclass
class Candidate:
    """One (partial or finished) response to score."""
    prompt: str
    response: str
    finished: bool = True
    prompt_ids: list[int] = field(default_factory=list)
    response_ids: list[int] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    reason: str | None = None  # how the response ended: eos | stop | length | pruned | None (running)


@dataclass
class ScorerCost:
    positions: int = 0
    calls: int = 0
    wall_s: float = 0.0

    def as_dict(self) -> dict:
        return {"positions": self.positions, "calls": self.calls, "wall_s": round(self.wall_s, 4)}


class Scorer(ABC):
    """Base class: subclasses implement ``_score(candidates) -> list[float]``."""

    name = "scorer"

    def __init__(self, max_batch_tokens: int = 16384):
        self.max_batch_tokens = max_batch_tokens
        self.cost = ScorerCost()

    @abstractmethod
    def _score(self, candidates: list[Candidate]) -> list[float]:
        """One float per candidate, in order."""

    def __call__(self, candidates: list[Candidate]) -> list[float]:
        if not candidates:
            return []
        start = clock()
        scores = [float(s) for s in self._score(candidates)]
        self.cost.calls += 1
        self.cost.wall_s += clock() - start
        if len(scores) != len(candidates):
            raise SpecError(f"scorer {self.name} returned {len(scores)} scores for {len(candidates)} responses: "
                            "it must return one score per response")
        bad = [s for s in scores if not math.isfinite(s)]
        if bad:
            raise SpecError(f"scorer {self.name} returned a non-finite score ({bad[0]}): fix the scorer so every "
                            "score is a finite number")
        return scores

    def batches(self, lengths: list[int]):
        """Index lists whose padded size (rows x longest) fits ``max_batch_tokens`` (at least one row each)."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        batch: list[int] = []
        for i in order:
            if batch and (len(batch) + 1) * max(lengths[j] for j in batch + [i]) > self.max_batch_tokens:
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch


class SentimentJudge(Scorer):
    name = "judge:sentiment"

    def __init__(self, **kw):
        super().__init__(**kw)
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        self.analyzer = SentimentIntensityAnalyzer()

    def _score(self, candidates):
        return [self.analyzer.polarity_scores(c.response)["compound"] for c in candidates]


class InoffensiveJudge(Scorer):
    name = "judge:inoffensive"

    def __init__(self, **kw):
        super().__init__(**kw)
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn version-mismatch warnings from the pickled model
            from profanity_check import predict_prob
        self.predict_prob = predict_prob

    def _score(self, candidates):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probs = self.predict_prob([c.response for c in candidates])
        return [1.0 - float(p) for p in probs]


class SelfLogLikelihood(Scorer):
    """Mean raw log-prob of the response tokens under the generator, recorded while sampling (free)."""
    name = "loglik:self"

    def _score(self, candidates):
        out = []
        for c in candidates:
            if "logp" not in c.stats:
                raise SpecError("loglik:self needs the generator's log-probs: use it with a specalign generator")
            out.append(c.stats["logp"] / max(1, len(c.response_ids)))
        return out


class ImplicitReward(Scorer):
    """The DPO implicit reward sum_t log(q_aligned/q_ref) of the emitted tokens, which SSS computes (free)."""
    name = "implicit"

    def _score(self, candidates):
        if any("implicit" not in c.stats for c in candidates):
            raise SpecError("scorer 'implicit' needs an SSS generator (--method sss): only it computes log(qr/q0)")
        return [c.stats["implicit"] for c in candidates]


class ModelLogLikelihood(Scorer):
    """Mean log-prob of the response under a causal LM (one forward per batch)."""

    def __init__(self, model, tokenizer, name: str, **kw):
        super().__init__(**kw)
        self.model, self.tokenizer, self.name = model, tokenizer, name

    @torch.inference_mode()
    def _score(self, candidates):
        from .loading import chat_prompt
        seqs, starts = [], []
        for c in candidates:
            p = c.prompt_ids or chat_prompt(self.tokenizer, c.prompt)
            r = c.response_ids or self.tokenizer(c.response, add_special_tokens=False)["input_ids"]
            seqs.append(list(p) + list(r))
            starts.append(len(p))
        scores = [0.0] * len(seqs)
        device = next(self.model.parameters()).device
        for batch in self.batches([len(s) for s in seqs]):
            width = max(len(seqs[i]) for i in batch)
            ids = torch.full((len(batch), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(batch):
                ids[row, width - len(seqs[i]):] = torch.tensor(seqs[i])
                mask[row, width - len(seqs[i]):] = 1
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                position_ids=positions.to(device)).logits.float()
            self.cost.positions += ids.numel()
            logp = torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None].to(device)).squeeze(2)
            for row, i in enumerate(batch):
                n_resp = len(seqs[i]) - starts[i]
                scores[i] = float(logp[row, width - 1 - n_resp:].mean()) if n_resp else 0.0
        return scores


class RewardModelScorer(Scorer):
    """A sequence-classification reward model with its own tokenizer and chat template."""

    def __init__(self, spec: str, dtype="auto", device="auto", **kw):
        super().__init__(**kw)
        from transformers import AutoModelForSequenceClassification
        from .loading import _ensure_local_copy, _from_pretrained, check_device, load_tokenizer, resolve, torch_dtype
        self.name = f"rm:{spec}"
        resolved = resolve(spec)
        self.model = _from_pretrained(AutoModelForSequenceClassification, resolved, _ensure_local_copy(resolved),
                                      dtype=torch_dtype(dtype, device))
        self.model.to(check_device(device)).eval()
        self.tokenizer = load_tokenizer(resolved)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def _text(self, c: Candidate) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": c.prompt}, {"role": "assistant", "content": c.response}], tokenize=False)
        return c.prompt + "\n" + c.response

    @torch.inference_mode()
    def _score(self, candidates):
        texts = [self._text(c) for c in candidates]
        encoded = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        scores = [0.0] * len(texts)
        for batch in self.batches([len(e) for e in encoded]):
            enc = self.tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt")
            device = next(self.model.parameters()).device
            logits = self.model(**{k: v.to(device) for k, v in enc.items()}).logits
            self.cost.positions += enc["input_ids"].numel()
            for row, i in enumerate(batch):
                scores[i] = float(logits[row, 0])
        return scores


class CallableScorer(Scorer):
    """``f(prompts, responses, finished) -> list[float]`` from ``python:module:function`` or a callable."""

    def __init__(self, fn, name: str, **kw):
        super().__init__(**kw)
        self.fn, self.name = fn, name

    def _score(self, candidates):
        out = self.fn([c.prompt for c in candidates], [c.response for c in candidates],
                      [c.finished for c in candidates])
        return list(out)


def _import_callable(spec: str):
    parts = spec.split(":")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise SpecError(f"bad scorer '{spec}': write python:module:function")
    try:
        module = importlib.import_module(parts[1])
        return getattr(module, parts[2])
    except (ImportError, AttributeError) as exc:
        raise SpecError(f"scorer '{spec}': cannot import {parts[1]}.{parts[2]} ({exc}); check the module is on "
                        "PYTHONPATH") from exc


SCORER_HELP = ("judge:sentiment, judge:inoffensive, loglik:self, loglik:MODEL, rm:MODEL, value:DIR, implicit, "
               "python:module:function")


def build_scorer(spec, *, generator_model=None, generator_tokenizer=None, dtype="auto", device="auto",
                 max_batch_tokens: int = 16384) -> Scorer:
    """Scorer from a spec string (see module doc), or wrap a Python callable / pass a Scorer through."""
    if isinstance(spec, Scorer):
        return spec
    if callable(spec):
        return CallableScorer(spec, getattr(spec, "__name__", "callable"), max_batch_tokens=max_batch_tokens)
    if not isinstance(spec, str) or ":" not in spec and spec != "implicit":
        raise SpecError(f"unknown scorer '{spec}': use one of {SCORER_HELP}")
    kind, _, arg = spec.partition(":")
    kw = {"max_batch_tokens": max_batch_tokens}
    if spec == "judge:sentiment":
        return SentimentJudge(**kw)
    if spec == "judge:inoffensive":
        return InoffensiveJudge(**kw)
    if spec == "loglik:self":
        return SelfLogLikelihood(**kw)
    if kind == "loglik" and arg:
        from .loading import load_model, load_tokenizer
        return ModelLogLikelihood(load_model(arg, dtype, device), load_tokenizer(arg), spec, **kw)
    if kind == "rm" and arg:
        return RewardModelScorer(arg, dtype=dtype, device=device, **kw)
    if kind == "python":
        return CallableScorer(_import_callable(spec), spec, **kw)
    if kind == "value" and arg:
        from .target_value import TargetValueScorer, is_target_value_dir
        if is_target_value_dir(arg):
            return TargetValueScorer(arg, generator_model, **kw)
        from .value_head import ValueScorer
        return ValueScorer(arg, dtype=dtype, device=device, **kw)
    if spec == "implicit":
        return ImplicitReward(**kw)
    raise SpecError(f"unknown scorer '{spec}': use one of {SCORER_HELP}")
