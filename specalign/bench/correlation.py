"""``specalign bench correlation``: how well a partial response's score predicts its final score
(the SpR paper's Fig. 2 / Appendix B), per prompt, at several decision lengths K.

For each prompt: M sampled responses (recorded by ``bench spr --work-dir``, or sampled here), each
scored whole and truncated to its first K tokens -- exactly what Speculative Rejection's scorer sees
at a decision after K tokens (a response that ended before K is scored whole). Per prompt and K:
Pearson r and Kendall tau between partial and final scores; over prompts: mean, median and quartiles.
Also per K and alpha: how often the final best response would survive one rejection at K that keeps
round((1 - alpha) M), and the share of responses already finished by K.
``--rankers`` adds other scorers of the partial text (a value head ``value:DIR``), each correlated
with every task's final score. ``--oracle M`` adds the ceiling (``specalign.decode.oracle``): for the first
``--oracle-prefixes`` rows of each prompt cut to K tokens (``--oracle-ks``), M continuations sampled
by the model and scored whole by the task estimate E[final | prefix]; its within-prompt correlation
with the row's own final score, corrected for Monte Carlo noise by split-half reliability, bounds
what any prefix scorer can reach. Its continuations cost about prefixes x M x (max-new-tokens - K)
target positions per prompt and K, reported as ``oracle.target_positions_per_prompt``.
Outputs under ``--output-dir``: results.json, table.md, correlation.png.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import SpecError
from .common import (RecordingSampler, Recorded, markdown_table, prefix_candidate, recorded_rows, set_threads,
                     write_results)


@dataclass
class CorrelationBenchConfig:
    samples: str = field(default="", metadata={"help": "samples.jsonl from `bench spr --work-dir` (else sample here)"})
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "model spec (tokenizer, sampling)"})
    prompts: str = field(default="alpaca_farm_100", metadata={"help": "data set name or prompt file"})
    limit: int = field(default=0, metadata={"help": "first N prompts only (0 = all)"})
    n: int = field(default=32, metadata={"help": "samples per prompt when sampling here"})
    max_new_tokens: int = field(default=128, metadata={"help": "new tokens per response when sampling here"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature when sampling here"})
    tasks: list[str] = field(default_factory=lambda: ["loglik:self", "judge:sentiment"], metadata={"help": "scorers"})
    ks: list[int] = field(default_factory=lambda: [4, 8, 16, 32, 64, 96], metadata={"help": "decision lengths"})
    alphas: list[float] = field(default_factory=lambda: [0.5, 0.75, 0.9], metadata={"help": "for best-survives"})
    rankers: list[str] = field(default_factory=list,
                               metadata={"help": "other scorers of the partial text (e.g. value:DIR), correlated "
                                                 "with each task's final score"})
    oracle: int = field(default=0, metadata={"help": "Monte Carlo oracle: M continuations per prefix (even; 0 = off)"})
    oracle_ks: list[int] = field(default_factory=lambda: [4, 8, 16, 32],
                                 metadata={"help": "prefix lengths the oracle measures"})
    oracle_prefixes: int = field(default=16, metadata={"help": "prefixes per prompt the oracle continues"})
    oracle_task: str = field(default="", metadata={"help": "the task the oracle scores (default: the first)"})
    oracle_batch_tokens: int = field(default=65536, metadata={"help": "rows x (prompt + max-new-tokens) per batch"})
    seed: int = field(default=0, metadata={"help": "base seed when sampling here, and the oracle's streams"})
    threads: int = field(default=1, metadata={"help": "torch threads (0 = leave as is)"})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16"})
    output_dir: str = field(default="benchmarks/results/correlation", metadata={"help": "where results go"})

    def validate(self) -> "CorrelationBenchConfig":
        if not self.ks or min(self.ks) < 1:
            raise SpecError(f"ks must be decision lengths >= 1, got {self.ks}")
        if any(not 0 <= a < 1 for a in self.alphas):
            raise SpecError(f"alphas must be in [0, 1), got {self.alphas}")
        if self.samples and not Path(self.samples).is_file():
            raise SpecError(f"samples file not found: {self.samples} (write one with `specalign bench spr "
                            "--work-dir DIR`, or leave --samples empty to sample here)")
        if self.oracle and (self.oracle < 2 or self.oracle % 2):
            raise SpecError(f"oracle must be an even number >= 2 of continuations per prefix (0 = off), got {self.oracle}")
        if self.oracle and (not self.oracle_ks or min(self.oracle_ks) < 1 or self.oracle_prefixes < 2):
            raise SpecError("oracle-ks must be lengths >= 1 and oracle-prefixes >= 2")
        if self.oracle_task and self.oracle_task not in self.tasks:
            raise SpecError(f"oracle-task {self.oracle_task!r} is not one of the tasks {self.tasks}")
        if not self.samples and self.n < 2:
            raise SpecError(f"n must be >= 2 to correlate anything, got {self.n}")
        return self


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def prompt_correlations(partial: list[float], final: list[float]) -> tuple[float, float]:
    """(Pearson r, Kendall tau-b); NaN when either side is constant."""
    from scipy.stats import kendalltau, pearsonr
    if len(set(partial)) < 2 or len(set(final)) < 2:
        return float("nan"), float("nan")
    return float(pearsonr(partial, final)[0]), float(kendalltau(partial, final)[0])


def best_survives(partial: list[float], final: list[float], alpha: float) -> bool:
    """Does a final-best response rank in the top round((1 - alpha) M) by partial score (ties: lower index)?"""
    keep = max(1, math.floor((1 - alpha) * len(partial) + 0.5 + 1e-9))
    top = set(sorted(range(len(partial)), key=lambda i: (-partial[i], i))[:keep])
    best = max(final)
    return any(final[i] == best for i in top)


def _samples(config, tokenizer, model) -> list[dict]:
    if config.samples:
        out = [json.loads(line) for line in Path(config.samples).read_text(encoding="utf-8").splitlines()
               if line.strip()]
        return out[:config.limit] if config.limit > 0 else out
    from tqdm.auto import tqdm
    from ..decode.api import prompt_seed
    from ..decode.prompts import load_prompts
    from ..decode.sampling import SamplingParams
    from ..models.loading import chat_prompt
    sampler = RecordingSampler(model, tokenizer, SamplingParams(config.temperature), config.max_new_tokens)
    out = []
    for index, prompt in enumerate(tqdm(load_prompts(prompts=config.prompts, limit=config.limit),
                                        desc="sample", unit="prompt")):
        ids = chat_prompt(tokenizer, prompt)
        sampler.start(ids, config.n, torch.Generator().manual_seed(prompt_seed(config.seed, index)))
        sampler.advance()
        out.append({"index": index, "prompt": prompt, "prompt_ids": ids,
                    "rows": [r.as_dict() for r in recorded_rows(sampler)]})
    return out


def _max_new_tokens(config, data: list[dict]) -> int:
    """The samples' length cap (the longest length-capped row), else --max-new-tokens."""
    capped = [len(r["tokens"]) for item in data for r in item["rows"] if r["reason"] == "length"]
    return max(capped) if capped else config.max_new_tokens


