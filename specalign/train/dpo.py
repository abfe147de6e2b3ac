"""``specalign train dpo``: align the draft with DPO (TRL ``DPOTrainer``) through a PEFT LoRA adapter.

The reference policy is the draft itself with the adapter disabled (TRL does this when it gets a
``peft_config`` and no ``ref_model``): one set of base weights, never a second copy. The output is
the adapter directory (``adapter_config.json`` names the draft directory as its base), which
``specalign decode --method sss --draft OUT`` uses directly: Qr = draft + adapter, Q0 = the same
weights with the adapter disabled. ``dpo_report.json`` gives the log-prob margin
log q(chosen) - log q(rejected) on training and held-out pairs before (Q0) and after (Qr) training.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from ..models.loading import load_model, load_tokenizer
from .common import (drop_checkpoints, finalize, is_main_process, plain_load, report, resume_from, setup_step,
                     train_summary, wait_for_everyone)
from .data import load_preferences, split_rows
from .dpo_config import DPOStepConfig
from .metrics import pair_margins


def base_spec(spec: str) -> str:
    """The draft as the adapter's base: an absolute path for a directory, else the spec itself."""
    return str(Path(spec).resolve()) if Path(spec).is_dir() else spec


def _summary(margins: list[float]) -> dict:
    return {"mean_margin": statistics.fmean(margins), "accuracy": sum(m > 0 for m in margins) / len(margins)}


def run(cfg: DPOStepConfig) -> dict:
    from datasets import Dataset
    from trl import DPOTrainer
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
                    "held_out_pairs": len(held_rows), "beta": cfg.beta}
    resume = resume_from(cfg, work)
    if is_main_process():
        result["before"] = {k: _summary(pair_margins(model, tok, v)) for k, v in probe.items() if v}
    model.train()
    model.requires_grad_(True)
    keep = ("prompt", "chosen", "rejected")
    dataset = Dataset.from_list([{k: r[k] for k in keep} for r in train_rows])
    cfg.output_dir, final_dir = str(work), cfg.output_dir
    try:
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tok,
                             peft_config=cfg.lora_config())
        out = trainer.train(resume_from_checkpoint=resume)
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
        result["after"] = {k: _summary(pair_margins(aligned, tok, v)) for k, v in probe.items() if v}
        result["wall_s"] = round(time.perf_counter() - started, 1)
        for k in result["after"]:
            report(f"{k} pairs: log-prob margin {result['before'][k]['mean_margin']:.3f} -> "
                   f"{result['after'][k]['mean_margin']:.3f}, chosen preferred "
                   f"{result['before'][k]['accuracy']:.2f} -> {result['after'][k]['accuracy']:.2f}")
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
