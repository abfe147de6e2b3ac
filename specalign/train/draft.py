"""``specalign train draft``: build a draft from the target and distill it on the target's own samples.

1. Draft: cut layers from the target (``first:K`` / ``spread:K`` / ``layers:...``; embeddings, final
   norm and head copied), or load any small model of the same vocabulary.
2. Data: the target samples responses for the training prompts (batched, the project's engine; cached
   on disk, resumable). These are the contexts speculative decoding meets: prompt + target text.
3. Teacher: ``teacher: forward`` runs the target on each training batch, so the loss sees its full
   next-token distributions; ``teacher: hidden`` gets the same full distributions from the target's
   final hidden states recorded while sampling, through its head (no teacher forward);
   ``teacher: samples`` uses the top-k log-probs recorded while sampling (the rest of the vocabulary
   is one bucket).
4. Loss on response positions: KL(p || q), or total variation TV(p, q) = 1 - acceptance, or KL that
   turns into TV for the last ``tvd_fraction`` of the run.
5. Report: acceptance sum_v min(p, q) (full vocabulary, exact) on held-out prompts, before and after.
Output: a plain model directory (safetensors, tokenizer) + ``draft_report.json``.
"""

from __future__ import annotations

import contextlib
import time

import torch
from transformers import Trainer, TrainerCallback

from ..decode.sampling import SamplingParams
from ..models.draft import acceptance_many, build_draft, check_same_vocab, layer_indices
from ..models.loading import load_model, load_tokenizer
from .common import (drop_checkpoints, encode_prompts, finalize, is_main_process, plain_load, prompt_split, report,
                     resume_from, setup_step, train_summary, wait_for_everyone, world_rank)
from .draft_config import DraftConfig
from .samples import cached_samples


def make_draft(spec: str, target, tokenizer):
    """A draft from a layer choice (cut from ``target``) or a model spec of the same vocabulary."""
    kind = spec.partition(":")[0]
    if kind in ("first", "spread", "layers"):
        layer_indices(spec, int(target.config.num_hidden_layers))  # validate before copying weights
        return build_draft(target, spec)
    draft = load_model(spec, "float32", adapter=False)
    check_same_vocab(target, draft, tokenizer, load_tokenizer(spec))
    return draft.requires_grad_(True)


# --------------------------------------------------------------------------------------------
# data: one item per (prompt, target sample); a batch aligns every prompt's end at one column
class SampleDataset(torch.utils.data.Dataset):
    def __init__(self, records: list[dict]):
        self.records = [r for r in records if len(r["response_ids"]) > 0]

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]


def collate(records: list[dict], pad_id: int = 0) -> dict:
    """Left-pad prompts, right-pad responses: column P-1+j predicts response token j in every row.

    Input is prompt + response[:-1] (width P + R - 1), so the draft's logits for the response are
    the last R columns (``logits_to_keep=R``). Teacher top-k tensors, when the records have them, are
    padded to (B, R, K); recorded hidden states to (B, R, H).
    """
    width_p = max(len(r["prompt_ids"]) for r in records)
    width_r = max(len(r["response_ids"]) for r in records)
    k = records[0]["topk_ids"].shape[1] if "topk_ids" in records[0] else 0
    b = len(records)
    ids = torch.full((b, width_p + width_r - 1), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    resp_mask = torch.zeros(b, width_r, dtype=torch.bool)
    top_ids = torch.zeros(b, width_r, k, dtype=torch.long)
    top_logp = torch.full((b, width_r, k), -1e4, dtype=torch.float32)
    for i, r in enumerate(records):
        p, resp = r["prompt_ids"], r["response_ids"]
        seq = list(p) + list(resp[:-1])
        ids[i, width_p - len(p):width_p - len(p) + len(seq)] = torch.tensor(seq)
        mask[i, width_p - len(p):width_p - len(p) + len(seq)] = 1
        n = len(resp)
        resp_mask[i, :n] = True
        if k:
            top_ids[i, :n] = r["topk_ids"][:n].long()
            top_logp[i, :n] = r["topk_logp"][:n].float()
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "response_mask": resp_mask}
    if k:
        batch.update(topk_ids=top_ids, topk_logp=top_logp)
    if "hidden" in records[0]:
        hidden = records[0]["hidden"].new_zeros(b, width_r, records[0]["hidden"].shape[1])
        for i, r in enumerate(records):
            hidden[i, :len(r["response_ids"])] = r["hidden"]
        batch["hidden"] = hidden
    return batch


