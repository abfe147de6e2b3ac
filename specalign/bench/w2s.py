"""``specalign bench w2s``: the weak-to-strong study -- gold judge score vs target compute and wall time.

On held-out prompts, the same target P (unaligned), per-prompt seeds, and one gold judge that scores
every method's answer:

    sample            one target sample
    best-of-n         Best-of-N by the gold judge, N = 1, 2, 4, ..., --bon-n, from one batch of --bon-n
                      samples (expected best of N; compute = prefill + N/M of the decode positions)
    spr-judge         Speculative Rejection, the gold judge on partial text ranks rows
    spr-value         Speculative Rejection ranked by the value head (value:DIR)
    spr-adaptive      --alpha auto with the judge (and spr-adaptive-value with the value head)
    sss               Reward-Shifted Speculative Sampling: Qr = the DPO adapter, Q0 = its base
    best-of-n+sss     Best-of-N by the gold judge over SSS samples (curve as for best-of-n)
    spr+sss-implicit  N SSS rows pruned by Speculative Rejection on the free implicit reward sum log(qr/q0)
    spr+sss-value     the same, ranked by the value head

Per method: mean gold score, target positions and FLOPs per prompt (all models' FLOPs too), wall
time per prompt, and the Best-of-N compute needed for the same mean score (log-linear interpolation
on the Best-of-N curve) over the method's: the compute speedup. ``targets`` checks the issue's three
targets on the measured numbers. Outputs under ``--output-dir``: results.json, table.md, frontier.png.
Methods whose models are missing (no --dpo: no SSS; no --value: no value methods) are left out and
listed under ``skipped``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import SpecError
from .common import (expected_best_of, markdown_table, plot_score_vs_compute, powers_of_two, reference_compute_for,
                     set_threads, write_results)

ALL_METHODS = ["sample", "best-of-n", "spr-judge", "spr-value", "spr-adaptive", "spr-adaptive-value", "sss",
               "best-of-n+sss", "spr+sss-implicit", "spr+sss-value"]


@dataclass
class W2SBenchConfig:
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "target P (unaligned)"})
    dpo: str | None = field(default=None, metadata={"help": "DPO adapter dir on the draft: Qr (Q0 = its base)"})
    value: str | None = field(default=None, metadata={"help": "value-head model dir (value:DIR scorer)"})
    judge: str = field(default="judge:sentiment", metadata={"help": "gold judge (scorer spec)"})
    prompts: str = field(default="alpaca_farm_100", metadata={"help": "held-out prompts"})
    limit: int = field(default=8, metadata={"help": "first N prompts (0 = all)"})
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS), metadata={"help": "methods to run"})
    max_new_tokens: int = field(default=48, metadata={"help": "new tokens per response"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus mass"})
    bon_n: int = field(default=64, metadata={"help": "Best-of-N samples per prompt (a power of 2)"})
    sss_bon_n: int = field(default=16, metadata={"help": "Best-of-N over SSS: samples per prompt (a power of 2)"})
    n: int = field(default=32, metadata={"help": "initial rows of every Speculative Rejection method"})
    alpha: float = field(default=0.5, metadata={"help": "fixed rejection rate of the non-adaptive methods"})
    judge_alphas: list[float] = field(default_factory=list, metadata={
        "help": "more fixed rates for spr-judge (to compare --alpha auto with the best fixed alpha)"})
    decision: str = field(default="tokens:8", metadata={"help": "decision points (tokens:K | budget)"})
    gamma: int = field(default=4, metadata={"help": "SSS draft tokens per block"})
    max_batch_tokens: int = field(default=1_000_000, metadata={"help": "token budget"})
    seed: int = field(default=0, metadata={"help": "base seed; every prompt has its own stream"})
    threads: int = field(default=0, metadata={"help": "torch threads (0 = leave as is)"})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16"})
    output_dir: str = field(default="benchmarks/results/w2s", metadata={"help": "results.json, table.md, frontier.png"})

    def validate(self) -> "W2SBenchConfig":
        for name in ("bon_n", "sss_bon_n"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise SpecError(f"{name.replace('_', '-')} must be a power of 2 >= 1, got {v}")
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown:
            raise SpecError(f"unknown w2s methods {unknown}: use some of {', '.join(ALL_METHODS)}")
        for a in [self.alpha, *self.judge_alphas]:
            if not 0 <= a < 1:
                raise SpecError(f"alpha must be in [0, 1), got {a}")
        if self.n < 1 or self.max_new_tokens < 1 or self.gamma < 1:
            raise SpecError("n, max-new-tokens and gamma must be >= 1")
        for path, what in ((self.dpo, "dpo"), (self.value, "value")):
            if path and not Path(path).is_dir():
                raise SpecError(f"--{what} {path}: directory not found (train it first, or leave it out)")
        return self


class Setup:
    """The models and scorers of one study, loaded once."""

    def __init__(self, cfg: W2SBenchConfig):
        from ..decode.cost import count_params
        from ..decode.sampling import SamplingParams
        from ..models.loading import load_model, load_tokenizer
        from ..models.scorers import build_scorer
        self.cfg = cfg
        self.params = SamplingParams(cfg.temperature, 0, cfg.top_p)
        self.target = load_model(cfg.model, cfg.dtype)
        self.tok = load_tokenizer(cfg.model)
        self.target_params = count_params(self.target)
        self.judge = build_scorer(cfg.judge, generator_model=self.target, generator_tokenizer=self.tok,
                                  dtype=cfg.dtype)
        self.value = (build_scorer(f"value:{cfg.value}", generator_model=self.target, generator_tokenizer=self.tok,
                                   dtype=cfg.dtype) if cfg.value else None)
        self.draft = load_model(cfg.dpo, cfg.dtype) if cfg.dpo else None  # PEFT: Qr; adapter disabled: Q0
        self.skipped = {}
        for m in cfg.methods:
            if "sss" in m and self.draft is None:
                self.skipped[m] = "no --dpo adapter"
            elif "value" in m and self.value is None:
                self.skipped[m] = "no --value head"
        self.methods = [m for m in cfg.methods if m not in self.skipped]

    def sampler(self):
        from ..decode.generators import SamplingGenerator
        return SamplingGenerator(self.target, self.tok, self.params, self.cfg.max_new_tokens)

    def sss(self):
        from ..decode.sss import SSSGenerator
        return SSSGenerator(self.target, self.draft, None, self.tok, self.params, self.cfg.max_new_tokens,
                            gamma=self.cfg.gamma, draft_tokenizer=self.tok)

    def spr(self, adaptive: bool = False, alpha: float | None = None):
        from ..decode.adaptive import AdaptiveRejection
        from ..decode.spec_rejection import SpeculativeRejection
        if adaptive:
            return AdaptiveRejection(n=self.cfg.n, decision=self.cfg.decision, max_batch_tokens=self.cfg.max_batch_tokens)
        return SpeculativeRejection(n=self.cfg.n, alpha=self.cfg.alpha if alpha is None else alpha,
                                    decision=self.cfg.decision,
                                    max_batch_tokens=self.cfg.max_batch_tokens)


def _costs(generator) -> dict:
    cost = {name: c.as_dict() for name, c in generator.cost.items()}
    return {"target_positions": cost["target"]["positions"], "target_calls": cost["target"]["calls"],
            "flops": sum(c["flops"] for c in cost.values()),
            "positions": {name: c["positions"] for name, c in cost.items()}}


def measure(setup: Setup, generator, selector, scorer, prompt, ids, seed: int) -> dict:
    """One selector run on one prompt: its answer's gold score, the generator's cost, wall time."""
    from ..models.scorers import ScorerCost
    generator.reset_cost()
    if scorer is not None:
        scorer.cost = ScorerCost()
    start = time.perf_counter()
    result = selector.run(generator, scorer, prompt, ids, torch.Generator().manual_seed(seed))
    wall = time.perf_counter() - start
    best = result["candidates"][result["best"]]
    gold = setup.judge([best])[0] if scorer is not setup.judge else result["scores"][result["best"]]
    out = {"gold": gold, "wall_s": wall, "tokens": len(best.response_ids), **_costs(generator),
           "scorer_positions": scorer.cost.positions if scorer is not None else 0}
    if hasattr(generator, "stats"):
        stats = generator.stats()
        out["target_calls_per_token"] = stats.get("target_calls_per_token")
        out["acceptance_rate"] = stats.get("acceptance_rate")
    if "rounds" in result:
        out["rounds"] = [[r["decision_tokens"], r["rows"], r["kept"]] for r in result["rounds"]]
    return out


def sample_batch(setup: Setup, generator, m: int, prompt, ids, seed: int) -> dict:
    """m samples in one batch, each judged: the raw material of a Best-of-N curve."""
    from ..decode.best_of_n import BestOfN
    generator.reset_cost()
    start = time.perf_counter()
    result = BestOfN(n=m, max_batch_tokens=setup.cfg.max_batch_tokens).run(
        generator, setup.judge, prompt, ids, torch.Generator().manual_seed(seed))
    wall = time.perf_counter() - start
    cost = _costs(generator)
    prefill = len(ids)
    out = {"gold": result["scores"], "wall_s": wall, "prefill": prefill,
           "decode_target_positions": cost["target_positions"] - prefill,
           "flops": cost["flops"], "tokens": [len(c.response_ids) for c in result["candidates"]]}
    if hasattr(generator, "stats"):
        out["target_calls_per_token"] = generator.stats().get("target_calls_per_token")
    return out


def run_prompt(setup: Setup, index: int, prompt: str) -> dict:
    from ..decode.api import prompt_seed
    from ..models.loading import chat_prompt
    cfg = setup.cfg
    ids = chat_prompt(setup.tok, prompt)
    seed = prompt_seed(cfg.seed, index)
    rec = {"index": index, "prompt": prompt, "prompt_len": len(ids)}
    methods = set(setup.methods)
    if methods & {"sample", "best-of-n"}:
        rec["best-of-n"] = sample_batch(setup, setup.sampler(), cfg.bon_n, prompt, ids, seed)
    if "best-of-n+sss" in methods:
        rec["best-of-n+sss"] = sample_batch(setup, setup.sss(), cfg.sss_bon_n, prompt, ids, seed)
    from ..decode.best_of_n import BestOfN
    runs = {
        "spr-judge": lambda: (setup.sampler(), setup.spr(), setup.judge),
        "spr-value": lambda: (setup.sampler(), setup.spr(), setup.value),
        "spr-adaptive": lambda: (setup.sampler(), setup.spr(adaptive=True), setup.judge),
        "spr-adaptive-value": lambda: (setup.sampler(), setup.spr(adaptive=True), setup.value),
        "sss": lambda: (setup.sss(), BestOfN(n=1), None),
        "spr+sss-implicit": lambda: (setup.sss(), setup.spr(), _implicit()),
        "spr+sss-value": lambda: (setup.sss(), setup.spr(), setup.value),
    }
    for name, make in runs.items():
        if name in methods:
            gen, selector, scorer = make()
            rec[name] = measure(setup, gen, selector, scorer, prompt, ids, seed)
    if "spr-judge" in methods:
        for a in cfg.judge_alphas:
            rec[f"spr-judge@{a}"] = measure(setup, setup.sampler(), setup.spr(alpha=a), setup.judge, prompt, ids, seed)
    return rec


def _implicit():
    from ..models.scorers import build_scorer
    return build_scorer("implicit")


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def curve(records: list[dict], key: str, m: int, params: int) -> list[dict]:
    """Best-of-N points N = 1, 2, 4, ..., m from each prompt's m judged samples."""
    points = []
    for n in powers_of_two(m):
        points.append({
            "n": n, "mean_gold": _mean(expected_best_of(r[key]["gold"], n) for r in records),
            "target_positions": _mean(r[key]["prefill"] + n / m * r[key]["decode_target_positions"] for r in records),
            "flops": _mean(n / m * r[key]["flops"] for r in records),
            "wall_s": _mean(n / m * r[key]["wall_s"] for r in records), "wall_measured": n == m})
    return points


