"""``specalign train STEP --config recipe.yaml [--key value ...]`` (also ``python -m specalign.train STEP``).

Steps: draft (distill a draft from the target), preferences (sample + score -> preference dataset),
dpo (TRL DPOTrainer + PEFT LoRA on the draft), value (value-head reward model; ``--features target``:
a head on the target's own hidden states, free at decode time), reward (TRL RewardTrainer). Every step runs plainly or under ``accelerate launch --config_file ... -m specalign.train``.
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


def features_of(args: list[str]) -> str:
    """``value``'s ``features`` key (``text`` unless ``--features`` or the recipe says otherwise)."""
    for i, a in enumerate(args):
        if a == "--features":
            return args[i + 1] if i + 1 < len(args) else ""
        if a.startswith("--features="):
            return a.split("=", 1)[1]
    if "--config" in args and args.index("--config") + 1 < len(args):
        import os
        import yaml
        path = args[args.index("--config") + 1]
        if os.path.isfile(path):
            try:
                data = yaml.safe_load(open(path)) or {}
            except yaml.YAMLError:
                return "text"  # the step's own parser reports the YAML error
            return str(data.get("features", "text")) if isinstance(data, dict) else "text"
    return "text"


def main(args: list[str]) -> int:
    args = _drop_local_rank(list(args))
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    step, rest = args[0], list(args[1:])
    if step not in STEPS:
        raise SpecError(f"unknown training step '{step}': use one of {', '.join(STEPS)}")
    module = STEPS[step]
    if step == "value" and features_of(rest) == "target":
        module = "specalign.train.target_value"
    return int(importlib.import_module(module).main(rest) or 0)
