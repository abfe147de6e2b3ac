"""Settings of ``specalign train value`` (YAML keys / flags); Trainer settings are ``TrainingArguments``."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..errors import SpecError
from .common import StepArgs


@dataclass
class ValueConfig(StepArgs, TrainingArguments):
    features: str = field(default="text", metadata={
        "help": "text: a backbone reads the response text; target: see `specalign train value --features target`"})
    backbone: str = field(default="", metadata={"help": "causal LM whose body reads the text (e.g. the draft)"})
    samples: str = field(default="", metadata={"help": "scored responses: a `train preferences` output dir "
                                                       "(samples.jsonl) or JSONL rows of prompt, response, score"})
    limit: int = field(default=0, metadata={"help": "use at most N samples (0 = all)"})
    eval_fraction: float = field(default=0.1, metadata={"help": "held-out share of prompts for the correlation report"})
    bt_weight: float = field(default=0.0, metadata={"help": "weight of a Bradley-Terry term on finished pairs of a "
                                                            "prompt (0 = regression only)"})
    max_length: int = field(default=512, metadata={"help": "tokens per prompt + response (longer responses are cut)"})
    freeze_backbone: bool = field(default=False, metadata={"help": "train the head only (a linear probe)"})
    prefix_lengths: str = field(default="4,8,16,32,64", metadata={"help": "prefix lengths (tokens) of the report"})
    baseline_scorer: str = field(default="", metadata={
        "help": "scorer of partial text to compare with (default: the samples' own scorer; none = skip)"})
    dtype: str = field(default="float32", metadata={"help": "backbone dtype"})
    # TrainingArguments defaults that suit this step
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "cosine"
    per_device_train_batch_size: int = 4
    num_train_epochs: float = 2.0
    logging_steps: int = 10
    save_steps: int = 50
    save_total_limit: int | None = 2
    remove_unused_columns: bool = False

    def validate(self) -> "ValueConfig":
        if self.features != "text":
            raise SpecError(f"features must be text or target, got {self.features!r}")
        if not self.backbone:
            raise SpecError("value needs a backbone: set backbone: DRAFT_DIR (or any causal LM spec)")
        if not self.samples:
            raise SpecError("value needs scored samples: set samples: DIR (a `train preferences` output) or a JSONL")
        if not self.output_dir:
            raise SpecError("output_dir is required: set output_dir in the recipe or pass --output_dir DIR")
        if self.max_length < 8:
            raise SpecError(f"max_length must be >= 8, got {self.max_length}")
        self.prefix_list()
        return self

    def prefix_list(self) -> list[int]:
        try:
            out = [int(x) for x in self.prefix_lengths.split(",") if x.strip()]
        except ValueError:
            raise SpecError(f"prefix_lengths must be integers like 4,8,16: got {self.prefix_lengths!r}") from None
        if any(x < 0 for x in out):
            raise SpecError("prefix_lengths must be >= 0")
        return out
