"""``specalign bench draft``: which draft-training choices reach high acceptance fastest.

Reads the target-sample caches that ``specalign train draft`` writes (``OUT.work/samples`` for
training contexts, ``OUT.work/samples-eval`` for held-out ones) and measures, against the target:

1. Teacher signal (``--drafts``): for each given draft, the exact held-out acceptance
   sum_v min(p, q) and the same on distributions coarsened to the target's top-k tokens + one
   bucket for the rest (what ``teacher: samples`` trains on), for each ``--topks`` k, with the
   target's probability mass inside the top k. Coarsening can only raise the overlap, so the gap
   is how much of the draft's mismatch the top-k signal cannot see.
2. Pilot runs (``--layers``): for each layer choice, the same short training from the same data
   order -- ``--steps`` of full-vocabulary KL -- then, from that state, ``--branch-steps`` more with
   each of ``--branch-losses``; held-out acceptance after every phase.
Outputs under ``--output_dir``: results.json, table.md.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field

import torch

from ..errors import SpecError
from .common import markdown_table, set_threads, write_results


@dataclass
class DraftBenchConfig:
    target: str = field(default="smollm2-135m-instruct", metadata={"help": "target model spec"})
    samples: str = field(default="", metadata={"help": "training sample cache dir (train draft's OUT.work/samples)"})
    held: str = field(default="", metadata={"help": "held-out sample cache dir (train draft's OUT.work/samples-eval)"})
    held_limit: int = field(default=16, metadata={"help": "held-out samples measured (0 = all)"})
    drafts: list[str] = field(default_factory=list, metadata={"help": "draft model specs for the teacher-signal table"})
    topks: list[int] = field(default_factory=lambda: [32, 128, 512, 2048], metadata={"help": "top-k sizes"})
    layers: list[str] = field(default_factory=list, metadata={"help": "layer choices for pilot runs (spread:6, ...)"})
    steps: int = field(default=80, metadata={"help": "pilot: full-vocabulary KL steps"})
    branch_steps: int = field(default=30, metadata={"help": "pilot: steps of each branch loss after --steps"})
    branch_losses: list[str] = field(default_factory=lambda: ["kl", "tvd"], metadata={"help": "kl | tvd"})
    batch_size: int = field(default=8, metadata={"help": "pilot: rows per step"})
    learning_rate: float = field(default=5e-4, metadata={"help": "pilot: AdamW learning rate (5-step warm-up)"})
    bf16: bool = field(default=True, metadata={"help": "pilot: bf16 autocast for teacher and draft"})
    teacher: str = field(default="forward", metadata={
        "help": "pilot: forward (a target forward per batch) | hidden (the final hidden states in --samples, made by "
                "train draft with teacher: hidden)"})
    freeze_embeddings: bool = field(default=False, metadata={
        "help": "pilot: keep the draft's embeddings / tied head fixed (train draft's freeze_embeddings)"})
    seed: int = field(default=0, metadata={"help": "data order and initialisation seed"})
    threads: int = field(default=2, metadata={"help": "torch threads (0 = leave as is)"})
    output_dir: str = field(default="benchmarks/results/draft", metadata={"help": "where results go"})

    def validate(self) -> "DraftBenchConfig":
        from pathlib import Path
        for name in ("held",) + (("samples",) if self.layers else ()):
            path = getattr(self, name)
            if not path or not list(Path(path).glob("chunk-*.pt")):
                raise SpecError(f"--{name} must be a sample cache dir with chunk-*.pt files (made by `specalign "
                                f"train draft`: OUT.work/samples and OUT.work/samples-eval), got '{path}'")
        if self.teacher not in ("forward", "hidden"):
            raise SpecError(f"unknown pilot teacher '{self.teacher}': use forward or hidden")
        if not self.drafts and not self.layers:
            raise SpecError("nothing to measure: give --drafts DIR ... and/or --layers spread:6 ...")
        if any(k < 1 for k in self.topks):
            raise SpecError(f"topks must be >= 1, got {self.topks}")
        if any(loss not in ("kl", "tvd") for loss in self.branch_losses):
            raise SpecError(f"branch_losses must be kl or tvd, got {self.branch_losses}")
        return self


def coarse_overlap(p: torch.Tensor, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum min(p, q) over the target's top-k tokens + the rest bucket, target mass in the top k), per row."""
    top_p, ids = p.topk(min(k, p.shape[-1]), -1)
    top_q = q.gather(-1, ids)
    overlap = torch.minimum(top_p, top_q).sum(-1) + torch.minimum(1 - top_p.sum(-1), 1 - top_q.sum(-1)).clamp(min=0)
    return overlap, top_p.sum(-1)


def teacher_signal(target, drafts: dict, held: list[dict], topks: list[int], pad_id: int) -> list[dict]:
    from ..models.draft import response_logits
    sums = {name: {"exact": 0.0, **{k: [0.0, 0.0] for k in topks}} for name in drafts}
    count = 0
    with torch.inference_mode():
        for start in range(0, len(held), 8):
            batch = held[start:start + 8]
            prompts, responses = [r["prompt_ids"] for r in batch], [r["response_ids"] for r in batch]
            lp, mask = response_logits(target, prompts, responses, pad_id)
            p = torch.softmax(lp.float(), -1)[mask]
            count += p.shape[0]
            for name, draft in drafts.items():
                lq, _ = response_logits(draft, prompts, responses, pad_id)
                q = torch.softmax(lq.float(), -1)[mask]
                sums[name]["exact"] += float(torch.minimum(p, q).sum(-1).sum())
                for k in topks:
                    overlap, mass = coarse_overlap(p, q, k)
                    sums[name][k][0] += float(overlap.sum())
                    sums[name][k][1] += float(mass.sum())
    rows = []
    for name, s in sums.items():
        row = {"draft": name, "exact": s["exact"] / count, "positions": count}
        for k in topks:
            row[f"coarse_top{k}"] = s[k][0] / count
            row[f"target_mass_top{k}"] = s[k][1] / count
        rows.append(row)
    return rows


