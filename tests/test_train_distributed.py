"""Launchers: every step runs under `accelerate launch ... -m specalign.train` (DeepSpeed ZeRO-2 / ZeRO-3,
one or two processes, and two-process CPU data parallel with gloo) and under the `deepspeed` launcher.
Each run is a tiny model; the report records how it ran (distributed type, process count, ZeRO stage)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from specalign.train.testing import ab_preferences, ab_samples, prompt_file, save_tiny_model, template_prompts

ROOT = Path(__file__).resolve().parents[1]
ACCEL = ROOT / "recipes" / "accelerate"
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return {"root": root, "draft": save_tiny_model(root / "draft", num_layers=2, init_scale=1.0),
            "target": save_tiny_model(root / "target"),
            "prefs": ab_preferences(root / "prefs.jsonl", template_prompts(24)),
            "samples": ab_samples(root / "samples.jsonl", template_prompts(16), k=4, length=16),
            "train": prompt_file(root / "train.json", template_prompts(32)),
            "held": prompt_file(root / "held.json", template_prompts(8, offset=400))}


def recipe(path: Path, step: str, body: dict) -> Path:
    lines = [f"# specalign train {step} --config {path.name}"] + [f"{k}: {json.dumps(v)}" for k, v in body.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def launch(cmd: list[str], timeout: int = 900) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def accelerate(config: str, step: str, recipe_file: Path, *extra: str) -> None:
    launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCEL / config),
            "--main_process_port", str(free_port()), *extra, "-m", "specalign.train", step,
            "--config", str(recipe_file)])


def dpo_recipe(files, name: str) -> tuple[Path, Path]:
    out = files["root"] / name
    body = {"draft": files["draft"], "preferences": files["prefs"], "columns": "prompt=question,chosen=good,rejected=bad",
            "output_dir": str(out), "eval_fraction": 0.25, "learning_rate": 5e-3, "max_steps": 8,
            "per_device_train_batch_size": 2, "lora_r": 4, "lora_alpha": 8, "max_length": 96, "save_steps": 1000,
            "logging_steps": 1000, "torch_threads": 1, "bf16": False, "disable_tqdm": True}
    return recipe(files["root"] / f"{name}.yaml", "dpo", body), out


def check_dpo(out: Path, kind: str, processes: int, stage) -> dict:
    rep = json.loads((out / "dpo_report.json").read_text())
    assert rep["distributed"] == {"type": kind, "processes": processes, "zero_stage": stage}
    assert rep["after"]["train"]["mean_margin"] > rep["before"]["train"]["mean_margin"] + 1.0, rep
    assert (out / "adapter_model.safetensors").is_file()
    return rep


@pytest.mark.parametrize("stage", [2, 3])
def test_dpo_deepspeed_one_process(files, stage):
    cfg, out = dpo_recipe(files, f"dpo_z{stage}")
    accelerate(f"zero{stage}.yaml", "dpo", cfg)
    check_dpo(out, "DEEPSPEED", 1, stage)


def test_dpo_deepspeed_zero2_two_cpu_processes(files):
    cfg, out = dpo_recipe(files, "dpo_z2x2")
    accelerate("zero2.yaml", "dpo", cfg, "--num_processes", "2")
    rep = check_dpo(out, "DEEPSPEED", 2, 2)
    assert rep["train_steps"] == 8


def test_dpo_with_the_deepspeed_launcher(files):
    cfg, out = dpo_recipe(files, "dpo_dslauncher")
    launch([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
            "--module", "specalign.train", "dpo", "--config", str(cfg),
            "--deepspeed", str(ACCEL / "ds_zero2.json")])
    check_dpo(out, "DEEPSPEED", 1, 2)


def test_draft_two_process_data_parallel_gloo(files):
    out = files["root"] / "draft_ddp"
    body = {"target": files["target"], "draft": "first:1", "prompts": files["train"], "exclude_prompts": None,
            "eval_prompts": files["held"], "eval_limit": 0, "output_dir": str(out), "max_new_tokens": 16, "topk": 8,
            "sample_batch_rows": 8, "learning_rate": 3e-3, "warmup_steps": 0, "max_steps": 30,
            "per_device_train_batch_size": 4, "save_steps": 1000, "logging_steps": 1000, "torch_threads": 1,
            "disable_tqdm": True}
    accelerate("ddp_cpu.yaml", "draft", recipe(files["root"] / "draft_ddp.yaml", "draft", body))
    rep = json.loads((out / "draft_report.json").read_text())
    assert rep["distributed"] == {"type": "MULTI_CPU", "processes": 2, "zero_stage": None}
    assert rep["acceptance"] > rep["acceptance_before"] + 0.03, rep
    # the two processes shared the sampling: 32 prompts in 4 chunks of 8 rows, all present
    chunks = sorted(p.name for p in (files["root"] / "draft_ddp.work" / "samples").glob("chunk-*.pt"))
    assert chunks == [f"chunk-{i:05d}.pt" for i in range(4)] and rep["train_samples"] == 32


def test_value_deepspeed_zero3_saves_a_loadable_model(files):
    from specalign.models.value_head import ValueHeadModel
    out = files["root"] / "value_z3"
    body = {"backbone": files["draft"], "samples": files["samples"], "output_dir": str(out), "eval_fraction": 0.25,
            "max_steps": 4, "per_device_train_batch_size": 2, "prefix_lengths": "2,4", "baseline_scorer": "none",
            "save_steps": 1000, "logging_steps": 1000, "torch_threads": 1, "disable_tqdm": True}
    accelerate("zero3.yaml", "value", recipe(files["root"] / "value_z3.yaml", "value", body))
    rep = json.loads((out / "value_report.json").read_text())
    assert rep["distributed"] == {"type": "DEEPSPEED", "processes": 1, "zero_stage": 3}
    model = ValueHeadModel.from_pretrained(out)  # gathered, full-size weights
    assert model.head.weight.shape == (1, 32) and model.head.weight.abs().sum() > 0
