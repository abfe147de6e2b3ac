"""The value head on the target's own hidden states: the generator hands scorers exactly the states a
full forward gives, `specalign train value --features target` fits and reports, and `value:DIR` scores
running rows from those states (no target position) and finished rows with the learned scorer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specalign.decode.generators import SamplingGenerator
from specalign.decode.sampling import SamplingParams
from specalign.errors import SpecError
from specalign.models.loading import final_norm
from specalign.train.testing import a_share, prompt_file, template_prompts, write_named_data

SCORER = "python:specalign.train.testing:a_share_scorer"


def _states(model, seq):
    seen = []
    hook = final_norm(model).register_forward_hook(lambda m, a, out: seen.append(out[0]))
    with torch.no_grad():
        model(torch.tensor([seq]))
    hook.remove()
    return seen[0]


def test_tracked_states_are_the_full_forward_states(tiny, tok):
    gen = SamplingGenerator(tiny, tok, SamplingParams(1.0), max_new_tokens=12, eos_ids=set())
    gen.track_hidden()
    prompt = [1, 5, 9, 12, 7]
    gen.start(prompt, 4, torch.Generator().manual_seed(0))
    gen.advance(5)
    gen.drop([1])  # a pruned row leaves; the others keep their own states
    gen.advance(3)
    for i in (0, 2, 3):
        cand = gen.candidate(i, "p")
        full = _states(tiny, prompt + gen.rows[i].tokens[:-1] + gen.rows[i].tokens[-1:])
        # the state after every token so far: the full sequence's last position
        assert torch.allclose(cand.stats["hidden"], full[-1], atol=1e-4)
        assert torch.allclose(cand.stats["prompt_hidden"], full[len(prompt) - 1], atol=1e-4)
    assert "hidden" not in gen.candidate(1, "p").stats  # pruned: no running state
    plain = SamplingGenerator(tiny, tok, SamplingParams(1.0), max_new_tokens=4, eos_ids=set())
    plain.start(prompt, 2, torch.Generator().manual_seed(0))
    plain.advance()
    assert "hidden" not in plain.candidate(0, "p").stats  # nothing kept unless asked


@pytest.fixture(scope="module")
def head_dir(tmp_path_factory):
    from specalign.train.testing import save_tiny_model
    root = tmp_path_factory.mktemp("tv")
    model = save_tiny_model(root / "model", init_scale=1.0)
    data = write_named_data(root / "data")
    env = {**os.environ, "SPECALIGN_DATA": data, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "specalign.cli", "train", "value", "--features", "target",
                           "--model", model, "--scorer", SCORER, "--output_dir", str(root / "head"), "--limit", "40",
                           "--eval_prompts", "8", "--val_prompts", "8", "--k", "6", "--max_new_tokens", "20", "--batch_rows", "60",
                           "--epochs", "40", "--train_lengths", "2,4,6,8,12", "--report_lengths", "4,8",
                           "--oracle_m", "4", "--oracle_prompts", "4", "--torch_threads", "1"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return model, str(root / "head")


def test_train_writes_head_and_report(head_dir):
    model, head = head_dir
    meta = json.loads((Path(head) / "target_value.json").read_text())
    assert meta["base_model"] == model and meta["scorer"] == SCORER and meta["partial"]
    rep = json.loads((Path(head) / "value_report.json").read_text())
    assert rep["eval_prompts"] == 8 and rep["val_prompts"] == 8 and rep["train_prompts"] == 24
    assert rep["features"] == "target" and rep["residual"] and meta["residual"]
    # the epoch kept is the one the validation prompts liked best (epoch 0: the partial score alone)
    val_r = rep["val_r_by_epoch"]
    assert len(val_r) == 41 and val_r[rep["epoch_kept"]] == max(val_r)
    assert set(rep["by_prefix_length"]) == {"4", "8"}
    for k, e in rep["by_prefix_length"].items():
        assert e["prompts"] == 8 and e["prefixes"] > 20
        # the share of 'a' so far predicts the final share: the scorer on the partial text predicts it, and
        # the head (a correction to that score) learned a real predictor from 24 prompts' samples
        assert e["partial_text_r"] > 0.3
        assert e["value_head_r"] > 0.2
        assert -1 <= e["oracle"]["r"] <= 1 and e["oracle"]["m"] == 4 and e["oracle"]["prompts"] == 4
    assert rep["loss_first_last"][1] < rep["loss_first_last"][0]


def test_value_scorer_reads_states_and_costs_no_target_position(head_dir, tmp_path):
    from specalign.decode import DecodeConfig, Decoder
    from specalign.models.target_value import TargetValueHead
    model, head = head_dir
    decoder = Decoder(DecodeConfig(model=model, method="spec-rejection", n=6, alpha="0.5", decision="tokens:4",
                                   scorer=f"value:{head}", max_new_tokens=12, seed=3, return_candidates=True))
    rec = decoder.run(["tell me cat dog"], progress=False)[0]
    assert rec["cost"]["scorer"]["positions"] == 0
    assert rec["rounds"][0]["rows"] == 6 and len(rec["rounds"][0]["kept_ids"]) == 3
    for c in rec["candidates"]:
        if c["finished"]:
            assert c["score"] == pytest.approx(a_share(c["response"]))
    # a running row's value is the head on (its state, the prompt's state, k, the partial score)
    gen = decoder.generator
    gen.start(decoder.encode("tell me cat dog"), 2, torch.Generator().manual_seed(0))
    gen.advance(4)
    cands = [gen.candidate(i, "tell me cat dog") for i in gen.active]
    values = decoder.scorer(cands)
    h, _ = TargetValueHead.load(head)
    x = h.features(torch.stack([c.stats["hidden"] for c in cands]), torch.stack([c.stats["prompt_hidden"] for c in cands]),
                   torch.tensor([4] * len(cands)), torch.tensor([a_share(c.response) for c in cands]))
    assert values == pytest.approx(h(x).tolist(), abs=1e-5)


def test_value_head_refuses_another_model_and_speculative(head_dir, tiny_dir, tmp_path):
    from specalign.decode import DecodeConfig, Decoder
    _, head = head_dir
    with pytest.raises(SpecError, match="trained on the hidden states of .*not of this --model"):
        Decoder(DecodeConfig(model=tiny_dir, scorer=f"value:{head}", max_new_tokens=4))
    proc = subprocess.run([sys.executable, "-m", "specalign.cli", "decode", "--model", tiny_dir, "--prompt", "hi",
                           "--scorer", f"value:{head}", "--max-new-tokens", "4", "--out", str(tmp_path / "o.jsonl")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not of this --model" in proc.stderr
    assert not list(tmp_path.iterdir())
    model, _ = head_dir
    with pytest.raises(SpecError, match="with the sample generator, not speculative"):
        Decoder(DecodeConfig(model=model, method="best-of-n", generator="speculative", draft=model,
                             scorer=f"value:{head}", max_new_tokens=4))


def test_replayed_rows_carry_the_states_the_live_rows_had(tiny, tok):
    from specalign.bench.common import RecordingSampler, ReplayGenerator, recorded_rows
    prompt = [1, 8, 3, 11]
    rec = RecordingSampler(tiny, tok, SamplingParams(1.0), max_new_tokens=10, eos_ids={2})
    rec.track_hidden()
    rec.start(prompt, 5, torch.Generator().manual_seed(4))
    rec.advance()
    live = SamplingGenerator(tiny, tok, SamplingParams(1.0), max_new_tokens=10, eos_ids={2})
    live.track_hidden()
    live.start(prompt, 5, torch.Generator().manual_seed(4))
    live.advance(3)
    replay = ReplayGenerator(tok, recorded_rows(rec), 10, {2})
    replay.start(prompt, 5)
    replay.advance(3)
    assert replay.active == live.active
    for i in live.active:
        a, b = live.candidate(i, "p").stats, replay.candidate(i, "p").stats
        assert torch.equal(a["hidden"], b["hidden"]) and torch.equal(a["prompt_hidden"], b["prompt_hidden"])


def test_bench_spr_ranks_by_the_head_measured_and_replayed(head_dir, tmp_path):
    model, head = head_dir
    prompts = prompt_file(tmp_path / "p.json", template_prompts(2, offset=300))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "specalign.cli", "bench", "spr", "--model", model, "--prompts", prompts,
                           "--tasks", SCORER, "--max_new_tokens", "16", "--bon_n", "8", "--reference_n", "2",
                           "--spr", "8:0.5:tokens:4", "--simulate", "8:0.5:tokens:4", "--rankers", "task",
                           f"value:{head}", "--measured_rankers", f"value:{head}", "--output_dir", str(out),
                           "--threads", "1"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    for p in results["per_prompt"]:
        run = p["spr"][f"{SCORER}|8:0.5:tokens:4|value:{head}"]
        assert run["rounds"][0][:3] == [4, 8, 4]  # 8 rows ranked by the head after 4 tokens, 4 kept
        assert p["simulated"][f"{SCORER}|8:0.5:tokens:4|value:{head}"]["blocks"] == 1
    points = [m for m in results["tasks"][SCORER]["methods"] if m.get("ranker") == f"value:{head}"]
    assert sorted(m["simulated"] for m in points) == [False, True]
    table = (out / "table.md").read_text()
    assert f"SpR (value:{head})" in table and f"SpR (replayed, value:{head})" in table


def test_residual_head_starts_as_the_partial_score_and_learns_a_correction():
    from specalign.models.target_value import TargetValueHead
    from specalign.train.target_value import TargetValueConfig, fit
    torch.manual_seed(0)
    head = TargetValueHead(4, width=16, partial=True, residual=True)
    h, h0, k, partial = torch.randn(256, 4), torch.randn(256, 4), torch.randint(1, 9, (256,)), torch.rand(256)
    x = head.features(h, h0, k, partial)
    y = partial + 0.5 * h[:, 0]  # the final score: the partial score plus what the state knows
    head.standardize(x, y)
    with torch.no_grad():  # untrained: the partial score plus a constant (it ranks exactly like the partial score)
        assert head(x).tolist() == pytest.approx((partial + head.y_mean).tolist(), abs=1e-6)
    cfg = TargetValueConfig(output_dir="unused", epochs=60, learning_rate=3e-3, weight_decay=0.0, batch_size=64)
    head = TargetValueHead(4, width=16, partial=True, residual=True)
    losses, val_r, kept = fit(head, x, y, cfg)
    assert val_r == [] and kept == 60 and losses[-1] < 0.1 * losses[0]
    with torch.no_grad():
        assert float(((head(x) - y) ** 2).mean()) < 0.1 * float(((partial - y) ** 2).mean())
    with pytest.raises(SpecError, match="needs partial"):
        TargetValueHead(4, partial=False, residual=True)
