"""``specalign bench w2s``: the weak-to-strong study -- gold judge score against target compute.

On held-out prompts, the same target P (unaligned), per-prompt seeds shared by every method, and one
gold judge that scores every method's answer:

    sample              one target sample (N = 1 of the Best-of-N batch)
    best-of-n           Best-of-N by the gold judge, N = 1, 2, 4, ..., --bon-n, from one batch of --bon-n
                        samples (expected best of N over the batch's subsets)
    draft               the aligned draft Qr sampled alone (no target call at all)
    sss                 Reward-Shifted Speculative Sampling, t ~ p (qr/q0)^lambda, for every lambda of
                        --shift-lambdas (--sss-bon-n samples per prompt and lambda)
    best-of-n+sss       Best-of-N by the gold judge over the SSS samples at --shift-lambda
    spr-judge           Speculative Rejection, the gold judge on partial text ranks rows (+ --judge-alphas)
    spr-value           Speculative Rejection ranked by a value head (value:DIR, --value)
    spr-target-value    ranked by a value head on the target's own features (value:DIR, --target-value)
    spr-adaptive        --alpha auto with the judge (and spr-adaptive-value with the value head)
    spr+sss-implicit    N SSS rows (lambda = --shift-lambda) pruned by Speculative Rejection on the free
                        implicit reward sum log(qr/q0)
    spr+sss-value       the same, ranked by --value (spr+sss-target-value is listed as skipped: the
                        target-feature head needs the target's state after every emitted token, which
                        SSS's verification does not compute for the token it resamples)

Per method: mean gold score with its standard error over prompts; its paired difference with target
sampling and with Best-of-N at matched compute (the largest N whose target positions, or target
calls, are at most the method's; N = 1 when every N costs more); target forward calls per prompt
(sequential forwards: what a GPU pays) and per emitted token; target positions per prompt (what a
CPU pays); FLOPs of all models; acceptance; and the target's mean log-probability per emitted token
of the method's answers (one extra target forward, not counted as cost): how far the output moved
from the target. ``targets`` checks the issue's targets on the measured numbers.

Every prompt's records are kept in ``--work-dir`` (default ``OUTPUT_DIR.work``), one JSON file per
prompt, each method's record under a fingerprint of the settings it depends on (the DPO adapter and
value heads by their files): a re-run reuses what matches and runs the rest, so the study resumes
after a stop, and adding a method or a lambda runs only that. Outputs under ``--output-dir``:
results.json, table.md, frontier.png (gold against target calls and against target positions).
``--num-processes K`` fills the records in K processes (one shard each) before writing the results.
Methods whose models are missing (no --dpo: no draft / SSS; no --value / --target-value: no value
methods) are left out and listed under ``skipped``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import SpecError
from ..train.metrics import mean_se, paired, sequence_logps
from .common import expected_best_of, markdown_table, powers_of_two, reference_compute_for, set_threads, write_results

ALL_METHODS = ["sample", "best-of-n", "draft", "sss", "best-of-n+sss", "spr-judge", "spr-value", "spr-target-value",
               "spr-adaptive", "spr-adaptive-value", "spr+sss-implicit", "spr+sss-value", "spr+sss-target-value"]
SPR_SCORERS = {"spr-judge": "judge", "spr-value": "value", "spr-target-value": "target_value",
               "spr-adaptive": "judge", "spr-adaptive-value": "value", "spr+sss-implicit": "implicit",
               "spr+sss-value": "value", "spr+sss-target-value": "target_value"}


@dataclass
class W2SBenchConfig:
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "target P (unaligned)"})
    dpo: str | None = field(default=None, metadata={"help": "DPO adapter dir on the draft: Qr (Q0 = its base)"})
    value: str | None = field(default=None, metadata={"help": "value-head model dir (value:DIR scorer)"})
    target_value: str | None = field(default=None, metadata={
        "help": "value head on the target's features (value:DIR; scores the target's rows at no extra forward)"})
    judge: str = field(default="judge:sentiment", metadata={"help": "gold judge (scorer spec)"})
    prompts: str = field(default="alpaca_farm_100", metadata={"help": "held-out prompts"})
    limit: int = field(default=8, metadata={"help": "first N prompts (0 = all)"})
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS), metadata={"help": "methods to run"})
    max_new_tokens: int = field(default=64, metadata={"help": "new tokens per response"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus mass"})
    bon_n: int = field(default=16, metadata={"help": "Best-of-N samples per prompt (a power of 2)"})
    draft_samples: int = field(default=8, metadata={"help": "aligned-draft samples per prompt"})
    shift_lambdas: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0], metadata={
        "help": "SSS shift strengths to sweep (t ~ p (qr/q0)^lambda)"})
    shift_lambda: float = field(default=1.0, metadata={"help": "the shift of best-of-n+sss and spr+sss-*"})
    sss_bon_n: int = field(default=4, metadata={"help": "SSS samples per prompt and lambda (a power of 2; "
                                                        "Best-of-N over SSS draws from them)"})
    n: int = field(default=16, metadata={"help": "initial rows of every Speculative Rejection method"})
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
    work_dir: str | None = field(default=None, metadata={"help": "per-prompt records, reused on a re-run "
                                                                 "(default: OUTPUT_DIR.work)"})
    shard: str = field(default="", metadata={"help": "R/K: fill the work dir's records of prompts i with i %% K == R "
                                                     "only (parallel processes); a run without it writes the results"})
    num_processes: int = field(default=1, metadata={
        "help": "K > 1: K child processes fill the records (--shard R/K each, the cores split between them), "
                "then this one writes the results"})

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
        if self.n < 1 or self.max_new_tokens < 1 or self.gamma < 1 or self.draft_samples < 1:
            raise SpecError("n, max-new-tokens, gamma and draft-samples must be >= 1")
        for lam in [*self.shift_lambdas, self.shift_lambda]:
            if not isinstance(lam, (int, float)) or not math.isfinite(lam):
                raise SpecError(f"shift lambdas must be finite numbers, got {lam!r}")
        if self.shard:
            self.shard_of()
        if self.num_processes < 1:
            raise SpecError(f"num-processes must be >= 1, got {self.num_processes}")
        for path, what in ((self.dpo, "dpo"), (self.value, "value"), (self.target_value, "target-value")):
            if path and not Path(path).is_dir():
                raise SpecError(f"--{what} {path}: directory not found (train it first, or leave it out)")
        return self

    def shard_of(self) -> tuple[int, int]:
        try:
            rank, world = (int(x) for x in self.shard.split("/"))
        except ValueError:
            raise SpecError(f"shard must be R/K with 0 <= R < K, got {self.shard!r}") from None
        if not 0 <= rank < world:
            raise SpecError(f"shard must be R/K with 0 <= R < K, got {self.shard!r}")
        return rank, world

    @property
    def lambdas(self) -> list[float]:
        """The SSS sweep: --shift-lambdas plus --shift-lambda (Best-of-N over SSS draws from its samples)."""
        out = [float(x) for x in self.shift_lambdas]
        if "best-of-n+sss" in self.methods and float(self.shift_lambda) not in out:
            out.append(float(self.shift_lambda))
        return out


def dir_id(path: str | None) -> str | None:
    """A model directory's identity for the cache: its files' names, sizes and modification times."""
    if not path:
        return None
    h = hashlib.sha256(str(Path(path).resolve()).encode())
    for f in sorted(Path(path).iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


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
        self.scorers = {"judge": self.judge}
        for key, path in (("value", cfg.value), ("target_value", cfg.target_value)):
            if path:
                self.scorers[key] = build_scorer(f"value:{path}", generator_model=self.target,
                                                 generator_tokenizer=self.tok, dtype=cfg.dtype)
        self.draft = load_model(cfg.dpo, cfg.dtype) if cfg.dpo else None  # PEFT: Qr; adapter disabled: Q0
        self.ids = {"model": cfg.model, "judge": cfg.judge, "dpo": dir_id(cfg.dpo), "value": dir_id(cfg.value),
                    "target_value": dir_id(cfg.target_value)}
        self.skipped = {}
        for m in cfg.methods:
            if ("sss" in m or m == "draft") and self.draft is None:
                self.skipped[m] = "no --dpo adapter"
            elif "target-value" in m and cfg.target_value is None:
                self.skipped[m] = "no --target-value head"
            elif m == "spr+sss-target-value":
                self.skipped[m] = ("the target-feature head reads the target's state after each emitted token; SSS's "
                                   "verification does not compute it for the token it resamples")
            elif "value" in m and "target-value" not in m and cfg.value is None:
                self.skipped[m] = "no --value head"
        self.methods = [m for m in cfg.methods if m not in self.skipped]

    def scorer(self, key: str):
        if key == "implicit":
            from ..models.scorers import build_scorer
            return build_scorer("implicit")
        return self.scorers[key]

    def sampler(self, model=None):
        from ..decode.generators import SamplingGenerator
        return SamplingGenerator(model if model is not None else self.target, self.tok, self.params,
                                 self.cfg.max_new_tokens)

    def sss(self, shift_lambda: float):
        from ..decode.sss import SSSGenerator
        return SSSGenerator(self.target, self.draft, None, self.tok, self.params, self.cfg.max_new_tokens,
                            gamma=self.cfg.gamma, draft_tokenizer=self.tok, shift_lambda=shift_lambda)

    def spr(self, adaptive: bool = False, alpha: float | None = None):
        from ..decode.adaptive import AdaptiveRejection
        from ..decode.spec_rejection import SpeculativeRejection
        if adaptive:
            return AdaptiveRejection(n=self.cfg.n, decision=self.cfg.decision, max_batch_tokens=self.cfg.max_batch_tokens)
        return SpeculativeRejection(n=self.cfg.n, alpha=self.cfg.alpha if alpha is None else alpha,
                                    decision=self.cfg.decision, max_batch_tokens=self.cfg.max_batch_tokens)

    # -- what each method's record depends on (its cache key) --------------------------------------------
    def fingerprint(self, key: str) -> str:
        cfg = self.cfg
        base = {k: getattr(cfg, k) for k in ("prompts", "max_new_tokens", "temperature", "top_p", "seed",
                                              "max_batch_tokens", "dtype")}
        base.update(model=self.ids["model"], judge=self.ids["judge"], key=key)
        name, _, arg = key.partition("@")
        if name == "best-of-n":
            base["bon_n"] = cfg.bon_n
        elif name == "draft":
            base.update(draft_samples=cfg.draft_samples, dpo=self.ids["dpo"])
        elif name == "sss":
            base.update(sss_bon_n=cfg.sss_bon_n, gamma=cfg.gamma, dpo=self.ids["dpo"])
        else:
            base.update(n=cfg.n, alpha=arg or cfg.alpha, decision=cfg.decision)
            scorer = SPR_SCORERS[name]
            base["scorer"] = self.ids.get(scorer, scorer)
            if "sss" in name:
                base.update(gamma=cfg.gamma, shift_lambda=cfg.shift_lambda, dpo=self.ids["dpo"])
        return hashlib.sha256(json.dumps(base, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _costs(generator, rename: dict | None = None) -> dict:
    cost = {(rename or {}).get(name, name): c.as_dict() for name, c in generator.cost.items()}
    target = cost.get("target", {"positions": 0, "calls": 0})
    return {"target_positions": target["positions"], "target_calls": target["calls"],
            "flops": sum(c["flops"] for c in cost.values()),
            "positions": {name: c["positions"] for name, c in cost.items()}}


def emitted(candidate) -> int:
    """Tokens a row emitted: its response plus the EOS it ended with."""
    return len(candidate.response_ids) + (candidate.reason == "eos")


def target_logp_per_token(setup: Setup, ids: list[int], candidates) -> list[float | None]:
    """The target's mean log-probability per response token of each candidate (None for an empty one):
    one forward of the target over the responses, a measurement outside every method's cost."""
    out: list[float | None] = [None] * len(candidates)
    rows = [i for i, c in enumerate(candidates) if c.response_ids]
    if rows:
        logps = sequence_logps(setup.target, [ids] * len(rows), [candidates[i].response_ids for i in rows],
                               setup.tok.pad_token_id or 0)
        for i, lp in zip(rows, logps):
            out[i] = lp / len(candidates[i].response_ids)
    return out


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
    out = {"gold": gold, "wall_s": wall, "tokens": emitted(best), **_costs(generator),
           "scorer_positions": scorer.cost.positions if scorer is not None else 0,
           "target_logp_per_token": target_logp_per_token(setup, ids, [best])[0]}
    if hasattr(generator, "stats"):
        stats = generator.stats()
        out["target_calls_per_token"] = stats.get("target_calls_per_token")
        out["acceptance_rate"] = stats.get("acceptance_rate")
    if "rounds" in result:
        out["rounds"] = [[r["decision_tokens"], r["rows"], r["kept"]] for r in result["rounds"]]
    return out


