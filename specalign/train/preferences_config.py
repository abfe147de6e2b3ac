"""Settings of ``specalign train preferences`` (YAML keys / flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import SpecError

PAIRINGS = ("best-worst", "all")


@dataclass
class PreferencesConfig:
    output_dir: str = field(default="", metadata={"help": "output directory: data.jsonl, samples.jsonl, report"})
    # sample + score (on-policy) ...
    policy: str = field(default="", metadata={"help": "model spec that samples the responses (e.g. the draft dir)"})
    scorer: str = field(default="judge:sentiment", metadata={"help": "scorer spec (judge:..., rm:DIR, value:DIR, "
                                                                    "python:mod:fn, loglik:MODEL)"})
    prompts: str = field(default="alpaca_farm_eval", metadata={"help": "prompt source"})
    exclude_prompts: str | None = field(default="alpaca_farm_100",
                                        metadata={"help": "prompts to leave out (held-out benchmark prompts)"})
    limit: int = field(default=0, metadata={"help": "use at most N prompts (0 = all)"})
    max_prompt_tokens: int = field(default=256, metadata={"help": "drop longer prompts (0 = keep all)"})
    k: int = field(default=4, metadata={"help": "responses sampled per prompt"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens per response"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling (0 = off)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    batch_rows: int = field(default=48, metadata={"help": "rows per sampling batch"})
    pairing: str = field(default="best-worst", metadata={"help": "best-worst: one pair per prompt; all: every pair"})
    min_margin: float = field(default=0.0, metadata={"help": "drop pairs whose score difference is <= this"})
    max_batch_tokens: int = field(default=16384, metadata={"help": "scorer batch budget (rows x tokens)"})
    # ... or load existing preference data
    from_data: str | None = field(default=None, metadata={"help": "existing preference data (JSONL/JSON/dir/hf:NAME) "
                                                                    "instead of sampling"})
    columns: str | None = field(default=None, metadata={"help": "column mapping, e.g. chosen=real,rejected=generated"})
    rescore: bool = field(default=False, metadata={"help": "with from_data: score chosen/rejected with the scorer"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    dtype: str = field(default="auto", metadata={"help": "policy / scorer dtype: auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when available, else CPU) | cpu | cuda[:N]"})
    work_dir: str | None = field(default=None, metadata={"help": "sample cache, reused when a run restarts "
                                                                 "(default: OUT.work)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing OUT"})
    torch_threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch default)"})

    def validate(self) -> "PreferencesConfig":
        if not self.output_dir:
            raise SpecError("output_dir is required: set output_dir in the recipe or pass --output_dir DIR")
        if self.from_data is None and not self.policy:
            raise SpecError("give a policy to sample from (policy: DRAFT_DIR) or existing data (from_data: FILE)")
        if self.pairing not in PAIRINGS:
            raise SpecError(f"unknown pairing '{self.pairing}': use one of {', '.join(PAIRINGS)}")
        if self.from_data is None and self.k < 2:
            raise SpecError(f"k must be >= 2 to form preference pairs, got {self.k}")
        if self.from_data is None and not self.scorer:
            raise SpecError("sampling needs a scorer to rank the responses: set scorer (e.g. judge:sentiment)")
        return self
