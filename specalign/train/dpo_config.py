"""Settings of ``specalign train dpo``: TRL's ``DPOConfig`` (beta, loss_type, max_length, learning_rate,
...) plus the draft, the preference data and the LoRA adapter."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig

from ..errors import SpecError
from .common import StepArgs


@dataclass
class DPOStepConfig(StepArgs, DPOConfig):
    draft: str = field(default="", metadata={"help": "the draft to align (model dir or spec); the adapter's base"})
    preferences: str = field(default="", metadata={"help": "preference data: a `train preferences` output dir, "
                                                           "JSON/JSONL file or hf:NAME"})
    columns: str | None = field(default=None, metadata={"help": "column mapping, e.g. chosen=real,rejected=generated"})
    limit: int = field(default=0, metadata={"help": "use at most N preference rows (0 = all)"})
    eval_fraction: float = field(default=0.1, metadata={"help": "held-out share of pairs for the margin report"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "all-linear or q_proj,v_proj,..."})
    dtype: str = field(default="float32", metadata={"help": "draft weights dtype"})
    judge: str = field(default="", metadata={"help": "gold scorer (e.g. judge:sentiment): after training, the aligned "
                                                  "and the unaligned draft each sample on the held-out pairs' prompts "
                                                  "with the same seeds and the judge scores both ('' = skip)"})
    eval_samples: int = field(default=4, metadata={"help": "samples per held-out prompt for the gold comparison"})
    eval_max_new_tokens: int = field(default=64, metadata={"help": "new tokens per gold-comparison sample"})
    eval_batch_rows: int = field(default=32, metadata={"help": "rows per sampling batch of the gold comparison"})
    # DPOConfig defaults that suit a small draft on any hardware
    learning_rate: float = 5e-5
    beta: float = 0.1
    bf16: bool | None = False
    gradient_checkpointing: bool = False
    max_length: int | None = 512
    precompute_ref_log_probs: bool = True  # one reference pass (adapter disabled) before training, none per step
    per_device_train_batch_size: int = 4
    num_train_epochs: float = 1.0
    logging_steps: float = 5
    save_steps: float = 50
    save_total_limit: int | None = 2

    def validate(self) -> "DPOStepConfig":
        if not self.draft:
            raise SpecError("dpo needs the draft to align: set draft: DIR (e.g. the `train draft` output)")
        if not self.preferences:
            raise SpecError("dpo needs preference data: set preferences: DIR_OR_FILE (e.g. the `train preferences` "
                            "output)")
        if not self.output_dir:
            raise SpecError("output_dir is required: set output_dir in the recipe or pass --output_dir DIR")
        if self.lora_r < 1:
            raise SpecError(f"lora_r must be >= 1, got {self.lora_r}")
        if self.judge and (self.eval_samples < 1 or self.eval_max_new_tokens < 1 or self.eval_batch_rows < 1):
            raise SpecError("eval_samples, eval_max_new_tokens and eval_batch_rows must be >= 1")
        return self

    def lora_config(self):
        from peft import LoraConfig
        targets = self.lora_target_modules
        modules = targets if targets == "all-linear" else [m.strip() for m in targets.split(",") if m.strip()]
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=modules, task_type="CAUSAL_LM")
