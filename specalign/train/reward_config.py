"""Settings of ``specalign train reward``: TRL's ``RewardConfig`` plus the base model and preference data."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import RewardConfig

from ..errors import SpecError
from .common import StepArgs


@dataclass
class RewardStepConfig(StepArgs, RewardConfig):
    base: str = field(default="", metadata={"help": "model whose body becomes the reward model (e.g. the draft)"})
    preferences: str = field(default="", metadata={"help": "preference data: a `train preferences` output dir, "
                                                           "JSON/JSONL file or hf:NAME"})
    columns: str | None = field(default=None, metadata={"help": "column mapping, e.g. chosen=real,rejected=generated"})
    limit: int = field(default=0, metadata={"help": "use at most N preference rows (0 = all)"})
    eval_fraction: float = field(default=0.1, metadata={"help": "held-out share of pairs for the ranking report"})
    dtype: str = field(default="float32", metadata={"help": "weights dtype"})
    # RewardConfig defaults that suit a small model on any hardware
    learning_rate: float = 5e-5
    bf16: bool | None = False
    gradient_checkpointing: bool = False
    max_length: int | None = 512
    per_device_train_batch_size: int = 4
    num_train_epochs: float = 1.0
    logging_steps: float = 5
    save_steps: float = 50
    save_total_limit: int | None = 2

    def validate(self) -> "RewardStepConfig":
        if not self.base:
            raise SpecError("reward needs a base model: set base: DRAFT_DIR (or any causal LM spec)")
        if not self.preferences:
            raise SpecError("reward needs preference data: set preferences: DIR_OR_FILE")
        if not self.output_dir:
            raise SpecError("output_dir is required: set output_dir in the recipe or pass --output_dir DIR")
        return self
