"""``specalign train reward``: a sequence-classification reward model (TRL ``RewardTrainer``,
Bradley-Terry loss) from preference data, loadable as scorer ``rm:DIR``.

The base model's body gets a fresh one-logit score head (``AutoModelForSequenceClassification``,
``num_labels=1``). ``reward_report.json`` gives the held-out ranking accuracy (score(chosen) >
score(rejected)) measured through ``RewardModelScorer`` on the saved directory, i.e. exactly what
``decode --scorer rm:DIR`` will use, before (random head) and after training.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from ..errors import SpecError
from ..models.loading import _ensure_local_copy, load_tokenizer, resolve, torch_dtype
from ..models.scorers import Candidate, RewardModelScorer
from .common import (drop_checkpoints, finalize, is_main_process, plain_load, report, resume_from, setup_step,
                     train_summary)
from .data import load_preferences, prompt_text, response_text, split_rows
from .reward_config import RewardStepConfig


def ranking(score_fn, rows: list[dict]) -> dict:
    """Share of pairs whose chosen response scores above the rejected one, and the mean score gap."""
    cands = [Candidate(prompt_text(r["prompt"]), response_text(r[side]))
             for r in rows for side in ("chosen", "rejected")]
    scores = score_fn(cands)
    gaps = [scores[2 * i] - scores[2 * i + 1] for i in range(len(rows))]
    return {"accuracy": sum(g > 0 for g in gaps) / len(gaps), "mean_gap": statistics.fmean(gaps), "pairs": len(rows)}


class _InMemoryScorer(RewardModelScorer):
    """``RewardModelScorer`` over a model already in memory (the untrained head, for the 'before' figure)."""

    def __init__(self, model, tokenizer):
        from ..models.scorers import Scorer
        Scorer.__init__(self)
        self.name, self.model, self.tokenizer = "rm:untrained", model, tokenizer


def run(cfg: RewardStepConfig) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardTrainer
    cfg.validate()
    started = time.perf_counter()
    work = setup_step(cfg)
    rows = load_preferences(cfg.preferences, cfg.columns, cfg.limit)
    train_rows, held = split_rows(rows, cfg.eval_fraction, cfg.seed)
    tok = load_tokenizer(cfg.base)
    resolved = resolve(cfg.base)
    if resolved.adapter:
        raise SpecError(f"reward base {cfg.base} is a PEFT adapter: use a full model directory (e.g. the draft)")
    with plain_load():
        model = AutoModelForSequenceClassification.from_pretrained(_ensure_local_copy(resolved), num_labels=1,
                                                                   dtype=torch_dtype(cfg.dtype))
    model.config.pad_token_id = tok.pad_token_id
    report(f"reward: {len(train_rows)} training pairs, {len(held)} held out; base {cfg.base}")
    result: dict = {"base": cfg.base, "preferences": cfg.preferences, "train_pairs": len(train_rows),
                    "held_out_pairs": len(held)}
    resume = resume_from(cfg, work)
    if held and is_main_process() and resume is None:
        model.eval()
        result["before"] = ranking(_InMemoryScorer(model, tok), held)
    model.train()
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in train_rows])
    cfg.output_dir, final_dir = str(work), cfg.output_dir
    try:
        trainer = RewardTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tok)
        out = trainer.train(resume_from_checkpoint=resume)
    finally:
        cfg.output_dir = final_dir
    result.update(train_summary(trainer, out, resume))

    def describe(tmp: Path):
        tok.save_pretrained(tmp)
        if held:
            result["after"] = ranking(RewardModelScorer(str(tmp)), held)  # what rm:DIR loads
            before = result.get("before", {}).get("accuracy")
            report(f"held-out ranking accuracy: {before if before is None else round(before, 3)} -> "
                   f"{result['after']['accuracy']:.3f} ({len(held)} pairs)")
        result["wall_s"] = round(time.perf_counter() - started, 1)
        return {"reward_report.json": result}

    finalize(trainer, final_dir, describe)
    drop_checkpoints(cfg, work)
    report(f"reward model saved to {final_dir} (use it as scorer rm:{final_dir})")
    return result


def main(args: list[str]) -> int:
    from ..cli import parse_config
    (cfg,) = parse_config([RewardStepConfig], args, "specalign train reward")
    run(cfg)
    return 0