def sample_batch(setup: Setup, generator, m: int, prompt, ids, seed: int, rename: dict | None = None) -> dict:
    """m samples in one batch, each judged: the raw material of a Best-of-N curve."""
    from ..decode.best_of_n import BestOfN
    generator.reset_cost()
    start = time.perf_counter()
    result = BestOfN(n=m, max_batch_tokens=setup.cfg.max_batch_tokens).run(
        generator, setup.judge, prompt, ids, torch.Generator().manual_seed(seed))
    wall = time.perf_counter() - start
    cost = _costs(generator, rename)
    prefill = len(ids) if cost["target_positions"] else 0
    out = {"gold": result["scores"], "wall_s": wall, "prefill": prefill,
           "decode_target_positions": cost["target_positions"] - prefill, "target_calls": cost["target_calls"],
           "flops": cost["flops"], "positions": cost["positions"],
           "tokens": [emitted(c) for c in result["candidates"]],
           "target_logp_per_token": target_logp_per_token(setup, ids, result["candidates"])}
    if hasattr(generator, "stats"):
        stats = generator.stats()
        out["target_calls_per_token"] = stats.get("target_calls_per_token")
        out["acceptance_rate"] = stats.get("acceptance_rate")
    return out


def method_keys(setup: Setup) -> list[str]:
    """The records each prompt needs: one per batch method / lambda / selector run."""
    cfg, methods = setup.cfg, set(setup.methods)
    keys = []
    if methods & {"sample", "best-of-n"}:
        keys.append("best-of-n")
    if "draft" in methods:
        keys.append("draft")
    if methods & {"sss", "best-of-n+sss"}:
        lams = cfg.lambdas if "sss" in methods else [float(cfg.shift_lambda)]
        keys += [f"sss@{lam:g}" for lam in lams]
    for name in SPR_SCORERS:
        if name in methods:
            keys.append(name)
            if name == "spr-judge":
                keys += [f"spr-judge@{a:g}" for a in cfg.judge_alphas if a != cfg.alpha]
    return keys