def coarse_distributions(logits: torch.Tensor, topk_ids: torch.Tensor, topk_logp: torch.Tensor):
    """(log p, log q) over K + 1 outcomes: the target's top-k tokens and 'any other token'.

    The rest bucket's log-probs are floored at -80 (an empty bucket then adds nothing to the loss)."""
    logits = logits.float()
    norm = torch.logsumexp(logits, -1, keepdim=True)
    logq_top = logits.gather(-1, topk_ids) - norm
    logq_rest = torch.logsumexp(logits.scatter(-1, topk_ids, float("-inf")), -1, keepdim=True) - norm
    p_rest = (1.0 - topk_logp.exp().sum(-1, keepdim=True)).clamp(min=0.0)
    logp = torch.cat([topk_logp, p_rest.clamp(min=1e-35).log()], -1)
    logq = torch.cat([logq_top, logq_rest.clamp(min=-80.0)], -1)
    return logp, logq


def divergence(logp: torch.Tensor, logq: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-row KL(p || q) or TV(p, q) = 1 - sum min(p, q) of distributions given as log-probs (last dim)."""
    p = logp.exp()
    if kind == "kl":
        return (p * (logp - logq)).sum(-1)
    return 0.5 * (p - logq.exp()).abs().sum(-1)


def distill_loss(logits, topk_ids, topk_logp, mask, kind: str = "kl") -> torch.Tensor:
    """Mean over response positions of KL(p || q) or TV(p, q) on the coarsened distributions."""
    logp, logq = coarse_distributions(logits[mask], topk_ids[mask], topk_logp[mask].float())
    return divergence(logp, logq, kind).mean()


def full_distill_loss(logits, teacher_logits, mask, kind: str = "kl") -> torch.Tensor:
    """Mean over response positions of KL(p || q) or TV(p, q) on the full vocabulary."""
    logq = torch.log_softmax(logits[mask].float(), -1)
    logp = torch.log_softmax(teacher_logits[mask].float(), -1)
    return divergence(logp, logq, kind).mean()


def model_inputs(batch: dict) -> dict:
    """Forward arguments for a ``collate`` batch: logits only for the response columns."""
    return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=batch["response_mask"].shape[1], use_cache=False)


def teacher_logits(teacher, inputs: dict, bf16: bool) -> torch.Tensor:
    """The target's logits for ``model_inputs(batch)``: no grad, bf16 autocast when ``bf16``."""
    device = inputs["input_ids"].device.type
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        return teacher(**inputs).logits


def head_logits(head, hidden: torch.Tensor, bf16: bool) -> torch.Tensor:
    """The target's logits from its recorded final hidden states: no grad, bf16 autocast when ``bf16``."""
    with torch.no_grad(), torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=bf16):
        return head(hidden.to(head.weight.dtype))


