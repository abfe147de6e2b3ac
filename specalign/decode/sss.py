"""Reward-Shifted Speculative Sampling (Li, Wu, Luo, Zhang, EMNLP 2025), exact and batched.

Models: target P (unaligned), aligned draft Qr (proposes), unaligned draft Q0 (Qr's reference).
One block, for every active row (x = last emitted token):

    y_1 .. y_gamma ~ qr                                  Qr, one token per forward (+ one over y_gamma)
    p_i, q0_i (i = 1..gamma+1) = P, Q0 ([x, y_1..y_gamma])  one forward each
    t_i = processed( log p_i + lambda * log(qr_i / q0_i) )    the reward-shifted (tilted) target
    accept y_i while u_i < t_i(y_i) / qr_i(y_i)
    first rejection at i:  z ~ normalize(max(0, t_i - qr_i));   all accepted:  z ~ t_{gamma+1}

This is ``speculative_verify`` with t in place of p, so every emitted token follows t_i exactly.
At temperature 1 without truncation t_i = p_i (qr_i/q0_i)^lambda / Z_i: lambda = 1 is SSS,
lambda = 0 plain speculative sampling of P (and Qr = Q0 gives the same). Choices (docs/sss.md):

- The tilt log(qr/q0) uses the *raw* (temperature-1, untruncated) draft distributions, i.e. the
  DPO implicit reward; temperature / top-k / top-p then apply to the tilted logits, as they apply
  to the target in speculative sampling. Greedy SSS is greedy decoding of the tilted target.
- Raw log-probs are floored at ``LOG_FLOOR`` before the ratio: a -inf logit (probability 0)
  gives a bounded shift, never NaN/inf. Truncation zeros (top-k/top-p) never enter the ratio;
  they zero t or qr, which the accept/residual rule handles.
- ``Row.stats["implicit"]`` = sum over emitted tokens of that raw, floored log(qr/q0), whatever lambda.
- ``rule="paper"``: the paper's equations (6)/(7) have no Z_i: accept with min(1, p/q0), residual
  normalize(max(0, p qr/q0 - qr)). Implemented as the same step with weights w_i = Z_i t_i,
  Z_i = sum_v p_i (qr_i/q0_i)^lambda (temperature 1, full vocabulary); the bonus token is drawn from
  normalize(w) = t. Exact only when Z_i = 1; what it produces instead is derived and tested.
"""

from __future__ import annotations

import math

import torch

from ..errors import SpecError
from .engine import LMState
from .sampling import SamplingParams, processed_logprobs
from .speculative import SpeculativeGenerator, same_spec

RULES = ("exact", "paper")
LOG_FLOOR = -80.0  # e^-80 ~ 2e-35: keeps |log(qr/q0)| finite and the paper rule's Z_i finite in float32


