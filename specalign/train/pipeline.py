"""``specalign run RECIPE [--budget smoke|full] [--output-dir DIR]``: a whole recipe in one command.

A pipeline recipe (``recipes/smollm2/weak_to_strong.yaml``) lists steps; each step's section is that
step's own YAML config (the keys ``specalign train STEP --config`` or ``specalign bench w2s --config``
take), so every key is checked by the step itself:

    output_dir: outputs/smollm2/w2s         # the run's root (--output-dir overrides it)
    steps:
      draft:        {target: ..., draft: spread:6, ...}
      preferences:  {policy: ${draft}, scorer: judge:sentiment, ...}
      dpo:          {...}
      value:        {...}
      study:        {dpo: ${dpo}, value: ${value}, ...}
    budgets:
      smoke: {steps: {tiny_target: {...}, draft: {max_steps: 2, ...}}}   # merged over ``steps``
      full:  {steps: {}}

Steps run in the order ``tiny_target, draft, preferences, dpo, value, study`` (those present).
A budget's ``steps`` are merged key by key over the recipe's (a step set to ``null`` is left out).
In string values ``${NAME}`` is step NAME's output directory and ``${output_dir}`` the root.
A step's output is ``output_dir`` of its section, default ``ROOT/NAME``. A step is skipped when its
output exists (training steps write their output atomically, so it exists only when complete; the
study is done when ``ROOT/study/results.json`` exists): re-running the command resumes. Each run
writes the merged config of every step to ``ROOT/configs/NAME.yaml`` and a log ``ROOT/pipeline.json``.

``tiny_target`` (smoke budgets) saves a tiny random Llama with the character tokenizer, so the whole
pipeline runs in minutes on models built from configs.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import time
from pathlib import Path

from ..errors import SpecError

ORDER = ["tiny_target", "draft", "preferences", "dpo", "value", "study"]
BUDGETS = ("smoke", "full")
TRAIN_STEPS = ("draft", "preferences", "dpo", "value")


def merge(base, over):
    """Deep merge of dicts (``over`` wins; a ``None`` value removes the key)."""
    if not isinstance(base, dict) or not isinstance(over, dict):
        return copy.deepcopy(over)
    out = copy.deepcopy(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_recipe(path: str, budget: str, output_dir: str | None) -> tuple[Path, dict[str, dict]]:
    """(root, {step: section with ${...} expanded and output_dir set}) in run order."""
    import yaml
    if budget not in BUDGETS:
        raise SpecError(f"unknown budget '{budget}': use one of {', '.join(BUDGETS)}")
    if not Path(path).is_file():
        raise SpecError(f"recipe not found: {path}")
    try:
        recipe = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise SpecError(f"recipe {path} is not valid YAML ({str(exc).splitlines()[0]}): fix the file") from None
    unknown = set(recipe) - {"output_dir", "steps", "budgets"}
    if unknown:
        raise SpecError(f"unknown recipe keys {sorted(unknown)} in {path}: a pipeline recipe has output_dir, "
                        "steps and budgets")
    root = output_dir or recipe.get("output_dir")
    if not root:
        raise SpecError(f"recipe {path} sets no output_dir: add one or pass --output-dir DIR")
    budgets = recipe.get("budgets") or {}
    steps = merge(recipe.get("steps") or {}, (budgets.get(budget) or {}).get("steps") or {})
    bad = [s for s in steps if s not in ORDER]
    if bad:
        raise SpecError(f"unknown pipeline steps {bad} in {path}: use some of {', '.join(ORDER)}")
    root = Path(root).resolve()
    sections = {name: dict(steps[name] or {}) for name in ORDER if name in steps}
    outputs = {"output_dir": str(root)}

    def expand(value):
        if isinstance(value, str):
            def sub(m):
                if m.group(1) not in outputs:
                    raise SpecError(f"recipe {path}: ${{{m.group(1)}}} names no step of budget '{budget}' "
                                    f"(steps: {', '.join(sections)})")
                return outputs[m.group(1)]
            return re.sub(r"\$\{(\w+)\}", sub, value)
        if isinstance(value, list):
            return [expand(v) for v in value]
        if isinstance(value, dict):
            return {k: expand(v) for k, v in value.items()}
        return value

    for name, sec in sections.items():  # outputs first: a section may name a later step's output
        outputs[name] = str(Path(expand(sec["output_dir"])) if sec.get("output_dir") else root / name)
    for name, sec in sections.items():
        sections[name] = expand(sec)
        sections[name]["output_dir"] = outputs[name]
    return root, sections


def done_marker(name: str, section: dict) -> Path:
    out = Path(section["output_dir"])
    return out / "results.json" if name == "study" else out


def vowel_judge(prompts, responses, finished) -> list[float]:
    """The smoke budget's gold judge (``python:specalign.train.pipeline:vowel_judge``): the share of vowels
    in the response. It has signal on the character-level text tiny random models write, where a
    sentiment judge scores nearly everything 0."""
    return [sum(ch in "aeiouAEIOU" for ch in r) / max(1, len(r)) for r in responses]


def make_tiny_target(section: dict) -> None:
    """A tiny random Llama + the character tokenizer, saved as a model directory (atomically)."""
    from ..models.testing import char_tokenizer, tiny_llama
    from .common import atomic_dir
    keys = {"hidden_size", "num_layers", "seed", "init_scale", "num_heads", "num_kv_heads", "intermediate_size",
            "max_position_embeddings"}
    unknown = set(section) - keys - {"output_dir"}
    if unknown:
        raise SpecError(f"unknown tiny_target keys {sorted(unknown)}: use some of {', '.join(sorted(keys))}")
    model = tiny_llama(**{k: v for k, v in section.items() if k in keys})
    with atomic_dir(section["output_dir"]) as tmp:
        model.save_pretrained(tmp)
        char_tokenizer().save_pretrained(tmp)


def run_step(name: str, config_path: Path, section: dict) -> None:
    if name == "tiny_target":
        make_tiny_target(section)
    elif name in TRAIN_STEPS:
        from .cli import main as train_main
        train_main([name, "--config", str(config_path)])
    else:
        from ..bench.w2s import main as w2s_main
        w2s_main(["--config", str(config_path)])


def run(recipe: str, budget: str = "full", output_dir: str | None = None) -> list[dict]:
    import yaml
    root, sections = load_recipe(recipe, budget, output_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "configs").mkdir(exist_ok=True)
    log_path = root / "pipeline.json"
    log = []
    for name, section in sections.items():
        marker = done_marker(name, section)
        entry = {"step": name, "output": section["output_dir"], "budget": budget}
        if marker.exists():
            entry["status"] = "skipped"
            print(f"[specalign run] {name}: skipped ({marker} exists)", flush=True)
        else:
            config_path = root / "configs" / f"{name}.yaml"
            config_path.write_text(f"# step '{name}' of {recipe} (budget {budget}), written by specalign run\n"
                                   + yaml.safe_dump(section, sort_keys=False), encoding="utf-8")
            print(f"[specalign run] {name}: running -> {section['output_dir']}", flush=True)
            start = time.perf_counter()
            run_step(name, config_path, section)
            entry.update(status="ran", wall_s=round(time.perf_counter() - start, 1))
            if not marker.exists():
                raise SpecError(f"step {name} finished without writing {marker}: check its output_dir")
            print(f"[specalign run] {name}: done in {entry['wall_s']:.0f}s", flush=True)
        log.append(entry)
        log_path.write_text(json.dumps(log, indent=2) + "\n", encoding="utf-8")
    print(f"[specalign run] all {len(log)} steps complete under {root}", flush=True)
    return log


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="specalign run", description="run a pipeline recipe; finished steps "
                                     "are skipped, so re-running resumes")
    parser.add_argument("recipe")
    parser.add_argument("--budget", default="full", help="smoke | full (default full)")
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", default=None,
                        help="root of every step's output (default: the recipe's output_dir)")
    try:
        ns = parser.parse_args(args)
    except SystemExit as exc:
        if exc.code:
            raise SpecError("usage: specalign run RECIPE [--budget smoke|full] [--output-dir DIR]") from None
        return 0
    run(ns.recipe, ns.budget, ns.output_dir)
    return 0
