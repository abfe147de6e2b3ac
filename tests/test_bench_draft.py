"""`bench draft`: exact vs coarsened acceptance, pilot runs, files written, bad input."""

import json

import pytest
import torch

from specalign.bench.draft import DraftBenchConfig, coarse_overlap, run, table
from specalign.errors import SpecError
from specalign.train.testing import prompt_file, save_tiny_model, template_prompts


def test_coarse_overlap_never_below_exact_and_equal_with_the_whole_vocab():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(50, 40) * 2, -1)
    q = torch.softmax(torch.randn(50, 40) * 2, -1)
    exact = torch.minimum(p, q).sum(-1)
    previous = None
    for k in (1, 4, 16, 39, 40):
        overlap, mass = coarse_overlap(p, q, k)
        assert (overlap >= exact - 1e-6).all()
        assert torch.allclose(mass, p.topk(k, -1).values.sum(-1))
        if previous is not None:  # a finer split can only lower the overlap
            assert (overlap <= previous + 1e-6).all()
        previous = overlap
    assert torch.allclose(coarse_overlap(p, q, 40)[0], exact, atol=1e-6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from specalign.train.draft import run as train_draft
    from specalign.train.draft_config import DraftConfig
    root = tmp_path_factory.mktemp("bench_draft")
    target = save_tiny_model(root / "target")
    cfg = DraftConfig(output_dir=str(root / "draft"), target=target, draft="first:1",
                      prompts=prompt_file(root / "train.json", template_prompts(32)), exclude_prompts=None,
                      eval_prompts=prompt_file(root / "held.json", template_prompts(8, offset=400)), eval_limit=0,
                      max_new_tokens=16, max_steps=3, eval_before=False, torch_threads=1, disable_tqdm=True,
                      logging_steps=1000, save_steps=1000)
    report = train_draft(cfg)
    return {"target": target, "draft": str(root / "draft"), "report": report,
            "samples": str(root / "draft.work" / "samples"), "held": str(root / "draft.work" / "samples-eval")}


def test_bench_draft_measures_drafts_and_pilots(trained, tmp_path):
    from specalign.bench.draft import main
    out = tmp_path / "res"
    assert main(["--target", trained["target"], "--samples", trained["samples"], "--held", trained["held"],
                 "--held_limit", "0", "--drafts", trained["draft"], "--topks", "4", "500",
                 "--layers", "first:1", "layers:1,2", "--steps", "4", "--branch_steps", "2",
                 "--threads", "1", "--output_dir", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert (out / "table.md").read_text() == table(result)
    (signal,) = result["teacher_signal"]
    # the exact figure is the one train draft reported for the same held-out samples and draft
    assert signal["exact"] == pytest.approx(trained["report"]["acceptance"], abs=1e-5)
    assert signal["positions"] == trained["report"]["eval_positions"]
    assert signal["coarse_top4"] >= signal["exact"] - 1e-6
    assert signal["coarse_top500"] == pytest.approx(signal["exact"], abs=1e-5)  # k >= vocabulary
    assert signal["target_mass_top500"] == pytest.approx(1.0, abs=1e-5)
    phases = [(r["layers"], r["phase"]) for r in result["pilot"]]
    assert phases == [("first:1", "4 kl"), ("first:1", "4 kl + 2 kl"), ("first:1", "4 kl + 2 tvd"),
                      ("layers:1,2", "4 kl"), ("layers:1,2", "4 kl + 2 kl"), ("layers:1,2", "4 kl + 2 tvd")]
    assert all(0.0 < r["acceptance"] <= 1.0 for r in result["pilot"])


def test_pilot_with_frozen_embeddings_keeps_them_the_targets(trained):
    from specalign.bench.draft import pilot
    from specalign.models.loading import load_model
    from specalign.train.samples import read_sample_cache
    target = load_model(trained["target"], "float32")
    recs, held = read_sample_cache(trained["samples"]), read_sample_cache(trained["held"])
    config = DraftBenchConfig(layers=["first:1"], steps=3, branch_steps=0, freeze_embeddings=True, bf16=False)
    before = target.get_input_embeddings().weight.clone()
    (row,) = pilot(target, recs, held, config, 0)
    draft = load_model(trained["draft"], "float32")  # a first:1 draft
    vocab_params = {id(m.weight): m.weight.numel() for m in (draft.get_input_embeddings(), draft.get_output_embeddings())}
    assert row["trainable_params"] == sum(p.numel() for p in draft.parameters()) - sum(vocab_params.values())
    assert torch.equal(target.get_input_embeddings().weight, before)


def test_pilot_on_recorded_hidden_states_trains_as_with_a_teacher_forward(trained):
    """fp32 samples keep fp32 hidden states: the head gives the forward's logits, so the two pilots
    take the same steps and end at the same acceptance."""
    from specalign.bench.draft import pilot
    from specalign.models.loading import load_model, load_tokenizer
    from specalign.train.samples import read_sample_cache, sample_responses
    target, tok = load_model(trained["target"], "float32"), load_tokenizer(trained["target"])
    held = read_sample_cache(trained["held"])
    prompts = [r["prompt_ids"] for r in read_sample_cache(trained["samples"])][:16]
    recs = sample_responses(target, tok, prompts, max_new_tokens=12, hidden=True, progress=False)
    rows = {}
    for teacher in ("forward", "hidden"):
        config = DraftBenchConfig(layers=["first:1"], steps=6, branch_steps=0, teacher=teacher, bf16=False,
                                  learning_rate=3e-3)
        (rows[teacher],) = pilot(target, recs, held, config, tok.pad_token_id or 0)
    assert rows["hidden"]["train_loss"] == pytest.approx(rows["forward"]["train_loss"], abs=1e-4)
    assert rows["hidden"]["acceptance"] == pytest.approx(rows["forward"]["acceptance"], abs=1e-4)
    config = DraftBenchConfig(layers=["first:1"], steps=2, branch_steps=0, teacher="hidden", bf16=False)
    with pytest.raises(SpecError, match="teacher: hidden"):
        pilot(target, read_sample_cache(trained["samples"]), held, config, tok.pad_token_id or 0)


def test_bench_draft_bad_input(trained, tmp_path):
    with pytest.raises(SpecError, match="--held must be a sample cache dir"):
        run(DraftBenchConfig(target=trained["target"], held=str(tmp_path), drafts=[trained["draft"]]))
    with pytest.raises(SpecError, match="unknown pilot teacher 'top'"):
        run(DraftBenchConfig(target=trained["target"], held=trained["held"], drafts=[trained["draft"]], teacher="top"))
    with pytest.raises(SpecError, match="nothing to measure"):
        run(DraftBenchConfig(target=trained["target"], held=trained["held"]))
    with pytest.raises(SpecError, match="--samples must be"):
        run(DraftBenchConfig(target=trained["target"], held=trained["held"], layers=["first:1"]))