def run_key(setup: Setup, key: str, prompt: str, ids: list[int], seed: int) -> dict:
    cfg = setup.cfg
    name, _, arg = key.partition("@")
    if name == "best-of-n":
        return sample_batch(setup, setup.sampler(), cfg.bon_n, prompt, ids, seed)
    if name == "draft":
        return sample_batch(setup, setup.sampler(setup.draft), cfg.draft_samples, prompt, ids, seed,
                            rename={"target": "draft"})
    if name == "sss":
        return sample_batch(setup, setup.sss(float(arg)), cfg.sss_bon_n, prompt, ids, seed)
    generator = setup.sss(cfg.shift_lambda) if "sss" in name else setup.sampler()
    scorer = setup.scorer(SPR_SCORERS[name])
    if getattr(scorer, "needs_hidden", False):  # the target-feature head reads the rows' states as they sample
        generator.track_hidden()
    selector = setup.spr(adaptive="adaptive" in name, alpha=float(arg) if arg else None)
    return measure(setup, generator, selector, scorer, prompt, ids, seed)


def _write_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def run_prompt(setup: Setup, index: int, prompt: str, work: Path | None = None) -> tuple[dict, int]:
    """Every method's record for one prompt, reusing the work dir's records whose fingerprint matches.
    Returns (record, methods run now)."""
    from ..decode.api import prompt_seed
    from ..models.loading import chat_prompt
    ids = chat_prompt(setup.tok, prompt)
    seed = prompt_seed(setup.cfg.seed, index)
    path = work / f"prompt-{index:04d}.json" if work is not None else None
    cache = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    if cache.get("prompt") != prompt:
        cache = {"prompt": prompt, "records": {}}
    rec = {"index": index, "prompt": prompt, "prompt_len": len(ids)}
    ran = 0
    for key in method_keys(setup):
        fp = setup.fingerprint(key)
        hit = cache["records"].get(key)
        if hit is None or hit.get("fingerprint") != fp:
            hit = cache["records"][key] = {"fingerprint": fp, "record": run_key(setup, key, prompt, ids, seed)}
            ran += 1
            if path is not None:
                _write_atomic(path, cache)
        rec[key] = hit["record"]
    return rec, ran