def run(config: CorrelationBenchConfig) -> dict:
    from tqdm.auto import tqdm
    from ..decode.api import prompt_seed
    from ..decode.cost import ModelCost
    from ..decode.generators import eos_ids_of
    from ..decode.sampling import SamplingParams
    from ..models.loading import load_model, load_tokenizer
    from ..models.scorers import build_scorer
    from ..decode.oracle import _pooled_within, bootstrap_se, mc_values, split_half
    config.validate()
    set_threads(config.threads)
    model = load_model(config.model, config.dtype)
    tokenizer = load_tokenizer(config.model)
    eos = eos_ids_of(model, tokenizer)
    data = _samples(config, tokenizer, model)
    build = lambda spec: build_scorer(spec, generator_model=model, generator_tokenizer=tokenizer,  # noqa: E731
                                      dtype=config.dtype)
    scorers = {t: build(t) for t in config.tasks}
    partials = dict(scorers)  # what scores the partial text: each task itself, then every ranker for every task
    pairs = [(t, t) for t in config.tasks]
    for ranker in config.rankers:
        partials.setdefault(ranker, build(ranker))
        pairs += [(f"{ranker} -> {t}", ranker) for t in config.tasks]
    names = [name for name, _ in pairs]
    task_of = {name: (name.split(" -> ")[1] if " -> " in name else name) for name in names}
    ks = sorted(set(config.ks))
    per = {name: {k: {"pearson": [], "kendall": [], "survive": {a: [] for a in config.alphas}} for k in ks}
           for name in names}
    finished_by = {k: [] for k in ks}
    lengths, capped = [], []
    horizon = _max_new_tokens(config, data)
    oracle_task = config.oracle_task or config.tasks[0]
    oks = sorted(set(config.oracle_ks)) if config.oracle else []
    oracle = {k: {"values": [], "finals": [], "partial": {name: [] for name in names if task_of[name] == oracle_task}}
              for k in oks}
    oracle_cost = ModelCost()
    sampling = SamplingParams(config.temperature)
    for item in tqdm(data, desc="bench correlation", unit="prompt"):
        rows = [Recorded(r["tokens"], r["token_logps"], r["reason"]) for r in item["rows"]]
        lengths += [len(r.tokens) for r in rows]
        capped += [r.reason == "length" for r in rows]
        full = max(len(r.tokens) for r in rows)
        finals = [prefix_candidate(tokenizer, item["prompt"], item["prompt_ids"], r, full, eos) for r in rows]
        for k in ks:
            finished_by[k].append(sum(len(r.tokens) <= k for r in rows) / len(rows))
        final = {t: scorer(finals) for t, scorer in scorers.items()}
        partial_at = {}
        for k in sorted(set(ks) | set(oks)):
            cands = [prefix_candidate(tokenizer, item["prompt"], item["prompt_ids"], r, k, eos) for r in rows]
            partial_at[k] = {spec: scorer(cands) for spec, scorer in partials.items()}
        for name, spec in pairs:
            for k in ks:
                partial = partial_at[k][spec]
                r_, tau = prompt_correlations(partial, final[task_of[name]])
                per[name][k]["pearson"].append(r_)
                per[name][k]["kendall"].append(tau)
                for a in config.alphas:
                    per[name][k]["survive"][a].append(best_survives(partial, final[task_of[name]], a))
        if oks:
            rng = torch.Generator().manual_seed(prompt_seed(config.seed, item["index"]) + 1)
            picked = list(range(min(config.oracle_prefixes, len(rows))))
            for k in oks:
                values = mc_values(model, tokenizer, item["prompt_ids"], [rows[i].tokens[:k] for i in picked],
                                   scorers[oracle_task], config.oracle, horizon, rng, sampling, prompt=item["prompt"],
                                   prefix_logps=[sum(rows[i].token_logps[:k]) for i in picked], eos_ids=eos,
                                   max_batch_tokens=config.oracle_batch_tokens, cost=oracle_cost)
                oracle[k]["values"].append(values)
                oracle[k]["finals"].append([final[oracle_task][i] for i in picked])
                for name in oracle[k]["partial"]:
                    oracle[k]["partial"][name].append([partial_at[k][pairs[names.index(name)][1]][i] for i in picked])
    summary = {}
    for name in names:
        summary[name] = []
        for k in ks:
            cell = {"k": k, "finished_share": sum(finished_by[k]) / len(finished_by[k])}
            for stat in ("pearson", "kendall"):
                vals = [v for v in per[name][k][stat] if not math.isnan(v)]
                cell[stat] = {"mean": sum(vals) / len(vals) if vals else float("nan"), "median": _quantile(vals, 0.5),
                              "q25": _quantile(vals, 0.25), "q75": _quantile(vals, 0.75), "prompts": len(vals)}
            cell["best_survives"] = {str(a): sum(v) / len(v) for a, v in per[name][k]["survive"].items()}
            summary[name].append(cell)
    ceiling = []
    for k in oks:
        o = oracle[k]
        rep = split_half(o["values"], o["finals"])
        rep["r_corrected_se"] = bootstrap_se(o["values"], o["finals"])
        rep["r_se"] = bootstrap_se(o["values"], o["finals"], "r")
        rep["k"] = k
        rep["partial_r"] = {name: _pooled_within(v, o["finals"]) for name, v in o["partial"].items()}
        ceiling.append(rep)
    report = {"config": asdict(config), "prompts": len(data), "samples_per_prompt": len(data[0]["rows"]),
              "mean_length": sum(lengths) / len(lengths), "capped_share": sum(capped) / len(capped),
              "max_new_tokens": horizon, "summary": summary,
              "per_prompt": {name: {str(k): {"pearson": per[name][k]["pearson"], "kendall": per[name][k]["kendall"]}
                                    for k in ks} for name in names}}
    if oks:
        report["oracle"] = {"task": oracle_task, "m": config.oracle, "prefixes_per_prompt": config.oracle_prefixes,
                            "by_k": ceiling, "target_positions_per_prompt": oracle_cost.positions / len(data),
                            "wall_s_per_prompt": oracle_cost.wall_s / len(data)}
    return report


