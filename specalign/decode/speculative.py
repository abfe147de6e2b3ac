"""Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): exact, batched, per-row acceptance.

One block, for every active row (x = the row's last emitted token):

    y_1 .. y_gamma ~ q_1 .. q_gamma              draft, one token per forward
    p_1 .. p_{gamma+1} = target([x, y_1..y_gamma])   one target forward verifies the whole block
    accept y_i while u_i < p_i(y_i) / q_i(y_i)      (u_i ~ U[0, 1))
    first rejection at i:  z ~ normalize(max(0, p_i - q_i))
    all gamma accepted:    z ~ p_{gamma+1}           (the bonus token)
    emit y_1 .. y_n, z;  roll every cache back to the tokens it keeps (n differs per row)

p and q are the *processed* distributions (same temperature / top-k / top-p, ``processed_logprobs``),
so every emitted token follows the processed target exactly; at temperature 0 both are one-hot and
the output is greedy target decoding token for token.

Cache invariants between blocks (no re-prefill ever):
- the target holds every token of a row except the last emitted one, ``last``: the next block's
  verification input is [last, y_1..y_gamma], so p_1 needs no extra forward;
- the draft holds every token except ``draft_pending`` ((B, 2): [y_n, z], with y_0 = last): the
  draft has not read y_n when all gamma were accepted, so every row re-reads one token to keep one
  width for the batch. (``draft_runs_last``, used by SSS, also feeds y_gamma to the draft, which
  then only lacks [z].)

``speculative_verify`` is the accept/residual step as a pure function of the distributions; SSS
(``sss.py``) reuses it with the tilted target. ``check_compatible`` is the draft/target check.
"""

from __future__ import annotations

import torch

from ..errors import SpecError
from .engine import LMState
from .generators import Generator, eos_ids_of
from .sampling import SamplingParams, processed_logprobs, sample, sample_from, uniform


