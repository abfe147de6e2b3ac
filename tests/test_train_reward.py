"""`train reward`: TRL RewardTrainer on preference pairs; the saved model loads as scorer `rm:DIR` and
ranks held-out chosen responses above rejected ones."""

import json

import pytest
import torch

from specalign.errors import SpecError
from specalign.models.scorers import Candidate, RewardModelScorer, build_scorer
from specalign.train.testing import ab_preferences, save_tiny_model, template_prompts


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rm")
    return {"root": root, "base": save_tiny_model(root / "base", num_layers=2, init_scale=1.0),
            "prefs": ab_preferences(root / "prefs.jsonl", template_prompts(80), seed=4)}


def reward_config(setup, out, **kw):
    from specalign.train.reward_config import RewardStepConfig
    base = dict(output_dir=str(out), base=setup["base"], preferences=setup["prefs"],
                columns="prompt=question,chosen=good,rejected=bad", eval_fraction=0.25, learning_rate=3e-3,
                max_steps=40, per_device_train_batch_size=4, logging_steps=1000, save_steps=1000, torch_threads=1,
                seed=0, disable_tqdm=True, max_length=128)
    base.update(kw)
    return RewardStepConfig(**base)


def test_reward_model_ranks_held_out_pairs(setup, tmp_path):
    from scipy.stats import binomtest

    from specalign.train.reward import run
    out = tmp_path / "rm"
    result = run(reward_config(setup, out))
    after = result["after"]
    assert after["pairs"] == 20 and result["train_pairs"] == 60
    # 20 held-out pairs: far above a coin flip (p < 0.001), and above the untrained head
    assert after["accuracy"] >= 0.85 and binomtest(round(after["accuracy"] * 20), 20, 0.5).pvalue < 1e-3, result
    assert after["mean_gap"] > result["before"]["mean_gap"]
    assert json.loads((out / "reward_report.json").read_text())["after"] == after
    # the directory is what `rm:DIR` loads; scores are the model's (chosen-like text above rejected-like)
    scorer = build_scorer(f"rm:{out}")
    assert isinstance(scorer, RewardModelScorer)
    good, bad = scorer([Candidate("tell me cat dog", "aaaaaaaaaaaaaaab"),
                        Candidate("tell me cat dog", "bbbbbbbbbbbbbbba")])
    assert good > bad


def test_reward_input_errors(setup, tmp_path):
    from specalign.train.reward import run
    with pytest.raises(SpecError, match="base"):
        run(reward_config(setup, tmp_path / "a", base=""))
    with pytest.raises(SpecError, match="eval_fraction"):
        run(reward_config(setup, tmp_path / "b", eval_fraction=1.5))
