"""`train draft`: draft construction, the distillation loss, the step end to end, resume, atomic output."""

import json
import math

import pytest
import torch

from specalign.decode.engine import CACHE_FIELD
from specalign.errors import SpecError
from specalign.models.draft import acceptance, build_draft, layer_indices
from specalign.models.testing import tiny_llama
from specalign.train.common import atomic_dir
from specalign.train.draft import DistillTrainer, TimeLimit, coarse_distributions, collate, distill_loss, full_distill_loss
from specalign.train.testing import prompt_file, save_tiny_model, template_prompts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("draft")
    torch.set_num_threads(1)
    return {"root": root, "target": save_tiny_model(root / "target"),
            "train": prompt_file(root / "train.json", template_prompts(64)),
            "held": prompt_file(root / "held.json", template_prompts(16, offset=400))}


def config(tiny, out, **kw):
    from specalign.train.draft_config import DraftConfig
    base = dict(output_dir=str(out), target=tiny["target"], draft="first:1", prompts=tiny["train"],
                exclude_prompts=None, eval_prompts=tiny["held"], eval_limit=0, max_new_tokens=24, topk=16,
                learning_rate=3e-3, max_steps=60, warmup_steps=0, per_device_train_batch_size=8, logging_steps=1000,
                save_steps=1000, torch_threads=1, seed=0, disable_tqdm=True, sample_batch_rows=32)
    base.update(kw)
    return DraftConfig(**base)


def test_layer_choices():
    assert layer_indices("first:3", 30) == [0, 1, 2]
    assert layer_indices("spread:6", 30) == [0, 6, 12, 17, 23, 29]
    assert layer_indices("spread:1", 30) == [0]
    assert layer_indices("layers:0,5,29", 30) == [0, 5, 29]
    for bad in ("first:0", "spread:31", "layers:3,1", "layers:0,30", "middle:4", "first:x", "layers:"):
        with pytest.raises(SpecError):
            layer_indices(bad, 30)


def test_build_draft_copies_layers_and_shares_vocab():
    target = tiny_llama(num_layers=4, seed=3)
    draft = build_draft(target, "layers:1,3")
    assert draft.config.num_hidden_layers == 2
    t, d = target.state_dict(), draft.state_dict()
    kept = {0: 1, 1: 3}
    for name, tensor in d.items():
        source = name
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            source = name.replace(f"model.layers.{i}.", f"model.layers.{kept[i]}.")
        assert torch.equal(tensor, t[source]), name
    # every layer kept = the target itself, exactly
    full = build_draft(target, "first:4")
    ids = torch.randint(3, 70, (2, 9))
    with torch.no_grad():
        assert torch.equal(full(ids).logits, target(ids).logits)
    # per-layer cache slots are renumbered: incremental decoding equals a full forward
    with torch.no_grad():
        whole = draft(ids).logits[:, -1]
        out = draft(ids[:, :5], use_cache=True)
        cache = getattr(out, CACHE_FIELD)
        step = draft(ids[:, 5:], use_cache=True, **{CACHE_FIELD: cache}).logits[:, -1]
    assert torch.allclose(whole, step, atol=1e-5)


def test_coarse_loss_is_exact_kl_and_tv_when_topk_covers_the_vocab():
    torch.manual_seed(0)
    p_logits, q_logits = torch.randn(2, 5, 11) * 2, torch.randn(2, 5, 11) * 2
    logp = torch.log_softmax(p_logits, -1)
    vals, ids = logp.topk(11, -1)
    mask = torch.ones(2, 5, dtype=torch.bool)
    p, q = logp.exp(), torch.softmax(q_logits, -1)
    kl = (p * (logp - torch.log_softmax(q_logits, -1))).sum(-1).mean()
    tv = 0.5 * (p - q).abs().sum(-1).mean()
    assert torch.allclose(distill_loss(q_logits, ids, vals, mask, "kl"), kl, atol=1e-5)
    assert torch.allclose(distill_loss(q_logits, ids, vals, mask, "tvd"), tv, atol=1e-5)
    # with k < V the rest bucket holds exactly the remaining mass of each distribution
    vals3, ids3 = logp.topk(3, -1)
    lp, lq = coarse_distributions(q_logits, ids3, vals3)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(2, 5), atol=1e-5)
    assert torch.allclose(lq.exp().sum(-1), torch.ones(2, 5), atol=1e-5)
    rest_q = 1 - q.gather(-1, ids3).sum(-1)
    assert torch.allclose(lq[..., -1].exp(), rest_q, atol=1e-5)
    # the full-vocabulary loss is the exact divergence, on masked positions only
    mask[1, 3:] = False
    want_kl = (p * (logp - torch.log_softmax(q_logits, -1))).sum(-1)[mask].mean()
    want_tv = (1 - torch.minimum(p, q).sum(-1))[mask].mean()
    assert torch.allclose(full_distill_loss(q_logits, p_logits, mask, "kl"), want_kl, atol=1e-5)
    assert torch.allclose(full_distill_loss(q_logits, p_logits, mask, "tvd"), want_tv, atol=1e-5)
    assert full_distill_loss(p_logits, p_logits, mask, "kl").abs() < 1e-5