def table(report: dict) -> str:
    cfg = report["config"]
    alphas = [str(a) for a in cfg["alphas"]]
    lines = [f"{report['prompts']} prompts x {report['samples_per_prompt']} samples"
             f"{' from ' + cfg['samples'] if cfg['samples'] else ''}; mean response length "
             f"{report['mean_length']:.1f} tokens, {100 * report['capped_share']:.1f}% hit the length cap. "
             "Per-prompt correlation of the score after K tokens with the final score; mean [quartiles] over "
             "prompts. 'best survives' = share of prompts whose final best response ranks in the top "
             "round((1-alpha) M) by its K-token score.", ""]
    cols = [("k", "K"), ("finished", "finished by K"), ("pearson", "Pearson r"), ("kendall", "Kendall tau")]
    cols += [(f"s{a}", f"best survives a={a}") for a in alphas]
    for task, cells in report["summary"].items():
        rows = []
        for c in cells:
            row = {"k": c["k"], "finished": f"{100 * c['finished_share']:.1f}%"}
            for name in ("pearson", "kendall"):
                s = c[name]
                row[name] = f"{s['mean']:.3f} [{s['q25']:.2f}, {s['q75']:.2f}]"
            for a in alphas:
                row[f"s{a}"] = f"{100 * c['best_survives'][a]:.0f}%"
            rows.append(row)
        lines += [f"### `{task}`", "", markdown_table(rows, cols)]
    if report.get("oracle"):
        o = report["oracle"]
        names = list(o["by_k"][0]["partial_r"]) if o["by_k"] else []
        lines += [f"### Ceiling: the Monte Carlo oracle on `{o['task']}`", "",
                  f"{o['prefixes_per_prompt']} prefixes per prompt, {o['m']} continuations each (cost "
                  f"{o['target_positions_per_prompt']:.0f} target positions and {o['wall_s_per_prompt']:.1f} s per "
                  "prompt, a measuring cost). Within-prompt Pearson r with the prefix's own held-out final score "
                  "(centred per prompt, pooled): the oracle's mean of M raw, and corrected for Monte Carlo noise "
                  "(split-half reliability rho = 2 r_h / (1 + r_h), r / sqrt(rho)) = the ceiling for any prefix "
                  "scorer; then each scorer of the partial text on the same prefixes. ± = bootstrap standard error "
                  "over prompts.", ""]
        cols = [("k", "K"), ("raw", "oracle r (raw)"), ("rel", "reliability"), ("corr", "oracle r (corrected)")]
        cols += [(f"p{i}", f"{n} on partial text") for i, n in enumerate(names)]
        rows = []
        for c in o["by_k"]:
            row = {"k": c["k"], "raw": f"{c['r']:.3f} ± {c['r_se']:.3f}", "rel": f"{c['reliability']:.3f}",
                   "corr": f"{c['r_corrected']:.3f} ± {c['r_corrected_se']:.3f}"}
            row.update({f"p{i}": f"{c['partial_r'][n]:.3f}" for i, n in enumerate(names)})
            rows.append(row)
        lines += [markdown_table(rows, cols)]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for task, cells in report["summary"].items():
        ks = [c["k"] for c in cells]
        for ax, name in zip(axes[:2], ("pearson", "kendall")):
            line, = ax.plot(ks, [c[name]["mean"] for c in cells], marker="o", label=f"{task} (mean, IQR band)")
            ax.fill_between(ks, [c[name]["q25"] for c in cells], [c[name]["q75"] for c in cells],
                            color=line.get_color(), alpha=0.15)
        for a in report["config"]["alphas"]:
            axes[2].plot(ks, [c["best_survives"][str(a)] for c in cells], marker="o", label=f"{task}, alpha={a}")
    if report.get("oracle"):
        by_k = report["oracle"]["by_k"]
        axes[0].plot([c["k"] for c in by_k], [c["r_corrected"] for c in by_k], marker="s", color="black",
                     label=f"ceiling: oracle on {report['oracle']['task']} (pooled, corrected)")
        axes[0].plot([c["k"] for c in by_k], [c["r"] for c in by_k], marker="s", color="gray", linestyle="--",
                     label=f"oracle, {report['oracle']['m']} continuations (pooled, raw)")
    for ax, title in zip(axes, ("Pearson r (partial vs final), per prompt", "Kendall tau, per prompt",
                                "final best survives one rejection at K")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("decision after K tokens")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['config']['model']}: {report['prompts']} prompts x {report['samples_per_prompt']} samples")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: list[str]) -> int:
    from ..cli import parse_config
    (config,) = parse_config([CorrelationBenchConfig], args, "specalign bench correlation")
    report = run(config)
    out = write_results(config.output_dir, report, table(report))
    plot(report, out / "correlation.png")
    print(table(report))
    return 0