# -- compatibility ---------------------------------------------------------------------------
def output_vocab(model) -> int:
    """Rows of the model's output head (may exceed the tokenizer: padded embeddings)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def check_compatible(tokenizer, models: dict, tokenizers: dict | None = None) -> int:
    """Check that drafts can stand in for the target; return the shared vocabulary size V.

    ``models`` maps role -> model, the target first. Every model must cover the tokens the target
    can emit that the tokenizer knows (min(target head, len(tokenizer))); a head padded beyond the
    tokenizer is fine. ``tokenizers`` (role -> tokenizer) must give every token id below the shorter
    length the same string as the target's tokenizer. Logits are compared on the first V ids.
    """
    roles = list(models)
    target_role = roles[0]
    sizes = {role: output_vocab(m) for role, m in models.items()}
    needed = min(sizes[target_role], len(tokenizer))
    for role in roles[1:]:
        if sizes[role] < needed:
            raise SpecError(f"the {role} model has {sizes[role]} output tokens but the {target_role} emits {needed}: "
                            f"the {role} must use the {target_role}'s vocabulary (build it from the target, e.g. "
                            "`specalign train draft`)")
    reference = {i: t for t, i in tokenizer.get_vocab().items()}
    for role, other in (tokenizers or {}).items():
        if other is tokenizer:
            continue
        mine = {i: t for t, i in other.get_vocab().items()}
        shared = min(len(tokenizer), len(other))
        for i in range(shared):
            if reference.get(i) != mine.get(i):
                raise SpecError(f"the {role} tokenizer differs from the {target_role}'s at token id {i} "
                                f"({mine.get(i)!r} vs {reference.get(i)!r}): speculative decoding needs one "
                                "vocabulary; use a draft built from the target's tokenizer")
    return min(sizes.values())


def load_draft_tokenizer(spec: str):
    """The draft's own tokenizer for ``check_compatible``; None for a model directory saved without one
    (a training checkpoint): then only the head sizes can be checked."""
    from pathlib import Path
    from ..models.loading import load_tokenizer, resolve
    resolved = resolve(spec)
    folder = Path(resolved.path)
    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not resolved.adapter and resolved.gguf_file is None and folder.is_dir() \
            and not any((folder / f).is_file() for f in files):
        return None
    return load_tokenizer(resolved)


def same_spec(a: str | None, b: str | None) -> bool:
    """Two model specs naming the same weights (after resolving paths / bundled names)."""
    if not a or not b:
        return False
    if a == b:
        return True
    from ..models.loading import resolve
    ra, rb = resolve(a), resolve(b)
    return (ra.path, ra.gguf_file, ra.adapter) == (rb.path, rb.gguf_file, rb.adapter)


# -- the block rule ------------------------------------------------------------------------
def speculative_verify(target_probs: torch.Tensor, draft_probs: torch.Tensor, drafts: torch.Tensor,
                       rng: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept/reject one block for B rows; returns (n accepted (B,), the block's last token z (B,)).

    target_probs (B, gamma+1, V): the distribution to follow at each drafted position and after
    the last (weights need not be normalised; the residual is normalised when sampled).
    draft_probs (B, gamma, V): the proposals, ``drafts`` (B, gamma) drawn from them.
    """
    batch, gamma = drafts.shape
    p_y = target_probs[:, :gamma].gather(2, drafts[..., None]).squeeze(2)
    q_y = draft_probs.gather(2, drafts[..., None]).squeeze(2)
    u = uniform((batch, gamma), rng, drafts.device)
    accepted = u * q_y < p_y                                   # u < p/q, without dividing
    n = accepted.long().cumprod(1).sum(1)
    # residual at the first rejection; after gamma acceptances q is 0, so max(0, p - 0) = p_{gamma+1}
    q_ext = torch.cat([draft_probs, draft_probs.new_zeros(batch, 1, draft_probs.shape[-1])], 1)
    at = n[:, None, None].expand(batch, 1, target_probs.shape[-1])
    p_n, q_n = target_probs.gather(1, at).squeeze(1), q_ext.gather(1, at).squeeze(1)
    residual = (p_n - q_n).clamp(min=0)
    # rounding can leave a rejection with an empty residual (p == q up to float error): use p
    residual = torch.where((residual.sum(-1) > 0)[:, None], residual, p_n)
    return n, sample_from(residual, rng)


