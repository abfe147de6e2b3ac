"""`train dpo`: TRL DPOTrainer + LoRA on the draft; the adapter raises the chosen-over-rejected margin,
the base weights stay as they were, and decode loads the adapter over the draft (Qr / Q0)."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from specalign.errors import SpecError
from specalign.train.testing import ab_preferences, save_tiny_model, template_prompts


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dpo")
    return {"root": root, "draft": save_tiny_model(root / "draft", num_layers=2, init_scale=1.0),
            "prefs": ab_preferences(root / "prefs.jsonl", template_prompts(40))}


def dpo_config(setup, out, **kw):
    from specalign.train.dpo_config import DPOStepConfig
    base = dict(output_dir=str(out), draft=setup["draft"], preferences=setup["prefs"],
                columns="prompt=question,chosen=good,rejected=bad", eval_fraction=0.25, learning_rate=5e-3,
                max_steps=24, per_device_train_batch_size=4, lora_r=8, lora_alpha=16, beta=0.1, logging_steps=1000,
                save_steps=1000, torch_threads=1, seed=0, disable_tqdm=True, max_length=128,
                judge="python:specalign.train.pipeline:vowel_judge", eval_samples=8, eval_max_new_tokens=24,
                train_sampling_strategy="group_by_length")
    base.update(kw)
    return DPOStepConfig(**base)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_dpo_raises_margin_and_trains_the_adapter_only(setup, tmp_path):
    from peft import PeftModel

    from specalign.decode.engine import LMState
    from specalign.models.loading import load_model
    from specalign.train.dpo import run
    draft_file = Path(setup["draft"]) / "model.safetensors"
    before_hash = sha(draft_file)
    out = tmp_path / "adapter"
    result = run(dpo_config(setup, out))
    # the margin log q(chosen) - log q(rejected) grows on training pairs and on held-out pairs
    for split in ("train", "held_out"):
        assert result["after"][split]["mean_margin"] > result["before"][split]["mean_margin"] + 5.0, result
    assert result["after"]["held_out"]["accuracy"] >= result["before"]["held_out"]["accuracy"]
    # DPO's implicit reward beta log(qr/q0) orders the held-out pairs (it is 0 on every pair before training)
    assert result["precompute_ref_log_probs"] is True
    assert result["implicit_reward"]["held_out"]["accuracy"] == 1.0
    assert result["implicit_reward"]["held_out"]["mean_margin"] > 0.5
    # the gold comparison: Qr and Q0 sample on the 10 held-out prompts with the same seeds; Qr writes more vowels (more "a")
    gold = result["gold"]
    assert gold["prompts"] == 10 and gold["samples_per_prompt"] == 8 and gold["aligned"]["n"] == 10
    d = gold["aligned_minus_unaligned"]
    assert d["diff"] == pytest.approx(gold["aligned"]["mean"] - gold["unaligned"]["mean"])
    assert d["n"] == 10 and d["se"] > 0 and d["diff"] > 0
    assert json.loads((out / "dpo_report.json").read_text())["gold"] == json.loads(json.dumps(gold))
    assert result["train_steps"] == 24 and result["held_out_pairs"] == 10
    # output: an adapter directory naming the draft as its base
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "dpo_report.json", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(setup["draft"]).resolve())
    # base weights unchanged: on disk, and inside the loaded adapter model
    assert sha(draft_file) == before_hash
    draft = load_model(setup["draft"])
    aligned = load_model(str(out))
    assert isinstance(aligned, PeftModel)
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in aligned.state_dict().items() if "lora_" not in k}
    ref = draft.state_dict()
    assert set(base) == set(ref)
    assert all(torch.equal(base[k], ref[k]) for k in ref)
    # Q0 = adapter disabled is exactly the draft; Qr differs
    ids = torch.tensor([[1, 40, 41, 42, 5, 6]])
    with torch.no_grad():
        q_draft = draft(ids).logits
        with aligned.disable_adapter():
            q0 = aligned(ids).logits
        qr = aligned(ids).logits
    assert torch.equal(q0, q_draft) and not torch.allclose(qr, q_draft)
    # the decode engine runs the same weights both ways
    s0, sr = LMState(aligned, adapter_enabled=False), LMState(aligned)
    assert torch.allclose(s0.prefill([ids[0].tolist()]), q_draft[:, -1], atol=1e-5)
    assert torch.allclose(sr.prefill([ids[0].tolist()]), qr[:, -1], atol=1e-5)


def test_dpo_input_errors(setup, tmp_path):
    from specalign.train.dpo import run
    with pytest.raises(SpecError, match="draft"):
        run(dpo_config(setup, tmp_path / "a", draft=""))
    with pytest.raises(SpecError, match="no column"):
        run(dpo_config(setup, tmp_path / "b", columns="chosen=winner,rejected=bad"))
    with pytest.raises(SpecError, match="not found"):
        run(dpo_config(setup, tmp_path / "c", preferences=str(tmp_path / "missing.jsonl")))
