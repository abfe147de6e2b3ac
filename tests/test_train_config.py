"""Recipes: YAML + flag overrides, unknown keys rejected, every shipped recipe parses for its step,
the accelerate configs load, and the two entry points (`specalign train`, `python -m specalign.train`)."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from specalign.cli import parse_config
from specalign.errors import SpecError
from specalign.train.dpo_config import DPOStepConfig
from specalign.train.draft_config import DraftConfig
from specalign.train.preferences_config import PreferencesConfig
from specalign.train.reward_config import RewardStepConfig
from specalign.train.cli import features_of
from specalign.train.target_value import TargetValueConfig
from specalign.train.value_config import ValueConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"draft": DraftConfig, "preferences": PreferencesConfig, "dpo": DPOStepConfig, "value": ValueConfig,
           "reward": RewardStepConfig}


def test_yaml_values_and_flag_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output_dir: /tmp/x\ndraft: first:3\nlearning_rate: 1.0e-3\ntopk: 32\nloss: tvd\n")
    (cfg,) = parse_config([DraftConfig], ["--config", str(recipe), "--learning_rate", "2e-3", "--draft", "spread:4"],
                          "specalign train draft")
    assert cfg.learning_rate == 2e-3 and cfg.draft == "spread:4"  # flags win
    assert cfg.topk == 32 and cfg.loss == "tvd" and cfg.output_dir == "/tmp/x"  # YAML kept
    assert cfg.max_new_tokens == 128  # defaults fill the rest
    (cfg,) = parse_config([DPOStepConfig], ["--draft", "d", "--preferences", "p", "--output_dir", "o",
                                            "--beta", "0.3", "--lora_r", "4"], "specalign train dpo")
    assert cfg.beta == 0.3 and cfg.lora_r == 4 and cfg.lora_config().r == 4


def test_unknown_keys_are_errors(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output_dir: /tmp/x\nlearning_rat: 1.0e-3\n")
    with pytest.raises(SpecError, match="learning_rat"):
        parse_config([DraftConfig], ["--config", str(recipe)], "specalign train draft")
    with pytest.raises(SpecError, match="bogus"):
        parse_config([ValueConfig], ["--backbone", "b", "--bogus", "1"], "specalign train value")
    with pytest.raises(SpecError, match="config file not found"):
        parse_config([RewardStepConfig], ["--config", str(tmp_path / "none.yaml")], "specalign train reward")
    with pytest.raises(SpecError, match="unknown distillation loss"):
        DraftConfig(output_dir="/tmp/x", loss="l2").validate()
    with pytest.raises(SpecError, match="unknown teacher 'logits'"):
        DraftConfig(output_dir="/tmp/x", teacher="logits").validate()
    with pytest.raises(SpecError, match="tvd_fraction must be in"):
        DraftConfig(output_dir="/tmp/x", tvd_fraction=1.5).validate()
    with pytest.raises(SpecError, match="topk must be >= 1 with teacher: samples"):
        DraftConfig(output_dir="/tmp/x", teacher="samples", topk=0).validate()
    DraftConfig(output_dir="/tmp/x", teacher="forward", topk=0).validate()  # topk unused there


def recipe_step(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# specalign train "), f"{path.name} must start with the command that runs it"
    return first.split()[3]


def test_every_smollm2_recipe_parses_for_its_step():
    recipes = sorted(p for p in (ROOT / "recipes" / "smollm2").glob("*.yaml") if p.name != "weak_to_strong.yaml")
    assert {recipe_step(p) for p in recipes} == set(CONFIGS)
    for path in recipes:
        step = recipe_step(path)
        config = CONFIGS[step]
        if step == "value" and features_of(["--config", str(path)]) == "target":
            config = TargetValueConfig  # `specalign train value` dispatches on the recipe's features key
        (cfg,) = parse_config([config], ["--config", str(path)], f"specalign train {step}")
        cfg.validate()
        assert cfg.output_dir.startswith("outputs/smollm2/")
    (draft,) = parse_config([DraftConfig], ["--config", str(ROOT / "recipes/smollm2/draft.yaml")], "draft")
    assert draft.output_dir == "outputs/smollm2/draft" and draft.draft == "layers:0,2,5,10,20,29"
    assert (draft.teacher, draft.loss, draft.tvd_fraction, draft.samples_per_prompt) == ("hidden", "kl", 0.25, 4)
    assert draft.freeze_embeddings and draft.sample_autocast
    # the weak-to-strong pipeline's draft step is the same recipe (it reuses that output directory)
    import yaml
    w2s = yaml.safe_load((ROOT / "recipes/smollm2/weak_to_strong.yaml").read_text())["steps"]["draft"]
    recipe = yaml.safe_load((ROOT / "recipes/smollm2/draft.yaml").read_text())
    same = ("draft", "output_dir", "samples_per_prompt", "teacher", "loss", "tvd_fraction", "learning_rate",
            "max_steps", "max_run_minutes", "sample_autocast", "freeze_embeddings", "bf16", "train_sampling_strategy")
    assert {k: w2s[k] for k in same} == {k: recipe[k] for k in same}


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file
    want = {"single.yaml": ("NO", 1), "ddp_cpu.yaml": ("MULTI_GPU", 2), "ddp_gpu.yaml": ("MULTI_GPU", 2),
            "zero2.yaml": ("DEEPSPEED", 1), "zero3.yaml": ("DEEPSPEED", 1)}
    for name, (kind, procs) in want.items():
        path = ROOT / "recipes" / "accelerate" / name
        assert path.read_text().startswith("# "), name
        cfg = load_config_from_file(str(path))
        assert str(cfg.distributed_type).split(".")[-1] == kind and cfg.num_processes == procs, name
    for stage in (2, 3):
        raw = yaml.safe_load((ROOT / "recipes" / "accelerate" / f"zero{stage}.yaml").read_text())
        assert raw["deepspeed_config"]["zero_stage"] == stage
        import json
        ds = json.loads((ROOT / "recipes" / "accelerate" / f"ds_zero{stage}.json").read_text())
        assert ds["zero_optimization"]["stage"] == stage


@pytest.mark.parametrize("entry", [["-m", "specalign.train"], ["-m", "specalign.cli", "train"]])
def test_entry_points_report_bad_input_in_one_line(entry, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output_dir: /tmp/x\nnot_a_key: 1\n")
    for args, needle in (([ "draft", "--config", str(recipe)], "not_a_key"), (["distill"], "unknown training step")):
        proc = subprocess.run([sys.executable, *entry, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
        assert len(lines) == 1 and needle in lines[0], proc.stderr
    proc = subprocess.run([sys.executable, *entry, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "draft" in proc.stdout and "reward" in proc.stdout