class DistillTrainer(Trainer):
    """Trainer whose loss is the draft's divergence from the target on response positions.

    ``teacher``: the target model (a forward per batch, full vocabulary); or ``head``: the target's output
    head (the batch carries recorded final hidden states: full vocabulary, no forward); or neither (the
    batch carries the top-k log-probs recorded while sampling). ``tvd_fraction``: with loss ``kl``, the last share of the
    run (by steps or by the ``time_limit`` callback's clock, whichever is further) trains on TV.
    """

    def __init__(self, *args, loss_kind: str = "kl", teacher=None, head=None, tvd_fraction: float = 0.0,
                 time_limit: "TimeLimit | None" = None, **kw):
        super().__init__(*args, **kw)
        self.loss_kind, self.teacher, self.head, self.tvd_fraction = loss_kind, teacher, head, tvd_fraction
        self.time_limit = time_limit

    def current_loss_kind(self) -> str:
        if self.loss_kind != "kl" or self.tvd_fraction <= 0:
            return self.loss_kind
        done = self.state.global_step / max(self.state.max_steps, 1)
        if self.time_limit is not None:
            done = max(done, self.time_limit.fraction())
        return "tvd" if done >= 1.0 - self.tvd_fraction else "kl"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        kw = model_inputs(inputs)
        kind = self.current_loss_kind()
        out = model(**kw)
        if self.teacher is not None:
            target = teacher_logits(self.teacher, kw, bool(self.args.bf16))
            loss = full_distill_loss(out.logits, target, inputs["response_mask"], kind)
        elif self.head is not None:
            target = head_logits(self.head, inputs["hidden"], bool(self.args.bf16))
            loss = full_distill_loss(out.logits, target, inputs["response_mask"], kind)
        else:
            loss = distill_loss(out.logits, inputs["topk_ids"], inputs["topk_logp"], inputs["response_mask"], kind)
        return (loss, out) if return_outputs else loss


