"""Shared benchmark helpers: the SpR paper's evaluation protocol and the files every benchmark writes.

- ``expected_best_of(values, k)`` / ``expected_worst_of``: the expected max / min of k of a prompt's
  M samples drawn without replacement (exact order statistics), so one batch of M samples gives the
  whole Best-of-N curve N = 1..M without the noise of picking one subset.
- ``improvement_score``: 100 x (1 + mean_p (method_p - best0_p) / (best0_p - worst0_p)), BoN0 the
  smallest reference Best-of-N (docs/spec_rejection.md); prompts whose reference spread is 0 are left out and counted.
- ``reference_compute_for`` / ``speedup``: the compute Best-of-N needs for a score, log-linear
  interpolation between the two curve points around it; outside the curve the answer is a bound.
- ``improvement_terms`` / ``mean_se``: per-prompt improvement terms and a mean with its standard error
  over prompts; ``bootstrap_speedup``: the speedup's standard error (prompts resampled).
- ``markdown_table``, ``write_results`` (results.json + table.md), ``plot_score_vs_compute`` (log x).
- ``RecordingSampler``: plain sampling that also keeps each token's log-prob, and
  ``ReplayGenerator``: the same rows replayed token by token with the engine's cost rule, so a
  selector can be re-run on recorded samples (partial scores at any length, simulated selectors).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..decode.cost import ModelCost
from ..decode.generators import Generator, SamplingGenerator


# -- Best-of-N from one batch of samples ---------------------------------------------------------------
def expected_best_of(values, k: int, attached=None) -> float:
    """E[max of k of ``values`` drawn without replacement]: sum_i x_(i) C(i-1, k-1) / C(M, k), x sorted up.
    With ``attached`` (one number per value): E[the attached number of that maximum] (e.g. its length;
    equal values rank by position, the later one counting as larger)."""
    m = len(values)
    if not 1 <= k <= m:
        raise ValueError(f"k must be in [1, {m}], got {k}")
    order = sorted(range(m), key=lambda i: (float(values[i]), i))
    pick = [float(values[i]) if attached is None else float(attached[i]) for i in order]
    total = math.comb(m, k)
    return sum(x * math.comb(i, k - 1) for i, x in enumerate(pick) if i >= k - 1) / total


def expected_worst_of(values, k: int) -> float:
    return -expected_best_of([-float(v) for v in values], k)


def powers_of_two(limit: int) -> list[int]:
    out, n = [], 1
    while n <= limit:
        out.append(n)
        n *= 2
    return out


# -- the paper's metrics ---------------------------------------------------------------------------------
def improvement_score(method, ref_best, ref_worst) -> tuple[float, int]:
    """(improvement score, prompts used). Per-prompt lists; BoN0 itself scores 100."""
    terms = [(m - b) / (b - w) for m, b, w in zip(method, ref_best, ref_worst) if b - w > 1e-12]
    if not terms:
        return float("nan"), 0
    return 100.0 * (1.0 + sum(terms) / len(terms)), len(terms)


def improvement_terms(method, ref_best, ref_worst) -> list[float | None]:
    """Per prompt: 100 x (1 + (method - best0) / (best0 - worst0)), None where the reference spread is 0.
    Their mean over the non-None prompts is ``improvement_score``."""
    return [100.0 * (1.0 + (m - b) / (b - w)) if b - w > 1e-12 else None for m, b, w in zip(method, ref_best, ref_worst)]


def mean_se(xs) -> tuple[float, float]:
    """(mean, standard error of the mean) of the non-None values; SE NaN below two values."""
    vals = [float(x) for x in xs if x is not None]
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) / len(vals))


def bootstrap_speedup(method_best, method_cost, curve: list[tuple[list[float], list[float]]], ref_best, ref_worst,
                      resamples: int = 400, seed: int = 0) -> float:
    """Standard error over prompts of ``speedup`` (bootstrap: resample whole prompts, recompute the
    Best-of-N curve, the method's improvement score and both costs). ``curve`` = [(per-prompt best
    score, per-prompt cost)] per curve point; the other arguments are per-prompt lists."""
    import random
    rnd = random.Random(seed)
    n = len(method_best)
    if n < 2:
        return float("nan")
    values = []
    for _ in range(resamples):
        pick = [rnd.randrange(n) for _ in range(n)]
        sub = lambda xs: [xs[i] for i in pick]  # noqa: E731
        rb, rw = sub(ref_best), sub(ref_worst)
        imp, used = improvement_score(sub(method_best), rb, rw)
        if not used:
            continue
        ref_c = [sum(sub(c)) / n for _, c in curve]
        ref_s = [improvement_score(sub(b), rb, rw)[0] for b, _ in curve]
        values.append(speedup(imp, sum(sub(method_cost)) / n, ref_c, ref_s)["value"])
    if len(values) < 2:
        return float("nan")
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def reference_compute_for(score: float, compute, scores) -> tuple[float, str]:
    """Compute the reference curve needs to reach ``score``: (value, relation).

    Log-linear interpolation between consecutive curve points (compute ascending; the curve is made
    monotone by a running max). relation "=" inside the curve; ">=" above its top (the top's compute,
    a lower bound); "<=" below its bottom (the bottom's compute, an upper bound)."""
    pts = sorted(zip(compute, scores))
    cs = [c for c, _ in pts]
    ss, top = [], -math.inf
    for _, s in pts:
        top = max(top, s)
        ss.append(top)
    if score > ss[-1]:
        return cs[-1], ">="
    if score <= ss[0]:
        return cs[0], "=" if score == ss[0] else "<="
    for j in range(len(cs) - 1):
        if ss[j] < score <= ss[j + 1]:
            frac = (score - ss[j]) / (ss[j + 1] - ss[j])
            return math.exp(math.log(cs[j]) + frac * (math.log(cs[j + 1]) - math.log(cs[j]))), "="
    return cs[-1], "="  # score == top reached on a flat segment


def speedup(score: float, compute: float, ref_compute, ref_scores) -> dict:
    """Reference compute for the method's score over the method's compute, with its relation."""
    needed, relation = reference_compute_for(score, ref_compute, ref_scores)
    return {"value": needed / compute if compute > 0 else float("inf"), "relation": relation,
            "reference_compute": needed}


def format_speedup(s: dict | None) -> str:
    if not s:
        return "-"
    prefix = {"=": "", ">=": ">=", "<=": "<="}[s["relation"]]
    return f"{prefix}{s['value']:.2f}x"


# -- files ---------------------------------------------------------------------------------------------
def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """columns = [(key, header)]; values already formatted or numbers (floats get 4 significant digits)."""
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _clean(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_results(output_dir, results: dict, table: str) -> Path:
    """results.json (NaN/inf -> null) and table.md under ``output_dir``; returns the directory."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_clean(results), indent=2) + "\n", encoding="utf-8")
    (out / "table.md").write_text(table, encoding="utf-8")
    return out


def plot_score_vs_compute(path, panels: list[dict], xlabel: str, ylabel: str, title: str = "") -> None:
    """One subplot per panel: {"title", "reference": {"x", "y", "labels", "name"}, "series": [{"x", "y",
    "label", "labels"?, "hollow"?}], "points": [{"x", "y", "label", "marker"?, "hollow"?}]}; log x, the
    reference drawn as a black line with labelled points, each series as a coloured line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        ref = panel.get("reference")
        if ref:
            ax.plot(ref["x"], ref["y"], "-o", color="black", label=ref.get("name", "reference"), markersize=4)
            for x, y, lab in zip(ref["x"], ref["y"], ref.get("labels", [])):
                ax.annotate(str(lab), (x, y), textcoords="offset points", xytext=(-4, 6), fontsize=7)
        cmap = plt.get_cmap("tab10")
        for j, line in enumerate(panel.get("series", [])):
            color = cmap((j + 3) % 10)
            ax.plot(line["x"], line["y"], "--" if line.get("hollow") else "-", marker="o", color=color,
                    markerfacecolor="none" if line.get("hollow") else color, markersize=5, label=line["label"])
            for x, y, lab in zip(line["x"], line["y"], line.get("labels", [])):
                ax.annotate(str(lab), (x, y), textcoords="offset points", xytext=(3, -9), fontsize=6, color=color)
        for j, pt in enumerate(panel.get("points", [])):
            color = cmap(j % 3)
            ax.scatter([pt["x"]], [pt["y"]], marker=pt.get("marker", "s"), s=46, zorder=3, label=pt["label"],
                       facecolors="none" if pt.get("hollow") else color, edgecolors=color)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(panel.get("title", ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def set_threads(threads: int) -> None:
    """torch intra-op threads. On a shared 2-core machine 1 thread is often several times faster than 2."""
    if threads > 0:
        torch.set_num_threads(threads)


# -- recorded samples ---------------------------------------------------------------------------------------
class RecordingSampler(SamplingGenerator):
    """Plain target sampling that also keeps every token's raw log-prob in ``row.stats["token_logps"]`` and,
    after ``track_hidden()``, the target's state before every token in ``row.stats["hidden_seq"]`` (index
    j = the state after j response tokens; 0 = after the prompt), for replays ranked by a value head on
    the target's own states."""

    def _emit(self, new_tokens, logps=None):
        if logps is not None:
            for pos, i in enumerate(self.active):
                self.rows[i].stats.setdefault("token_logps", []).extend(float(x) for x in logps[pos])
        if self._hook is not None:
            for pos, i in enumerate(self.active):
                self.rows[i].stats.setdefault("hidden_seq", []).append(self.last_hidden[pos])
        super()._emit(new_tokens, logps)


@dataclass
class Recorded:
    """One sampled row: its tokens, per-token log-probs and how it ended (eos | stop | length)."""
    tokens: list[int]
    token_logps: list[float]
    reason: str
    hidden: torch.Tensor | None = None  # (tokens, H) target states (RecordingSampler.track_hidden); never saved

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "token_logps": self.token_logps, "reason": self.reason}


def recorded_rows(generator: Generator) -> list[Recorded]:
    return [Recorded(list(r.tokens), list(r.stats.get("token_logps", [])), r.reason,
                     torch.stack(r.stats["hidden_seq"]) if r.stats.get("hidden_seq") else None)
            for r in generator.rows]


class ReplayGenerator(Generator):
    """Replays recorded rows token by token under the engine's cost rule: the prompt is prefilled once
    (``len(prompt)`` positions, one call), and after each step every row still active feeds its token
    (one position per row, one call). ``start(prompt_ids, n)`` replays the first n recorded rows."""

    name = "replay"

    def __init__(self, tokenizer, recorded: list[Recorded], max_new_tokens: int, eos_ids=(), params: int = 0):
        super().__init__(tokenizer, None, max_new_tokens, (), set(eos_ids))
        self.recorded = recorded
        self._cost = ModelCost(params=params)

    @property
    def states(self):
        return []

    @property
    def cost(self):
        return {"target": self._cost}

    def reset_cost(self) -> None:
        self._cost = ModelCost(params=self._cost.params)

    def start(self, prompt_ids, n, rng=None):
        if n > len(self.recorded):
            raise ValueError(f"only {len(self.recorded)} recorded rows, asked for {n}")
        super().start(prompt_ids, n, rng)

    def _prefill(self, prompt_ids, n):
        self._cost.positions += len(prompt_ids)
        self._cost.calls += 1

    def hidden_of(self, i: int) -> dict:
        """A recorded row's target states, as the live generator hands them to a value head."""
        rec, row = self.recorded[i], self.rows[i]
        if rec.hidden is None:
            return {}
        return {"prompt_hidden": rec.hidden[0], **({} if row.done else {"hidden": rec.hidden[len(row.tokens)]})}

    def _step(self):
        new, logps = [], []
        for i in self.active:
            rec, t = self.recorded[i], len(self.rows[i].tokens)
            new.append([rec.tokens[t]])
            logps.append([rec.token_logps[t]])
        self._emit(new, logps)
        if self.active:  # rows that did not just end feed their token
            self._cost.positions += len(self.active)
            self._cost.calls += 1

    def _emit(self, new_tokens, logps=None):
        super()._emit(new_tokens, logps)
        for i in range(len(self.rows)):  # a recorded row ends where it ended when sampled
            row, rec = self.rows[i], self.recorded[i]
            if not row.done and len(row.tokens) == len(rec.tokens) and rec.reason not in (None, "pruned"):
                row.done, row.reason = True, rec.reason
        self._compact()


def prefix_candidate(tokenizer, prompt: str, prompt_ids, rec: Recorded, k: int, eos_ids=()):
    """What a selector sees of a recorded row after k new tokens (the whole row if it ended by then)."""
    from ..models.scorers import Candidate
    toks = rec.tokens[:k]
    finished = len(rec.tokens) <= k
    ids = toks[:-1] if finished and rec.reason == "eos" and toks and toks[-1] in eos_ids else toks
    return Candidate(prompt, tokenizer.decode(ids, skip_special_tokens=True), finished, list(prompt_ids), list(ids),
                     {"logp": float(sum(rec.token_logps[:k]))}, rec.reason if finished else None)