# -- the generator -------------------------------------------------------------------------
class SpeculativeGenerator(Generator):
    """Draft proposes gamma tokens per active row, the target verifies them in one forward."""

    name = "speculative"
    draft_runs_last = False  # SSS sets True: the draft also reads y_gamma (it needs q_{gamma+1})

    def __init__(self, target, draft, tokenizer, params: SamplingParams | None = None, max_new_tokens: int = 128,
                 stop=(), gamma: int = 4, eos_ids=None, draft_tokenizer=None, draft_adapter_enabled=None):
        super().__init__(tokenizer, params, max_new_tokens, stop,
                         eos_ids if eos_ids is not None else eos_ids_of(target, tokenizer))
        if not isinstance(gamma, int) or gamma < 1:
            raise SpecError(f"gamma must be an integer >= 1 (draft tokens per block), got {gamma!r}")
        self.gamma = gamma
        self.model = target
        self.vocab = check_compatible(tokenizer, self._models(target, draft),
                                      {"draft": draft_tokenizer} if draft_tokenizer is not None else None)
        pad = tokenizer.pad_token_id or 0
        self.target = LMState(target, pad_id=pad)
        self.draft = LMState(draft, pad_id=pad, adapter_enabled=draft_adapter_enabled)
        self.last = torch.zeros(0, dtype=torch.long)
        self.draft_pending = torch.zeros(0, 1, dtype=torch.long)
        self._reset_counters()

    def _models(self, target, draft) -> dict:
        return {"target": target, "draft": draft}

    @classmethod
    def from_specs(cls, model, tokenizer, config) -> "SpeculativeGenerator":
        """From a ``DecodeConfig``: load ``config.draft`` (reusing the target when it is the same spec)."""
        from ..models.loading import load_model
        if same_spec(config.draft, config.model):
            draft, draft_tok = model, tokenizer
        else:
            draft = load_model(config.draft, config.dtype, config.device)
            draft_tok = load_draft_tokenizer(config.draft)
        return cls(model, draft, tokenizer, config.sampling, config.max_new_tokens, config.stop, gamma=config.gamma,
                   draft_tokenizer=draft_tok)

    # -- states, cost, statistics ------------------------------------------------------------
    @property
    def states(self):
        return [self.target, self.draft]

    @property
    def verifiers(self) -> list[LMState]:
        """States that read [last, y_1..y_gamma] in one forward per block (the target; SSS adds Q0)."""
        return [self.target]

    @property
    def cost(self):
        return {"target": self.target.cost, "draft": self.draft.cost}

    def _reset_counters(self) -> None:
        self.counters = {"rows": 0, "blocks": 0, "proposed": 0, "evaluated": 0, "accepted": 0, "tokens": 0}

    def reset_cost(self) -> None:
        super().reset_cost()
        self._reset_counters()

    def stats(self) -> dict:
        """Per-prompt statistics since ``reset_cost``, counted per row: a block of one row proposes gamma
        tokens and costs that row one target forward (batched rows share the forward).

        ``acceptance_rate`` = accepted / proposed; ``position_acceptance`` = accepted / evaluated, where a
        block evaluates its drafts up to the first rejection: the per-position acceptance probability
        (the alpha of speculative decoding's theory, sum_v min(p, q) averaged over the positions reached)."""
        c = self.counters
        return {"acceptance_rate": round(c["accepted"] / max(1, c["proposed"]), 6),
                "position_acceptance": round(c["accepted"] / max(1, c["evaluated"]), 6),
                "mean_accepted_per_block": round(c["accepted"] / max(1, c["blocks"]), 6),
                "target_calls_per_token": round(c["blocks"] / max(1, c["tokens"]), 6),
                "gamma": self.gamma, "blocks": c["blocks"], "proposed": c["proposed"], "evaluated": c["evaluated"],
                "accepted": c["accepted"], "tokens": c["tokens"]}

    # -- start -------------------------------------------------------------------------------
    def _prefill(self, prompt_ids, n):
        self._prefill_rows([list(prompt_ids)], n)

    def start_batch(self, prompts: list[list[int]], rng: torch.Generator | None = None) -> None:
        """One row per prompt: a ragged, left-padded batch of different prompts (one prefill per model)."""
        self._begin(prompts, rng)
        self._prefill_rows(self.row_prompts, 1)

    def _prefill_rows(self, rows: list[list[int]], n: int) -> None:
        """Prefill every model, fan out, then un-read each row's last prompt token: it is the first
        input of the first block (target and draft invariants above)."""
        if any(len(r) == 0 for r in rows):
            raise SpecError("empty prompt: every prompt must contain at least one token")
        for state in self.states:
            state.prefill(rows)
            state.repeat(n)
            state.rollback(torch.zeros(len(rows) * n, dtype=torch.long), 1)
        self.last = torch.tensor([r[-1] for r in rows], dtype=torch.long).repeat_interleave(n)
        self.draft_pending = self.last[:, None].clone()
        self.counters["rows"] += len(rows) * n
        self._start_rows()

    def _start_rows(self) -> None:
        """Per-row statistics a subclass adds to ``Row.stats``."""

    def _select_pending(self, keep):
        self.last = self.last[keep]
        self.draft_pending = self.draft_pending[keep]

    # -- one block -----------------------------------------------------------------------------
    def _propose(self, gamma: int):
        """Draft y_1..y_gamma; returns drafts (B, gamma), processed q (B, gamma, V), raw draft logits
        (B, gamma (+1 with ``draft_runs_last``), V)."""
        logits = self.draft.extend(self.draft_pending, keep_logits=1)[:, -1, : self.vocab]
        drafts, probs, raw = [], [], []
        for i in range(gamma):
            raw.append(logits)
            logq = processed_logprobs(logits, self.params)
            y = sample(logq, self.rng)
            drafts.append(y)
            probs.append(logq.exp())
            if i < gamma - 1 or self.draft_runs_last:
                logits = self.draft.extend(y[:, None], keep_logits=1)[:, -1, : self.vocab]
        if self.draft_runs_last:
            raw.append(logits)
        return torch.stack(drafts, 1), torch.stack(probs, 1), torch.stack(raw, 1)

    def _target_side(self, verified: list[torch.Tensor], draft_raw: torch.Tensor):
        """The distributions to follow at the gamma+1 positions, and per-token statistics to record."""
        return processed_logprobs(verified[0][..., : self.vocab], self.params).exp(), {}

    def _step(self):
        gamma = self.gamma
        drafts, q, draft_raw = self._propose(gamma)
        block = torch.cat([self.last[:, None], drafts], 1)
        verified = [state.extend(block) for state in self.verifiers]
        follow, extras = self._target_side(verified, draft_raw)
        n, z = speculative_verify(follow, q, drafts, self.rng)

        emitted = torch.cat([drafts, z[:, None]], 1)
        emitted.scatter_(1, n[:, None], z[:, None])           # y_1..y_n, z, (unused)
        logp = torch.log_softmax(verified[0].float(), -1).gather(2, emitted[..., None]).squeeze(2)
        per_token = {name: values.gather(2, emitted[..., None]).squeeze(2) for name, values in extras.items()}
        self._roll_back(n, z, drafts)

        self.counters["blocks"] += len(n)
        self.counters["proposed"] += len(n) * gamma
        self.counters["evaluated"] += int((n + 1).clamp(max=gamma).sum())
        self.counters["accepted"] += int(n.sum())
        lengths = (n + 1).tolist()
        self._emit_block([row[:k] for row, k in zip(emitted.tolist(), lengths)],
                         [row[:k] for row, k in zip(logp.tolist(), lengths)],
                         {name: [row[:k] for row, k in zip(v.tolist(), lengths)] for name, v in per_token.items()})

    def _roll_back(self, n: torch.Tensor, z: torch.Tensor, drafts: torch.Tensor) -> None:
        """Every cache keeps exactly the accepted tokens of its row; set the next block's inputs."""
        gamma = drafts.shape[1]
        for state in self.verifiers:                           # read [last, y_1..y_gamma], keep [last, y_1..y_n]
            state.rollback(n + 1, gamma + 1)
        width = self.draft_pending.shape[1]
        if self.draft_runs_last:                               # read pending, y_1..y_gamma; keep pending, y_1..y_n
            self.draft.rollback(width + n, width + gamma)
            self.draft_pending = z[:, None]
        else:                                                  # read pending, y_1..y_{gamma-1}; y_n is re-read
            self.draft.rollback(width - 1 + n, width + gamma - 1)
            y_n = torch.cat([self.last[:, None], drafts], 1).gather(1, n[:, None])
            self.draft_pending = torch.cat([y_n, z[:, None]], 1)
        self.last = z

    def _emit_block(self, tokens: list[list[int]], logps: list[list[float]], extras: dict) -> None:
        """``_emit`` (EOS / stop / length), then add per-token ``extras`` of the tokens really kept to ``Row.stats``."""
        rows = list(self.active)
        before = [len(self.rows[i].tokens) for i in rows]
        self._emit(tokens, logps)
        for pos, i in enumerate(rows):
            kept = len(self.rows[i].tokens) - before[pos]
            self.counters["tokens"] += kept
            for name, values in extras.items():
                value = float(sum(values[pos][:kept]))
                self.rows[i].stats[name] = self.rows[i].stats.get(name, 0.0) + value
                self.counters[name] = self.counters.get(name, 0.0) + value