def test_kl_turns_into_tv_for_the_last_share_of_the_run():
    from transformers import TrainerState
    trainer = DistillTrainer.__new__(DistillTrainer)  # only the schedule is under test
    trainer.loss_kind, trainer.tvd_fraction, trainer.time_limit = "kl", 0.25, None
    trainer.state = TrainerState(max_steps=100)
    kinds = []
    for step in (0, 74, 75, 99):
        trainer.state.global_step = step
        kinds.append(trainer.current_loss_kind())
    assert kinds == ["kl", "kl", "tvd", "tvd"]
    # the time limit counts too: 80% of the minutes used -> tv although steps are at 10%
    clock = TimeLimit(10.0)
    clock.start = __import__("time").perf_counter() - 480
    trainer.time_limit, trainer.state.global_step = clock, 10
    assert trainer.current_loss_kind() == "tvd"
    trainer.tvd_fraction = 0.0
    assert trainer.current_loss_kind() == "kl"
    trainer.loss_kind = "tvd"
    assert trainer.current_loss_kind() == "tvd"


def test_collate_aligns_every_response_token_with_its_prediction():
    recs = [{"prompt_ids": [5, 6, 7], "response_ids": [8, 9], "topk_ids": torch.zeros(2, 4, dtype=torch.int32),
             "topk_logp": torch.zeros(2, 4)},
            {"prompt_ids": [5], "response_ids": [10, 11, 12, 2], "topk_ids": torch.zeros(4, 4, dtype=torch.int32),
             "topk_logp": torch.zeros(4, 4)}]
    b = collate(recs, pad_id=0)
    width_r = b["response_mask"].shape[1]
    assert width_r == 4 and b["input_ids"].shape == (2, 3 + 4 - 1)
    # column P-1+j holds the token just before response token j
    last_r = b["input_ids"].shape[1] - width_r
    assert b["input_ids"][0, last_r:last_r + 2].tolist() == [7, 8]
    assert b["input_ids"][1, last_r:last_r + 4].tolist() == [5, 10, 11, 12]
    assert b["response_mask"].tolist() == [[True, True, False, False], [True] * 4]
    assert b["position_ids"][1, last_r].item() == 0 and b["position_ids"][0, last_r].item() == 2


def test_collate_pads_recorded_hidden_states_per_response_position():
    h0, h1 = torch.randn(2, 3), torch.randn(4, 3)
    recs = [{"prompt_ids": [5, 6, 7], "response_ids": [8, 9], "hidden": h0},
            {"prompt_ids": [5], "response_ids": [10, 11, 12, 2], "hidden": h1}]
    b = collate(recs, pad_id=0)
    assert b["hidden"].shape == (2, 4, 3)
    assert torch.equal(b["hidden"][0, :2], h0) and torch.equal(b["hidden"][1], h1)
    assert not b["hidden"][0, 2:].any()


@pytest.mark.parametrize("autocast", [False, True])
def test_recorded_hidden_states_give_the_logits_each_token_was_sampled_from(autocast):
    """The head on the recorded final hidden states reproduces the sampler's own log-probs at every
    position of every row (rows of different prompts and lengths, rows ending early)."""
    from specalign.decode.sampling import SamplingParams
    from specalign.models.testing import char_tokenizer
    from specalign.train.draft import head_logits
    from specalign.train.samples import sample_responses
    torch.manual_seed(0)
    model = tiny_llama(hidden_size=32, num_layers=2).eval()
    with torch.no_grad():  # larger logits: sharper, more varied distributions
        model.lm_head.weight.mul_(4.0)
    tok = char_tokenizer()
    prompts = [[3, 4, 5], [6], [7, 8, 9, 10, 11], [4, 4]]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        recs = sample_responses(model, tok, prompts, n=3, batch_rows=5, max_new_tokens=12, topk=6, hidden=True,
                                params=SamplingParams(1.0), seed=3, progress=False)
    assert len({len(r["response_ids"]) for r in recs}) > 1, "some rows end early"
    for r in recs:
        n = len(r["response_ids"])
        assert r["hidden"].shape == (n, 32)
        assert r["hidden"].dtype == (torch.bfloat16 if autocast else torch.float32)
        logp = torch.log_softmax(head_logits(model.lm_head, r["hidden"], autocast).float(), -1)
        vals, ids = logp.topk(6, -1)
        assert torch.allclose(vals, r["topk_logp"].float(), atol=2e-3), (vals, r["topk_logp"])
        # the sampled token's log-prob summed over the response is the recorded logp
        picked = logp.gather(1, torch.tensor(r["response_ids"])[:, None]).sum()
        assert float(picked) == pytest.approx(r["logp"], abs=1e-2)