# -- aggregation ----------------------------------------------------------------------------------------
def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def batch_point(records: list[dict], key: str, n: int) -> dict:
    """Expected best of n from each prompt's batch of m: per-prompt gold, target positions (prefill + n/m
    of the decode positions), target calls (the batch's calls scaled by the expected longest of n rows over
    the longest of m: the forwards a batch of n needs), FLOPs (n/m) and wall time (n/m)."""
    gold, positions, calls, flops, wall = [], [], [], [], []
    for r in records:
        x = r[key]
        m = len(x["gold"])
        gold.append(expected_best_of(x["gold"], n))
        positions.append(x["prefill"] + n / m * x["decode_target_positions"])
        longest = max(x["tokens"]) or 1
        calls.append(x["target_calls"] * expected_best_of(x["tokens"], n) / longest)
        flops.append(n / m * x["flops"])
        wall.append(n / m * x["wall_s"])
    return {"gold": gold, "target_positions": _mean(positions), "target_calls": _mean(calls), "flops": _mean(flops),
            "wall_s": _mean(wall)}


def _per_prompt_logp(x: dict) -> float | None:
    v = x["target_logp_per_token"]
    return _mean(v) if isinstance(v, list) else v


def aggregate(cfg: W2SBenchConfig, records: list[dict], methods: list[str]) -> dict:
    rows: list[dict] = []
    keys = set(records[0]) if records else set()

    def add(method, params, point, extra=None, logp=None):
        row = {"method": method, "params": params, "mean_gold": _mean(point["gold"]),
               "gold_se": mean_se(point["gold"])["se"], "target_calls": point["target_calls"],
               "target_positions": point["target_positions"], "flops": point["flops"], "wall_s": point["wall_s"],
               **(extra or {})}
        if logp is not None:
            stats = mean_se([v for v in logp if v is not None])
            row["target_logp_per_token"], row["target_logp_per_token_se"] = stats["mean"], stats["se"]
        row["_gold"] = point["gold"]
        row["label"] = label(row)
        rows.append(row)

    if "best-of-n" in keys:
        for n in powers_of_two(cfg.bon_n):
            point = batch_point(records, "best-of-n", n)
            logp = [_per_prompt_logp(r["best-of-n"]) for r in records] if n == 1 else None
            if n == 1 and "sample" in methods:
                add("sample", {"n": 1}, point, {"target_calls_per_token": 1.0}, logp)
            if "best-of-n" in methods:
                add("best-of-n", {"n": n}, point, {"target_calls_per_token": 1.0}, logp)
    if "draft" in keys:
        point = batch_point(records, "draft", 1)
        add("draft", {"samples": cfg.draft_samples}, point, {"target_calls_per_token": 0.0},
            [_per_prompt_logp(r["draft"]) for r in records])
    for lam in cfg.lambdas:
        key = f"sss@{lam:g}"
        if key not in keys:
            continue
        runs = [r[key] for r in records]
        extra = {"target_calls_per_token": _mean(x["target_calls_per_token"] for x in runs),
                 "acceptance_rate": _mean(x["acceptance_rate"] for x in runs)}
        if "sss" in methods and lam in [float(x) for x in cfg.shift_lambdas]:
            add("sss", {"lambda": lam, "gamma": cfg.gamma, "samples": cfg.sss_bon_n}, batch_point(records, key, 1),
                extra, [_per_prompt_logp(x) for x in runs])
        if "best-of-n+sss" in methods and lam == float(cfg.shift_lambda):
            for n in powers_of_two(cfg.sss_bon_n):
                add("best-of-n+sss", {"n": n, "lambda": lam, "gamma": cfg.gamma}, batch_point(records, key, n),
                    extra)
    for key in SPR_SCORERS:
        names = [key] + ([f"spr-judge@{a:g}" for a in cfg.judge_alphas if a != cfg.alpha]
                         if key == "spr-judge" else [])
        for name in names:
            if name not in keys:
                continue
            method, _, alpha = name.partition("@")
            runs = [r[name] for r in records]
            params = {"n": cfg.n, "alpha": "auto" if "adaptive" in method else float(alpha or cfg.alpha),
                      "decision": cfg.decision}
            extra = {"mean_tokens": _mean(x["tokens"] for x in runs),
                     "scorer_positions": _mean(x["scorer_positions"] for x in runs),
                     # a sampled row costs one target forward per token; SSS rows report their own rate
                     "target_calls_per_token": _mean(x.get("target_calls_per_token") or 1.0 for x in runs)}
            if "sss" in method:
                params.update(gamma=cfg.gamma, **{"lambda": float(cfg.shift_lambda)})
                extra["acceptance_rate"] = _mean(x["acceptance_rate"] for x in runs)
            extra["rounds_first_prompt"] = runs[0].get("rounds")
            point = {"gold": [x["gold"] for x in runs], "target_positions": _mean(x["target_positions"] for x in runs),
                     "target_calls": _mean(x["target_calls"] for x in runs), "flops": _mean(x["flops"] for x in runs),
                     "wall_s": _mean(x["wall_s"] for x in runs)}
            add(method, params, point, extra, [x["target_logp_per_token"] for x in runs])
    compare(rows)
    out = {"methods": rows, "best_of_n_curve": [r for r in rows if r["method"] == "best-of-n"],
           "frontier_target_calls": pareto(rows, "target_calls"),
           "frontier_target_positions": pareto(rows, "target_positions")}
    out["targets"] = check_targets(out)
    for r in rows:
        r.pop("_gold")
    return out


