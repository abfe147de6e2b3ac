"""The model side: ``Worker`` owns the models and runs every job in one thread; ``Progress`` is the
generators' ``on_step`` hook (token streaming, cancellation)."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import secrets
import threading
import time
from collections import OrderedDict

import torch

from ..decode.api import DecodeConfig, Decoder, build_generator, build_selector
from ..decode.best_of_n import BestOfN
from ..errors import SpecError
from ..models.scorers import build_scorer
from .protocol import SELECTORS, RequestError, ServeConfig, as_param

log = logging.getLogger("specalign.serve")

STREAM_CHUNK = 16  # characters per server-sent event when a ranked answer is streamed at the end


class Cancelled(Exception):
    """The client went away: its work stops at the next generation step."""


class Job:
    """One request on its way through the queue and the worker."""

    def __init__(self, kind: str, config: DecodeConfig, n: int, seeded: bool, stream: bool, payload,
                 loop: asyncio.AbstractEventLoop):
        self.kind = kind  # "chat" (payload: messages) or "completion" (payload: text or token ids)
        self.config, self.n, self.seeded, self.stream, self.payload = config, n, seeded, stream, payload
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def push(self, *event) -> None:
        """From the worker thread: ("started",), ("delta", choice, text), ("result", dict), ("error", exc)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def batch_key(self):
        """Jobs with the same key decode together. None (run alone): a ranked method, several choices, or a
        fixed seed (a seeded answer must not depend on which other requests share its batch)."""
        c = self.config
        if c.method != "sample" or c.generator_kind != "sample" or self.n != 1 or self.seeded:
            return None
        return (c.sampling, c.max_new_tokens, tuple(c.stop), c.scorer, c.chat, c.truncate)


def visible(text: str, stops: tuple[str, ...]) -> str:
    """The part of a running row's text that can be streamed: not a possible start of a stop string, nor an
    incomplete character."""
    keep = len(text)
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = min(keep, len(text) - k)
                break
    return text[:keep].rstrip("\ufffd")


class Progress:
    """A generator's ``on_step`` for one run: stop cancelled work, stream new text of running rows.

    ``batch``: row i belongs to jobs[i] (choice 0) and a cancelled job's row is dropped; otherwise every row
    is a choice of jobs[0] (Best-of-N style chunks follow one another: rows are numbered across them)."""

    def __init__(self, jobs: list[Job], batch: bool, stream: bool):
        self.jobs, self.batch, self.stream = jobs, batch, stream
        self.rows, self.offset = None, 0
        self.sent: dict[tuple[int, int], str] = {}
        self.closed: set[tuple[int, int]] = set()

    def owner(self, i: int) -> tuple[int, int]:
        return (i, 0) if self.batch else (0, self.offset + i)

    def __call__(self, gen) -> None:
        if gen.rows is not self.rows:
            self.offset += len(self.rows or [])
            self.rows = gen.rows
        if self.batch:
            gone = [i for i in gen.active if self.jobs[i].cancelled.is_set()]
            if gone:
                gen.drop(gone)
            if all(job.cancelled.is_set() for job in self.jobs):
                raise Cancelled()
        elif self.jobs[0].cancelled.is_set():
            raise Cancelled()
        if not self.stream:
            return
        for i, row in enumerate(gen.rows):
            key = self.owner(i)
            if key in self.closed or not self.jobs[key[0]].stream or self.jobs[key[0]].cancelled.is_set():
                continue
            text = gen.response_text(i)
            self.send(key, text if row.done else visible(text, gen.stop))
            if row.done:
                self.closed.add(key)

    def send(self, key: tuple[int, int], text: str) -> None:
        old = self.sent.get(key, "")
        if len(text) > len(old):
            self.jobs[key[0]].push("delta", key[1], text[len(old):])
            self.sent[key] = text


class KeepResult:
    """A selector that remembers its last result (every candidate with its finish reason and score)."""

    def __init__(self, selector):
        self.selector, self.name, self.result = selector, selector.name, None

    def run(self, *args) -> dict:
        self.result = self.selector.run(*args)
        return self.result


def _finish_reason(candidate) -> str:
    return "length" if candidate.reason == "length" else "stop"


