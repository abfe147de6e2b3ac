"""``specalign bench spr``: Speculative Rejection vs Best-of-N, the SpR paper's evaluation (Fig. 3).

For every prompt, on the same engine and sampling settings:

1. Best-of-N reference: ``--bon-n`` (M) samples in one batch (one prefill). The curve at
   N = 1, 2, 4, ..., M comes from those samples: the expected best of N drawn without replacement
   (exact order statistics) and, as compute, the prefill plus N/M of the measured decode positions
   (what N of those rows cost; exact in expectation). Wall time at N < M is N/M of the batch-M
   wall time, which favours Best-of-N (small batches run slower per token on CPU), so wall-time
   speedups read off the curve are conservative; at N = M every number is measured.
2. Speculative Rejection, measured: each ``--spr N:ALPHA:DECISION`` entry runs for real per task
   (the task's scorer ranks partial responses), with the same per-prompt seed as the reference.
   ``--bon-direct N ...`` also runs Best-of-N directly at those N (their own batch and samples), to
   measure what the N/M wall-time share leaves out.
3. Speculative Rejection, replayed (``--simulate``): the same algorithm code run on the M recorded
   samples, token by token (``ReplayGenerator``). A survivor's continuation is then its recorded
   one -- a sample from the same conditional distribution as a fresh continuation -- so scores
   and target positions follow the measured algorithm's distribution exactly; wall time is not
   measured. An initial N < M replays M/N disjoint blocks of N rows and averages them.
   Each replay runs once per ``--rankers`` entry: the scorer that ranks *partial* responses
   (finished ones always score the task). ``task`` is the task's scorer on the partial text;
   ``value:DIR`` (or any scorer spec) a learned scorer; ``oracle:M`` the Monte Carlo oracle
   (``specalign.decode.oracle``): the mean task score of M continuations sampled from each prefix, i.e. the best
   speedup any prefix scorer could give at this N, alpha and schedule once M makes its values reliable (a
   small M ranks by noisy values: a lower bound on that ceiling). The oracle's continuations
   are a measuring cost: reported apart (``oracle_cost``), never in the method's target positions.
   When an entry is both measured and replayed, ``replay_minus_measured`` gives the paired
   per-prompt difference (improvement, score, positions) with its standard error.

Tasks (``--tasks``): ``loglik:self`` (the model's own mean log-likelihood, the paper's second task)
and ``judge:sentiment``. Metrics per method: mean score, improvement score (reference BoN0 =
Best-of-``--reference-n``), target positions and FLOPs per prompt, wall time per prompt, speedup
= Best-of-N compute (or wall) at the method's improvement score, by log-linear interpolation, over
the method's; every metric with its standard error over prompts (the speedup's by bootstrap over
prompts). Outputs under ``--output-dir``: results.json, table.md, curve.png, curve_wall.png.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import SpecError
from ..models.scorers import Scorer
from .common import (RecordingSampler, ReplayGenerator, Recorded, expected_best_of, expected_worst_of,
                     bootstrap_speedup, format_speedup, improvement_score, improvement_terms, markdown_table, mean_se, plot_score_vs_compute,
                     powers_of_two, recorded_rows, set_threads, speedup, write_results)
from ..decode.oracle import OracleScorer, parse_oracle


@dataclass
class SprBenchConfig:
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "target model spec"})
    prompts: str = field(default="alpaca_farm_100", metadata={"help": "data set name or prompt file"})
    limit: int = field(default=0, metadata={"help": "first N prompts only (0 = all)"})
    tasks: list[str] = field(default_factory=lambda: ["loglik:self", "judge:sentiment"],
                             metadata={"help": "scorer specs, one task each"})
    max_new_tokens: int = field(default=128, metadata={"help": "new tokens per response"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_k: int = field(default=0, metadata={"help": "0 = off"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus mass"})
    bon_n: int = field(default=128, metadata={"help": "samples per prompt for the Best-of-N curve (a power of 2)"})
    reference_n: int = field(default=2, metadata={"help": "BoN0 of the improvement score (>= 2)"})
    spr: list[str] = field(default_factory=lambda: ["128:0.9:tokens:8"],
                           metadata={"help": "measured Speculative Rejection runs, N:ALPHA:DECISION"})
    bon_direct: list[int] = field(default_factory=list,
                                  metadata={"help": "also run Best-of-N directly at these N (own batch, measured wall)"})
    simulate: list[str] = field(default_factory=list,
                                metadata={"help": "Speculative Rejection replayed on the Best-of-N samples"})
    rankers: list[str] = field(default_factory=lambda: ["task"],
                               metadata={"help": "scorers ranking partial responses in --simulate replays: task (the "
                                                 "task's own scorer), oracle:M (Monte Carlo value, M continuations), "
                                                 "or any scorer spec (value:DIR, rm:MODEL, ...)"})
    measured_rankers: list[str] = field(default_factory=list, metadata={
        "help": "also run every --spr entry for real with these rankers (scorer specs such as value:DIR; finished "
                "responses score the task)"})
    oracle_simulate: list[str] = field(default_factory=list, metadata={
        "help": "the --simulate entries oracle rankers replay (default: all; an oracle samples M continuations of "
                "every prefix it ranks, so it is the costly ranker)"})
    oracle_batch_tokens: int = field(default=65536,
                                     metadata={"help": "rows x (prompt + max-new-tokens) per oracle batch"})
    max_batch_tokens: int = field(default=1_000_000, metadata={"help": "token budget (decision=budget)"})
    seed: int = field(default=0, metadata={"help": "base seed; each prompt has its own stream"})
    threads: int = field(default=1, metadata={"help": "torch threads (0 = leave as is)"})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16"})
    output_dir: str = field(default="benchmarks/results/spr", metadata={"help": "results.json, table.md, plots"})
    work_dir: str = field(default="", metadata={"help": "per-prompt records (resumable) and samples.jsonl"})
    aggregate_only: bool = field(default=False, metadata={"help": "report the prompts in --work-dir, run no new ones"})

    def validate(self) -> "SprBenchConfig":
        if self.bon_n < 2 or self.bon_n & (self.bon_n - 1):
            raise SpecError(f"bon-n must be a power of 2 >= 2, got {self.bon_n}")
        if not 2 <= self.reference_n <= self.bon_n:
            raise SpecError(f"reference-n must be in [2, bon-n={self.bon_n}], got {self.reference_n}")
        if not self.tasks:
            raise SpecError("give at least one task (--tasks loglik:self judge:sentiment)")
        if any(not 1 <= n for n in self.bon_direct):
            raise SpecError(f"bon-direct sizes must be >= 1, got {self.bon_direct}")
        for entry in self.spr + self.simulate:
            spr_from_entry(entry, self.max_batch_tokens)
        if not self.rankers:
            raise SpecError("give at least one ranker (--rankers task oracle:8 value:DIR)")
        for ranker in self.measured_rankers:
            if ranker == "task" or parse_oracle(ranker) is not None or ":" not in ranker:
                raise SpecError(f"measured ranker {ranker!r}: give a scorer spec such as value:DIR (the task ranks "
                                "every --spr entry already; oracles are replayed with --rankers)")
        for ranker in self.rankers:
            parse_oracle(ranker)
            if ranker != "task" and ":" not in ranker:
                raise SpecError(f"unknown ranker {ranker!r}: use task, oracle:M or a scorer spec (value:DIR, ...)")
        for entry in self.oracle_simulate:
            if entry not in self.simulate:
                raise SpecError(f"--oracle-simulate {entry}: not one of the --simulate entries {self.simulate}")
        for entry in self.simulate:
            n = spr_from_entry(entry, self.max_batch_tokens).n
            if n > self.bon_n or self.bon_n % n:
                raise SpecError(f"--simulate {entry}: N must divide bon-n={self.bon_n} (it replays those samples)")
        return self

    def replays(self, ranker: str) -> list[str]:
        """The --simulate entries a ranker replays: all of them, or --oracle-simulate for an oracle."""
        return (self.oracle_simulate or self.simulate) if parse_oracle(ranker) is not None else self.simulate


def spr_from_entry(entry: str, max_batch_tokens: int):
    from ..decode.spec_rejection import SpeculativeRejection
    parts = str(entry).split(":", 2)
    if len(parts) != 3 or not parts[0].isdigit():
        raise SpecError(f"Speculative Rejection entries are N:ALPHA:DECISION (e.g. 128:0.9:tokens:8), got {entry!r}")
    return SpeculativeRejection(n=int(parts[0]), alpha=parts[1], decision=parts[2], max_batch_tokens=max_batch_tokens)


def _positions(generator) -> int:
    return sum(c.positions for c in generator.cost.values())


def _spr_record(result, generator, wall: float) -> dict:
    best = result["candidates"][result["best"]]
    return {"score": result["scores"][result["best"]], "positions": _positions(generator), "wall_s": wall,
            "tokens": len(best.response_ids),
            "rounds": [[r["decision_tokens"], r["rows"], r["kept"], r["continuing"]] for r in result["rounds"]]}


def run_best_of_n(config, index: int, prompt: str, tokenizer, scorers: dict, sampler) -> tuple[dict, dict]:
    """Best-of-M on one prompt, scored by every task -> (record, samples line)."""
    from ..decode.api import prompt_seed
    from ..models.loading import chat_prompt
    ids = chat_prompt(tokenizer, prompt)
    m = config.bon_n
    sampler.reset_cost()
    start, cpu = time.perf_counter(), time.process_time()
    sampler.start(ids, m, torch.Generator().manual_seed(prompt_seed(config.seed, index)))
    sampler.advance()
    gen_wall, gen_cpu = time.perf_counter() - start, time.process_time() - cpu
    rows = recorded_rows(sampler)
    candidates = [sampler.candidate(i, prompt) for i in range(m)]
    record = {"index": index, "prompt": prompt, "prompt_len": len(ids),
              "bon": {"decode_positions": _positions(sampler) - len(ids), "gen_wall_s": gen_wall,
                      "gen_cpu_s": gen_cpu, "lengths": [len(c.response_ids) for c in candidates],
                      "reasons": [r.reason for r in rows], "scores": {}, "score_wall_s": {}, "score_cpu_s": {}},
              "spr": {}, "simulated": {}}
    for task, scorer in scorers.items():
        start, cpu = time.perf_counter(), time.process_time()
        record["bon"]["scores"][task] = scorer(candidates)
        record["bon"]["score_wall_s"][task] = time.perf_counter() - start
        record["bon"]["score_cpu_s"][task] = time.process_time() - cpu
    samples = {"index": index, "prompt": prompt, "prompt_ids": ids, "rows": [r.as_dict() for r in rows]}
    if any(r.hidden is not None for r in rows):
        samples["hidden"] = [r.hidden for r in rows]
    return record, samples


def run_measured(config, record: dict, tokenizer, scorers: dict, sampler, rankers: dict | None = None) -> bool:
    """Every ``--spr`` entry the record lacks, run for real with the prompt's seed, ranked by the task and by
    every ``--measured-rankers`` entry; True if any ran."""
    from ..decode.api import prompt_seed
    from ..models.loading import chat_prompt
    from ..models.scorers import ScorerCost
    ids = chat_prompt(tokenizer, record["prompt"])
    ran = False
    direct = record.setdefault("direct", {})
    for n in config.bon_direct:
        if str(n) in direct:
            continue
        sampler.reset_cost()
        start, cpu = time.perf_counter(), time.process_time()
        sampler.start(ids, n, torch.Generator().manual_seed(prompt_seed(config.seed, record["index"])))
        sampler.advance()
        entry = {"positions": _positions(sampler), "gen_wall_s": time.perf_counter() - start,
                 "gen_cpu_s": time.process_time() - cpu, "scores": {}, "score_wall_s": {}, "score_cpu_s": {},
                 "measured_at": time.time()}
        candidates = [sampler.candidate(i, record["prompt"]) for i in range(n)]
        entry["lengths"] = [len(c.response_ids) for c in candidates]
        for task, scorer in scorers.items():
            start, cpu = time.perf_counter(), time.process_time()
            entry["scores"][task] = scorer(candidates)
            entry["score_wall_s"][task] = time.perf_counter() - start
            entry["score_cpu_s"][task] = time.process_time() - cpu
        direct[str(n)] = entry
        ran = True
    measured = [(task, scorer, "task") for task, scorer in scorers.items()]
    measured += [(task, scorer, ranker) for ranker in config.measured_rankers
                 for task, scorer in (rankers or {}).get(ranker, {}).items()]
    for task, scorer, ranker in measured:
        for entry in config.spr:
            key = simulated_key(task, entry, ranker)
            if key in record["spr"]:
                continue
            spr = spr_from_entry(entry, config.max_batch_tokens)
            sampler.reset_cost()
            scorer.cost = ScorerCost()
            start, cpu = time.perf_counter(), time.process_time()
            result = spr.run(sampler, scorer, record["prompt"], ids,
                             torch.Generator().manual_seed(prompt_seed(config.seed, record["index"])))
            record["spr"][key] = _spr_record(result, sampler, time.perf_counter() - start)
            record["spr"][key]["cpu_s"] = time.process_time() - cpu
            record["spr"][key]["measured_at"] = time.time()
            ran = True
    return ran


def simulated_key(task: str, entry: str, ranker: str = "task") -> str:
    return f"{task}|{entry}" if ranker == "task" else f"{task}|{entry}|{ranker}"


class Ranked(Scorer):
    """Finished responses score ``gold`` (the task), partial ones ``partial`` (a ranker on its own scale:
    a value head trained on the task's final scores shares it)."""

    def __init__(self, gold, partial):
        super().__init__()
        self.gold, self.partial, self.name = gold, partial, partial.name

    def _score(self, candidates):
        out = [0.0] * len(candidates)
        for finished, scorer in ((True, self.gold), (False, self.partial)):
            idx = [i for i, c in enumerate(candidates) if c.finished == finished]
            for i, v in zip(idx, scorer([candidates[i] for i in idx])):
                out[i] = v
        return out


def build_rankers(config, model, tokenizer, scorers: dict, eos_ids) -> dict:
    """{ranker spec: {task: scorer}}; ``task`` is the task's own scorer on partial text."""
    from ..decode.sampling import SamplingParams
    from ..models.scorers import build_scorer
    out = {}
    for spec in dict.fromkeys([*config.rankers, *config.measured_rankers]):
        m = parse_oracle(spec)
        if spec == "task":
            out[spec] = dict(scorers)
        elif m is not None:
            out[spec] = {t: OracleScorer(model, tokenizer, gold, m, config.max_new_tokens,
                                         SamplingParams(config.temperature, config.top_k, config.top_p), eos_ids,
                                         config.oracle_batch_tokens) for t, gold in scorers.items()}
        else:
            partial = build_scorer(spec, generator_model=model, generator_tokenizer=tokenizer, dtype=config.dtype)
            out[spec] = {t: Ranked(gold, partial) for t, gold in scorers.items()}
    return out


def run_simulated(config, record: dict, samples: dict, tokenizer, scorers: dict, eos_ids,
                  rankers: dict | None = None) -> bool:
    """Every ``--simulate`` entry x ranker the record lacks, replayed on its recorded samples; True if any ran.
    An oracle ranker's continuations start from the prompt's own stream (seed, index) and are cached over
    the entries of one prompt; their target positions and wall time are recorded apart (``oracle``)."""
    from ..decode.api import prompt_seed
    hidden = samples.get("hidden") or [None] * len(samples["rows"])  # in memory only: never in samples.jsonl
    rows = [Recorded(r["tokens"], r["token_logps"], r["reason"], h) for r, h in zip(samples["rows"], hidden)]
    rankers = rankers if rankers is not None else {"task": scorers}
    ran = False
    for ranker, by_task in rankers.items():
        for task, scorer in by_task.items():
            keys = [(entry, simulated_key(task, entry, ranker)) for entry in config.replays(ranker)]
            if all(key in record["simulated"] for _, key in keys):
                continue
            if isinstance(scorer, OracleScorer):
                scorer.reset(torch.Generator().manual_seed(prompt_seed(config.seed, record["index"]) + 1))
            for entry, key in keys:
                if key in record["simulated"]:
                    continue
                spr = spr_from_entry(entry, config.max_batch_tokens)
                oracle_before = (scorer.target_cost.positions, scorer.target_cost.wall_s) \
                    if isinstance(scorer, OracleScorer) else None
                wall_before = scorer.cost.wall_s
                blocks = []
                for b in range(len(rows) // spr.n):
                    replay = ReplayGenerator(tokenizer, rows[b * spr.n:(b + 1) * spr.n], config.max_new_tokens,
                                             eos_ids)
                    result = spr.run(replay, scorer, record["prompt"], samples["prompt_ids"], None)
                    blocks.append(_spr_record(result, replay, 0.0))
                out = {"score": sum(b["score"] for b in blocks) / len(blocks),
                       "positions": sum(b["positions"] for b in blocks) / len(blocks),
                       "tokens": sum(b["tokens"] for b in blocks) / len(blocks), "blocks": len(blocks),
                       "block_scores": [b["score"] for b in blocks],
                       "ranker_wall_s": (scorer.cost.wall_s - wall_before) / len(blocks),
                       "rounds": blocks[0]["rounds"]}
                if oracle_before is not None:
                    out["oracle_positions"] = scorer.target_cost.positions - oracle_before[0]
                    out["oracle_wall_s"] = scorer.target_cost.wall_s - oracle_before[1]
                    out["ranker_wall_s"] -= out["oracle_wall_s"] / len(blocks)
                record["simulated"][key] = out
                ran = True
    return ran


def _with_se(point: dict, terms, costs, walls=None, boot=None) -> dict:
    """Standard errors over prompts of a point's improvement score, target positions and wall time."""
    point["se"] = {"improvement_score": mean_se(terms)[1], "target_positions": mean_se(costs)[1],
                   "wall_s": mean_se(walls)[1] if walls else None, "speedup": boot}
    return point


def aggregate(config, records: list[dict], params: int) -> dict:
    """Per task: the Best-of-N curve and every SpR point (measured; replayed per ranker) with the paper's
    metrics and standard errors over prompts; the oracle's own cost; replayed - measured, paired."""
    m = config.bon_n
    tasks = {}
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    for task in config.tasks:
        scores = [r["bon"]["scores"][task] for r in records]
        ref_best = [expected_best_of(s, config.reference_n) for s in scores]
        ref_worst = [expected_worst_of(s, config.reference_n) for s in scores]
        bon_wall = [r["bon"]["gen_wall_s"] + r["bon"]["score_wall_s"][task] for r in records]
        has_cpu = all("gen_cpu_s" in r["bon"] for r in records)
        bon_cpu = [r["bon"]["gen_cpu_s"] + r["bon"]["score_cpu_s"][task] for r in records] if has_cpu else None
        methods, curve_pp = [], []
        for n in powers_of_two(m):
            best = [expected_best_of(s, n) for s in scores]
            costs = [r["prompt_len"] + n / m * r["bon"]["decode_positions"] for r in records]
            walls = [n / m * w for w in bon_wall]
            curve_pp.append((best, costs))
            imp, used = improvement_score(best, ref_best, ref_worst)
            methods.append(_with_se({"method": "best-of-n", "params": {"n": n}, "simulated": False,
                                     "mean_score": mean(best), "improvement_score": imp,
                                     "compute": {"target_positions": mean(costs), "flops": 2.0 * params * mean(costs)},
                                     "wall_s": mean(walls),
                                     "cpu_s": mean([n / m * c for c in bon_cpu]) if has_cpu else None,
                                     "wall_measured": n == m,
                                     "mean_tokens": mean([expected_best_of(r["bon"]["scores"][task], n,
                                                                           r["bon"]["lengths"]) for r in records])},
                                    improvement_terms(best, ref_best, ref_worst), costs, walls))
        curve = list(methods)  # the Best-of-N curve from the M samples
        ref_c = [x["compute"]["target_positions"] for x in curve]
        ref_w = [x["wall_s"] for x in curve]
        ref_s = [x["improvement_score"] for x in curve]
        top = curve[-1]
        boot = lambda best, costs: bootstrap_speedup(best, costs, curve_pp, ref_best, ref_worst)  # noqa: E731
        for n in config.bon_direct:
            runs = [r["direct"][str(n)] for r in records]
            best = [max(x["scores"][task]) for x in runs]
            costs = [x["positions"] for x in runs]
            positions = mean(costs)
            walls = [x["gen_wall_s"] + x["score_wall_s"][task] for x in runs]
            wall = mean(walls)
            cpu = mean([x["gen_cpu_s"] + x["score_cpu_s"][task] for x in runs]) if all(
                "gen_cpu_s" in x for x in runs) else None
            imp, used = improvement_score(best, ref_best, ref_worst)
            methods.append(_with_se({"method": "best-of-n", "params": {"n": n, "direct": True}, "simulated": False,
                                     "mean_score": mean(best), "improvement_score": imp,
                                     "compute": {"target_positions": positions, "flops": 2.0 * params * positions},
                                     "wall_s": wall, "wall_measured": True, "cpu_s": cpu,
                                     "mean_tokens": mean([x["lengths"][max(range(n), key=lambda i: x["scores"][task][i])]
                                                          for x in runs]) if all("lengths" in x for x in runs) else None,
                                     "speedup": speedup(imp, positions, ref_c, ref_s),
                                     "speedup_wall": speedup(imp, wall, ref_w, ref_s)},
                                    improvement_terms(best, ref_best, ref_worst), costs, walls, boot(best, costs)))
        entries = [("spr", e, ranker) for ranker in ["task", *config.measured_rankers] for e in config.spr]
        entries += [("simulated", e, ranker) for ranker in config.rankers for e in config.replays(ranker)]
        oracle_cost: dict[str, list] = {}
        for kind, entry, ranker in entries:
            key = simulated_key(task, entry, ranker)
            runs = [r[kind][key] for r in records]
            spr = spr_from_entry(entry, config.max_batch_tokens)
            best = [x["score"] for x in runs]
            costs = [x["positions"] for x in runs]
            positions = mean(costs)
            imp, used = improvement_score(best, ref_best, ref_worst)
            point = {"method": "spec-rejection", "params": {"n": spr.n, "alpha": spr.alpha, "decision": spr.decision},
                     "simulated": kind == "simulated", "ranker": ranker, "mean_score": mean(best),
                     "improvement_score": imp,
                     "compute": {"target_positions": positions, "flops": 2.0 * params * positions},
                     "mean_tokens": mean([x["tokens"] for x in runs]),
                     "speedup": speedup(imp, positions, ref_c, ref_s),
                     "vs_best_of_max": {"n": m, "reaches": imp >= top["improvement_score"],
                                        "compute_ratio": top["compute"]["target_positions"] / positions},
                     "rounds_first_prompt": runs[0]["rounds"]}
            walls = None
            if kind == "spr":
                walls = [x["wall_s"] for x in runs]
                wall = mean(walls)
                point["wall_s"] = wall
                point["speedup_wall"] = speedup(imp, wall, ref_w, ref_s)
                point["vs_best_of_max"]["wall_ratio"] = top["wall_s"] / wall
                if top.get("cpu_s") is not None and all("cpu_s" in x for x in runs):
                    point["cpu_s"] = mean([x["cpu_s"] for x in runs])
                    point["vs_best_of_max"]["cpu_ratio"] = top["cpu_s"] / point["cpu_s"]
            elif all("ranker_wall_s" in x for x in runs):
                point["ranker_wall_s"], point["ranker_wall_se"] = mean_se([x["ranker_wall_s"] for x in runs])
            if kind == "simulated" and all("oracle_positions" in x for x in runs):
                point["oracle_positions"] = mean([x["oracle_positions"] for x in runs])
                costs_o = oracle_cost.setdefault(ranker, [[0.0] * len(runs), [0.0] * len(runs)])
                for i, x in enumerate(runs):
                    costs_o[0][i] += x["oracle_positions"]
                    costs_o[1][i] += x["oracle_wall_s"]
            methods.append(_with_se(point, improvement_terms(best, ref_best, ref_worst), costs, walls,
                                    boot(best, costs)))
        paired = []
        for entry in (e for e in config.spr if e in config.simulate):
            measured = [r["spr"][f"{task}|{entry}"]["score"] for r in records]
            replayed = [r["simulated"][simulated_key(task, entry)]["score"] for r in records]
            tm = improvement_terms(measured, ref_best, ref_worst)
            tr = improvement_terms(replayed, ref_best, ref_worst)
            diff, diff_se = mean_se([b - a if a is not None else None for a, b in zip(tm, tr)])
            raw, raw_se = mean_se([b - a for a, b in zip(measured, replayed)])
            pos, pos_se = mean_se([r["simulated"][simulated_key(task, entry)]["positions"]
                                   - r["spr"][f"{task}|{entry}"]["positions"] for r in records])
            paired.append({"entry": entry, "improvement_diff": diff, "improvement_diff_se": diff_se,
                           "score_diff": raw, "score_diff_se": raw_se, "positions_diff": pos,
                           "positions_diff_se": pos_se, "prompts": len(records)})
        tasks[task] = {"reference_n": config.reference_n, "prompts_used": used, "methods": methods,
                       "replay_minus_measured": paired,
                       "oracle_cost": {k: {"target_positions": mean_se(v[0])[0], "target_positions_se": mean_se(v[0])[1],
                                           "wall_s": mean_se(v[1])[0], "wall_s_se": mean_se(v[1])[1],
                                           "bon_target_positions": top["compute"]["target_positions"]}
                                       for k, v in oracle_cost.items()}}
    return tasks


def _pm(value, se, fmt="{:.1f}") -> str:
    if value is None:
        return "-"
    text = fmt.format(value)
    return text if se is None or se != se else f"{text} ± {fmt.format(se)}"


def table(report: dict) -> str:
    cfg = report["config"]
    out = [f"Model `{cfg['model']}` ({cfg['dtype']}, {report['torch_threads']} thread(s)), {report['prompts']} "
           f"AlpacaFarm prompts, max {cfg['max_new_tokens']} new tokens, temperature {cfg['temperature']}, "
           f"top-p {cfg['top_p']}, top-k {cfg['top_k']}. Best-of-N from {cfg['bon_n']} samples per prompt "
           f"(expected best of N; compute = prefill + N/{cfg['bon_n']} of the decode positions; wall = "
           f"N/{cfg['bon_n']} of the batch-{cfg['bon_n']} wall, measured at N = {cfg['bon_n']}). Improvement "
           f"score reference: Best-of-{cfg['reference_n']}. Compute, wall and CPU time (this process) are per prompt; "
           "± = standard error over prompts (speedup: bootstrap over prompts). Replayed = Speculative Rejection "
           "run on the recorded Best-of-N samples (no wall time), partial responses ranked by the ranker (task = "
           "the task's scorer on the partial text; oracle:M = mean task score of M sampled continuations, the best "
           "any prefix scorer could do; its continuations are a measuring cost, reported below, not in the "
           "method's target positions); finished responses always score the task. Ranker s = the ranker's own "
           "scoring time per prompt.", ""]
    cols = [("method", "method"), ("params", "params"), ("mean_score", "mean score"),
            ("improvement_score", "improvement"), ("positions", "target positions"), ("tflops", "TFLOPs"),
            ("wall_s", "wall s"), ("cpu_s", "CPU s"), ("ranker_s", "ranker s"), ("tokens", "answer tokens"),
            ("speedup", "speedup (compute)"), ("speedup_wall", "speedup (wall)"),
            ("vs_max", f"vs Best-of-{cfg['bon_n']}: compute / wall / CPU")]
    for task, data in report["tasks"].items():
        rows = []
        for x in data["methods"]:
            se = x.get("se", {})
            if x["method"] == "best-of-n":
                name = "Best-of-N (run directly)" if x["params"].get("direct") else "Best-of-N"
                params = f"N={x['params']['n']}"
            else:
                ranker = x.get("ranker", "task")
                name = (f"SpR (replayed, {ranker})" if x["simulated"] else
                        "SpR" if ranker == "task" else f"SpR ({ranker})")
                params = f"N={x['params']['n']} a={x['params']['alpha']} {x['params']['decision']}"
            vs = x.get("vs_best_of_max")
            sp = format_speedup(x.get("speedup"))
            if se.get("speedup") is not None and se["speedup"] == se["speedup"] and sp != "-":
                sp += f" ± {se['speedup']:.2f}"
            rows.append({"method": name, "params": params, "mean_score": x["mean_score"],
                         "improvement_score": _pm(x["improvement_score"], se.get("improvement_score")),
                         "positions": _pm(x["compute"]["target_positions"], se.get("target_positions"), "{:.0f}"),
                         "tflops": x["compute"]["flops"] / 1e12,
                         "wall_s": _pm(x.get("wall_s"), se.get("wall_s"), "{:.3g}"), "cpu_s": x.get("cpu_s"),
                         "ranker_s": _pm(x.get("ranker_wall_s"), x.get("ranker_wall_se"), "{:.3g}"),
                         "tokens": x["mean_tokens"], "speedup": sp,
                         "speedup_wall": format_speedup(x.get("speedup_wall")),
                         "vs_max": "-" if not vs else (f"{'reaches' if vs['reaches'] else 'below'}; "
                                                       f"{vs['compute_ratio']:.2f}x" +
                                                       (f" / {vs['wall_ratio']:.2f}x" if "wall_ratio" in vs else "") +
                                                       (f" / {vs['cpu_ratio']:.2f}x" if "cpu_ratio" in vs else ""))})
        out += [f"### Task `{task}` ({data['prompts_used']} prompts with a non-zero reference spread)", "",
                markdown_table(rows, cols)]
        if data.get("oracle_cost"):
            out += ["Oracle cost (target positions of its continuations per prompt, all --simulate entries; "
                    "values cached across entries), next to Best-of-N's own:", ""]
            out += [markdown_table([{"ranker": k, "positions": _pm(v["target_positions"], v["target_positions_se"],
                                                                   "{:.0f}"),
                                     "wall": _pm(v["wall_s"], v["wall_s_se"], "{:.3g}"),
                                     "bon": round(v["bon_target_positions"])} for k, v in data["oracle_cost"].items()],
                                   [("ranker", "ranker"), ("positions", "oracle target positions"),
                                    ("wall", "oracle wall s"), ("bon", f"Best-of-{cfg['bon_n']} target positions")])]
        if data.get("replay_minus_measured"):
            out += ["Replayed - measured, paired per prompt (same prompts, same first-round samples):", ""]
            out += [markdown_table([{"entry": d["entry"], "imp": _pm(d["improvement_diff"], d["improvement_diff_se"]),
                                     "score": _pm(d["score_diff"], d["score_diff_se"], "{:.4f}"),
                                     "pos": _pm(d["positions_diff"], d["positions_diff_se"], "{:.0f}")}
                                    for d in data["replay_minus_measured"]],
                                   [("entry", "entry"), ("imp", "improvement"), ("score", "mean score"),
                                    ("pos", "target positions")])]
    return "\n".join(out)


def plots(report: dict, output_dir: Path) -> None:
    """curve.png (improvement vs target positions) and curve_wall.png (vs wall time, measured runs only):
    Best-of-N as the reference line, measured SpR as filled squares, replayed SpR as dashed lines over
    alpha, one per (N, decision)."""
    for fname, key, xlabel in (("curve.png", "compute", "target positions per prompt (log)"),
                               ("curve_wall.png", "wall", "wall seconds per prompt (log)")):
        panels = []
        for task, data in report["tasks"].items():
            bon = [x for x in data["methods"] if x["method"] == "best-of-n" and not x["params"].get("direct")]
            value = (lambda x: x["compute"]["target_positions"]) if key == "compute" else (lambda x: x.get("wall_s"))
            points, series = [], {}
            for x in data["methods"]:
                if x in bon or value(x) is None:
                    continue
                p = x["params"]
                if x["method"] == "best-of-n":
                    points.append({"x": value(x), "y": x["improvement_score"], "marker": "^",
                                   "label": f"Best-of-{p['n']} run directly (measured)"})
                elif x["simulated"]:
                    series.setdefault((p["n"], p["decision"], x.get("ranker", "task")), []).append(
                        (p["alpha"], value(x), x["improvement_score"]))
                else:
                    points.append({"x": value(x), "y": x["improvement_score"], "marker": "s",
                                   "label": f"SpR N={p['n']} a={p['alpha']} {p['decision']} (measured)"})
            lines = []
            for (n, decision, ranker), pts in series.items():
                pts.sort()
                lines.append({"x": [v for _, v, _ in pts], "y": [y for _, _, y in pts], "hollow": True,
                              "labels": [f"{a:g}" for a, _, _ in pts],
                              "label": f"SpR N={n} {decision} (replayed, {ranker}; alpha at points)"})
            panels.append({"title": f"{task}", "points": points, "series": lines,
                           "reference": {"x": [value(x) for x in bon], "y": [x["improvement_score"] for x in bon],
                                         "labels": [x["params"]["n"] for x in bon], "name": "Best-of-N"}})
        plot_score_vs_compute(output_dir / fname, panels, xlabel, "improvement score",
                              f"{report['config']['model']}, {report['prompts']} prompts")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, items: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(x) + "\n" for x in items), encoding="utf-8")
    tmp.replace(path)