def aggregate(cfg: W2SBenchConfig, records: list[dict], methods: list[str], params: int) -> dict:
    out: dict = {"methods": []}
    bon = curve(records, "best-of-n", cfg.bon_n, params) if records and "best-of-n" in records[0] else []
    out["best_of_n_curve"] = bon
    if records and "best-of-n+sss" in records[0]:
        sss_curve = curve(records, "best-of-n+sss", cfg.sss_bon_n, params)
        calls = [r["best-of-n+sss"].get("target_calls_per_token") for r in records]
        for p in sss_curve:
            p["target_calls_per_token"] = _mean(c for c in calls if c is not None)
        out["best_of_n_sss_curve"] = sss_curve
    ref_c = [p["target_positions"] for p in bon]
    ref_w = [p["wall_s"] for p in bon]
    ref_s = [p["mean_gold"] for p in bon]

    def add(name, params_, gold, positions, flops, wall, extra=None):
        row = {"method": name, "params": params_, "mean_gold": gold, "target_positions": positions, "flops": flops,
               "wall_s": wall, **(extra or {})}
        if bon:
            need, rel = reference_compute_for(gold, ref_c, ref_s)
            need_w, rel_w = reference_compute_for(gold, ref_w, ref_s)
            row["bon_equivalent"] = {"target_positions": need, "relation": rel, "speedup": need / positions,
                                     "wall_s": need_w, "wall_relation": rel_w, "wall_speedup": need_w / wall}
        out["methods"].append(row)

    for p in bon:
        if p["n"] == 1 and "sample" in methods:
            add("sample", {"n": 1}, p["mean_gold"], p["target_positions"], p["flops"], p["wall_s"])
    if "best-of-n" in methods:
        for p in bon:
            add("best-of-n", {"n": p["n"]}, p["mean_gold"], p["target_positions"], p["flops"], p["wall_s"],
                {"wall_measured": p["wall_measured"]})
    for p in out.get("best_of_n_sss_curve", []):
        add("best-of-n+sss", {"n": p["n"]}, p["mean_gold"], p["target_positions"], p["flops"], p["wall_s"],
            {"wall_measured": p["wall_measured"], "target_calls_per_token": p["target_calls_per_token"]})
    names = list(methods)
    if "spr-judge" in methods:
        names[names.index("spr-judge") + 1:names.index("spr-judge") + 1] = [f"spr-judge@{a}" for a in cfg.judge_alphas]
    for key in names:
        if key in ("sample", "best-of-n", "best-of-n+sss"):
            continue
        name, _, alpha = key.partition("@")
        alpha = float(alpha) if alpha else cfg.alpha
        runs = [r[key] for r in records]
        extra = {"mean_tokens": _mean(x["tokens"] for x in runs),
                 "scorer_positions": _mean(x["scorer_positions"] for x in runs)}
        calls = [x.get("target_calls_per_token") for x in runs if x.get("target_calls_per_token") is not None]
        if calls:
            extra["target_calls_per_token"] = _mean(calls)
            extra["acceptance_rate"] = _mean(x["acceptance_rate"] for x in runs)
        if "rounds" in runs[0]:
            extra["rounds_first_prompt"] = runs[0]["rounds"]
        params_ = {} if name == "sss" else {"n": cfg.n, "alpha": "auto" if "adaptive" in name else alpha,
                                            "decision": cfg.decision}
        if "sss" in name:
            params_["gamma"] = cfg.gamma
        add(name, params_, _mean(x["gold"] for x in runs), _mean(x["target_positions"] for x in runs),
            _mean(x["flops"] for x in runs), _mean(x["wall_s"] for x in runs), extra)
    out["targets"] = check_targets(out)
    out["frontier"] = pareto(out["methods"])
    return out


