"""``specalign run recipes/smollm2/weak_to_strong.yaml --budget smoke``: every step runs to completion on
tiny models and writes its output (draft, preference data, DPO adapter, the study's results.json /
table.md / frontier.png); the second run skips every finished step; a step removed is redone alone;
recipe errors are one-line SpecErrors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from specalign.errors import SpecError
from specalign.train.pipeline import load_recipe, merge

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/smollm2/weak_to_strong.yaml"


def specalign_run(out, *extra):
    proc = subprocess.run([sys.executable, "-m", "specalign.cli", "run", str(RECIPE), "--budget", "smoke",
                           "--output-dir", str(out), *extra], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((out / "pipeline.json").read_text())


def test_smoke_pipeline_runs_then_resumes(tmp_path, named_data):
    out = tmp_path / "run"
    _, log = specalign_run(out)
    steps = [e["step"] for e in log]
    assert steps == ["tiny_target", "draft", "preferences", "dpo", "value", "study"]
    assert all(e["status"] == "ran" for e in log), log
    assert (out / "draft" / "draft_report.json").is_file()
    assert (out / "preferences" / "data.jsonl").read_text().strip()
    adapter = json.loads((out / "dpo" / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]) == (out / "draft").resolve()
    study = out / "study"
    results = json.loads((study / "results.json").read_text())
    assert (study / "table.md").read_text().startswith("Target ")
    assert (study / "frontier.png").stat().st_size > 1000
    methods = {m["method"] for m in results["results"]["methods"]}
    assert methods == {"sample", "best-of-n", "draft", "sss", "best-of-n+sss", "spr-judge", "spr-value",
                       "spr-adaptive", "spr+sss-implicit", "spr+sss-value"}
    assert [m["params"]["lambda"] for m in results["results"]["methods"] if m["method"] == "sss"] == [0.5, 2.0]
    assert {m["params"]["lambda"] for m in results["results"]["methods"] if m["method"] == "best-of-n+sss"} == {1.0}
    report = json.loads((out / "dpo" / "dpo_report.json").read_text())
    assert report["precompute_ref_log_probs"] is True and report["gold"]["samples_per_prompt"] == 2
    assert set(report["implicit_reward"]) == {"train", "held_out"}
    assert (out / "value" / "value_head.json").is_file() and (out / "value" / "value_report.json").is_file()
    assert [p["params"]["n"] for p in results["results"]["best_of_n_curve"]] == [1, 2, 4, 8]
    assert results["config"]["dpo"] == str(out / "dpo") and results["config"]["value"] == str(out / "value")
    assert set(results["results"]["targets"]) == {"sss_reaches_best_of_8", "sss_keeps_target_fluency",
                                                  "sss_x_spr_on_frontier"}
    assert [m["params"]["alpha"] for m in results["results"]["methods"] if m["method"] == "spr-judge"] == [0.5, 0.75]
    # each step's merged config was written and names the earlier steps' outputs
    assert f"policy: {out / 'draft'}" in (out / "configs" / "preferences.yaml").read_text()

    stamp = (study / "results.json").stat().st_mtime_ns
    proc, log = specalign_run(out)
    assert [e["status"] for e in log] == ["skipped"] * len(steps)
    assert (study / "results.json").stat().st_mtime_ns == stamp
    assert proc.stdout.count(": skipped (") == len(steps)

    shutil.rmtree(study)  # only the missing step runs again
    _, log = specalign_run(out)
    assert [e["status"] for e in log] == ["skipped"] * (len(steps) - 1) + ["ran"]
    assert (study / "results.json").is_file()


def test_recipe_budgets_merge_and_expand(tmp_path):
    root, smoke = load_recipe(str(RECIPE), "smoke", str(tmp_path))
    assert list(smoke)[:2] == ["tiny_target", "draft"]
    assert smoke["draft"]["target"] == str(tmp_path / "tiny_target")
    assert smoke["draft"]["output_dir"] == str(tmp_path / "draft")
    assert smoke["draft"]["prompts"] == "alpaca_farm_eval"  # kept from the full steps
    assert smoke["dpo"]["preferences"] == str(tmp_path / "preferences")
    root, full = load_recipe(str(RECIPE), "full", None)
    assert "tiny_target" not in full
    assert full["draft"]["output_dir"] == "outputs/smollm2/draft"  # the draft recipe's output, reused if present
    assert full["preferences"]["policy"] == "outputs/smollm2/draft"
    assert full["study"]["prompts"] == "alpaca_farm_100" and full["study"]["limit"] >= 50
    assert full["study"]["max_new_tokens"] >= 64 and full["preferences"]["limit"] >= 300
    assert full["preferences"]["k"] >= 4 and full["preferences"]["exclude_prompts"] == "alpaca_farm_100"
    assert full["study"]["output_dir"] == str(root / "study")
    assert full["study"]["value"] == str(root / "value") and full["value"]["samples"] == str(root / "preferences")
    assert merge({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 5}, "d": None}) == {"a": {"b": 5, "c": 2}}


def test_recipe_errors(tmp_path):
    with pytest.raises(SpecError, match="unknown budget"):
        load_recipe(str(RECIPE), "huge", None)
    with pytest.raises(SpecError, match="recipe not found"):
        load_recipe(str(tmp_path / "nope.yaml"), "full", None)
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\nsteps:\n  distill: {}\n")
    with pytest.raises(SpecError, match="unknown pipeline steps"):
        load_recipe(str(bad), "full", None)
    bad.write_text("output_dir: x\nsteps:\n  study: {dpo: '${dpo}'}\n")
    with pytest.raises(SpecError, match="names no step"):
        load_recipe(str(bad), "full", None)
    bad.write_text("steps: {}\n")
    with pytest.raises(SpecError, match="no output_dir"):
        load_recipe(str(bad), "full", None)
    proc = subprocess.run([sys.executable, "-m", "specalign.cli", "run", str(RECIPE), "--budget", "huge"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == ["error: unknown budget 'huge': use one of "
                                                                          "smoke, full"]