def _train(draft, target, recs, start: int, steps: int, kind: str, opt, sched, config, pad_id: int) -> float:
    """``steps`` optimiser steps on rows start*B.. (cycling); returns the mean loss of the last 10."""
    from ..train.draft import batch_loss, collate
    params = [p for p in draft.parameters() if p.requires_grad]
    losses = []
    b = config.batch_size
    for step in range(start, start + steps):
        i = (step * b) % max(len(recs) - b, 1)
        batch = collate(recs[i:i + b], pad_id)
        if config.teacher == "hidden":
            if "hidden" not in batch:
                raise SpecError("--teacher hidden needs samples recorded with their hidden states (train draft with "
                                "teacher: hidden)")
            loss = batch_loss(draft, batch, kind, config.bf16, head=target.get_output_embeddings())
        else:
            loss = batch_loss(draft, batch, kind, config.bf16, teacher=target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return sum(losses[-10:]) / len(losses[-10:])


def pilot(target, recs: list[dict], held: list[dict], config: DraftBenchConfig, pad_id: int) -> list[dict]:
    from tqdm.auto import tqdm

    from ..models.draft import acceptance, build_draft

    def measure(draft):
        draft.eval()
        acc = acceptance(target, draft, [r["prompt_ids"] for r in held], [r["response_ids"] for r in held],
                         pad_id)["acceptance"]
        draft.train()
        return acc

    rows = []
    for how in tqdm(config.layers, desc="pilot runs", unit="draft"):
        torch.manual_seed(config.seed)
        draft = build_draft(target, how).train()
        if config.freeze_embeddings:
            draft.get_input_embeddings().requires_grad_(False)
            draft.get_output_embeddings().requires_grad_(False)
        opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=config.learning_rate,
                                weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
        started = time.perf_counter()
        loss = _train(draft, target, recs, 0, config.steps, "kl", opt, sched, config, pad_id)
        rows.append({"layers": how, "phase": f"{config.steps} kl", "train_loss": loss,
                     "train_s_per_step": (time.perf_counter() - started) / max(config.steps, 1),
                     "acceptance": measure(draft),
                     "trainable_params": sum(p.numel() for p in draft.parameters() if p.requires_grad)})
        if not config.branch_steps:
            continue
        state = copy.deepcopy((draft.state_dict(), opt.state_dict(), sched.state_dict()))
        for kind in config.branch_losses:
            draft.load_state_dict(state[0])
            opt.load_state_dict(state[1])
            sched.load_state_dict(state[2])
            loss = _train(draft, target, recs, config.steps, config.branch_steps, kind, opt, sched, config, pad_id)
            rows.append({"layers": how, "phase": f"{config.steps} kl + {config.branch_steps} {kind}",
                         "train_loss": loss, "acceptance": measure(draft)})
    return rows


def run(config: DraftBenchConfig) -> dict:
    from ..models.loading import load_model, load_tokenizer
    from ..train.samples import read_sample_cache
    config.validate()
    set_threads(config.threads)
    target = load_model(config.target, "float32")
    pad_id = load_tokenizer(config.target).pad_token_id or 0
    held = [r for r in read_sample_cache(config.held) if r["response_ids"]]
    held = held[:config.held_limit] if config.held_limit > 0 else held
    result = {"target": config.target, "held_samples": len(held), "config": vars(config).copy()}
    if config.drafts:
        drafts = {spec: load_model(spec, "float32") for spec in config.drafts}
        result["teacher_signal"] = teacher_signal(target, drafts, held, sorted(set(config.topks)), pad_id)
    if config.layers:
        recs = [r for r in read_sample_cache(config.samples) if r["response_ids"]]
        random.Random(config.seed).shuffle(recs)
        result["train_samples"] = len(recs)
        result["pilot"] = pilot(target, recs, held, config, pad_id)
    return result


def table(result: dict) -> str:
    out = [f"# bench draft: {result['target']}, {result['held_samples']} held-out samples\n"]
    if "teacher_signal" in result:
        ks = sorted(result["config"]["topks"])
        cols = [("draft", "draft"), ("exact", "exact acceptance")]
        cols += [(f"coarse_top{k}", f"top-{k} + rest") for k in ks] + [(f"target_mass_top{k}", f"p mass top-{k}")
                                                                       for k in ks]
        out += ["## Teacher signal: exact vs coarsened acceptance\n", markdown_table(result["teacher_signal"], cols)]
    if "pilot" in result:
        c = result["config"]
        how = f"teacher {c.get('teacher', 'forward')}" + (", frozen embeddings" if c.get("freeze_embeddings") else "")
        out += [f"## Pilot runs ({result['train_samples']} training samples, same data order; {how}, "
                f"lr {c['learning_rate']:g})\n",
                markdown_table(result["pilot"], [("layers", "layers"), ("phase", "steps"),
                                                 ("train_loss", "train loss (last 10)"),
                                                 ("train_s_per_step", "s / step (first phase)"),
                                                 ("acceptance", "held-out acceptance")])]
    return "\n".join(out)


def main(args: list[str]) -> int:
    from ..cli import parse_config
    (config,) = parse_config([DraftBenchConfig], args, "specalign bench draft")
    result = run(config)
    write_results(config.output_dir, result, table(result))
    print(table(result))
    return 0
