"""The fast paths of `train draft`: fused head + divergence, inverse-CDF sampling, once-cast weights,
eager attention while sampling, and the whole-command time budget. Each must give what the plain path gives."""

import pytest
import torch
from scipy.stats import chisquare

from specalign.decode.sampling import sample_from
from specalign.errors import SpecError
from specalign.models.draft import build_draft
from specalign.models.testing import tiny_llama
from specalign.train.draft import batch_loss, collate, full_distill_loss, fused_head, head_divergence, train_minutes
from specalign.train.samples import attention, autocast_weights


@pytest.mark.parametrize("kind", ["kl", "tvd"])
@pytest.mark.parametrize("train_head", [False, True])
def test_head_divergence_equals_full_loss_and_its_gradient(kind, train_head):
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=train_head)
    h_t, w_t = torch.randn(37, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64)
    wrt = [h, w] if train_head else [h]
    ref = full_distill_loss((h @ w.T)[None], (h_t @ w_t.T)[None], torch.ones(1, 37, dtype=torch.bool), kind)
    ref_grads = torch.autograd.grad(ref, wrt)
    for chunk in (1, 8, 37, 100):  # chunk boundaries inside, at and past the end
        out = head_divergence(h, w, h_t, w_t, kind, chunk=chunk)
        assert abs(out.item() - ref.item()) < 1e-6
        for got, want in zip(torch.autograd.grad(out, wrt), ref_grads):
            assert torch.allclose(got, want.to(got.dtype), atol=1e-7)


