"""Named data sets: a local copy in $SPECALIGN_DATA / --data-dir first, else the public dataset through
``datasets``, else one line naming the data set, the directory looked in and how to get it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from specalign.data import ALPACA_FARM_100, DATASETS, load_named
from specalign.decode.prompts import load_prompts
from specalign.errors import SpecError
from specalign.train.data import load_preferences

ROOT = Path(__file__).resolve().parents[1]


def test_index_list_is_a_subset_of_the_805():
    assert len(ALPACA_FARM_100) == len(set(ALPACA_FARM_100)) == 100
    assert 0 <= min(ALPACA_FARM_100) and max(ALPACA_FARM_100) < 805


def test_names_resolve_from_the_data_directory(named_data):
    full = json.loads((Path(named_data) / "alpaca_farm_eval.json").read_text())
    assert load_prompts(prompts="alpaca_farm_eval") == [r["prompt"] for r in full]
    subset = load_prompts(prompts="alpaca_farm_100", limit=3)
    assert subset == [full[i]["prompt"] for i in ALPACA_FARM_100[:3]]
    assert len(load_prompts(prompts="alpaca_farm_100")) == 100
    # the preference pairs: whole conversations split into the shared user turn and the two answers
    pairs = load_preferences("saferlhf")
    raw = [json.loads(x) for x in (Path(named_data) / "saferlhf_200.jsonl").read_text().splitlines()]
    assert len(pairs) == len(raw) == 12
    assert pairs[0]["prompt"] == raw[0]["real"][:1] and pairs[0]["chosen"] == raw[0]["real"][1:]
    assert pairs[0]["rejected"] == raw[0]["generated"][1:]
    with pytest.raises(SpecError, match="preference pairs, not prompts"):
        load_prompts(prompts="saferlhf")


def test_public_dataset_when_no_local_copy(tmp_path, monkeypatch):
    import datasets
    calls = []

    def fake_load(*args, **kwargs):
        calls.append((args, kwargs))
        if args[0] == "tatsu-lab/alpaca_eval":
            return datasets.Dataset.from_dict({"instruction": [f"instruction {i}" for i in range(805)]})
        return datasets.Dataset.from_dict({"prompt": ["q"], "response_0": ["safe"], "response_1": ["unsafe"],
                                           "safer_response_id": [0]})

    monkeypatch.setenv("SPECALIGN_DATA", str(tmp_path))  # an empty folder: nothing local
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_prompts(prompts="alpaca_farm_100", limit=2) == [f"instruction {i}" for i in ALPACA_FARM_100[:2]]
    hub_id, config, split = DATASETS["alpaca_farm_eval"].hub
    assert calls[0] == ((hub_id, config), {"split": split})
    assert load_preferences("saferlhf") == [{"prompt": [{"role": "user", "content": "q"}],
                                             "chosen": [{"role": "assistant", "content": "safe"}],
                                             "rejected": [{"role": "assistant", "content": "unsafe"}]}]


def test_unreachable_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.delenv("SPECALIGN_DATA", raising=False)
    with pytest.raises(SpecError) as err:
        load_named("alpaca_farm_100")
    msg = str(err.value)
    assert "\n" not in msg and "'alpaca_farm_eval'" in msg and "$SPECALIGN_DATA is not set" in msg
    assert "alpaca_farm_eval.json" in msg and "tatsu-lab/alpaca_eval" in msg
    monkeypatch.setenv("SPECALIGN_DATA", str(tmp_path))
    with pytest.raises(SpecError, match=f"{tmp_path} has no alpaca_farm_eval.json"):
        load_named("alpaca_farm_eval")


def _decode(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "specalign.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_cli_names_with_and_without_data(tiny_dir, named_data, tmp_path):
    import os
    common = ["decode", "--model", tiny_dir, "--prompts", "alpaca_farm_100", "--limit", "2", "--n", "2",
              "--max-new-tokens", "8", "--scorer", "python:specalign.train.testing:a_share_scorer", "--out", "o.jsonl"]
    env = {**os.environ, "SPECALIGN_DATA": named_data, "OMP_NUM_THREADS": "1"}
    proc = _decode(common, env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    full = json.loads((Path(named_data) / "alpaca_farm_eval.json").read_text())
    assert [r["prompt"] for r in records] == [full[i]["prompt"] for i in ALPACA_FARM_100[:2]]

    # --data-dir instead of the variable, anywhere on the line
    env.pop("SPECALIGN_DATA")
    proc = _decode(["--data-dir", named_data, *common[:-1], "p.jsonl"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["response"], r["score"]) for r in again] == \
        [(r["prompt"], r["response"], r["score"]) for r in records]

    # neither a local copy nor the network: exit 2, one line, nothing written
    offline = {**env, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "c")}
    proc = _decode([*common[:-1], "q.jsonl"], offline, tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: data set")
    assert not list(tmp_path.glob("q.jsonl*"))
    proc = _decode(["--data-dir", str(tmp_path / "missing"), *common], offline, tmp_path)
    assert proc.returncode == 2 and "not a directory" in proc.stderr and proc.stderr.count("\n") == 1
