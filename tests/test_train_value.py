"""`train value`: the value head's prefix scores predict final rewards; `value:DIR` scores prefixes in
one forward and reuses the generator's token ids when the tokenizers agree."""

import json

import pytest
import torch

from specalign.errors import SpecError
from specalign.models.scorers import Candidate, build_scorer
from specalign.models.value_head import ValueHeadModel, ValueScorer
from specalign.train.testing import ab_samples, save_tiny_model, template_prompts
from specalign.train.value import collate, value_loss


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from specalign.train.value import run
    from specalign.train.value_config import ValueConfig
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("value")
    backbone = save_tiny_model(root / "backbone", num_layers=2, init_scale=1.0)
    samples = ab_samples(root / "samples.jsonl", template_prompts(60), k=4, length=24)
    cfg = ValueConfig(output_dir=str(root / "value"), backbone=backbone, samples=samples, eval_fraction=0.25,
                      learning_rate=3e-3, max_steps=100, warmup_steps=0, per_device_train_batch_size=4, bt_weight=0.1,
                      prefix_lengths="0,4,8,16", baseline_scorer="python:specalign.train.testing:a_share_scorer",
                      logging_steps=1000, save_steps=1000, torch_threads=1, disable_tqdm=True, seed=0)
    return {"root": root, "dir": str(root / "value"), "result": run(cfg), "backbone": backbone}


def test_prefix_values_predict_the_final_reward(trained):
    from scipy.stats import pearsonr
    corr = trained["result"]["correlation"]
    # n = 60 held-out responses (15 prompts x 4); chance is r = 0
    assert corr["8"]["value"]["n"] == 60
    for length, floor in (("4", 0.6), ("8", 0.7), ("16", 0.8), ("final", 0.9)):
        assert corr[length]["value"]["pearson"] > floor, corr
    # the prompt alone carries no information here (every prompt draws its rewards alike)
    assert abs(corr["0"]["value"]["pearson"]) < 0.4
    report = json.loads((trained["root"] / "value" / "value_report.json").read_text())
    assert report["correlation"] == corr and corr["8"]["baseline"]["n"] == 60
    # through the scorer spec, on the texts of all 240 responses cut to 8 characters (= 8 tokens here)
    scorer = build_scorer(f"value:{trained['dir']}")
    rows = [json.loads(x) for x in (trained["root"] / "samples.jsonl").read_text().splitlines()]
    assert isinstance(scorer, ValueScorer)
    cands = [Candidate(r["prompt"], r["response"][:8], False) for r in rows]
    values = scorer(cands)
    finals = [r["score"] for r in rows]
    r_all, p_all = pearsonr(values, finals)
    assert r_all > 0.6 and p_all < 1e-6


def test_scorer_uses_ids_when_tokenizers_agree_and_scores_all_prefixes(trained):
    from specalign.models.loading import chat_prompt, load_tokenizer
    scorer = ValueScorer(trained["dir"])
    tok = load_tokenizer(trained["backbone"])
    prompt = "tell me cat dog"
    p_ids = chat_prompt(tok, prompt)
    r_ids = tok("aabab", add_special_tokens=False)["input_ids"]
    by_text = Candidate(prompt, "aabab", False)
    by_ids = Candidate(prompt, "text that does not match", False, p_ids, r_ids)
    other_tok = Candidate(prompt, "aabab", False, [999, 998], [7, 7, 7])  # ids of another tokenizer: text wins
    s = scorer([by_text, by_ids, other_tok])
    assert s[0] == pytest.approx(s[1], abs=1e-6) and s[0] == pytest.approx(s[2], abs=1e-6)
    # every prefix in one forward: prefix length 0..5, then EOS for a response that ended with it
    partial = scorer.score_prefixes([by_text])[0]
    ended = scorer.score_prefixes([Candidate(prompt, "aabab", True, reason="eos")])[0]
    assert len(partial) == 6 and len(ended) == 7 and partial == pytest.approx(ended[:6], abs=1e-5)
    # scores are the same alone or batched with longer rows (left padding is invisible)
    longer = Candidate(prompt, "abbbbbbbbbbbbbbbbbba", False)
    alone = scorer([by_text])[0]
    batched = scorer([longer, by_text, longer])[1]
    assert alone == pytest.approx(batched, abs=1e-5)
    # positions = tokens read (prompt + response [+ EOS]) over every scoring; calls = __call__ batches
    assert scorer.cost.positions == 9 * len(p_ids) + 76 and scorer.cost.calls == 3


def test_value_loss_terms():
    values = torch.tensor([[0.0, 1.0, 2.0], [5.0, 1.0, -1.0]])
    mask = torch.tensor([[False, True, True], [True, True, True]])
    targets = torch.tensor([1.0, 0.0])
    group = torch.tensor([0, 0])
    finished = torch.tensor([True, True])
    mse = ((0 + 1) / 2 + (25 + 1 + 1) / 3) / 2
    assert value_loss(values, mask, targets, group, finished).item() == pytest.approx(mse)
    # BT: response 0 (target 1) should outscore response 1 (target 0) at the end: -log sigmoid(2 - (-1))
    bt = -torch.nn.functional.logsigmoid(torch.tensor(3.0)).item()
    assert value_loss(values, mask, targets, group, finished, 0.5).item() == pytest.approx(mse + 0.5 * bt)
    # no BT pair across prompts or with an unfinished response
    assert value_loss(values, mask, targets, torch.tensor([0, 1]), finished, 0.5).item() == pytest.approx(mse)
    assert value_loss(values, mask, targets, group, torch.tensor([True, False]), 0.5).item() == pytest.approx(mse)


def test_collate_marks_prefix_positions():
    groups = [[{"seq": [1, 2, 3, 4, 5], "start": 3, "target": 0.5, "finished": True}],
              [{"seq": [1, 2, 6], "start": 2, "target": -1.0, "finished": False}]]
    b = collate(groups, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [0, 0, 1, 2, 6]]
    # value positions: from the last prompt token to the end
    assert b["value_mask"].tolist() == [[False, False, True, True, True], [False, False, False, True, True]]
    assert b["group"].tolist() == [0, 1] and b["targets"].tolist() == [0.5, -1.0]


def test_saved_format_and_errors(trained, tmp_path):
    files = {p.name for p in (trained["root"] / "value").iterdir()}
    assert {"config.json", "model.safetensors", "value_head.json", "tokenizer.json"} <= files
    model = ValueHeadModel.from_pretrained(trained["dir"])
    meta = json.loads((trained["root"] / "value" / "value_head.json").read_text())
    assert meta["target_std"] == pytest.approx(trained["result"]["target_std"])
    assert model.head.weight.abs().sum() > 0  # trained, not the zero init
    with pytest.raises(SpecError, match="not a value-head model"):
        ValueHeadModel.from_pretrained(trained["backbone"])
    from specalign.train.value import load_samples
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    with pytest.raises(SpecError, match="no 'score'"):
        load_samples(str(bad))
