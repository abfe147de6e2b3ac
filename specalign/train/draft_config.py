"""Settings of ``specalign train draft`` (YAML keys / flags). Trainer settings (learning_rate,
per_device_train_batch_size, num_train_epochs, max_steps, save_steps, deepspeed, ...) are
``transformers.TrainingArguments`` fields and go in the same file."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..errors import SpecError
from .common import StepArgs

LOSSES = ("kl", "tvd")
TEACHERS = ("forward", "hidden", "samples")


@dataclass
class DraftConfig(StepArgs, TrainingArguments):
    target: str = field(default="smollm2-135m-instruct", metadata={"help": "target model spec (the teacher)"})
    draft: str = field(default="spread:6", metadata={
        "help": "first:K | spread:K | layers:I,J,... (cut from the target) or a model spec of the same vocabulary"})
    prompts: str = field(default="alpaca_farm_eval",
                         metadata={"help": "training prompts (JSON list / JSONL with 'prompt', hf:NAME)"})
    exclude_prompts: str | None = field(default="alpaca_farm_100",
                                        metadata={"help": "prompts to hold out of training (e.g. benchmark prompts)"})
    limit: int = field(default=0, metadata={"help": "use at most N training prompts (0 = all)"})
    eval_prompts: str | None = field(default="alpaca_farm_100",
                                     metadata={"help": "held-out prompts for the acceptance report"})
    eval_limit: int = field(default=50, metadata={"help": "held-out prompts used (0 = all)"})
    eval_before: bool = field(default=True, metadata={"help": "also measure the draft's acceptance before training"})
    max_prompt_tokens: int = field(default=256, metadata={"help": "drop prompts longer than this (0 = keep all)"})
    samples_per_prompt: int = field(default=1, metadata={"help": "target samples per training prompt"})
    max_new_tokens: int = field(default=128, metadata={"help": "tokens per target sample"})
    sample_temperature: float = field(default=1.0, metadata={"help": "temperature of the target's samples"})
    sample_batch_rows: int = field(default=48, metadata={"help": "rows per sampling batch"})
    sample_seed: int | None = field(default=None, metadata={"help": "seed of the target's samples (default: seed)"})
    sample_autocast: bool = field(default=False, metadata={
        "help": "sample the training responses under bf16 autocast (faster on CPUs with AVX512-BF16 and on GPUs; "
                "held-out samples and the acceptance report keep the target's dtype)"})
    teacher: str = field(default="forward", metadata={
        "help": "forward: a target forward per batch gives full-vocabulary distributions (exact loss) | hidden: the "
                "target's final hidden states recorded while sampling give the same distributions through its head "
                "(no teacher forward; H numbers a position on disk) | samples: the top-k log-probs recorded while "
                "sampling (no teacher forward; the rest of the vocabulary is one bucket)"})
    topk: int = field(default=128, metadata={"help": "teacher: samples: target log-probs kept per position"})
    loss: str = field(default="kl", metadata={"help": "kl (forward KL(p||q)) | tvd (total variation = 1 - acceptance)"})
    tvd_fraction: float = field(default=0.0, metadata={
        "help": "with loss kl: train the last share of the run (steps or max_train_minutes, whichever ends first) "
                "on tvd"})
    freeze_embeddings: bool = field(default=False, metadata={"help": "keep input embeddings / output head fixed"})
    samples_cache: str | None = field(default=None, metadata={"help": "target-sample cache dir (default WORK/samples)"})
    max_train_minutes: float = field(default=0.0, metadata={"help": "stop training after this wall time (0 = off)"})
    max_run_minutes: float = field(default=0.0, metadata={
        "help": "budget for the whole command (0 = off): training stops early enough that sampling + training + the "
                "final acceptance measurement (timed as the one before training) + saving fit in it"})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 (teacher sampling and eval)"})
    # TrainingArguments defaults that suit this step
    learning_rate: float = 3e-4
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03
    per_device_train_batch_size: int = 8
    num_train_epochs: float = 1.0
    logging_steps: int = 10
    save_steps: int = 50
    save_total_limit: int | None = 2
    remove_unused_columns: bool = False
    optim: str = "adamw_torch"

    def validate(self) -> "DraftConfig":
        if self.loss not in LOSSES:
            raise SpecError(f"unknown distillation loss '{self.loss}': use one of {', '.join(LOSSES)}")
        if self.teacher not in TEACHERS:
            raise SpecError(f"unknown teacher '{self.teacher}': use forward (a target forward per batch), hidden or "
                            "samples (signals recorded while sampling)")
        if self.teacher == "samples" and self.topk < 1:
            raise SpecError(f"topk must be >= 1 with teacher: samples, got {self.topk}")
        if not 0.0 <= self.tvd_fraction <= 1.0:
            raise SpecError(f"tvd_fraction must be in [0, 1], got {self.tvd_fraction}")
        if self.samples_per_prompt < 1 or self.max_new_tokens < 1 or self.sample_batch_rows < 1:
            raise SpecError("samples_per_prompt, max_new_tokens and sample_batch_rows must be >= 1")
        if self.max_train_minutes < 0 or self.max_run_minutes < 0:
            raise SpecError("max_train_minutes and max_run_minutes must be >= 0 (0 = no limit)")
        if not self.output_dir:
            raise SpecError("output_dir is required: set output_dir in the recipe or pass --output_dir DIR")
        return self