def matched_bon(rows: list[dict], row: dict, axis: str) -> dict | None:
    """The Best-of-N point at matched compute on ``axis``: the largest N costing at most the method (N = 1
    when every N costs more)."""
    bon = sorted((r for r in rows if r["method"] == "best-of-n"), key=lambda r: r["params"]["n"])
    if not bon:
        return None
    within = [r for r in bon if r[axis] <= row[axis] * (1 + 1e-9)]
    return within[-1] if within else bon[0]


def compare(rows: list[dict]) -> None:
    """Paired differences (over prompts) with target sampling, Best-of-8 and Best-of-N at matched compute;
    and the Best-of-N target positions needed for the method's mean score."""
    sample = next((r for r in rows if r["method"] == "sample"), None)
    bo8 = next((r for r in rows if r["method"] == "best-of-n" and r["params"]["n"] == 8), None)
    bon = [r for r in rows if r["method"] == "best-of-n"]
    for r in rows:
        if sample is not None and r is not sample:
            r["vs_sample"] = paired(r["_gold"], sample["_gold"])
        if bo8 is not None and r is not bo8:
            r["vs_best_of_8"] = paired(r["_gold"], bo8["_gold"])
        for axis in ("target_positions", "target_calls"):
            ref = matched_bon(rows, r, axis)
            if ref is not None and r["method"] not in ("best-of-n", "sample"):  # sample is Best-of-1 itself
                r[f"vs_bon_matched_{axis}"] = {"bon_n": ref["params"]["n"], **paired(r["_gold"], ref["_gold"])}
        if bon and r["target_positions"] > 0:
            need, rel = reference_compute_for(r["mean_gold"], [b["target_positions"] for b in bon],
                                              [b["mean_gold"] for b in bon])
            r["bon_equivalent"] = {"target_positions": need, "relation": rel, "speedup": need / r["target_positions"]}


