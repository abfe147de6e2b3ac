"""`train preferences`: on-policy samples scored and paired; existing data through a column mapping."""

import json
from pathlib import Path

import pytest
import torch

from specalign.errors import SpecError
from specalign.train.data import load_preferences, parse_columns, split_rows, to_conversational
from specalign.train.preferences import pairs_of
from specalign.train.testing import a_share, prompt_file, save_tiny_model, template_prompts

@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("prefs")
    return {"dir": save_tiny_model(root / "policy", init_scale=1.0),
            "prompts": prompt_file(root / "p.json", template_prompts(10))}


def test_pairing_rules():
    assert pairs_of([0.1, 0.9, 0.5, 0.9], "best-worst", 0.0) == [(1, 0)]  # ties: first best, first worst
    assert pairs_of([0.3, 0.3], "best-worst", 0.0) == []
    assert pairs_of([0.1, 0.5, 0.2], "best-worst", 0.4) == []  # margin 0.4 not above min_margin
    assert sorted(pairs_of([0.1, 0.5, 0.2], "all", 0.0)) == [(1, 0), (1, 2), (2, 0)]
    assert pairs_of([0.1, 0.5, 0.2], "all", 0.15) == [(1, 0), (1, 2)]


def test_sample_score_and_pair(policy, tmp_path):
    from datasets import load_dataset
    from specalign.train.preferences import run
    from specalign.train.preferences_config import PreferencesConfig
    out = tmp_path / "prefs"
    cfg = PreferencesConfig(output_dir=str(out), policy=policy["dir"], prompts=policy["prompts"],
                            exclude_prompts=None, k=4, max_new_tokens=16, seed=3, torch_threads=1,
                            scorer="python:specalign.train.testing:a_share_scorer")
    result = run(cfg)
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    rows = [json.loads(x) for x in (out / "data.jsonl").read_text().splitlines()]
    assert len(samples) == 40 and result["samples"] == 40
    # every stored score is the scorer applied to the stored text
    assert all(s["score"] == a_share(s["response"]) for s in samples)
    # one best-vs-worst pair per prompt whose responses differ in score
    by_prompt = {}
    for s in samples:
        by_prompt.setdefault(s["prompt"], []).append(s["score"])
    expected = sum(max(v) > min(v) for v in by_prompt.values())
    assert len(rows) == expected == result["pairs"] and expected >= 1
    for r in rows:
        p = r["prompt"][0]["content"]
        assert r["prompt"] == [{"role": "user", "content": p}]
        assert r["score_chosen"] == max(by_prompt[p]) and r["score_rejected"] == min(by_prompt[p])
        assert r["chosen"][0]["role"] == "assistant" and a_share(r["chosen"][0]["content"]) == r["score_chosen"]
    margins = sorted(r["score_chosen"] - r["score_rejected"] for r in rows)
    report = json.loads((out / "preferences_report.json").read_text())
    assert report["pair_margin"]["min"] == margins[0] > 0 and report["prompts_with_pairs"] == expected
    assert report["pair_margin"]["mean"] == pytest.approx(sum(margins) / len(margins))
    # min_margin keeps only the pairs the scorer separates by more than it
    assert margins[-1] > margins[0]
    cut = (margins[0] + margins[-1]) / 2
    strict = run(PreferencesConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "strict"), "min_margin": cut}))
    assert strict["pairs"] == sum(m > cut for m in margins) and strict["pair_margin"]["min"] > cut
    ds = load_dataset("json", data_files=str(out / "data.jsonl"), split="train")
    assert set(ds.column_names) == {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}
    # a restart reuses the sampled chunks: same samples, no new sampling
    cache = sorted((tmp_path / "prefs.work" / "samples").glob("chunk-*.pt"))
    stamps = [c.stat().st_mtime_ns for c in cache]
    cfg.overwrite = True
    run(cfg)
    assert [c.stat().st_mtime_ns for c in cache] == stamps
    assert [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()] == samples


def test_cache_with_other_settings_is_an_error(policy, tmp_path):
    from specalign.train.preferences import run
    from specalign.train.preferences_config import PreferencesConfig
    kw = dict(policy=policy["dir"], prompts=policy["prompts"], exclude_prompts=None, k=2, max_new_tokens=4,
              scorer="python:specalign.train.testing:a_share_scorer", work_dir=str(tmp_path / "work"))
    run(PreferencesConfig(output_dir=str(tmp_path / "a"), **kw))
    with pytest.raises(SpecError, match="max_new_tokens"):
        run(PreferencesConfig(output_dir=str(tmp_path / "b"), **dict(kw, max_new_tokens=5)))


def test_column_mapping_and_forms(tmp_path):
    assert parse_columns("chosen=real, rejected=generated") == {"chosen": "real", "rejected": "generated"}
    for bad in ("chosen", "winner=real"):
        with pytest.raises(SpecError):
            parse_columns(bad)
    implicit = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
                "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]}
    assert to_conversational(implicit) == {"prompt": [{"role": "user", "content": "q"}],
                                           "chosen": [{"role": "assistant", "content": "good"}],
                                           "rejected": [{"role": "assistant", "content": "bad"}]}
    plain = {"prompt": "q", "chosen": "good", "rejected": "bad", "score_chosen": 1}
    assert to_conversational(plain)["score_chosen"] == 1.0
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "q", "good": "yes", "bad": "no"}) + "\n")
    rows = load_preferences(str(path), "prompt=question,chosen=good,rejected=bad")
    assert rows == [{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "yes"}],
                     "rejected": [{"role": "assistant", "content": "no"}]}]
    with pytest.raises(SpecError, match="no column 'winner'"):
        load_preferences(str(path), "chosen=winner,rejected=bad")
    train, held = split_rows(list(range(10)), 0.2, seed=1)
    assert len(held) == 2 and sorted(train + held) == list(range(10))


def test_saferlhf_by_name_through_the_built_in_mapping(tmp_path, named_data):
    """`from_data: saferlhf` resolves the local copy in $SPECALIGN_DATA and maps its columns itself."""
    from specalign.train.preferences import run
    from specalign.train.preferences_config import PreferencesConfig
    run(PreferencesConfig(output_dir=str(tmp_path / "s"), from_data="saferlhf"))
    rows = [json.loads(x) for x in (tmp_path / "s" / "data.jsonl").read_text().splitlines()]
    raw = [json.loads(x) for x in (Path(named_data) / "saferlhf_200.jsonl").read_text().splitlines()]
    assert len(rows) == len(raw) == 12
    for r, x in zip(rows, raw):
        assert r["prompt"] == x["real"][:-1] and r["chosen"] == x["real"][-1:] and r["rejected"] == x["generated"][-1:]