class Worker:
    """Owns the models; every method runs in the one worker thread."""

    def __init__(self, config: DecodeConfig, serve: ServeConfig):
        base = Decoder(config)  # the target, its tokenizer, the default method's generator (drafts) and scorer
        self.config, self.serve = config, serve
        self.tokenizer = base.tokenizer
        self.model = base.generator.model
        self.generators = {config.generator_kind: base.generator}
        self.scorers: OrderedDict = OrderedDict()
        if base.scorer is not None:
            self.scorers[config.scorer] = base.scorer
        try:
            self._malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            self._malloc_trim = None

    # -- shared pieces, cached ----------------------------------------------------------------
    def generator(self, cfg: DecodeConfig):
        """The generator of this kind (built once: drafts load once), set to the request's settings."""
        kind = cfg.generator_kind
        with as_param("method"):
            if kind not in self.generators:
                self.generators[kind] = build_generator(cfg, self.model, self.tokenizer)
        gen = self.generators[kind]
        gen.params, gen.max_new_tokens, gen.stop = cfg.sampling, cfg.max_new_tokens, tuple(s for s in cfg.stop if s)
        if hasattr(gen, "gamma"):
            gen.gamma = cfg.gamma
        if hasattr(gen, "shift_lambda"):
            gen.shift_lambda = float(cfg.shift_lambda)
        return gen

    def scorer(self, spec: str):
        """The scorer of this spec, from a small cache (the server's own scorer is never evicted)."""
        if not spec:
            return None
        if spec not in self.scorers:
            with as_param("scorer"):
                self.scorers[spec] = build_scorer(spec, generator_model=self.model, generator_tokenizer=self.tokenizer,
                                                  dtype=self.config.dtype, device=self.config.device,
                                                  max_batch_tokens=self.config.max_batch_tokens)
            evictable = [s for s in self.scorers if s != self.config.scorer and s != spec]
            while len(self.scorers) > self.serve.scorer_cache and evictable:
                del self.scorers[evictable.pop(0)]
        self.scorers.move_to_end(spec)
        return self.scorers[spec]

    def encode(self, job: Job) -> tuple[list[int], str]:
        """(prompt ids, prompt text the scorers see), checked against the model's context."""
        cfg, tok = job.config, self.tokenizer
        if job.kind == "chat":
            messages, param = job.payload, "messages"
            text = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
            if cfg.chat and getattr(tok, "chat_template", None):
                ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            else:
                ids = tok("\n\n".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"]
        else:
            param = "prompt"
            if isinstance(job.payload, list):
                ids = list(job.payload)
                if any(not 0 <= t < len(tok) for t in ids):
                    raise RequestError(f"prompt token ids must be in [0, {len(tok)})", "prompt")
                text = tok.decode(ids, skip_special_tokens=True)
            else:
                text, ids = job.payload, tok(job.payload, add_special_tokens=True)["input_ids"]
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and len(ids) > limit - cfg.max_new_tokens:
            room = limit - cfg.max_new_tokens
            if room < 1:
                raise RequestError(f"max_tokens {cfg.max_new_tokens} leaves no room for a prompt in the model's "
                                   f"context of {limit}: lower max_tokens", "max_tokens")
            if not cfg.truncate:
                raise RequestError(f"prompt of {len(ids)} tokens + max_tokens {cfg.max_new_tokens} exceeds the "
                                   f"model's context of {limit}: shorten the prompt or lower max_tokens", param)
            ids = ids[-room:]
        return ids, text

    # -- running jobs ----------------------------------------------------------------------------
    def run(self, jobs: list[Job]) -> list[str]:
        """Run one job or one batch; every job gets a result or an error event. Returns each job's outcome:
        completed | cancelled | invalid | failed."""
        outcomes = {}
        try:
            if len(jobs) == 1:
                outcomes.update(self._run_one(jobs[0]))
            else:
                outcomes.update(self._run_batch(jobs))
        except Cancelled:
            outcomes.update({id(j): "cancelled" for j in jobs if id(j) not in outcomes})
        except SpecError as exc:  # bad input found while running (a RequestError names its field)
            error = exc if isinstance(exc, RequestError) else RequestError(str(exc))
            for job in jobs:
                if id(job) not in outcomes:
                    job.push("error", error)
                    outcomes[id(job)] = "invalid"
        except Exception as exc:  # a bug or an out-of-memory: this request fails, the server goes on
            log.exception("decode failed")
            for job in jobs:
                if id(job) not in outcomes:
                    job.push("error", RequestError(f"{type(exc).__name__}: {exc}", status=500))
                    outcomes[id(job)] = "failed"
        finally:
            self.release()
        return [outcomes.get(id(j), "cancelled" if j.cancelled.is_set() else "completed") for j in jobs]

    def _run_one(self, job: Job) -> dict:
        if job.cancelled.is_set():
            return {id(job): "cancelled"}
        cfg = job.config
        ids, prompt = self.encode(job)
        gen, scorer = self.generator(cfg), self.scorer(cfg.scorer)
        ranked = cfg.method in SELECTORS
        selector = KeepResult(build_selector(cfg) if ranked else
                              BestOfN(n=job.n, max_batch_tokens=cfg.max_batch_tokens, name=cfg.method))
        with as_param("scorer"):  # a scorer that needs what this generator cannot give
            decoder = Decoder(cfg, generator=gen, selector=selector, scorer=scorer)
        check = getattr(selector.selector, "check", None)  # a prompt too large for max-batch-tokens: 400 now
        if check is not None:
            check(len(ids), cfg.max_new_tokens)
        job.push("started")
        progress = Progress([job], batch=False, stream=job.stream and not ranked)
        gen.on_step = progress
        try:
            record = decoder.decode_one(prompt, 0, ids)
        finally:
            gen.on_step = None
        result = selector.result
        cands, scores = result["candidates"], result["scores"]
        if ranked:  # the top-scored finished candidates, best first (ties: lower row, as the selectors)
            order = sorted((i for i, c in enumerate(cands) if c.finished), key=lambda i: (-scores[i], i))[:job.n]
        else:
            order = list(range(len(cands)))[:job.n]
        choices = [{"text": cands[i].response, "finish_reason": _finish_reason(cands[i]),
                    "tokens": len(cands[i].response_ids), "score": scores[i]} for i in order]
        if job.stream:
            for k, choice in enumerate(choices):
                text = choice["text"]
                if ranked:  # known only now: stream it in chunks
                    for start in range(0, len(text), STREAM_CHUNK):
                        job.push("delta", k, text[start:start + STREAM_CHUNK])
                else:
                    progress.send((0, k), text)
        info = {"method": record["method"], "score": record["score"], "scores": [c["score"] for c in choices],
                "num_candidates": len(cands), "finished_candidates": sum(c.finished for c in cands),
                "generated_tokens": sum(len(c.response_ids) for c in cands), "seed": cfg.seed, "batch_size": 1,
                "params": record["params"], "cost": record["cost"]}
        if "rounds" in record:
            info["rounds"] = record["rounds"]
        job.push("result", {"choices": choices, "prompt_tokens": len(ids), "specalign": info})
        return {id(job): "completed"}

    def _run_batch(self, jobs: list[Job]) -> dict:
        """Plain sampling of several requests with the same settings: one ragged batch, one row each."""
        outcomes, live, prompts = {}, [], []
        cfg = jobs[0].config
        gen, scorer = self.generator(cfg), self.scorer(cfg.scorer)
        for job in jobs:
            if job.cancelled.is_set():
                outcomes[id(job)] = "cancelled"
                continue
            try:
                prompts.append(self.encode(job))
                live.append(job)
            except RequestError as exc:
                job.push("error", exc)
                outcomes[id(job)] = "invalid"
        if not live:
            return outcomes
        with as_param("scorer"):
            decoder = Decoder(cfg, generator=gen, selector=BestOfN(n=1, name="sample"), scorer=scorer)
        for job in live:
            job.push("started")
        gen.reset_cost()
        if scorer is not None:
            scorer.cost = type(scorer.cost)()
        start = time.perf_counter()
        progress = Progress(live, batch=True, stream=True)
        gen.on_step = progress
        try:
            gen.start_batch([ids for ids, _ in prompts], torch.Generator().manual_seed(secrets.randbits(62)))
            gen.advance()
        finally:
            gen.on_step = None
        rows = [i for i, job in enumerate(live) if not job.cancelled.is_set()]
        cands = [gen.candidate(i, prompts[i][1]) for i in rows]
        scores = scorer(cands) if scorer is not None else [0.0] * len(cands)
        cost = decoder.cost_record(time.perf_counter() - start)
        for i, cand, score in zip(rows, cands, scores):
            job = live[i]
            if job.stream:
                progress.send((i, 0), cand.response)
            choice = {"text": cand.response, "finish_reason": _finish_reason(cand), "tokens": len(cand.response_ids),
                      "score": score}
            info = {"method": "sample", "score": score, "scores": [score], "num_candidates": 1,
                    "finished_candidates": int(cand.finished), "generated_tokens": len(cand.response_ids),
                    "seed": None, "batch_size": len(live), "params": cfg.method_params(), "cost": cost}
            job.push("result", {"choices": [choice], "prompt_tokens": len(prompts[i][0]), "specalign": info})
            outcomes[id(job)] = "completed"
        for job in live:
            outcomes.setdefault(id(job), "cancelled")
        return outcomes

    def release(self, idle: bool = False) -> None:
        """Drop the KV caches of the last run; when idle, also give freed memory back to the system."""
        for gen in self.generators.values():
            for state in gen.states:
                state.reset()
            gen.rows, gen.active = [], []
            if hasattr(gen, "next_logits"):
                gen.next_logits = None
        if idle:
            gc.collect()
            if self._malloc_trim is not None:
                self._malloc_trim(0)