def label(m: dict) -> str:
    p = m["params"]
    if m["method"] in ("best-of-n", "best-of-n+sss"):
        return f"{m['method']} N={p['n']}"
    if m["method"] == "sss":
        return f"sss lambda={p['lambda']:g}"
    if m["method"] == "spr-judge":
        return f"spr-judge a={p['alpha']:g}"
    return m["method"]


def pareto(methods: list[dict], axis: str) -> list[str]:
    """Labels of the points no other point beats on both mean gold (higher) and ``axis`` (lower)."""
    pts = [(m[axis], m["mean_gold"], m["label"]) for m in methods]
    return [lab for c, s, lab in pts if not any(c2 <= c and s2 >= s and (c2 < c or s2 > s) for c2, s2, _ in pts)]


def _find(methods, name, **params):
    for m in methods:
        if m["method"] == name and all(m["params"].get(k) == v for k, v in params.items()):
            return m
    return None


def check_targets(agg: dict) -> dict:
    """The issue's targets on the measured numbers (a target whose methods did not run is left out)."""
    methods = agg["methods"]
    out = {}
    sss = [m for m in methods if m["method"] == "sss"]
    sample, draft = _find(methods, "sample"), _find(methods, "draft")
    if sss and _find(methods, "best-of-n", n=8):
        per = [{"lambda": m["params"]["lambda"], "gold": m["mean_gold"], "vs_best_of_8": m["vs_best_of_8"],
                "target_calls_per_token": m["target_calls_per_token"]} for m in sss]
        ok = [p for p in per if p["vs_best_of_8"]["diff"] + 2 * (p["vs_best_of_8"]["se"] or 0) >= 0
              and p["target_calls_per_token"] <= 0.75]
        out["sss_reaches_best_of_8"] = {
            "target": "SSS at some lambda: gold not significantly below Best-of-8 (paired diff + 2 se >= 0) at <= 0.75 "
                      "target calls per emitted token", "per_lambda": per,
            "met_at": [p["lambda"] for p in ok], "met": bool(ok)}
    if sss and sample and draft and "target_logp_per_token" in draft:
        ref = sample["target_logp_per_token"]
        per = [{"lambda": m["params"]["lambda"], "target_logp_per_token": m["target_logp_per_token"],
                "distance": abs(m["target_logp_per_token"] - ref)} for m in sss]
        d_draft = abs(draft["target_logp_per_token"] - ref)
        best = max(sss, key=lambda m: m["mean_gold"])["params"]["lambda"]
        closer = [p["lambda"] for p in per if p["distance"] < d_draft]
        out["sss_keeps_target_fluency"] = {
            "target": "SSS's target log-prob per token closer to target sampling's than the aligned draft's is",
            "sample": ref, "draft": draft["target_logp_per_token"], "draft_distance": d_draft, "per_lambda": per,
            "closer_at": closer, "best_gold_lambda": best, "met": best in closer}
    combo = [m for m in methods if m["method"].startswith("spr+sss")]
    if combo:
        frontier = agg["frontier_target_calls"]
        on = [m["label"] for m in combo if m["label"] in frontier]
        out["sss_x_spr_on_frontier"] = {"target": "SSS x Speculative Rejection on the gold-vs-target-calls Pareto "
                                                  "frontier", "on_frontier": on, "frontier": frontier,
                                        "met": bool(on)}
    return out


