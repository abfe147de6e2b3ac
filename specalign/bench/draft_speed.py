"""``specalign bench draft-speed``: what the fast paths of ``train draft`` buy, before vs after, in one run.

1. Sampling the training data (one batch of the recipe's rows, hidden states recorded, bf16 autocast):
   *before* = the model's own attention (sdpa), ``torch.multinomial`` (an exponential draw per vocabulary
   entry), frozen weights cast by autocast at every call; *after* = what ``train draft`` does now
   (grouped attention, inverse-CDF sampling, weights cast once). Same prompts, same seed.
2. Training steps on those samples (AdamW, bf16 autocast, the recipe's draft, frozen embeddings):
   *before* = the draft's logits for every response column and the target head's logits in full, then
   ``full_distill_loss``; *after* = ``batch_loss`` (the fused chunked head + divergence). Alternating.
Both paths compute the same thing (tests/test_draft_speed.py); only time differs.
3. What a response token of teacher signal costs by the other route, on-policy contexts as in DistillSpec:
   the (untrained) draft samples the same prompts (fast paths on), then the target runs one forward over
   prompt + draft response per batch of training rows, its final hidden states at the response positions
   kept (what ``teacher: hidden`` records). Tokens/s of the two parts and of the route as a whole, against
   the target sampling its own responses (row "after" of 1).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class DraftSpeedConfig:
    target: str = field(default="smollm2-135m-instruct", metadata={"help": "target model spec"})
    draft: str = field(default="layers:0,2,5,10,20,29", metadata={"help": "draft layer choice"})
    prompts: str = field(default="alpaca_farm_eval", metadata={"help": "data set name or prompt file"})
    rows: int = field(default=128, metadata={"help": "rows of the sampling batch"})
    first_row: int = field(default=2000, metadata={"help": "where in the length-sorted jobs the batch starts"})
    max_new_tokens: int = field(default=128, metadata={"help": "tokens per sample"})
    batch_size: int = field(default=8, metadata={"help": "training rows per step"})
    steps: int = field(default=6, metadata={"help": "timed training steps per path and round"})
    rounds: int = field(default=2, metadata={"help": "alternating rounds of training steps"})
    threads: int = field(default=2, metadata={"help": "torch threads"})
    seed: int = field(default=0, metadata={"help": "seed"})
    output_dir: str = field(default="benchmarks/results/draft_speed", metadata={"help": "where results go"})


@contextlib.contextmanager
def multinomial_draws():
    """The generators' token draw as it was: ``torch.multinomial`` (restored afterwards)."""
    from ..decode import generators
    own = generators.sample
    generators.sample = lambda logprobs, generator=None: torch.multinomial(
        logprobs.exp(), 1, generator=generator).squeeze(-1)
    try:
        yield
    finally:
        generators.sample = own


def _sample(target, tok, prompts, config, before: bool):
    """One sampling batch, timed; *before*: multinomial draws, the model's own attention, per-call casts."""
    from ..decode.sampling import SamplingParams
    from ..train.samples import MultiPromptSampler, _sample_chunk, autocast_weights
    own = {"attn_implementation": None} if before else {}  # after: the sampler's default (grouped attention)
    sampler = MultiPromptSampler(target, tok, SamplingParams(1.0), config.max_new_tokens, hidden=True, **own)
    with contextlib.ExitStack() as stack:
        stack.enter_context(multinomial_draws() if before else autocast_weights(target))
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        start = time.perf_counter()
        recs = _sample_chunk(sampler, prompts, [(i, 0) for i in range(len(prompts))],
                             torch.Generator().manual_seed(config.seed))
        seconds = time.perf_counter() - start
    return recs, _rate(sum(len(r["response_ids"]) for r in recs), seconds)


def _rate(tokens: int, seconds: float) -> dict:
    return {"tokens": tokens, "seconds": round(seconds, 2), "tok_s": round(tokens / seconds, 1)}


def _on_policy(target, draft, tok, prompts, config) -> dict:
    """Draft samples for ``prompts``, then target forwards over them (hidden states at response positions)."""
    from ..train.draft import collate, response_states
    from ..train.samples import autocast_weights
    draft.requires_grad_(False)
    try:
        recs, sampled = _sample(draft, tok, prompts, config, False)
    finally:
        draft.requires_grad_(True)
    recs = [r for r in recs if r["response_ids"]]
    b = config.batch_size
    with torch.no_grad(), autocast_weights(target), torch.autocast("cpu", dtype=torch.bfloat16):
        start = time.perf_counter()
        for i in range(0, len(recs), b):
            response_states(target, target, collate(recs[i:i + b], 0))
        seconds = time.perf_counter() - start
    forward = _rate(sampled["tokens"], seconds)
    both = round(1.0 / (1.0 / sampled["tok_s"] + 1.0 / forward["tok_s"]), 1)
    return {"draft_sampling": sampled, "target_forward": forward, "tok_s": both}