def _find(methods, name, n=None):
    for m in methods:
        if m["method"] == name and (n is None or m["params"].get("n") == n):
            return m
    return None


def pareto(methods: list[dict]) -> list[str]:
    """Labels of the points no other point beats on both score (higher) and target positions (lower)."""
    pts = [(m["target_positions"], m["mean_gold"], label(m)) for m in methods]
    return [lab for c, s, lab in pts if not any(c2 <= c and s2 >= s and (c2 < c or s2 > s) for c2, s2, _ in pts)]


def label(m: dict) -> str:
    p = m["params"]
    if m["method"] in ("best-of-n", "best-of-n+sss"):
        return f"{m['method']} N={p['n']}"
    if m["method"] == "spr-judge":
        return f"spr-judge a={p['alpha']}"
    return m["method"]


def check_targets(agg: dict) -> dict:
    """The issue's targets, on the measured numbers (None = a method needed was not run)."""
    methods = agg["methods"]
    out = {}
    value, judge = _find(methods, "spr-value"), _find(methods, "spr-judge")
    if value and judge:
        ratio = judge["target_positions"] / value["target_positions"]
        out["value_vs_partial_text"] = {
            "target": ">= 1.5x less target compute than spr-judge at equal score",
            "compute_ratio": ratio, "score_value": value["mean_gold"], "score_judge": judge["mean_gold"],
            "bon_speedup_value": value.get("bon_equivalent", {}).get("speedup"),
            "bon_speedup_judge": judge.get("bon_equivalent", {}).get("speedup"),
            "met": ratio >= 1.5 and value["mean_gold"] >= judge["mean_gold"]}
    sss, sample, bo8 = _find(methods, "sss"), _find(methods, "sample"), _find(methods, "best-of-n", 8)
    if sss and sample and bo8:
        ratio = sss["target_positions"] / sample["target_positions"]
        calls = sss.get("target_calls_per_token")
        out["sss"] = {"target": "gold >= Best-of-8 at <= 1.3x sampling's target compute, <= 0.5 target calls/token",
                      "score": sss["mean_gold"], "best_of_8": bo8["mean_gold"], "compute_vs_sampling": ratio,
                      "target_calls_per_token": calls,
                      "met": sss["mean_gold"] >= bo8["mean_gold"] and ratio <= 1.3 and calls is not None
                      and calls <= 0.5}
    fixed = [m for m in methods if m["method"] == "spr-judge"]
    adaptive = _find(methods, "spr-adaptive")
    if fixed and adaptive:
        beaten = [m["params"]["alpha"] for m in fixed if m["target_positions"] <= adaptive["target_positions"]
                  and m["mean_gold"] >= adaptive["mean_gold"]]
        best = max(fixed, key=lambda m: (m["mean_gold"], -m["target_positions"]))
        out["adaptive_vs_fixed_alpha"] = {
            "target": "spr-adaptive not dominated by any fixed alpha (score >= and target compute <=)",
            "adaptive": {"score": adaptive["mean_gold"], "target_positions": adaptive["target_positions"]},
            "fixed": [{"alpha": m["params"]["alpha"], "score": m["mean_gold"],
                       "target_positions": m["target_positions"]} for m in fixed],
            "best_fixed_alpha": best["params"]["alpha"], "dominated_by": beaten, "met": not beaten}
    combo = [m for m in methods if m["method"].startswith("spr+sss")]
    if combo:
        frontier = pareto(methods)
        on = [label(m) for m in combo if label(m) in frontier]
        out["sss_x_spr_frontier"] = {"target": "SSS x Speculative Rejection has the best score-per-compute frontier",
                                     "on_frontier": on, "frontier": frontier,
                                     "met": bool(on) and all(lab.startswith("spr+sss") or lab == "sample" or
                                                             lab == "sss" for lab in frontier)}
    return out