# -- outputs --------------------------------------------------------------------------------------------
def _pm(mean, se):
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return None
    return f"{mean:.3f} ± {se:.3f}" if se is not None and math.isfinite(se) else f"{mean:.3f}"


def table(report: dict) -> str:
    cfg = report["config"]
    agg = report["results"]
    lines = [f"Target `{cfg['model']}`, gold judge `{cfg['judge']}`, {report['prompts']} held-out prompts "
             f"(`{cfg['prompts']}`), max {cfg['max_new_tokens']} new tokens, temperature {cfg['temperature']}, "
             f"{report['torch_threads']} thread(s), per-prompt seeds shared by every method. Means over prompts ± "
             f"standard error. Best-of-N: expected best of N from one batch of {cfg['bon_n']}. SSS: "
             f"{cfg['sss_bon_n']} samples per prompt and lambda, gamma={cfg['gamma']}. Speculative Rejection: "
             f"N={cfg['n']}, alpha={cfg['alpha']} (or auto), {cfg['decision']}. Δ = paired difference over prompts "
             f"(± its standard error) with Best-of-N at matched target positions (the largest N costing at most the "
             f"method's positions; [N]) and with Best-of-8. Target log-prob = the target's mean log-probability per "
             f"token of the method's answers.", ""]
    rows = []
    for m in agg["methods"]:
        mp, b8 = m.get("vs_bon_matched_target_positions"), m.get("vs_best_of_8")
        rows.append({"method": m["label"], "gold": _pm(m["mean_gold"], m["gold_se"]),
                     "dpos": f"{_pm(mp['diff'], mp['se'])} [{mp['bon_n']}]" if mp else None,
                     "d8": _pm(b8["diff"], b8["se"]) if b8 else None,
                     "calls": m["target_calls"], "cpt": m.get("target_calls_per_token"),
                     "pos": round(m["target_positions"]), "tflops": m["flops"] / 1e12,
                     "logp": _pm(m.get("target_logp_per_token"), m.get("target_logp_per_token_se")),
                     "acc": m.get("acceptance_rate"), "wall": m["wall_s"]})
    lines.append(markdown_table(rows, [("method", "method"), ("gold", "gold"), ("dpos", "Δ vs BoN (matched positions)"),
                                       ("d8", "Δ vs BoN-8"), ("calls", "target calls"),
                                       ("cpt", "target calls / token"), ("pos", "target positions"),
                                       ("tflops", "TFLOPs (all models)"), ("logp", "target log-prob / token"),
                                       ("acc", "acceptance"), ("wall", "wall s")]))
    lines += ["", f"Pareto frontier, gold vs target calls: {', '.join(agg['frontier_target_calls'])}",
              f"Pareto frontier, gold vs target positions: {', '.join(agg['frontier_target_positions'])}",
              "", "Targets:", ""]
    if not agg["targets"]:
        lines.append("- none checked: every target compares SSS methods, which did not run (see Skipped)")
    for name, t in agg["targets"].items():
        detail = {k: v for k, v in t.items() if k not in ("target", "met")}
        lines.append(f"- {name}: {t['target']} -- {'MET' if t['met'] else 'missed'} "
                     f"({json.dumps(_rounded(detail))})")
    if report.get("skipped"):
        lines += ["", "Skipped: " + ", ".join(f"{k} ({v})" for k, v in report["skipped"].items())]
    return "\n".join(lines) + "\n"


def _rounded(obj):
    if isinstance(obj, float):
        return round(obj, 4)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


def _style(method: str) -> tuple[str, str]:
    """(marker, colour) by family."""
    if method == "best-of-n+sss":
        return "^", "tab:purple"
    if method.startswith("spr+sss"):
        return "*", "tab:red"
    if method == "sss":
        return "o", "tab:orange"
    if "value" in method:
        return "D", "tab:green"
    if method.startswith("spr"):
        return "s", "tab:blue"
    return "x", "black"