def _steps(draft, head, opt, recs, config, start: int, before: bool) -> float:
    from ..train.draft import batch_loss, collate
    b = config.batch_size
    begin = time.perf_counter()
    for step in range(start, start + config.steps):
        i = (step * b) % max(len(recs) - b, 1)
        batch = collate(recs[i:i + b], 0)
        loss = batch_loss(draft, batch, "kl", True, head=head, fused=not before)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return (time.perf_counter() - begin) / config.steps


def run(config: DraftSpeedConfig) -> dict:
    from ..models.draft import build_draft
    from ..models.loading import load_model, load_tokenizer
    from ..train.common import encode_prompts, prompt_split
    from ..train.samples import _jobs
    torch.set_num_threads(config.threads)
    target = load_model(config.target, "float32")
    tok = load_tokenizer(config.target)
    _, ids = encode_prompts(tok, prompt_split(config.prompts, None, 0), 256)
    jobs = _jobs(ids, 8)[config.first_row:config.first_row + config.rows]  # the recipe's job order at 8 per prompt
    prompts = [ids[i] for i, _ in jobs]
    sampling = {}
    for name in ("before", "after"):
        recs, sampling[name] = _sample(target, tok, prompts, config, name == "before")
    torch.manual_seed(config.seed)
    recs = [recs[i] for i in torch.randperm(len(recs)).tolist()]  # batches of mixed lengths, as the Trainer's
    draft = build_draft(target, config.draft).train()
    on_policy = _on_policy(target, draft, tok, prompts, config)
    draft.get_input_embeddings().requires_grad_(False)
    draft.get_output_embeddings().requires_grad_(False)
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-5)
    head = target.get_output_embeddings()
    _steps(draft, head, opt, recs, DraftSpeedConfig(steps=1, batch_size=config.batch_size), 0, False)  # warm-up
    times = {"before": [], "after": []}
    for r in range(config.rounds):
        for name in ("before", "after"):
            times[name].append(_steps(draft, head, opt, recs, config, r * config.steps, name == "before"))
    train = {name: round(min(v), 3) for name, v in times.items()}
    return {"config": asdict(config), "sampling": sampling,
            "sampling_speedup": round(sampling["after"]["tok_s"] / sampling["before"]["tok_s"], 2),
            "on_policy": on_policy,
            "on_policy_vs_target_sampling": round(on_policy["tok_s"] / sampling["after"]["tok_s"], 2),
            "train_s_per_step": train, "train_speedup": round(train["before"] / train["after"], 2),
            "train_rounds": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "command": "specalign bench draft-speed " + " ".join(getattr(config, "_argv", []))}


def table(report: dict) -> str:
    cfg, s, t, o = report["config"], report["sampling"], report["train_s_per_step"], report["on_policy"]
    return "\n".join([
        f"`{report['command'].strip()}`: {cfg['target']}, sampling batch of {cfg['rows']} rows x up to "
        f"{cfg['max_new_tokens']} tokens (bf16 autocast, hidden states recorded), training steps of "
        f"{cfg['batch_size']} rows on those samples (draft `{cfg['draft']}`, bf16 autocast), {cfg['threads']} threads.",
        "", "| phase | before | after | speedup |", "|---|---:|---:|---:|",
        f"| sampling, tokens/s | {s['before']['tok_s']:.1f} | {s['after']['tok_s']:.1f} | {report['sampling_speedup']:.2f}x |",
        f"| training, s/step (best of {cfg['rounds']} rounds of {cfg['steps']}) | {t['before']:.3f} | {t['after']:.3f} "
        f"| {report['train_speedup']:.2f}x |", "",
        "Teacher signal for training, response tokens/s (fast paths on):", "",
        "| route | tokens/s |", "|---|---:|",
        f"| the target samples its own responses (hidden states recorded) | {s['after']['tok_s']:.1f} |",
        f"| on-policy: the draft samples | {o['draft_sampling']['tok_s']:.1f} |",
        f"| on-policy: the target's forward over the draft's samples ({cfg['batch_size']} rows a batch) "
        f"| {o['target_forward']['tok_s']:.1f} |",
        f"| on-policy, both parts | {o['tok_s']:.1f} ({report['on_policy_vs_target_sampling']:.2f}x the target's "
        "sampling) |", ""])


def main(args: list[str]) -> int:
    from ..cli import parse_config
    (config,) = parse_config([DraftSpeedConfig], args, "specalign bench draft-speed")
    config._argv = list(args)
    from .common import write_results
    report = run(config)
    write_results(config.output_dir, report, table(report))
    print(table(report))
    return 0