def table(report: dict) -> str:
    cfg = report["config"]
    agg = report["results"]
    lines = [f"Target `{cfg['model']}`, gold judge `{cfg['judge']}`, {report['prompts']} held-out prompts, "
             f"max {cfg['max_new_tokens']} new tokens, temperature {cfg['temperature']}, {report['torch_threads']} "
             f"thread(s). Speculative Rejection: N={cfg['n']}, alpha={cfg['alpha']} (or auto), {cfg['decision']}. "
             f"Per prompt means. Best-of-N curves: expected best of N from one batch (wall at N < M is N/M of "
             f"the batch's). BoN-equivalent speedup = target positions Best-of-N needs for the same mean gold "
             f"score / the method's.", ""]
    rows = []
    for m in agg["methods"]:
        eq = m.get("bon_equivalent") or {}
        rel = {"=": "", ">=": ">=", "<=": "<="}.get(eq.get("relation"), "")
        rows.append({"method": m["method"], "params": " ".join(f"{k}={v}" for k, v in m["params"].items()),
                     "gold": m["mean_gold"], "pos": round(m["target_positions"]), "tflops": m["flops"] / 1e12,
                     "wall": m["wall_s"], "calls": m.get("target_calls_per_token"),
                     "speedup": f"{rel}{eq['speedup']:.2f}x" if eq else "-"})
    lines.append(markdown_table(rows, [("method", "method"), ("params", "params"), ("gold", "mean gold score"),
                                       ("pos", "target positions"), ("tflops", "TFLOPs (all models)"),
                                       ("wall", "wall s"), ("calls", "target calls / token"),
                                       ("speedup", "BoN-equivalent speedup")]))
    lines += ["", "Targets:", ""]
    for name, t in agg["targets"].items():
        detail = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in t.items() if k not in ("target", "met")}
        lines.append(f"- {name}: {t['target']} -- {'MET' if t['met'] else 'missed'} ({json.dumps(detail)})")
    if report.get("skipped"):
        lines += ["", "Skipped: " + ", ".join(f"{k} ({v})" for k, v in report["skipped"].items())]
    return "\n".join(lines) + "\n"


