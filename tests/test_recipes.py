"""Every recipe runs from the repository root of a fresh clone without edits: it names no absolute
path, its inputs are data set names, ``${step}`` references or another recipe's output folder, its
outputs go under ``outputs/`` relative to the working directory, and the cheap ones run at a smoke size
from an empty working directory, writing only there."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from specalign.data import is_named

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes" / "smollm2").glob("*.yaml"))
INPUT_KEYS = {"prompts", "exclude_prompts", "eval_prompts", "preferences", "from_data", "samples", "draft", "policy",
              "backbone", "base", "dpo", "value", "target", "model"}


def sections(path: Path):
    """(name, mapping) of every step config in a recipe (a pipeline recipe's steps and budgets too)."""
    raw = yaml.safe_load(path.read_text())
    if "steps" not in raw:
        yield path.stem, raw
        return
    yield "pipeline", {"output_dir": raw["output_dir"]}
    for name, section in raw["steps"].items():
        yield name, section or {}


def test_recipes_name_no_absolute_path_and_resolve_every_input(named_data):
    outputs = {s["output_dir"] for p in RECIPES for _, s in sections(p) if "output_dir" in s}
    assert outputs and all(o.startswith("outputs/") for o in outputs), outputs
    for path in RECIPES:
        for name, section in sections(path):
            for key, value in section.items():
                if not isinstance(value, str):
                    continue
                assert not os.path.isabs(value) and not value.startswith(("~", "..")), (path.name, key, value)
                if key not in INPUT_KEYS:
                    continue
                ok = (is_named(value) or value.startswith("${") or value in outputs or value == "smollm2-135m-instruct"
                      or value.startswith(("layers:", "first:", "spread:")))
                assert ok, f"{path.name} [{name}] {key}: {value} resolves to nothing a fresh clone has"
                if is_named(value):
                    from specalign.data import load_named
                    assert load_named(value)


def _run(args, cwd, env):
    proc = subprocess.run([sys.executable, "-m", "specalign.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_cheap_recipes_run_from_an_empty_folder(named_data, tiny_dir, tmp_path):
    env = {**os.environ, "SPECALIGN_DATA": named_data, "OMP_NUM_THREADS": "1"}
    recipes = ROOT / "recipes" / "smollm2"
    _run(["train", "preferences", "--config", str(recipes / "preferences_saferlhf.yaml")], tmp_path, env)
    rows = (tmp_path / "outputs/smollm2/prefs-saferlhf/data.jsonl").read_text().splitlines()
    assert len(rows) == 12 and json.loads(rows[0])["chosen"][0]["role"] == "assistant"
    # the draft recipe at a smoke size: only the target and the sizes are overridden
    _run(["train", "draft", "--config", str(recipes / "draft.yaml"), "--target", tiny_dir, "--draft", "first:1",
          "--limit", "4", "--eval_limit", "2", "--samples_per_prompt", "1", "--max_new_tokens", "8",
          "--sample_batch_rows", "4", "--max_steps", "2", "--max_run_minutes", "0", "--bf16", "false",
          "--sample_autocast", "false", "--torch_threads", "1", "--report_to", "none"], tmp_path, env)
    report = json.loads((tmp_path / "outputs/smollm2/draft/draft_report.json").read_text())
    assert report["train_samples"] == 4 and report["eval_prompts"] == 2 and 0 <= report["acceptance"] <= 1
    written = {p.relative_to(tmp_path).parts[:2] for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {("outputs", "smollm2")}, written