def _records(n=5, vocab=40, hidden=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    recs = []
    for _ in range(n):
        p, r = int(torch.randint(2, 9, (1,), generator=g)), int(torch.randint(1, 12, (1,), generator=g))
        recs.append({"prompt_ids": torch.randint(3, vocab, (p,), generator=g).tolist(),
                     "response_ids": torch.randint(3, vocab, (r,), generator=g).tolist(),
                     "hidden": torch.randn(r, hidden, generator=g)})
    return recs


@pytest.mark.parametrize("teacher_kind", ["hidden", "forward"])
@pytest.mark.parametrize("kind", ["kl", "tvd"])
def test_batch_loss_fused_equals_plain_path(teacher_kind, kind):
    target = tiny_llama(num_layers=3, seed=4)
    batch = collate(_records(vocab=target.config.vocab_size), 0)
    grads = {}
    for fused in (True, False):
        draft = build_draft(target, "first:1").train().requires_grad_(True)
        teacher = target if teacher_kind == "forward" else None
        head = target.get_output_embeddings() if teacher_kind == "hidden" else None
        # fused=False: the draft's logits and the teacher's in full, then full_distill_loss
        loss = batch_loss(draft, batch, kind, False, teacher=teacher, head=head, fused=fused)
        loss.backward()
        grads[fused] = (loss.item(), {n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None})
    assert fused_head(target)  # the fused path is the one taken above
    (loss_f, g_f), (loss_p, g_p) = grads[True], grads[False]
    assert abs(loss_f - loss_p) < 1e-5 and loss_f > 0
    assert g_f.keys() == g_p.keys() and "lm_head.weight" in g_f
    for name in g_f:
        assert torch.allclose(g_f[name], g_p[name], atol=1e-6), name


def test_sample_from_follows_the_weights_and_never_draws_a_zero_weight():
    weights = torch.tensor([[0.0, 3.0, 0.0, 1.0, 6.0, 0.0]]).repeat(20000, 1)  # unnormalised
    draws = sample_from(weights, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=6)
    assert counts[[0, 2, 5]].sum() == 0
    assert chisquare(counts[[1, 3, 4]].numpy(), [6000, 2000, 12000]).pvalue > 1e-3
    # a wrong law is rejected with the same sample size (the check has power)
    assert chisquare(counts[[1, 3, 4]].numpy(), [6600, 1800, 11600]).pvalue < 1e-3
    # rows are independent and the seed fixes them
    again = sample_from(weights[:50], torch.Generator().manual_seed(0))
    assert torch.equal(again, draws[:50])
    assert torch.equal(sample_from(torch.tensor([[0.0, 0.0, 1e-30]])), torch.tensor([2]))


def test_autocast_weights_gives_the_same_logits_and_restores_the_model():
    model = tiny_llama(seed=2)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2's head is
    model.requires_grad_(False)  # frozen, as load_model leaves a target
    before = {n: p for n, p in model.named_parameters()}
    ids = torch.randint(3, 40, (2, 7))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(ids).logits
        with autocast_weights(model):
            assert model.lm_head.weight.dtype == torch.bfloat16
            assert model.model.embed_tokens.weight.dtype == torch.float32
            cast = model(ids).logits
    assert torch.equal(plain, cast)
    assert all(p is before[n] for n, p in model.named_parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_attention_switch_gives_the_same_logits_and_restores():
    model = tiny_llama(seed=5)
    own = model.config._attn_implementation
    ids = torch.randint(3, 40, (2, 9))
    with torch.no_grad():
        plain = model(ids).logits
        with attention(model, "eager"):
            assert model.config._attn_implementation == "eager"
            eager = model(ids).logits
    assert model.config._attn_implementation == own
    assert torch.allclose(plain, eager, atol=1e-5)


def test_run_budget_shortens_training_and_refuses_when_nothing_is_left():
    from specalign.train.draft_config import DraftConfig
    cfg = DraftConfig(output_dir="/tmp/unused", max_train_minutes=50, max_run_minutes=0)
    assert train_minutes(cfg, 1800, 60) == 50
    cfg.max_run_minutes = 90  # 30 min gone, final measurement 1.2 * 60 s + 60 s: 57.8 min left, over 50
    assert train_minutes(cfg, 1800, 60) == 50
    assert train_minutes(cfg, 3000, 60) == pytest.approx((5400 - 3000 - 132) / 60)
    cfg.max_train_minutes = 10
    assert train_minutes(cfg, 1800, 60) == 10
    cfg.max_train_minutes = 0
    assert train_minutes(cfg, 1800, 60) == pytest.approx((5400 - 1800 - 132) / 60)
    with pytest.raises(SpecError, match="max_run_minutes 90 leaves no time to train"):
        train_minutes(cfg, 5300, 60)
    with pytest.raises(SpecError, match="must be >= 0"):
        DraftConfig(output_dir="/tmp/unused", max_run_minutes=-1).validate()


def test_bench_draft_speed_writes_its_files_and_restores_the_sampler(tmp_path):
    import json

    from specalign.bench import draft_speed
    from specalign.decode import generators
    from specalign.train.testing import prompt_file, save_tiny_model, template_prompts
    own = generators.sample
    target = save_tiny_model(tmp_path / "target")
    prompts = prompt_file(tmp_path / "p.json", template_prompts(8))
    out = tmp_path / "out"
    assert draft_speed.main(["--target", target, "--draft", "first:1", "--prompts", prompts, "--rows", "6",
                             "--first_row", "0", "--max_new_tokens", "6", "--batch_size", "2", "--steps", "2",
                             "--rounds", "1", "--threads", "1", "--output_dir", str(out)]) == 0
    assert generators.sample is own
    report = json.loads((out / "results.json").read_text())
    for name in ("before", "after"):
        assert report["sampling"][name]["tokens"] > 0 and report["train_s_per_step"][name] > 0
    assert report["sampling_speedup"] == round(report["sampling"]["after"]["tok_s"] / report["sampling"]["before"]["tok_s"], 2)
    on = report["on_policy"]
    assert on["draft_sampling"]["tokens"] == on["target_forward"]["tokens"] > 0
    assert on["tok_s"] == round(1 / (1 / on["draft_sampling"]["tok_s"] + 1 / on["target_forward"]["tok_s"]), 1)
    assert on["tok_s"] < min(on["draft_sampling"]["tok_s"], on["target_forward"]["tok_s"])
    table = (out / "table.md").read_text()
    assert "| sampling, tokens/s |" in table and "| on-policy, both parts |" in table


@pytest.mark.parametrize("clock_share", [None, 0.5, 1.7])
def test_schedule_follows_the_time_limit_when_it_is_further_than_the_steps(tmp_path, clock_share):
    import math
    import time

    from transformers import TrainingArguments

    from specalign.train.draft import DistillTrainer, SampleDataset, TimeLimit
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, learning_rate=1e-3, lr_scheduler_type="cosine",
                             warmup_steps=0, max_steps=100, report_to=[])
    clock = TimeLimit(10.0)
    trainer = DistillTrainer(model=tiny_llama(num_layers=1), args=args, train_dataset=SampleDataset(_records()),
                             time_limit=clock)
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    sched = trainer.lr_scheduler
    if clock_share is not None:
        clock.start = time.perf_counter() - clock_share * clock.seconds
    for _ in range(3):
        trainer.optimizer.step()
        sched.step()
    at = 3 if clock_share is None else min(round(clock_share * 100), 100)  # the clock, if further than step 3
    want = 1e-3 * 0.5 * (1 + math.cos(math.pi * at / 100))
    assert sched.get_last_lr()[0] == pytest.approx(want, rel=1e-3, abs=1e-12)
    if clock_share and clock_share > 1:
        assert sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    # no time limit: transformers' schedule, untouched (step 3 of 100)
    plain = DistillTrainer(model=tiny_llama(num_layers=1), args=args, train_dataset=SampleDataset(_records()))
    plain.create_optimizer_and_scheduler(num_training_steps=100)
    for _ in range(3):
        plain.optimizer.step()
        plain.lr_scheduler.step()
    assert plain.lr_scheduler.get_last_lr()[0] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 100)))


