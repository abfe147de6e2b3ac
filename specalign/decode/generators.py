"""Generators: advance a batch of rows of one prompt by some tokens.

Every generator has the same surface, which selectors (Best-of-N, Speculative Rejection) use:

- ``start(prompt_ids, n, rng)``: prefill the prompt once and fan it out to n rows;
- ``advance(tokens=None)``: generate until every active row has ``tokens`` more (or is finished);
- ``drop(rows)``: remove rows from the batch in place, KV caches included;
- ``rows``: every row started (tokens, done, reason, stats); ``active``: rows still generating;
- ``cost``: a ``ModelCost`` per model.

A row finishes on EOS, on a stop string, or at ``max_new_tokens``; a finished row leaves the
batch at once, so it stops costing compute. ``SamplingGenerator`` is plain target sampling; the
speculative generators live in ``speculative.py`` and ``sss.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from .cost import ModelCost
from .engine import LMState
from .sampling import SamplingParams, processed_logprobs, sample


@dataclass
class Row:
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    reason: str | None = None  # "eos" | "stop" | "length" | "pruned"
    # logp: sum of the target's raw (temperature-1) log-probs of the emitted tokens, for loglik:self.
    stats: dict = field(default_factory=lambda: {"logp": 0.0})

    @property
    def finished(self) -> bool:
        """Ended by itself (EOS, stop string or length cap), as opposed to pruned or still running."""
        return self.done and self.reason != "pruned"


def eos_ids_of(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                   getattr(model.config, "eos_token_id", None), tokenizer.eos_token_id):
        if source is None:
            continue
        ids.update([source] if isinstance(source, int) else list(source))
    return ids


class Generator(ABC):
    """Shared bookkeeping: rows, the active set (in cache order), finishing rules, compaction."""

    name = "base"
    # Called as on_step(generator) after every step of ``advance``: a server streams the new tokens from it,
    # or raises to stop the work of a client that went away.
    on_step = None

    def __init__(self, tokenizer, params: SamplingParams | None = None, max_new_tokens: int = 128,
                 stop: tuple[str, ...] | list[str] = (), eos_ids: set[int] | None = None):
        if max_new_tokens < 1:
            from ..errors import SpecError
            raise SpecError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
        self.tokenizer = tokenizer
        self.params = params or SamplingParams()
        self.max_new_tokens = max_new_tokens
        self.stop = tuple(s for s in stop if s)
        self.eos_ids = set(eos_ids or ())
        self.rows: list[Row] = []
        self.active: list[int] = []
        self.rng: torch.Generator | None = None

    # -- what subclasses provide -------------------------------------------------------------
    @property
    @abstractmethod
    def states(self) -> list[LMState]:
        """Every model state whose rows follow ``active`` (compacted together)."""

    @abstractmethod
    def _prefill(self, prompt_ids: list[int], n: int) -> None:
        """Prefill the prompt once and fan it out to n rows."""

    @abstractmethod
    def _step(self) -> None:
        """Emit at least one token for every active row (via ``_emit``)."""

    def _select_pending(self, keep: torch.Tensor) -> None:
        """Keep rows ``keep`` of any per-row tensors a subclass holds beside its caches."""

    # -- shared surface ----------------------------------------------------------------------
    @property
    @abstractmethod
    def cost(self) -> dict[str, ModelCost]:
        """A ``ModelCost`` per model, by role (target, draft, ...)."""

    def start(self, prompt_ids: list[int], n: int, rng: torch.Generator | None = None) -> None:
        if n < 1:
            from ..errors import SpecError
            raise SpecError(f"n must be >= 1, got {n}")
        self._begin([list(prompt_ids)] * n, rng)
        self._prefill(self.prompt_ids, n)

    def _begin(self, row_prompts: list[list[int]], rng: torch.Generator | None) -> None:
        """Fresh rows, one per entry of ``row_prompts`` (the prompt ids each row continues)."""
        if not row_prompts:
            from ..errors import SpecError
            raise SpecError("start needs at least one prompt")
        self.rng = rng
        self.prompt_ids = list(row_prompts[0])
        self.row_prompts = [list(p) for p in row_prompts]
        self.rows = [Row() for _ in row_prompts]
        self.active = list(range(len(row_prompts)))

    def advance(self, tokens: int | None = None) -> None:
        """Generate until every active row has ``tokens`` more tokens (None: until all finish)."""
        targets = {i: len(self.rows[i].tokens) + (tokens if tokens is not None else self.max_new_tokens)
                   for i in self.active}
        while self.active and any(len(self.rows[i].tokens) < targets[i] for i in self.active):
            self._step()
            if self.on_step is not None:
                self.on_step(self)

    def drop(self, row_ids) -> None:
        """Prune rows: they leave the batch and every cache, in place."""
        gone = set(row_ids)
        for i in gone:
            if not self.rows[i].done:
                self.rows[i].done, self.rows[i].reason = True, "pruned"
        self._compact()

    def reset_cost(self) -> None:
        for state in self.states:
            state.cost = ModelCost(params=state.cost.params)

    def candidate(self, i: int, prompt: str):
        from ..models.scorers import Candidate
        row = self.rows[i]
        return Candidate(prompt, self.response_text(i), row.finished, self.row_prompts[i], self.response_ids(i),
                         {**row.stats, **self.hidden_of(i)}, row.reason)

    def hidden_of(self, i: int) -> dict:
        """Row i's target features, when a scorer asked for them (``track_hidden``); else nothing."""
        return {}

    def response_ids(self, i: int) -> list[int]:
        """A copy of row i's tokens (without its EOS): a scored partial candidate must not grow later."""
        toks = self.rows[i].tokens
        if toks and toks[-1] in self.eos_ids and self.rows[i].reason == "eos":
            return toks[:-1]
        return list(toks)

    def response_text(self, i: int) -> str:
        text = self.tokenizer.decode(self.response_ids(i), skip_special_tokens=True)
        if self.rows[i].reason == "stop":
            cut = min((text.find(s) for s in self.stop if s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
        return text

    def _emit(self, new_tokens: list[list[int]], logps: list[list[float]] | None = None) -> None:
        """Append each active row's new tokens (in active order), apply EOS/stop/length, compact."""
        for pos, i in enumerate(list(self.active)):
            row = self.rows[i]
            for j, tok in enumerate(new_tokens[pos]):
                row.tokens.append(int(tok))
                if logps is not None:
                    row.stats["logp"] += float(logps[pos][j])
                if tok in self.eos_ids:
                    row.done, row.reason = True, "eos"
                elif len(row.tokens) >= self.max_new_tokens:
                    row.done, row.reason = True, "length"
                elif self.stop and self._hit_stop(row):
                    row.done, row.reason = True, "stop"
                if row.done:
                    break
        self._compact()

    def _hit_stop(self, row: Row) -> bool:
        tail = self.tokenizer.decode(row.tokens[-(max(len(s) for s in self.stop) + 8):], skip_special_tokens=True)
        return any(s in tail for s in self.stop)

    def _compact(self) -> None:
        keep = [pos for pos, i in enumerate(self.active) if not self.rows[i].done]
        if len(keep) == len(self.active):
            return
        self.active = [self.active[pos] for pos in keep]
        keep_t = torch.tensor(keep, dtype=torch.long)
        for state in self.states:
            state.select(keep_t)
        self._select_pending(keep_t)


class SamplingGenerator(Generator):
    """Plain sampling from the target (temperature / top-k / top-p / greedy), one token per step."""

    name = "sample"

    def __init__(self, model, tokenizer, params: SamplingParams | None = None, max_new_tokens: int = 128,
                 stop=(), eos_ids=None):
        super().__init__(tokenizer, params, max_new_tokens, stop,
                         eos_ids if eos_ids is not None else eos_ids_of(model, tokenizer))
        self.model = model
        self.target = LMState(model, pad_id=tokenizer.pad_token_id or 0)
        self.next_logits: torch.Tensor | None = None
        self._hook = None  # track_hidden: the target's final-norm output of the latest forward, kept below
        self.last_hidden: torch.Tensor | None = None   # (active rows, H): the state behind next_logits
        self.prompt_hidden: torch.Tensor | None = None  # (rows, H): the state after each row's prompt

    def track_hidden(self) -> None:
        """Keep every active row's final hidden state -- the input of the LM head behind ``next_logits``, the
        state after the row's tokens so far -- and the prompt's, so a value head on the target's own features
        scores running rows with no extra forward (candidates carry them as ``stats["hidden"]`` and
        ``stats["prompt_hidden"]``)."""
        if self._hook is None:
            from ..models.loading import final_norm
            self._hook = final_norm(self.model).register_forward_hook(
                lambda module, args, out: setattr(self, "_latest", out[:, -1, :].detach().float()))

    def hidden_of(self, i: int) -> dict:
        if self._hook is None:
            return {}
        out = {"prompt_hidden": self.prompt_hidden[i]}
        if not self.rows[i].done:
            out["hidden"] = self.last_hidden[self.active.index(i)]
        return out

    @property
    def states(self):
        return [self.target]

    @property
    def cost(self):
        return {"target": self.target.cost}

    def _prefill(self, prompt_ids, n):
        logits = self.target.prefill([prompt_ids])
        self.target.repeat(n)
        self.next_logits = logits.repeat(n, 1)
        if self._hook is not None:
            self.last_hidden = self.prompt_hidden = self._latest.repeat(n, 1)

    def start_batch(self, prompts: list[list[int]], rng: torch.Generator | None = None) -> None:
        """Start one row per prompt: a ragged, left-padded batch of different prompts (one prefill)."""
        self._begin(prompts, rng)
        self.next_logits = self.target.prefill(self.row_prompts)
        if self._hook is not None:
            self.last_hidden = self.prompt_hidden = self._latest

    def _select_pending(self, keep):
        self.next_logits = self.next_logits[keep.to(self.next_logits.device)]
        if self._hook is not None:
            self.last_hidden = self.last_hidden[keep.to(self.last_hidden.device)]

    def _step(self):
        raw = torch.log_softmax(self.next_logits.float(), dim=-1)
        tokens = sample(processed_logprobs(self.next_logits, self.params), self.rng)
        logp = raw.gather(1, tokens[:, None]).squeeze(1)
        self._emit([[t] for t in tokens.tolist()], [[x] for x in logp.tolist()])
        if self.active:  # rows still active are those this step did not finish, in cache order
            self.next_logits = self.target.extend(self._last_tokens()[:, None], keep_logits=1)[:, -1, :]
            if self._hook is not None:
                self.last_hidden = self._latest

    def _last_tokens(self) -> torch.Tensor:
        return torch.tensor([self.rows[i].tokens[-1] for i in self.active], dtype=torch.long)