def _marker(method: str) -> str:
    """Squares: Speculative Rejection on target samples; plus: adaptive; diamonds: value-guided; circles: SSS; triangles:
    Best-of-N over SSS (colours repeat after ten points, the marker tells the family)."""
    if method == "best-of-n+sss":
        return "^"
    if "value" in method:
        return "D"
    if "adaptive" in method:
        return "P"
    return "o" if "sss" in method else "s"


def plot(report: dict, out: Path) -> None:
    agg = report["results"]
    panels = []
    for key, xlabel in (("target_positions", "target positions per prompt (log)"), ("wall_s", "wall s per prompt")):
        bon = agg["best_of_n_curve"]
        points = [{"x": m[key], "y": m["mean_gold"], "label": label(m), "marker": _marker(m["method"])}
                  for m in agg["methods"] if m["method"] not in ("best-of-n", "sample") and m[key] > 0]
        panels.append({"title": xlabel, "points": points,
                       "reference": {"x": [p[key] for p in bon], "y": [p["mean_gold"] for p in bon],
                                     "labels": [p["n"] for p in bon], "name": "Best-of-N"} if bon else None})
    plot_score_vs_compute(out / "frontier.png", panels, "compute", "mean gold score",
                          f"{report['config']['model']}: weak-to-strong, {report['prompts']} prompts")


def run(cfg: W2SBenchConfig) -> dict:
    from tqdm.auto import tqdm
    from ..decode.prompts import load_prompts
    cfg.validate()
    set_threads(cfg.threads)
    prompts = load_prompts(prompts=cfg.prompts, limit=cfg.limit)
    setup = Setup(cfg)
    records = []
    start = time.perf_counter()
    for index in tqdm(range(len(prompts)), desc="bench w2s", unit="prompt"):
        records.append(run_prompt(setup, index, prompts[index]))
    return {"config": asdict(cfg), "prompts": len(records), "torch_threads": torch.get_num_threads(),
            "target_params": setup.target_params, "wall_s": round(time.perf_counter() - start, 1),
            "skipped": setup.skipped, "results": aggregate(cfg, records, setup.methods, setup.target_params),
            "per_prompt": records}


def write(report: dict, output_dir) -> Path:
    out = write_results(output_dir, report, table(report))
    plot(report, out)
    return out


def main(args: list[str]) -> int:
    from ..cli import parse_config
    (cfg,) = parse_config([W2SBenchConfig], args, "specalign bench w2s")
    report = run(cfg)
    write(report, cfg.output_dir)
    print(table(report))
    return 0
