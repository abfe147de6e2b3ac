"""Adaptive Speculative Rejection (``--alpha auto``): how many rows to reject is decided per prompt
and per round from how informative the current partial scores are -- the first item of future work
of the Speculative Rejection paper. It replaces only ``SpeculativeRejection.select``.

Model: a running row's final score is its current score plus what the rest of its response adds,

    F_i = S_i + E_i,   E_i ~ N(0, sigma_i^2),   sigma_i^2 = rate x remaining_i

(a random walk in the number of tokens; remaining_i = max_new_tokens - tokens so far; a finished
row's score is final, sigma_i = 0). ``rate`` is measured on this prompt at this decision:

    d_i  = S_i(now) - S_i(previous decision)            over the rows scored both times
    rate = residual variance of d after a least-squares fit on S_i(previous)
           / mean tokens generated in between

The fit keeps score changes that the earlier score predicts (a row that keeps rising) out of the
noise; what is left is the part of a row's score the next tokens can still overturn. At the first
decision the previous scores are those of the empty response, equal for every row, so the noise is
the whole spread of the scores: with many tokens still to come, the first round rejects little
unless the scorer comes with a calibration, used then: ``scorer.calibration["noise_rate"]`` (variance
of score change per token), or for a ``value:DIR`` scorer the held-out correlations its training
wrote to ``DIR/value_report.json`` (residual variance std^2 (1 - r_L^2) of the final score given the
value after L tokens, spread over the tokens still to come).

Rule (successive elimination, as in racing algorithms):

    L = max_i (S_i - z sigma_i)              a final score some row will very likely reach
    reject row i  when  S_i + z sigma_i < L  it will very likely not end up best

clamped so that at least ``ceil((1 - max_alpha) x pool)`` rows (and at least one) survive. Scores
that separate rows clearly (spread >> noise) reject many rows, scores that are mostly noise reject
few or none. Every round's measured rate, noise and rejection rate go into the run's ``rounds``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SpecError
from .spec_rejection import SpeculativeRejection


def residual_variance(x: list[float], y: list[float]) -> float:
    """Variance of y left after a least-squares line on x (n - 2 degrees of freedom); when x is
    constant (or n < 3) the plain variance of y (n - 1). Needs n >= 2."""
    n = len(y)
    my = sum(y) / n
    syy = sum((v - my) ** 2 for v in y)
    if n >= 3:
        mx = sum(x) / n
        sxx = sum((u - mx) ** 2 for u in x)
        if sxx > 1e-12 * max(1.0, sum(u * u for u in x)):
            sxy = sum((u - mx) * (v - my) for u, v in zip(x, y))
            return max(0.0, syy - sxy * sxy / sxx) / (n - 2)
    return syy / (n - 1)


def calibration_of(scorer) -> dict:
    """What the scorer says about its own noise: ``scorer.calibration`` if set, else for a ``value:DIR``
    scorer its training report (``DIR/value_report.json``): the held-out correlation r_L of the value
    after L response tokens with the final score, i.e. a residual variance std^2 (1 - r_L^2) at L."""
    cal = getattr(scorer, "calibration", None)
    if isinstance(cal, dict):
        return cal
    cal = {}
    name = str(getattr(scorer, "name", ""))
    report = Path(name[len("value:"):]) / "value_report.json" if name.startswith("value:") else None
    if report is not None and report.is_file():
        data = json.loads(report.read_text())
        std = float(data.get("target_std") or 0.0)
        residual = {}
        for length, entry in (data.get("correlation") or {}).items():
            r = (entry.get("value") or {}).get("pearson")
            if str(length).isdigit() and r is not None and std > 0:
                residual[int(length)] = std * std * (1.0 - float(r) ** 2)
        if residual:
            cal = {"residual_var": residual, "source": str(report)}
    try:
        scorer.calibration = cal  # read once per scorer
    except AttributeError:
        pass
    return cal


def calibrated_rate(scorer, tokens: float = 0.0, remaining: float = 0.0) -> float | None:
    """A per-token noise rate from the scorer's calibration at ``tokens`` generated, ``remaining`` to go:
    ``noise_rate`` as given, or the residual variance at the longest calibrated prefix <= tokens
    (the shortest if none) spread over the remaining tokens."""
    cal = calibration_of(scorer) if scorer is not None else {}
    rate = cal.get("noise_rate")
    if rate is None and cal.get("residual_var"):
        table = {int(k): float(v) for k, v in cal["residual_var"].items()}
        below = [k for k in table if k <= tokens]
        var = table[max(below)] if below else table[min(table)]
        rate = var / remaining if remaining > 0 else 0.0
    if rate is None:
        return None
    rate = float(rate)
    return rate if math.isfinite(rate) and rate >= 0 else None


@dataclass
class AdaptiveRejection(SpeculativeRejection):
    """Speculative Rejection whose rejection rate is chosen each round (``alpha='auto'``)."""

    alpha: float | str = "auto"
    z: float = field(default=1.0, metadata={"help": "confidence width in noise standard deviations"})
    max_alpha: float = field(default=0.9, metadata={"help": "never reject more than this fraction of a pool"})
    name: str = "spec-rejection"

    def __post_init__(self):
        if str(self.alpha).strip() != "auto":
            raise SpecError(f"AdaptiveRejection chooses alpha itself: pass alpha='auto', got {self.alpha!r}")
        if not (isinstance(self.z, (int, float)) and math.isfinite(self.z) and self.z >= 0):
            raise SpecError(f"z must be a finite number >= 0, got {self.z!r}")
        if not 0 <= self.max_alpha < 1:
            raise SpecError(f"max_alpha must be in [0, 1), got {self.max_alpha}")
        self.alpha = 0.0  # the base class checks a number; ``select`` below never uses it
        super().__post_init__()
        self.alpha = "auto"
        self._reset(None, None)

    @classmethod
    def from_config(cls, config) -> "AdaptiveRejection":
        return cls(n=config.n, alpha="auto", decision=config.decision, max_batch_tokens=config.max_batch_tokens)

    def _reset(self, generator, scorer) -> None:
        self._generator, self._scorer = generator, scorer
        self._previous: dict[int, tuple[float, int]] = {}  # row -> (score, tokens) at its last decision
        self._final: set[int] = set()                      # rows whose score is final
        self._rate: float | None = None
        self.decisions: list[dict] = []

    def run(self, generator, scorer, prompt, prompt_ids, rng) -> dict:
        self._reset(generator, scorer)
        result = super().run(generator, scorer, prompt, prompt_ids, rng)
        for record, decision in zip(result["rounds"], self.decisions):
            record["adaptive"] = decision
        return result

    # -- the noise rate ---------------------------------------------------------------------------------
    def noise_rate(self, fresh: list[int], scores: dict[int, float], lengths: dict[int, int]) -> tuple[float, str]:
        """(variance of score change per token, where it came from) for this decision."""
        first = not self._previous
        if first and fresh:
            tokens = sum(lengths[i] for i in fresh) / len(fresh)
            rate = calibrated_rate(self._scorer, tokens, max(0.0, self._generator.max_new_tokens - tokens))
            if rate is not None:
                return rate, "calibration"
        prev = {i: self._previous.get(i, (0.0, 0)) for i in fresh}
        pairs = [(prev[i][0], scores[i] - prev[i][0], lengths[i] - prev[i][1]) for i in fresh
                 if lengths[i] > prev[i][1]]
        if len(pairs) < 2:
            if self._rate is not None:
                return self._rate, "previous round"
            return math.inf, "too few rows"
        before, change, steps = zip(*pairs)
        rate = residual_variance(list(before), list(change)) / (sum(steps) / len(steps))
        return rate, "first decision (spread)" if first else "measured"

    # -- the rejection rule -----------------------------------------------------------------------------
    def select(self, pool: list[int], scores: dict[int, float]) -> list[int]:
        rows = self._generator.rows
        lengths = {i: len(rows[i].tokens) for i in pool}
        fresh = [i for i in pool if i not in self._final]  # scored this round
        rate, source = self.noise_rate(fresh, scores, lengths)
        self._rate = rate if math.isfinite(rate) else self._rate
        horizon = self._generator.max_new_tokens

        def sigma(i):
            if rows[i].done:
                return 0.0
            remaining = max(0, horizon - lengths[i])
            return math.inf if math.isinf(rate) and remaining else math.sqrt(rate * remaining) if remaining else 0.0

        sig = {i: sigma(i) for i in pool}
        width = {i: self.z * sig[i] if self.z else 0.0 for i in pool}
        ranked = sorted(pool, key=lambda i: (-scores[i], i))
        floor = max(scores[i] - width[i] for i in pool)
        keep = [i for i in ranked if scores[i] + width[i] >= floor]
        least = max(1, math.ceil((1.0 - self.max_alpha) * len(pool) - 1e-9))
        if len(keep) < least:
            keep = ranked[:least]
        running = [i for i in pool if not rows[i].done]
        self.decisions.append({
            "rate": None if math.isinf(rate) else round(rate, 8), "source": source,
            "noise_std": None if not running or math.isinf(sig[running[0]]) else
            round(max(sig[i] for i in running), 6),
            "spread": round(_std([scores[i] for i in pool]), 6),
            "alpha": round(1.0 - len(keep) / len(pool), 6)})
        for i in fresh:
            self._previous[i] = (scores[i], lengths[i])
            if rows[i].done:
                self._final.add(i)
        return keep


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