def plot(report: dict, out: Path) -> None:
    """frontier.png: gold against target calls and against target positions per prompt (log x), error bars =
    standard errors over prompts; Best-of-N as the reference curve; the aligned draft alone (no target
    compute) as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    agg = report["results"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=True)
    for ax, (key, xlabel) in zip(axes, (("target_calls", "target forward calls per prompt (log)"),
                                        ("target_positions", "target positions per prompt (log)"))):
        bon = [m for m in agg["methods"] if m["method"] == "best-of-n"]
        if bon:
            ax.errorbar([m[key] for m in bon], [m["mean_gold"] for m in bon], yerr=[m["gold_se"] or 0 for m in bon],
                        color="grey", marker=".", label="Best-of-N", capsize=2)
            for m in bon:
                ax.annotate(f"N={m['params']['n']}", (m[key], m["mean_gold"]), fontsize=7, color="grey",
                            xytext=(3, -9), textcoords="offset points")
        frontier = set(agg[f"frontier_{key}"])
        for m in agg["methods"]:
            if m["method"] == "best-of-n":
                continue
            if m["method"] == "draft":
                ax.axhline(m["mean_gold"], color="tab:brown", ls="--", lw=1,
                           label=f"aligned draft alone ({m['mean_gold']:.3f}, no target calls)")
                continue
            marker, colour = _style(m["method"])
            ax.errorbar([m[key]], [m["mean_gold"]], yerr=[m["gold_se"] or 0], marker=marker, color=colour,
                        capsize=2, ms=8 if m["label"] in frontier else 5, ls="none")
            ax.annotate(m["label"] + (" (frontier)" if m["label"] in frontier else ""), (m[key], m["mean_gold"]),
                        fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"mean gold score ({report['config']['judge']})")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{report['config']['model']}: weak-to-strong, {report['prompts']} prompts, "
                 f"{report['config']['max_new_tokens']} new tokens")
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=110)
    plt.close(fig)


def run(cfg: W2SBenchConfig) -> dict:
    from tqdm.auto import tqdm
    from ..decode.prompts import load_prompts
    cfg.validate()
    set_threads(cfg.threads)
    prompts = load_prompts(prompts=cfg.prompts, limit=cfg.limit)
    setup = Setup(cfg)
    work = Path(cfg.work_dir or f"{str(cfg.output_dir).rstrip('/')}.work")
    work.mkdir(parents=True, exist_ok=True)
    records, ran = [], 0
    start = time.perf_counter()
    rank, world = cfg.shard_of() if cfg.shard else (0, 1)
    indices = [i for i in range(len(prompts)) if i % world == rank]
    for index in tqdm(indices, desc=f"bench w2s{' shard ' + cfg.shard if cfg.shard else ''}", unit="prompt"):
        rec, n = run_prompt(setup, index, prompts[index], work)
        records.append(rec)
        ran += n
    if cfg.shard:
        return {"shard": cfg.shard, "prompts": len(records), "records_run": ran, "work_dir": str(work)}
    return {"config": asdict(cfg), "prompts": len(records), "torch_threads": torch.get_num_threads(),
            "target_params": setup.target_params, "wall_s": round(time.perf_counter() - start, 1),
            "records_run": ran, "records_reused": len(records) * len(method_keys(setup)) - ran,
            "skipped": setup.skipped, "results": aggregate(cfg, records, setup.methods), "per_prompt": records}


def write(report: dict, output_dir) -> Path:
    out = write_results(output_dir, report, table(report))
    plot(report, out)
    return out


def main(args: list[str]) -> int:
    from ..cli import parse_config
    from ..shards import spawn_shards
    (cfg,) = parse_config([W2SBenchConfig], args, "specalign bench w2s")
    start = time.perf_counter()
    if cfg.num_processes > 1 and not cfg.shard:
        cfg.validate()
        spawn_shards(["bench", "w2s"], args, cfg.num_processes)
    report = run(cfg)
    if cfg.num_processes > 1 and not cfg.shard:
        report["wall_s"] = round(time.perf_counter() - start, 1)  # the shards' time included
    if cfg.shard:
        print(f"shard {cfg.shard}: {report['prompts']} prompts' records in {report['work_dir']} "
              f"({report['records_run']} run now); run without --shard to write the results")
        return 0
    write(report, cfg.output_dir)
    print(table(report))
    return 0