def test_grouped_attention_equals_eager_attention_with_a_mask_and_several_query_positions():
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from specalign.models.attention import grouped_attention_forward
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, t, length, d = 3, 6, 2, 4, 11, 8
    q = torch.randn(b, hq, t, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, hkv, length, d, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.zeros(b, 1, t, length, dtype=torch.float64)
    mask[0, :, :, :3] = float("-inf")  # left padding of row 0
    future = torch.arange(length)[None, :] > torch.arange(t)[:, None] + (length - t)  # query i sees keys <= L-T+i
    mask[:, :, future] = float("-inf")
    module = torch.nn.Module()
    module.num_key_value_groups, module.training, module.is_causal = hq // hkv, False, True
    want, _ = eager_attention_forward(module, q, k, v, mask, scaling=d ** -0.5)
    got, none = grouped_attention_forward(module, q, k, v, mask, scaling=d ** -0.5)
    assert got.shape == want.shape == (b, t, hq, d) and none is None
    assert (got - want).abs().max() < 1e-6  # torch's CPU SDPA kernel differs from eager by ~1e-7 even in fp64
    # no mask and T > 1: causal attention over an empty cache (a prefill without padding)
    k, v = k[:, :, :t], v[:, :, :t]
    causal = torch.zeros(t, t, dtype=torch.float64).masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
    want, _ = eager_attention_forward(module, q, k, v, causal[None, None], scaling=d ** -0.5)
    got, _ = grouped_attention_forward(module, q, k, v, None, scaling=d ** -0.5)
    assert (got - want).abs().max() < 1e-6


def test_grouped_attention_gives_eager_logits_through_the_engine():
    """Ragged left-padded prefill, one-token steps, a multi-token extend and a row selection: same logits."""
    from specalign.decode.engine import LMState
    from specalign.models.attention import register
    name = register()
    model = tiny_llama(num_heads=6, num_kv_heads=2, hidden_size=48, seed=3)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    logits = {}
    for impl in ("eager", name):
        with torch.no_grad(), attention(model, impl):
            assert model.config._attn_implementation == impl
            state = LMState(model)
            out = [state.prefill(prompts)]
            out.append(state.extend(torch.tensor([[20], [21], [22]]))[:, -1])
            out.append(state.extend(torch.tensor([[23, 24, 25], [26, 27, 28], [29, 30, 31]])).flatten(0, 1))
            state.select([0, 2])
            out.append(state.extend(torch.tensor([[32], [33]]))[:, -1])
        logits[impl] = out
    for a, b in zip(logits["eager"], logits[name]):
        assert torch.allclose(a, b, atol=1e-5)


def test_group_by_length_batches_rows_of_neighbouring_lengths(tmp_path):
    """``train_sampling_strategy: group_by_length`` (Trainer's own sampler) reads SampleDataset's input_ids: every
    row comes once, and batches pad to far fewer columns than random batches of the same rows."""
    from transformers import TrainingArguments

    from specalign.train.draft import DistillTrainer, SampleDataset
    g = torch.Generator().manual_seed(3)  # as the target's samples: most responses run to max_new_tokens
    recs = [{"prompt_ids": [5] * int(torch.randint(2, 60, (1,), generator=g)), "response_ids": [6] * 12}
            for _ in range(400)]

    def padding(strategy):
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=8, report_to=[],
                                 train_sampling_strategy=strategy, remove_unused_columns=False, seed=0)
        trainer = DistillTrainer(model=tiny_llama(num_layers=1), args=args, train_dataset=SampleDataset(recs),
                                 data_collator=lambda rows: collate(rows, 0))
        batches = list(trainer.get_train_dataloader())
        rows = sorted(sum((b["attention_mask"].sum(1).tolist() for b in batches), []))
        assert rows == sorted(len(r["prompt_ids"]) + len(r["response_ids"]) - 1 for r in recs)  # every row once
        return sum(int((1 - b["attention_mask"]).sum()) for b in batches)

    grouped, random = padding("group_by_length"), padding("random")
    assert grouped < 0.2 * random, (grouped, random)