class TimeLimit(TrainerCallback):
    """Stop (and save a checkpoint) once training has run ``minutes`` of wall time."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.start = None

    def fraction(self) -> float:
        """Share of the time limit used so far (0 without a limit)."""
        if self.seconds <= 0 or self.start is None:
            return 0.0
        return (time.perf_counter() - self.start) / self.seconds

    def on_train_begin(self, args, state, control, **kw):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if self.seconds > 0 and time.perf_counter() - self.start > self.seconds:
            control.should_training_stop = True
            control.should_save = True
        return control


# --------------------------------------------------------------------------------------------
def _samples(cfg: DraftConfig, target, tok, prompt_ids, cache, desc: str, train: bool):
    """Target samples through the cache: each process fills its share of chunks, then all read all.

    Training samples: ``samples_per_prompt`` per prompt, top-k log-probs only for ``teacher: samples``,
    final hidden states only for ``teacher: hidden``, bf16 autocast with ``sample_autocast``. Held-out samples: one per prompt in the target's dtype."""
    topk = cfg.topk if train and cfg.teacher == "samples" else 0
    autocast = train and cfg.sample_autocast
    kw = dict(n=cfg.samples_per_prompt if train else 1, batch_rows=cfg.sample_batch_rows,
              max_new_tokens=cfg.max_new_tokens, params=SamplingParams(cfg.sample_temperature),
              seed=cfg.seed if cfg.sample_seed is None else cfg.sample_seed,
              topk=topk, hidden=train and cfg.teacher == "hidden", desc=desc)
    meta = {"model": cfg.target, **({"autocast": "bfloat16"} if autocast else {})}
    device = next(target.parameters()).device.type
    rank, world = world_rank()
    with torch.autocast(device, dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        if world > 1:
            cached_samples(cache, target, tok, prompt_ids, meta, shard=(rank, world), **kw)
            wait_for_everyone()
        return cached_samples(cache, target, tok, prompt_ids, meta, progress=is_main_process(), **kw)


def run(cfg: DraftConfig) -> dict:
    cfg.validate()
    started = time.perf_counter()
    work = setup_step(cfg)
    with plain_load():
        target = load_model(cfg.target, cfg.dtype)
        tok = load_tokenizer(cfg.target)
        draft = make_draft(cfg.draft, target, tok)
    report(f"draft: {cfg.draft} -> {draft.config.num_hidden_layers} layers, "
           f"{sum(p.numel() for p in draft.parameters()) / 1e6:.1f}M parameters")

    _, train_ids = encode_prompts(tok, prompt_split(cfg.prompts, cfg.exclude_prompts, cfg.limit), cfg.max_prompt_tokens)
    train = _samples(cfg, target, tok, train_ids, cfg.samples_cache or work / "samples", "target samples", True)
    held = []
    if cfg.eval_prompts:
        _, eval_ids = encode_prompts(tok, prompt_split(cfg.eval_prompts, limit=cfg.eval_limit), cfg.max_prompt_tokens)
        held = _samples(cfg, target, tok, eval_ids, work / "samples-eval", "held-out samples", False)
    sample_s = time.perf_counter() - started
    n_tokens = sum(len(r["response_ids"]) for r in train)
    report(f"{len(train)} target samples, {n_tokens} response tokens ({sample_s:.0f}s)")

    result = {"target": cfg.target, "draft": cfg.draft, "layers": getattr(draft.config, "draft_of", None),
              "train_samples": len(train), "train_response_tokens": n_tokens, "teacher": cfg.teacher, "loss": cfg.loss,
              "tvd_fraction": cfg.tvd_fraction, "sample_s": round(sample_s, 1)}
    evaluate = lambda models: acceptance_many(  # noqa: E731
        target, models, [r["prompt_ids"] for r in held], [r["response_ids"] for r in held], tok.pad_token_id,
        temperature=cfg.sample_temperature, progress=True)
    resume = resume_from(cfg, work)
    if held and cfg.eval_before and is_main_process() and resume is None:
        result["acceptance_before"] = evaluate({"draft": draft})["draft"]["acceptance"]
        report(f"acceptance before training: {result['acceptance_before']:.4f}")
    wait_for_everyone()

    if cfg.freeze_embeddings:
        draft.get_input_embeddings().requires_grad_(False)
        draft.get_output_embeddings().requires_grad_(False)
    draft.train()
    teacher = head = None
    if cfg.teacher in ("forward", "hidden"):
        target.to(cfg.device).eval().requires_grad_(False)
        teacher, head = (target, None) if cfg.teacher == "forward" else (None, target.get_output_embeddings())
    cfg.output_dir, final_dir = str(work), cfg.output_dir
    clock = TimeLimit(cfg.max_train_minutes)
    try:
        trainer = DistillTrainer(model=draft, args=cfg, train_dataset=SampleDataset(train),
                                 data_collator=lambda rows: collate(rows, tok.pad_token_id or 0),
                                 callbacks=[clock], loss_kind=cfg.loss, teacher=teacher, head=head,
                                 tvd_fraction=cfg.tvd_fraction, time_limit=clock)
        train_start = time.perf_counter()
        out = trainer.train(resume_from_checkpoint=resume)
        result["train_s"] = round(time.perf_counter() - train_start, 1)
        result.update(train_summary(trainer, out, resume))
    finally:
        cfg.output_dir = final_dir

    def describe(tmp):
        tok.save_pretrained(tmp)
        if held:
            trained = load_model(str(tmp), "float32")
            acc = evaluate({"draft": trained})["draft"]
            result.update(acceptance=acc["acceptance"], eval_positions=acc["positions"],
                          acceptance_per_position=[round(a, 4) for a in acc["per_position"]],
                          eval_prompts=len(held))
            report(f"acceptance after training: {acc['acceptance']:.4f} on {acc['positions']} held-out positions")
        result["wall_s"] = round(time.perf_counter() - started, 1)
        return {"draft_report.json": result}

    finalize(trainer, final_dir, describe)
    drop_checkpoints(cfg, work)
    report(f"draft saved to {final_dir} (wall time {time.perf_counter() - started:.0f}s)")
    return result


def main(args: list[str]) -> int:
    from ..cli import parse_config
    (cfg,) = parse_config([DraftConfig], args, "specalign train draft")
    run(cfg)
    return 0
