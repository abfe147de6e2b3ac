"""``specalign train dpo``: align the draft with DPO (TRL ``DPOTrainer``) through a PEFT LoRA adapter.

The reference policy is the draft itself with the adapter disabled (TRL does this when it gets a
``peft_config`` and no ``ref_model``): one set of base weights, never a second copy. By default the
reference log-probs of every training pair are computed once before training
(``precompute_ref_log_probs``), so a step costs one policy forward + backward, not two forwards;
``train_sampling_strategy: group_by_length`` batches pairs of similar length (less padding).

The output is the adapter directory (``adapter_config.json`` names the draft directory as its base),
which ``specalign decode --method sss --draft OUT`` uses directly: Qr = draft + adapter, Q0 = the same
weights with the adapter disabled. ``dpo_report.json``, on training and held-out pairs:

- ``before`` / ``after``: the policy's log-prob margin log q(chosen) - log q(rejected) and the share
  of pairs where it is > 0 (Q0 before, Qr after);
- ``implicit_reward``: DPO's implicit reward r = beta log(qr/q0) of chosen minus rejected: its mean
  margin and the share of pairs it orders correctly (ties count half; before training r = 0 on every
  pair, so its accuracy is 0.5 and its margin 0 by construction);
- ``gold`` (with ``judge``): the aligned draft Qr and the unaligned draft Q0 each sample
  ``eval_samples`` responses per held-out prompt with the same seeds; the judge's mean score of each,
  with standard errors over prompts, and their paired difference.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from ..models.loading import load_model, load_tokenizer
from .common import (drop_checkpoints, finalize, is_main_process, plain_load, report, resume_from, setup_step,
                     train_summary, wait_for_everyone, world_size)
from .data import load_preferences, prompt_text, split_rows
from .dpo_config import DPOStepConfig
from .metrics import mean_se, pair_logps, paired


def base_spec(spec: str) -> str:
    """The draft as the adapter's base: an absolute path for a directory, else the spec itself."""
    return str(Path(spec).resolve()) if Path(spec).is_dir() else spec


def _summary(logps: tuple[list[float], list[float]]) -> dict:
    margins = [a - b for a, b in zip(*logps)]
    return {"mean_margin": statistics.fmean(margins), "accuracy": sum(m > 0 for m in margins) / len(margins)}


def implicit_reward(before: tuple[list[float], list[float]], after: tuple[list[float], list[float]],
                    beta: float) -> dict:
    """beta * (log(qr/q0)(chosen) - log(qr/q0)(rejected)) per pair: mean margin and accuracy (ties = 1/2)."""
    margins = [beta * ((ac - bc) - (ar - br)) for bc, br, ac, ar in zip(*before, *after)]
    return {"mean_margin": statistics.fmean(margins),
            "accuracy": sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / len(margins)}


def gold_comparison(cfg: DPOStepConfig, aligned, unaligned, tok, rows: list[dict]) -> dict:
    """The judge's score of Qr and Q0 sampled alone on the held-out prompts, same seeds, paired over prompts."""
    from ..decode.sampling import SamplingParams
    from ..models.loading import chat_prompt
    from ..models.scorers import Candidate, build_scorer
    from .samples import sample_responses
    prompts = list(dict.fromkeys(prompt_text(r["prompt"]) for r in rows))
    ids = [chat_prompt(tok, p) for p in prompts]
    judge = build_scorer(cfg.judge, dtype=cfg.dtype)
    eos = tok.eos_token_id
    per_prompt = {}
    for name, model in (("aligned", aligned), ("unaligned", unaligned)):
        recs = sample_responses(model, tok, ids, n=cfg.eval_samples, batch_rows=cfg.eval_batch_rows,
                                max_new_tokens=cfg.eval_max_new_tokens, params=SamplingParams(1.0), seed=cfg.seed,
                                desc=f"gold eval: {name} draft")
        cands = []
        for r in recs:
            resp = r["response_ids"][:-1] if r["reason"] == "eos" and r["response_ids"][-1:] == [eos] else \
                r["response_ids"]
            cands.append(Candidate(prompts[r["prompt_index"]], tok.decode(resp, skip_special_tokens=True),
                                   r["reason"] == "eos", r["prompt_ids"], resp, {}, r["reason"]))
        scores = judge(cands)
        sums = [0.0] * len(prompts)
        for r, s in zip(recs, scores):
            sums[r["prompt_index"]] += s
        per_prompt[name] = [v / cfg.eval_samples for v in sums]
    return {"judge": cfg.judge, "prompts": len(prompts), "samples_per_prompt": cfg.eval_samples,
            "max_new_tokens": cfg.eval_max_new_tokens, "temperature": 1.0,
            "aligned": mean_se(per_prompt["aligned"]), "unaligned": mean_se(per_prompt["unaligned"]),
            "aligned_minus_unaligned": paired(per_prompt["aligned"], per_prompt["unaligned"])}


