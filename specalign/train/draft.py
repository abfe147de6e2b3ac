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
from .samples import autocast_weights, cached_samples


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
        # ``input_ids`` (the row's model input) lets Trainer's ``train_sampling_strategy: group_by_length``
        # batch rows of similar length (less padding)
        r = self.records[i]
        return dict(r, input_ids=row_input_ids(r))


def row_input_ids(record: dict) -> list[int]:
    """A record's model input: prompt + response without its last token (which nothing follows)."""
    return list(record["prompt_ids"]) + list(record["response_ids"][:-1])


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
        seq = row_input_ids(r)
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


# --------------------------------------------------------------------------------------------
# the fused head + divergence: the (positions x vocabulary) logits are never held whole
class HeadDivergence(torch.autograd.Function):
    """Mean over N positions of KL(p || q) or TV(p, q), with q = softmax(h W^T), p = softmax(h_t W_t^T).

    Computed in chunks of positions; the gradient is formed in the same pass (d KL / d z = q - p;
    d TV / d z = q * (s - sum_v s_v q_v) / 2 with s = sign(q - p)), so no (N, V) tensor is kept for
    backward. Matmuls run in ``dtype`` (bfloat16 = what autocast does), softmax and the loss in fp32."""

    @staticmethod
    def forward(ctx, h, weight, h_t, weight_t, kind: str, chunk: int, dtype):
        n = h.shape[0]
        w, w_t = weight.detach().to(dtype), weight_t.detach().to(dtype)
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        for s in range(0, n, chunk):
            hc = h[s:s + chunk].detach().to(dtype)
            logq = torch.log_softmax(hc @ w.T, -1, dtype=torch.float32)
            logp = torch.log_softmax(h_t[s:s + chunk].to(dtype) @ w_t.T, -1, dtype=torch.float32)
            q, p = logq.exp(), logp.exp()
            if kind == "kl":
                total += (p * (logp - logq)).sum(dtype=torch.float64)
                g = q.sub_(p)
            else:
                sign = torch.sign(q - p)
                total += 0.5 * (p - q).abs().sum(dtype=torch.float64)
                g = q.mul_(sign - (sign * q).sum(-1, keepdim=True)).mul_(0.5)
            g16 = g.to(dtype)
            grad_h[s:s + chunk] = (g16 @ w).float()
            if grad_w is not None:
                grad_w += (g16.T @ hc).float()
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
        ctx.has_w, ctx.n = grad_w is not None, n
        return (total / max(n, 1)).to(h.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out / max(ctx.n, 1)
        return ((grad_h * scale).to(grad_out.dtype), (grad_w * scale) if ctx.has_w else None,
                None, None, None, None, None)


def head_divergence(h, weight, h_t, weight_t, kind: str = "kl", chunk: int = 128, bf16: bool = False):
    """``HeadDivergence`` for student states ``h`` (N, H) over head ``weight`` (V, H) and teacher states
    ``h_t`` over ``weight_t``: equal to ``full_distill_loss`` of the two heads' logits, in one pass."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    return HeadDivergence.apply(h, weight, h_t, weight_t, kind, chunk, dtype)


@contextlib.contextmanager
def final_states(model):
    """Collect the output of ``model``'s final norm (what its head sees) during a forward."""
    from .samples import final_norm
    seen = []
    hook = final_norm(model).register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        yield seen
    finally:
        hook.remove()


def fused_head(model) -> bool:
    """Whether ``model``'s logits are head(final norm output) with a plain bias-free head (the fused loss applies)."""
    from ..errors import SpecError
    from .samples import final_norm
    head = model.get_output_embeddings()
    try:
        final_norm(model)
    except SpecError:
        return False
    return isinstance(head, torch.nn.Linear) and head.bias is None


def response_states(model, inner, batch: dict) -> torch.Tensor:
    """Final hidden states (N, H) of ``model`` at the batch's response positions (one forward; the head runs
    for one column only). ``inner`` is the unwrapped model whose final norm is hooked."""
    kw = dict(model_inputs(batch), logits_to_keep=1)
    width = batch["response_mask"].shape[1]
    with final_states(inner) as seen:
        model(**kw)
    return seen[-1][:, -width:][batch["response_mask"]]


def batch_loss(model, batch: dict, kind: str, bf16: bool, teacher=None, head=None, inner=None,
               fused: bool = True) -> torch.Tensor:
    """The distillation loss of one ``collate`` batch: the draft against the target's full distributions
    (``teacher``: a target forward; ``head``: the target's head over recorded hidden states) or, with neither,
    against the recorded top-k log-probs. ``inner``: the unwrapped ``model`` (default ``model``).
    ``fused``: use ``head_divergence`` where the models allow it; False computes the full logits (same loss)."""
    inner = model if inner is None else inner
    device = batch["input_ids"].device.type
    mask = batch["response_mask"]
    full = teacher is not None or head is not None
    if fused and full and fused_head(inner) and (teacher is None or fused_head(teacher)):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            states = response_states(model, inner, batch)
        if teacher is not None:
            with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                t_states = response_states(teacher, teacher, batch)
            t_weight = teacher.get_output_embeddings().weight
        else:
            t_states, t_weight = batch["hidden"][mask], head.weight
        return head_divergence(states.float(), inner.get_output_embeddings().weight, t_states.float(), t_weight,
                               kind, bf16=bf16)
    kw = model_inputs(batch)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        logits = model(**kw).logits
    if teacher is not None:
        return full_distill_loss(logits, teacher_logits(teacher, kw, bf16), mask, kind)
    if head is not None:
        return full_distill_loss(logits, head_logits(head, batch["hidden"], bf16), mask, kind)
    return distill_loss(logits, batch["topk_ids"], batch["topk_logp"], mask, kind)


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

    def progress_step(self, step: int, total: int) -> int:
        """The step the run's progress puts us at: ``step``, or the time limit's share of ``total`` if further."""
        clock = self.time_limit.fraction() if self.time_limit is not None else 0.0
        return min(max(step, round(clock * total)), total)

    def current_loss_kind(self) -> str:
        if self.loss_kind != "kl" or self.tvd_fraction <= 0:
            return self.loss_kind
        total = max(self.state.max_steps, 1)
        done = self.progress_step(self.state.global_step, total) / total
        return "tvd" if done >= 1.0 - self.tvd_fraction else "kl"

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The configured schedule (transformers' own), read at the step the run's progress puts us at: with a
        time limit that stops training before ``max_steps``, the learning rate still decays over the whole run."""
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.time_limit is not None and self.time_limit.seconds > 0 and hasattr(scheduler, "lr_lambdas"):
            scheduler.lr_lambdas = [
                (lambda step, f=f: f(self.progress_step(step, num_training_steps)))
                for f in scheduler.lr_lambdas]
        return scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = batch_loss(model, inputs, self.current_loss_kind(), bool(self.args.bf16), self.teacher, self.head,
                          inner=self.accelerator.unwrap_model(model))
        return (loss, None) if return_outputs else loss


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


def train_minutes(cfg: DraftConfig, elapsed_s: float, eval_s: float) -> float:
    """Training's wall-time limit in minutes (0 = none): ``max_train_minutes``, shortened so that the whole
    command fits ``max_run_minutes`` -- what has run so far, training, then the final measurement (as long as
    the one before training; 20% and a minute are added for reloading and saving)."""
    from ..errors import SpecError
    limit = cfg.max_train_minutes
    if cfg.max_run_minutes > 0:
        left = cfg.max_run_minutes * 60 - elapsed_s - (1.2 * eval_s + 60)
        if left < 60:
            raise SpecError(f"max_run_minutes {cfg.max_run_minutes:g} leaves no time to train: {elapsed_s / 60:.1f} min "
                            "went to sampling and measuring; raise it or sample less (samples_per_prompt)")
        limit = min(limit, left / 60) if limit > 0 else left / 60
    return limit


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
    with contextlib.ExitStack() as stack:
        if autocast:
            stack.enter_context(torch.autocast(device, dtype=torch.bfloat16))
            stack.enter_context(autocast_weights(target))
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
    eval_s = 0.0
    if held and cfg.eval_before and is_main_process() and resume is None:
        eval_start = time.perf_counter()
        result["acceptance_before"] = evaluate({"draft": draft})["draft"]["acceptance"]
        eval_s = time.perf_counter() - eval_start
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
    clock = TimeLimit(train_minutes(cfg, time.perf_counter() - started, eval_s))
    result["train_minutes_limit"] = round(clock.seconds / 60, 2)
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
