"""``specalign bench speculative``: speculative sampling vs plain target sampling for a draft/target pair.

For each batch size B (one prompt fanned out to B rows, as Best-of-N does) and each gamma:
- plain target sampling: tokens/s, and the wall time of one target decode step (t_target);
- speculative sampling with the same settings and seeds: tokens/s, the per-position acceptance a
  (accepted / evaluated draft tokens: a block evaluates its drafts up to the first rejection) beside
  accepted / proposed, tokens per target call (per row: emitted tokens / blocks), the wall time of one
  draft step (t_draft) and of one target verification forward over gamma+1 tokens (t_verify);
- theory (Leviathan et al. 2023, with c = t_draft / t_target measured here):
  tokens per target call (1 - a^(gamma+1)) / (1 - a), speedup (1 - a^(gamma+1)) / ((1 - a)(gamma c + 1)).
  That formula assumes verifying gamma+1 tokens costs one target step; on CPU it costs v = t_verify /
  t_target > 1, so the table also gives the same expectation with the measured v:
  (1 - a^(gamma+1)) / ((1 - a)(gamma c + v)).

Writes results.json and table.md under ``--output_dir`` (default benchmarks/results/speculative).
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class SpeculativeBenchConfig:
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "target model spec"})
    draft: str = field(default="outputs/smollm2/draft", metadata={"help": "draft model spec"})
    prompts: str = field(default="alpaca_farm_100", metadata={"help": "data set name or prompt file"})
    num_prompts: int = field(default=3, metadata={"help": "prompts (the first N of the file)"})
    max_new_tokens: int = field(default=48, metadata={"help": "new tokens per row"})
    gammas: list[int] = field(default_factory=lambda: [1, 2, 4, 6], metadata={"help": "draft tokens per block"})
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8], metadata={"help": "rows per prompt"})
    temperature: float = field(default=1.0, metadata={"help": "0 = greedy"})
    top_k: int = field(default=0, metadata={"help": "0 = off"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus mass"})
    eos: bool = field(default=True, metadata={"help": "rows stop at EOS (else exactly max_new_tokens)"})
    threads: int = field(default=0, metadata={"help": "torch threads (0 = leave as is)"})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16"})
    seed: int = field(default=0, metadata={"help": "seed"})
    output_dir: str = field(default="benchmarks/results/speculative", metadata={"help": "where results go"})

    def validate(self) -> "SpeculativeBenchConfig":
        from ..errors import SpecError
        if not self.gammas or min(self.gammas) < 1:
            raise SpecError(f"gammas must be integers >= 1, got {self.gammas}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise SpecError(f"batch_sizes must be integers >= 1, got {self.batch_sizes}")
        if self.num_prompts < 1 or self.max_new_tokens < 1:
            raise SpecError("num_prompts and max_new_tokens must be >= 1")
        return self


def theory(a: float, gamma: int, c: float, verify: float = 1.0) -> tuple[float, float]:
    """(expected tokens per target call, expected speedup) for per-position acceptance a, draft/target step
    cost ratio c and verification cost ``verify`` (in target steps; 1 in the classical formula)."""
    per_call = gamma + 1.0 if a >= 1.0 else (1.0 - a ** (gamma + 1)) / (1.0 - a)
    return per_call, per_call / (gamma * c + verify)


def _prompt_ids(config, tokenizer) -> list[list[int]]:
    from ..decode.prompts import load_prompts
    from ..errors import SpecError
    from ..models.loading import chat_prompt
    try:
        texts = load_prompts(prompts=config.prompts, limit=config.num_prompts)
    except SpecError:
        texts = ["Write a short story about a cat.", "Explain photosynthesis simply.", "Give three tips for sleep."]
        texts = (texts * config.num_prompts)[: config.num_prompts]
    return [chat_prompt(tokenizer, t) for t in texts]


def _run(generator, prompts, rows, seed) -> dict:
    """Every prompt with ``rows`` rows: wall time (prefill included), tokens, and decode-phase costs."""
    from ..decode.cost import ModelCost
    totals, wall, tokens = {}, 0.0, 0
    stats = {"blocks": 0, "proposed": 0, "evaluated": 0, "accepted": 0, "tokens": 0}
    for index, ids in enumerate(prompts):
        rng = torch.Generator().manual_seed(seed + index)
        start = time.perf_counter()
        generator.start(ids, rows, rng)
        prefill = time.perf_counter() - start
        generator.reset_cost()  # the costs below are decode-phase only (prefill is in ``wall``)
        start = time.perf_counter()
        generator.advance()
        wall += prefill + time.perf_counter() - start
        tokens += sum(len(r.tokens) for r in generator.rows)
        for name, cost in generator.cost.items():
            totals.setdefault(name, ModelCost(params=cost.params)).add(cost)
        if hasattr(generator, "stats"):
            for key in stats:
                stats[key] += generator.stats()[key]
    out = {"tokens": tokens, "wall_s": round(wall, 4), "tok_s": round(tokens / wall, 3)}
    for name, cost in totals.items():
        out[name] = {"calls": cost.calls, "positions": cost.positions, "wall_s": round(cost.wall_s, 4),
                     "s_per_call": cost.wall_s / max(1, cost.calls)}
    if hasattr(generator, "stats"):
        out.update(stats)
    return out


def run(config: SpeculativeBenchConfig) -> dict:
    from tqdm.auto import tqdm
    from ..decode.generators import SamplingGenerator, eos_ids_of
    from ..decode.sampling import SamplingParams
    from ..decode.speculative import SpeculativeGenerator, load_draft_tokenizer, same_spec
    from ..models.loading import load_model, load_tokenizer
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    target = load_model(config.model, config.dtype)
    tokenizer = load_tokenizer(config.model)
    if same_spec(config.draft, config.model):
        draft, draft_tok = target, tokenizer
    else:
        draft, draft_tok = load_model(config.draft, config.dtype), load_draft_tokenizer(config.draft)
    params = SamplingParams(config.temperature, config.top_k, config.top_p)
    eos_ids = eos_ids_of(target, tokenizer) if config.eos else set()
    prompts = _prompt_ids(config, tokenizer)
    plain = SamplingGenerator(target, tokenizer, params, config.max_new_tokens, eos_ids=eos_ids)
    cells = [(b, g) for b in config.batch_sizes for g in [0] + list(config.gammas)]
    baseline, results = {}, []
    for batch, gamma in tqdm(cells, desc="bench speculative", unit="cell"):
        if gamma == 0:
            baseline[batch] = _run(plain, prompts, batch, config.seed)
            continue
        gen = SpeculativeGenerator(target, draft, tokenizer, params, config.max_new_tokens, gamma=gamma,
                                   eos_ids=eos_ids, draft_tokenizer=draft_tok)
        spec = _run(gen, prompts, batch, config.seed)
        base = baseline[batch]
        a = spec["accepted"] / max(1, spec["evaluated"])
        t_step = base["target"]["s_per_call"]
        c = spec["draft"]["s_per_call"] / t_step
        v = spec["target"]["s_per_call"] / t_step
        per_call, speedup = theory(a, gamma, c)
        results.append({
            "batch": batch, "gamma": gamma, "acceptance": round(a, 4),
            "accepted_over_proposed": round(spec["accepted"] / max(1, spec["proposed"]), 4),
            "tokens_per_target_call": round(spec["tokens"] / max(1, spec["blocks"]), 4),
            "tokens_per_target_call_theory": round(per_call, 4),
            "cost_ratio_c": round(c, 4), "verify_over_step": round(v, 4),
            "plain_tok_s": base["tok_s"], "spec_tok_s": spec["tok_s"],
            "speedup": round(spec["tok_s"] / base["tok_s"], 4), "speedup_theory": round(speedup, 4),
            "speedup_theory_verify": round(theory(a, gamma, c, v)[1], 4),
            "plain": base, "speculative": spec})
    return {"config": asdict(config), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "results": results,
            "baseline": {str(b): v for b, v in baseline.items()}}


def table(report: dict) -> str:
    from .common import markdown_table
    cfg = report["config"]
    head = (f"Target `{cfg['model']}`, draft `{cfg['draft']}` ({cfg['dtype']}), {cfg['num_prompts']} prompts x "
            f"{cfg['max_new_tokens']} new tokens, temperature {cfg['temperature']}, top-k {cfg['top_k']}, top-p "
            f"{cfg['top_p']}, EOS {'on' if cfg['eos'] else 'off'}, {report['torch_threads']} torch threads.\n"
            "a = accepted / evaluated draft tokens (per-position acceptance); acc/prop = accepted / proposed; "
            "c = draft step / target step (wall); v = target forward over gamma+1 tokens / one target decode "
            "step; theory: (1-a^(g+1))/(1-a) tokens per call, speedup (1-a^(g+1))/((1-a)(g c+1)), and with the "
            "measured verification cost (1-a^(g+1))/((1-a)(g c+v)). Command: `specalign bench speculative "
            f"{report.get('command', '')}`.\n\n")
    columns = [("batch", "batch"), ("gamma", "gamma"), ("acceptance", "a"), ("accepted_over_proposed", "acc/prop"),
               ("tokens_per_target_call", "tokens/target call"), ("tokens_per_target_call_theory", "(theory)"),
               ("cost_ratio_c", "c"), ("verify_over_step", "v"), ("plain_tok_s", "plain tok/s"),
               ("spec_tok_s", "spec tok/s"), ("speedup", "speedup"), ("speedup_theory", "(theory)"),
               ("speedup_theory_verify", "(theory, v)")]
    return head + markdown_table(report["results"], columns)


def main(args: list[str]) -> int:
    from ..cli import parse_config
    from .common import write_results
    (config,) = parse_config([SpeculativeBenchConfig], args, "specalign bench speculative")
    report = run(config.validate())
    report["command"] = " ".join(args)
    text = table(report)
    out = write_results(config.output_dir, report, text)
    print(text)
    print(f"wrote {out / 'results.json'} and {out / 'table.md'}")
    return 0