def _trainer_class():
    from trl import DPOTrainer

    class GroupedDPOTrainer(DPOTrainer):
        """``train_sampling_strategy: group_by_length`` on tokenized pairs: a pair's length is its prompt plus
        its longer response (the padded width of its chosen/rejected rows)."""

        def _get_train_sampler(self, train_dataset=None):
            from transformers.trainer_pt_utils import LengthGroupedSampler
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if (self.args.train_sampling_strategy != "group_by_length"
                    or "prompt_ids" not in getattr(dataset, "column_names", ())):
                return super()._get_train_sampler(train_dataset)
            lengths = [len(p) + max(len(c), len(r)) for p, c, r in
                       zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])]
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=lengths)

    return GroupedDPOTrainer


def run(cfg: DPOStepConfig) -> dict:
    from datasets import Dataset, load_from_disk
    cfg.validate()
    started = time.perf_counter()
    work = setup_step(cfg)
    rows = load_preferences(cfg.preferences, cfg.columns, cfg.limit)
    train_rows, held_rows = split_rows(rows, cfg.eval_fraction, cfg.seed)
    tok = load_tokenizer(cfg.draft)
    with plain_load():
        model = load_model(cfg.draft, cfg.dtype, adapter=False)
    report(f"dpo: {len(train_rows)} training pairs, {len(held_rows)} held out; draft {cfg.draft}")
    probe = {"train": train_rows[:64], "held_out": held_rows}
    result: dict = {"draft": base_spec(cfg.draft), "preferences": cfg.preferences, "train_pairs": len(train_rows),
                    "held_out_pairs": len(held_rows), "beta": cfg.beta,
                    "precompute_ref_log_probs": cfg.precompute_ref_log_probs,
                    "train_sampling_strategy": str(cfg.train_sampling_strategy)}
    resume = resume_from(cfg, work)
    before_logps = {}
    if is_main_process():
        before_logps = {k: pair_logps(model, tok, v) for k, v in probe.items() if v}
        result["before"] = {k: _summary(v) for k, v in before_logps.items()}
    model.train()
    model.requires_grad_(True)
    keep = ("prompt", "chosen", "rejected")
    dataset = Dataset.from_list([{k: r[k] for k in keep} for r in train_rows])
    if world_size() > 1 and cfg.precompute_ref_log_probs:
        # TRL caches the precomputed reference log-probs beside the dataset's files, and an in-memory dataset's
        # are in a per-process temporary folder: give every rank the same files, or the other ranks find none
        shared = work / "train_pairs"
        if is_main_process():
            dataset.save_to_disk(str(shared))
        wait_for_everyone()
        dataset = load_from_disk(str(shared))
    cfg.output_dir, final_dir = str(work), cfg.output_dir
    try:
        trainer = _trainer_class()(model=model, args=cfg, train_dataset=dataset, processing_class=tok,
                                   peft_config=cfg.lora_config())
        train_start = time.perf_counter()
        out = trainer.train(resume_from_checkpoint=resume)
        result["train_s"] = round(time.perf_counter() - train_start, 1)
    finally:
        cfg.output_dir = final_dir
    result.update(train_summary(trainer, out, resume))

    def describe(tmp: Path):
        config_file = tmp / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = base_spec(cfg.draft)
        config_file.write_text(json.dumps(config, indent=2))
        tok.save_pretrained(tmp)
        aligned = load_model(str(tmp))  # Qr: the saved adapter over the draft, as decode loads it
        after_logps = {k: pair_logps(aligned, tok, v) for k, v in probe.items() if v}
        result["after"] = {k: _summary(v) for k, v in after_logps.items()}
        result["implicit_reward"] = {k: implicit_reward(before_logps[k], after_logps[k], cfg.beta)
                                     for k in after_logps}
        for k in result["after"]:
            report(f"{k} pairs: log-prob margin {result['before'][k]['mean_margin']:.3f} -> "
                   f"{result['after'][k]['mean_margin']:.3f}, chosen preferred "
                   f"{result['before'][k]['accuracy']:.2f} -> {result['after'][k]['accuracy']:.2f}; implicit "
                   f"reward accuracy {result['implicit_reward'][k]['accuracy']:.2f}, margin "
                   f"{result['implicit_reward'][k]['mean_margin']:.3f}")
        if cfg.judge and held_rows:
            with plain_load():
                unaligned = load_model(cfg.draft, cfg.dtype, adapter=False)
            gold = result["gold"] = gold_comparison(cfg, aligned, unaligned, tok, held_rows)
            d = gold["aligned_minus_unaligned"]
            report(f"gold ({cfg.judge}) on {gold['prompts']} held-out prompts: aligned "
                   f"{gold['aligned']['mean']:.4f} vs unaligned {gold['unaligned']['mean']:.4f}, paired difference "
                   f"{d['diff']:+.4f} +- {d['se']:.4f}")
        result["wall_s"] = round(time.perf_counter() - started, 1)
        return {"dpo_report.json": result}

    finalize(trainer, final_dir, describe)
    drop_checkpoints(cfg, work)
    report(f"adapter saved to {final_dir} (base: {base_spec(cfg.draft)})")
    wait_for_everyone()
    return result


def main(args: list[str]) -> int:
    from ..cli import parse_config
    (cfg,) = parse_config([DPOStepConfig], args, "specalign train dpo")
    run(cfg)
    return 0