def tilted_logits(target_logits: torch.Tensor, qr_logits: torch.Tensor, q0_logits: torch.Tensor,
                  shift_lambda: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p + lambda log(qr/q0), log(qr/q0)) from raw logits (any leading dims), in float32."""
    logp = torch.log_softmax(target_logits.float(), -1)
    log_ratio = (torch.log_softmax(qr_logits.float(), -1).clamp(min=LOG_FLOOR)
                 - torch.log_softmax(q0_logits.float(), -1).clamp(min=LOG_FLOOR))
    return logp + shift_lambda * log_ratio, log_ratio


def tilted_target(target_logits, qr_logits, q0_logits, params: SamplingParams, shift_lambda: float = 1.0,
                  rule: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """The weights SSS follows (t, or w = Z t for ``rule='paper'``) and the per-token log(qr/q0)."""
    tilted, log_ratio = tilted_logits(target_logits, qr_logits, q0_logits, shift_lambda)
    t = processed_logprobs(tilted, params).exp()
    if rule == "paper":
        t = t * torch.logsumexp(tilted, -1, keepdim=True).exp()
    return t, log_ratio


class SSSGenerator(SpeculativeGenerator):
    """Aligned draft Qr proposes; target P and unaligned draft Q0 verify (one forward each per block)."""

    name = "sss"
    draft_runs_last = True

    def __init__(self, target, draft, draft_ref, tokenizer, params: SamplingParams | None = None,
                 max_new_tokens: int = 128, stop=(), gamma: int = 4, rule: str = "exact", shift_lambda: float = 1.0,
                 eos_ids=None, draft_tokenizer=None, draft_ref_tokenizer=None):
        """``draft_ref=None``: Q0 is ``draft`` (a PEFT model) with its adapter disabled, one set of weights."""
        if rule not in RULES:
            raise SpecError(f"unknown SSS rule '{rule}': use exact (default) or paper")
        if not isinstance(shift_lambda, (int, float)) or not math.isfinite(shift_lambda):
            raise SpecError(f"shift-lambda must be a finite number (0 = target sampling, 1 = SSS), "
                            f"got {shift_lambda!r}")
        if draft_ref is None and not hasattr(draft, "disable_adapter"):
            raise SpecError("SSS needs the unaligned draft Q0: pass --draft-ref MODEL, or a --draft adapter directory "
                            "(Q0 = its base with the adapter disabled)")
        self._draft_ref_model = draft_ref
        self.rule, self.shift_lambda = rule, float(shift_lambda)
        super().__init__(target, draft, tokenizer, params, max_new_tokens, stop, gamma, eos_ids=eos_ids,
                         draft_tokenizer=draft_tokenizer, draft_adapter_enabled=True if draft_ref is None else None)
        if draft_ref_tokenizer is not None:
            from .speculative import check_compatible
            check_compatible(tokenizer, {"target": target, "draft_ref": draft_ref or draft},
                             {"draft_ref": draft_ref_tokenizer})
        pad = tokenizer.pad_token_id or 0
        if draft_ref is None:
            self.draft_ref = LMState(draft, pad_id=pad, adapter_enabled=False)
        else:
            self.draft_ref = LMState(draft_ref, pad_id=pad)

    def _models(self, target, draft) -> dict:
        models = {"target": target, "draft": draft}
        if self._draft_ref_model is not None:
            models["draft_ref"] = self._draft_ref_model
        return models

    @classmethod
    def from_specs(cls, model, tokenizer, config) -> "SSSGenerator":
        """From a ``DecodeConfig``. ``--draft`` = Qr: an adapter directory (Q0 = its base, adapter disabled;
        a ``--draft-ref`` must then name that base) or a model with ``--draft-ref`` = Q0."""
        from ..models.loading import load_model, resolve
        from .speculative import load_draft_tokenizer
        loaded = {config.model: (model, tokenizer)}

        def get(spec):
            for known, pair in loaded.items():
                if same_spec(spec, known):
                    return pair
            loaded[spec] = (load_model(spec, config.dtype, config.device), load_draft_tokenizer(spec))
            return loaded[spec]

        adapter = resolve(config.draft).adapter
        if adapter:
            if config.draft_ref:
                check_adapter_base(config.draft, config.draft_ref)
            draft, draft_tok = get(config.draft)
            draft_ref, ref_tok = None, None
        else:
            if not config.draft_ref:
                raise SpecError(f"--draft {config.draft} is not an adapter directory, so SSS needs the unaligned draft "
                                "Q0: pass --draft-ref MODEL (or --draft DIR_WITH_DPO_ADAPTER)")
            draft, draft_tok = get(config.draft)
            draft_ref, ref_tok = get(config.draft_ref)
        return cls(model, draft, draft_ref, tokenizer, config.sampling, config.max_new_tokens, config.stop,
                   gamma=config.gamma, rule=config.sss_rule, shift_lambda=config.shift_lambda,
                   draft_tokenizer=draft_tok, draft_ref_tokenizer=ref_tok)

    @property
    def states(self):
        return [self.target, self.draft, self.draft_ref]

    @property
    def verifiers(self):
        return [self.target, self.draft_ref]

    @property
    def cost(self):
        return {"target": self.target.cost, "draft": self.draft.cost, "draft_ref": self.draft_ref.cost}

    def _reset_counters(self) -> None:
        super()._reset_counters()
        self.counters["implicit"] = 0.0

    def stats(self) -> dict:
        out = super().stats()
        out["mean_implicit_reward"] = round(self.counters["implicit"] / max(1, self.counters["rows"]), 6)
        out["rule"], out["shift_lambda"] = self.rule, self.shift_lambda
        return out

    def _start_rows(self) -> None:
        for row in self.rows:
            row.stats.setdefault("implicit", 0.0)

    def _target_side(self, verified, draft_raw):
        t, log_ratio = tilted_target(verified[0][..., : self.vocab], draft_raw, verified[1][..., : self.vocab],
                                     self.params, self.shift_lambda, self.rule)
        return t, {"implicit": log_ratio}


def check_adapter_base(adapter_spec: str, expected_spec: str, role: str = "--draft-ref") -> None:
    """An adapter trained on one base, used where the user names another, is an error naming both."""
    from ..models.loading import resolve
    resolved = resolve(adapter_spec)
    if not resolved.adapter:
        return
    import json
    from pathlib import Path
    base = json.loads((Path(resolved.adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not same_spec(base, expected_spec):
        raise SpecError(f"adapter {adapter_spec} was trained on base '{base}' but {role} is '{expected_spec}': "
                        f"omit {role} (Q0 = the adapter's base with the adapter disabled) or pass that base")