def run(config: SprBenchConfig) -> dict:
    """Every prompt: Best-of-M, then the measured and replayed SpR entries. With ``--work-dir``,
    prompts already recorded there are not re-run; entries they lack are added (measured ones then
    run later than their Best-of-M reference: ``measured_at`` records when)."""
    from tqdm.auto import tqdm
    from ..decode.cost import count_params
    from ..decode.prompts import load_prompts
    from ..decode.sampling import SamplingParams
    from ..models.loading import load_model, load_tokenizer
    from ..models.scorers import build_scorer
    config.validate()
    set_threads(config.threads)
    prompts = load_prompts(prompts=config.prompts, limit=config.limit)
    model = load_model(config.model, config.dtype)
    tokenizer = load_tokenizer(config.model)
    sampler = RecordingSampler(model, tokenizer, SamplingParams(config.temperature, config.top_k, config.top_p),
                               config.max_new_tokens)
    scorers = {t: build_scorer(t, generator_model=model, generator_tokenizer=tokenizer, dtype=config.dtype)
               for t in config.tasks}
    rankers = build_rankers(config, model, tokenizer, scorers, sampler.eos_ids)
    if any(getattr(getattr(sc, "partial", sc), "needs_hidden", False) for by_task in rankers.values()
           for sc in by_task.values()):
        sampler.track_hidden()  # a value head on the target's own states ranks some runs
    work = Path(config.work_dir) if config.work_dir else None
    done, samples = {}, {}
    if work:
        work.mkdir(parents=True, exist_ok=True)
        (work / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
        same = lambda r: r["index"] < len(prompts) and prompts[r["index"]] == r["prompt"]  # noqa: E731
        done = {r["index"]: r for r in _read_jsonl(work / "records.jsonl") if same(r)}
        samples = {s["index"]: s for s in _read_jsonl(work / "samples.jsonl") if same(s)}
    records = []
    bar = tqdm(range(len(prompts)), desc="bench spr", unit="prompt")
    for index in bar:
        if index in done:
            record = done[index]
            changed = False
            if not config.aggregate_only:
                changed = run_measured(config, record, tokenizer, scorers, sampler, rankers)
            if index in samples:
                changed |= run_simulated(config, record, samples[index], tokenizer, scorers, sampler.eos_ids,
                                         rankers)
            if changed:
                _write_jsonl(work / "records.jsonl", [done[i] for i in sorted(done)])
        elif config.aggregate_only:
            continue
        else:
            record, sample = run_best_of_n(config, index, prompts[index], tokenizer, scorers, sampler)
            run_measured(config, record, tokenizer, scorers, sampler, rankers)
            run_simulated(config, record, sample, tokenizer, scorers, sampler.eos_ids, rankers)
            sample.pop("hidden", None)
            if work:
                done[index] = record
                with open(work / "samples.jsonl", "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(sample) + "\n")
                _write_jsonl(work / "records.jsonl", [done[i] for i in sorted(done)])
            bar.set_postfix(bon_s=f"{record['bon']['gen_wall_s']:.0f}")
        records.append(record)
    if not records:
        raise SpecError("no prompts recorded yet: run without --aggregate-only first")
    missing = [simulated_key(t, e, k) for e in config.spr for k in ["task", *config.measured_rankers]
               for t in config.tasks for r in records if simulated_key(t, e, k) not in r["spr"]]
    missing += [f"bon-direct {n}" for n in config.bon_direct for r in records if str(n) not in r.get("direct", {})]
    missing += [simulated_key(t, e, k) for k in config.rankers for e in config.replays(k) for t in config.tasks
                for r in records if simulated_key(t, e, k) not in r["simulated"]]
    if missing:
        raise SpecError(f"entry {missing[0]} is missing from some records: run without --aggregate-only")
    params = count_params(model)
    return {"config": asdict(config), "torch_threads": torch.get_num_threads(), "prompts": len(records),
            "model_params": params, "tasks": aggregate(config, records, params),
            "per_prompt": [{"index": r["index"], "prompt_len": r["prompt_len"],
                            "bon_gen_wall_s": r["bon"]["gen_wall_s"],
                            "bon_decode_positions": r["bon"]["decode_positions"],
                            "bon_mean_tokens": sum(r["bon"]["lengths"]) / len(r["bon"]["lengths"]),
                            "bon_capped": sum(x == "length" for x in r["bon"]["reasons"]),
                            "direct": {n: {"positions": d["positions"], "gen_wall_s": d["gen_wall_s"]}
                                       for n, d in r.get("direct", {}).items() if int(n) in config.bon_direct},
                            "spr": {k: v for k, v in r["spr"].items() if k.split("|")[1] in config.spr},
                            "simulated": {k: {kk: vv for kk, vv in v.items() if kk != "rounds"}
                                          for k, v in r["simulated"].items() if k.split("|")[1] in config.simulate}}
                           for r in records]}


def main(args: list[str]) -> int:
    from ..cli import parse_config
    (config,) = parse_config([SprBenchConfig], args, "specalign bench spr")
    report = run(config)
    out = write_results(config.output_dir, report, table(report))
    plots(report, out)
    print(table(report))
    return 0


if __name__ == "__main__":  # pragma: no cover
    import sys
    sys.exit(main(sys.argv[1:]))