def test_hidden_states_need_a_final_norm_feeding_the_head():
    from transformers import GPT2Config, GPT2LMHeadModel

    from specalign.train.samples import final_norm
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=16))
    with pytest.raises(SpecError, match="use teacher: forward"):
        final_norm(model)
    assert final_norm(tiny_llama()) is not None


@pytest.mark.parametrize("teacher", ["forward", "hidden", "samples"])
def test_draft_step_raises_held_out_acceptance(tiny, tmp_path, teacher):
    from specalign.models.loading import load_model
    from specalign.train.draft import run
    result = run(config(tiny, tmp_path / "draft", teacher=teacher))
    assert result["teacher"] == teacher
    out = tmp_path / "draft"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    saved = json.loads((out / "draft_report.json").read_text())
    assert saved["acceptance"] == pytest.approx(result["acceptance"])
    assert result["acceptance"] > result["acceptance_before"] + 0.05, result
    assert result["train_steps"] == 60 and result["distributed"]["processes"] == 1
    meta = json.loads((tmp_path / "draft.work" / "samples" / "meta.json").read_text())
    assert meta.get("hidden", False) == (teacher == "hidden") and (meta["topk"] > 0) == (teacher == "samples")
    # the directory is a plain model of one layer; re-measuring gives the reported figure
    draft = load_model(str(out))
    assert draft.config.num_hidden_layers == 1
    assert not list(tmp_path.glob(".draft.*")), "no partial directory left behind"
    assert not list((tmp_path / "draft.work").glob("checkpoint-*")), "checkpoints dropped after success"


def test_frozen_embeddings_stay_the_targets_while_the_layers_learn(tiny, tmp_path):
    from specalign.models.loading import load_model
    from specalign.train.draft import run
    result = run(config(tiny, tmp_path / "fr", teacher="hidden", freeze_embeddings=True, max_steps=20))
    target, draft = load_model(tiny["target"]), load_model(str(tmp_path / "fr"))
    assert torch.equal(draft.get_input_embeddings().weight, target.get_input_embeddings().weight)
    assert torch.equal(draft.get_output_embeddings().weight, target.get_output_embeddings().weight)
    layer = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(draft.state_dict()[layer], target.state_dict()[layer])
    assert result["acceptance"] > result["acceptance_before"] + 0.02, result


def test_autocast_samples_are_cached_apart_and_train(tiny, tmp_path):
    from specalign.train.draft import run
    result = run(config(tiny, tmp_path / "ac", sample_autocast=True, max_steps=3, eval_before=False,
                        samples_per_prompt=2, eval_limit=4))
    meta = json.loads((tmp_path / "ac.work" / "samples" / "meta.json").read_text())
    assert meta["autocast"] == "bfloat16" and meta["n"] == 2 and meta["topk"] == 0
    assert "autocast" not in json.loads((tmp_path / "ac.work" / "samples-eval" / "meta.json").read_text())
    assert result["train_samples"] == 2 * 64 and result["train_steps"] == 3


def test_existing_small_model_as_draft_and_vocab_check(tiny, tmp_path):
    from specalign.train.draft import run
    other = save_tiny_model(tmp_path / "other", num_layers=1, seed=7)
    result = run(config(tiny, tmp_path / "d2", draft=other, max_steps=2, eval_before=False))
    assert result["layers"] is None and result["train_steps"] == 2
    from specalign.models.testing import tiny_llama as tl
    tl(vocab_size=50, num_layers=1).save_pretrained(tmp_path / "small_vocab")
    from specalign.models.testing import char_tokenizer
    char_tokenizer().save_pretrained(tmp_path / "small_vocab")
    with pytest.raises(SpecError, match="vocabulary"):
        run(config(tiny, tmp_path / "d3", draft=str(tmp_path / "small_vocab"), max_steps=1))


def test_resume_continues_from_the_last_checkpoint(tiny, tmp_path):
    from specalign.train.draft import run
    out = tmp_path / "r"
    first = run(config(tiny, out, max_steps=4, save_steps=2, keep_checkpoints=True, eval_prompts=None))
    assert first["train_steps"] == 4
    assert sorted(p.name for p in (tmp_path / "r.work").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    second = run(config(tiny, out, max_steps=6, save_steps=2, resume=True, eval_prompts=None))
    assert second["resumed_from"].endswith("checkpoint-4")
    assert second["train_steps"] == 6 and second["steps_this_run"] == 2


def test_existing_output_needs_overwrite(tiny, tmp_path):
    from specalign.train.draft import run
    (tmp_path / "taken").mkdir()
    with pytest.raises(SpecError, match="already exists"):
        run(config(tiny, tmp_path / "taken", max_steps=1))


def test_atomic_dir_keeps_the_old_output_on_failure(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("crash")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]


def test_acceptance_of_a_model_with_itself_is_one():
    target = tiny_llama(num_layers=2, seed=1)
    res = acceptance(target, target, [[1, 5, 6], [1, 7]], [[8, 9, 10], [11]], pad_id=0)
    assert res["positions"] == 4 and math.isclose(res["acceptance"], 1.0, rel_tol=1e-5)
    assert len(res["per_position"]) == 3
