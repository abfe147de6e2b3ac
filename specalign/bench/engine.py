"""``specalign bench engine``: tokens/s of the engine vs transformers ``generate``, same model,
dtype and sampling settings, at several batch sizes.

Two workloads, each timed for both implementations, alternating, best of ``--repeats``:
- ``fan-out``: one prompt x B samples (the Best-of-N / Speculative Rejection case). The engine
  prefills once and shares the cache; ``generate`` gets the prompt repeated B times.
- ``distinct``: B different prompts in one left-padded batch.
Tokens counted are generated tokens up to and including EOS (what a user keeps). With ``--eos``
rows stop at EOS: the engine drops finished rows, ``generate`` pads them until the batch ends.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class EngineBenchConfig:
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "model spec"})
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32], metadata={"help": "batch sizes"})
    max_new_tokens: int = field(default=64, metadata={"help": "new tokens per row"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    eos: bool = field(default=True, metadata={"help": "stop rows at EOS (else generate exactly max_new_tokens)"})
    workloads: list[str] = field(default_factory=lambda: ["fan-out", "distinct"], metadata={"help": "fan-out, distinct"})
    repeats: int = field(default=2, metadata={"help": "timed runs per cell (best kept)"})
    prompts: str = field(default="alpaca_farm_100", metadata={"help": "data set name or prompt file"})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16"})
    seed: int = field(default=0, metadata={"help": "seed"})
    threads: int = field(default=0, metadata={"help": "torch threads (0 = torch's default)"})
    clock: str = field(default="wall", metadata={"help": "wall | cpu (process CPU time: robust on a shared "
                                                         "machine, use with --threads 1)"})
    output_dir: str = field(default="benchmarks/results/engine", metadata={"help": "where results go"})


def _prompts(config, tokenizer, count):
    from ..decode.prompts import load_prompts
    from ..models.loading import chat_prompt
    try:
        texts = load_prompts(prompts=config.prompts)
    except Exception:
        texts = ["Write a short story about a cat.", "Explain photosynthesis simply.", "Give three tips for sleep."]
    texts = (texts * (count // len(texts) + 1))[:count]
    return [chat_prompt(tokenizer, t) for t in texts]


def _clock(config):
    if config.clock not in ("wall", "cpu"):
        from ..errors import SpecError
        raise SpecError(f"clock must be wall or cpu, got {config.clock!r}")
    return time.perf_counter if config.clock == "wall" else time.process_time


def _run_engine(model, tokenizer, rows, fan_out, config, eos_ids):
    from ..decode import SamplingGenerator, SamplingParams
    gen = SamplingGenerator(model, tokenizer, SamplingParams(config.temperature), config.max_new_tokens,
                            eos_ids=eos_ids)
    rng = torch.Generator().manual_seed(config.seed)
    clock = _clock(config)
    start = clock()
    if fan_out:
        gen.start(rows[0], len(rows), rng)
    else:
        gen.start_batch(rows, rng)
    gen.advance()
    wall = clock() - start
    return sum(len(r.tokens) for r in gen.rows), wall


@torch.inference_mode()
def _run_generate(model, tokenizer, rows, config, eos_ids):
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    torch.manual_seed(config.seed)
    kwargs = {"eos_token_id": sorted(eos_ids)} if eos_ids else {"eos_token_id": None,
                                                                 "min_new_tokens": config.max_new_tokens}
    clock = _clock(config)
    start = clock()
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=config.temperature > 0,
                         temperature=config.temperature or None, top_k=None, top_p=None,
                         max_new_tokens=config.max_new_tokens, pad_token_id=pad, **kwargs)
    wall = clock() - start
    tokens = 0
    for row in out[:, width:].tolist():
        n = len(row)
        for j, t in enumerate(row):
            if t in eos_ids:
                n = j + 1
                break
        tokens += n
    return tokens, wall


def run(config: EngineBenchConfig) -> dict:
    from tqdm.auto import tqdm
    from ..decode.generators import eos_ids_of
    from ..models.loading import load_model, load_tokenizer
    if config.threads:
        torch.set_num_threads(config.threads)
    model = load_model(config.model, config.dtype)
    tokenizer = load_tokenizer(config.model)
    eos_ids = eos_ids_of(model, tokenizer) if config.eos else set()
    results = []
    cells = [(w, b) for w in config.workloads for b in config.batch_sizes]
    for workload, batch in tqdm(cells, desc="bench engine", unit="cell"):
        rows = _prompts(config, tokenizer, batch)
        if workload == "fan-out":
            rows = [rows[0]] * batch
        best = {"engine": None, "generate": None}
        for _ in range(config.repeats):
            for impl in ("engine", "generate"):
                if impl == "engine":
                    tokens, wall = _run_engine(model, tokenizer, rows, workload == "fan-out", config, eos_ids)
                else:
                    tokens, wall = _run_generate(model, tokenizer, rows, config, eos_ids)
                rate = tokens / wall
                if best[impl] is None or rate > best[impl]["tok_s"]:
                    best[impl] = {"tokens": tokens, "seconds": round(wall, 3), "tok_s": round(rate, 2)}
        results.append({"workload": workload, "batch": batch, "engine": best["engine"],
                        "generate": best["generate"],
                        "speedup": round(best["engine"]["tok_s"] / best["generate"]["tok_s"], 2)})
    return {"config": asdict(config), "torch_threads": torch.get_num_threads(), "results": results,
            "command": "specalign bench engine " + " ".join(getattr(config, "_argv", []))}


def table(report: dict) -> str:
    cfg = report["config"]
    lines = [f"Model `{cfg['model']}` ({cfg['dtype']}), {cfg['max_new_tokens']} new tokens, temperature "
             f"{cfg['temperature']}, EOS {'on' if cfg['eos'] else 'off'}, {report['torch_threads']} threads, "
             f"{cfg['clock']} clock, best of {cfg['repeats']}.",
             "", "| workload | batch | engine tok/s | generate tok/s | speedup |", "|---|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(f"| {r['workload']} | {r['batch']} | {r['engine']['tok_s']:.1f} | {r['generate']['tok_s']:.1f} "
                     f"| {r['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(args: list[str]) -> int:
    from ..cli import parse_config
    (config,) = parse_config([EngineBenchConfig], args, "specalign bench engine")
    config._argv = list(args)
    report = run(config)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "table.md").write_text(table(report))
    print(table(report))
    return 0
