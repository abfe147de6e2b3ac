"""``specalign train STEP --config recipe.yaml [--key value ...]`` (also ``python -m specalign.train STEP``).

Steps: draft (distill a draft from the target), preferences (sample + score -> preference dataset),
dpo (TRL DPOTrainer + PEFT LoRA on the draft), value (value-head reward model), reward (TRL
RewardTrainer). Every step runs plainly or under ``accelerate launch --config_file ... -m specalign.train``.
"""

from __future__ import annotations

import importlib

from ..errors import SpecError

STEPS = {
    "draft": "specalign.train.draft",
    "preferences": "specalign.train.preferences",
    "dpo": "specalign.train.dpo",
    "value": "specalign.train.value",
    "reward": "specalign.train.reward",
}


def _drop_local_rank(args: list[str]) -> list[str]:
    """The ``deepspeed`` launcher prepends ``--local_rank=N`` (it also sets LOCAL_RANK in the environment)."""
    out, skip = [], False
    for i, a in enumerate(args):
        if skip:
            skip = False
        elif a.startswith("--local_rank=") or a.startswith("--local-rank="):
            continue
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(args):
            skip = True
        else:
            out.append(a)
    return out


def main(args: list[str]) -> int:
    args = _drop_local_rank(list(args))
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    step, rest = args[0], list(args[1:])
    if step not in STEPS:
        raise SpecError(f"unknown training step '{step}': use one of {', '.join(STEPS)}")
    return int(importlib.import_module(STEPS[step]).main(rest) or 0)
