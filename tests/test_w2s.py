"""Weak-to-strong compositions: SSS rows pruned by Speculative Rejection (implicit reward = the hand-computed
sum of log(qr/q0) of every emitted token; rows kept = the top of the scores), value-guided pruning keeps
the rows a scripted value head ranks highest, Best-of-N over SSS, adaptive rejection over SSS, and the
decode API / CLI compositions."""

import pytest
import torch

from specalign.decode.adaptive import AdaptiveRejection
from specalign.decode.api import DecodeConfig, Decoder
from specalign.decode.best_of_n import BestOfN
from specalign.decode.sampling import SamplingParams
from specalign.decode.spec_rejection import SpeculativeRejection
from specalign.decode.sss import LOG_FLOOR, SSSGenerator
from specalign.models.loading import chat_prompt
from specalign.models.scorers import Scorer, build_scorer
from specalign.models.testing import char_tokenizer, perturbed_copy, tiny_llama


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    target = tiny_llama(seed=0, init_scale=8.0)
    q0 = perturbed_copy(target, scale=0.5, seed=5)
    qr = perturbed_copy(q0, scale=1.5, seed=4)
    return target, qr, q0, char_tokenizer()


def sss(models, max_new_tokens=16, gamma=3):
    target, qr, q0, tok = models
    return SSSGenerator(target, qr, q0, tok, SamplingParams(1.0), max_new_tokens=max_new_tokens, gamma=gamma)


@torch.inference_mode()
def hand_implicit(qr, q0, prompt_ids, tokens):
    """sum_t log qr(y_t | prefix) - log q0(y_t | prefix), both floored as SSS floors them, by full forwards."""
    seq = torch.tensor([list(prompt_ids) + list(tokens)])
    lr = torch.log_softmax(qr(seq).logits[0].float(), -1).clamp(min=LOG_FLOOR)
    l0 = torch.log_softmax(q0(seq).logits[0].float(), -1).clamp(min=LOG_FLOOR)
    start = len(prompt_ids)
    return sum(float(lr[start - 1 + j, t] - l0[start - 1 + j, t]) for j, t in enumerate(tokens))


def test_implicit_scorer_is_the_hand_computed_log_ratio_sum_under_spec_rejection(models):
    target, qr, q0, tok = models
    gen = sss(models)
    ids = chat_prompt(tok, "hi")
    scorer = build_scorer("implicit")
    seen = []

    class Spy(Scorer):
        name = "spy"

        def _score(self, candidates):
            out = scorer(candidates)  # token lists copied now: a running row's list keeps growing
            seen.append(([(list(gen_tokens(gen, c)), dict(c.stats)) for c in candidates], out))
            return out

    spr = SpeculativeRejection(n=6, alpha=0.5, decision="tokens:5")
    result = spr.run(gen, Spy(), "hi", ids, torch.Generator().manual_seed(1))
    assert len(result["rounds"]) >= 2
    checked = 0
    for candidates, out in seen:  # partial and final responses, every round
        for (tokens, stats), s in zip(candidates, out):
            assert s == stats["implicit"]
            assert s == pytest.approx(hand_implicit(qr, q0, ids, tokens), abs=2e-4)
            checked += 1
    assert checked >= 9
    # every round keeps the top round((1 - alpha) * pool) of the implicit scores
    for r in result["rounds"]:
        assert r["kept"] == max(1, int((r["pool"] * 0.5) + 0.5))


def gen_tokens(gen, candidate):
    """The row's emitted tokens (the EOS included when it ended with one): what the implicit sum covers."""
    return candidate.response_ids + ([next(iter(gen.eos_ids))] if candidate.reason == "eos" else [])


class PrefixValue(Scorer):
    """A scripted value head: v(prefix) = sum of a fixed weight per emitted token, for every prefix."""

    name = "value:scripted"

    def __init__(self, weights):
        super().__init__()
        self.weights = weights

    def value(self, tokens):
        return float(sum(self.weights[t] for t in tokens))

    def _score(self, candidates):
        return [self.value(c.response_ids) for c in candidates]


def test_value_guided_pruning_keeps_the_rows_the_head_ranks_highest(models):
    target, qr, q0, tok = models
    weights = torch.randn(len(tok), generator=torch.Generator().manual_seed(7)).tolist()
    head = PrefixValue(weights)
    gen = sss(models, max_new_tokens=20)
    ids = chat_prompt(tok, "hi")
    spr = SpeculativeRejection(n=8, alpha=0.75, decision="tokens:4")
    result = spr.run(gen, head, "hi", ids, torch.Generator().manual_seed(2))
    rows = gen.rows
    finished_kept = []
    for r in result["rounds"]:
        pool = finished_kept + r["row_ids"]
        # the head's own values of each row's prefix at this decision, recomputed from the recorded scores
        value = dict(zip(r["row_ids"], r["scores"]))
        value.update({i: round(head.value(gen.response_ids(i)), 6) for i in finished_kept})
        expected = sorted(pool, key=lambda i: (-value[i], i))[:max(1, int(len(pool) * 0.25 + 0.5))]
        assert r["kept_ids"] == expected
        finished_kept = [i for i in expected if rows[i].finished]
    # the recorded scores are the head's values of the prefixes (checked on the finished rows' full text)
    finished = [i for i in range(8) if rows[i].finished]
    assert finished
    for i in finished:
        assert result["scores"][i] == pytest.approx(head.value(gen.response_ids(i)))
    assert result["best"] == max(finished, key=lambda i: (result["scores"][i], -i))
    pruned = [i for i in range(8) if rows[i].reason == "pruned"]
    assert len(pruned) >= 4


def test_best_of_n_over_sss_and_adaptive_over_sss(models):
    target, qr, q0, tok = models
    ids = chat_prompt(tok, "hi")
    gen = sss(models, max_new_tokens=12)
    result = BestOfN(n=5).run(gen, build_scorer("implicit"), "hi", ids, torch.Generator().manual_seed(3))
    assert len(result["candidates"]) == 5
    assert all(c.finished for c in result["candidates"])
    assert result["best"] == max(range(5), key=lambda i: (result["scores"][i], -i))
    adaptive = AdaptiveRejection(n=6, decision="tokens:3")
    out = adaptive.run(sss(models, max_new_tokens=12), build_scorer("implicit"), "hi", ids,
                       torch.Generator().manual_seed(3))
    assert out["rounds"][0]["rows"] == 6 and "adaptive" in out["rounds"][0]


def test_compositions_through_the_decode_api(models):
    """DecodeConfig(method=spec-rejection, generator=sss, scorer=implicit) composes with no new code."""
    target, qr, q0, tok = models
    for alpha in ("0.5", "auto"):
        cfg = DecodeConfig(model="unused", method="spec-rejection", generator="sss", draft="unused",
                           scorer="implicit", n=4, alpha=alpha, decision="tokens:4", max_new_tokens=12, seed=0)
        rec = Decoder(cfg, generator=sss(models, max_new_tokens=12)).run(["hi"], progress=False)[0]
        assert rec["method"] == "spec-rejection+sss"
        assert rec["rounds"][0]["rows"] == 4
        assert set(rec["cost"]) >= {"target", "draft", "draft_ref", "scorer", "acceptance_rate"}
        assert rec["score"] == pytest.approx(hand_implicit(qr, q0, chat_prompt(tok, "hi"),
                                                           tok(rec["response"], add_special_tokens=False)[
                                                               "input_ids"] + ([2] if rec["finish_reason"] == "eos"
                                                                               else [])), abs=2e-4)


# -- specalign bench w2s on tiny models ----------------------------------------------------------------
@pytest.fixture(scope="module")
def study_models(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from specalign.train.testing import prompt_file, save_tiny_model
    root = tmp_path_factory.mktemp("w2s-study")
    target = save_tiny_model(root / "target", num_layers=2, init_scale=8.0, seed=0)
    draft = save_tiny_model(root / "draft", num_layers=1, init_scale=8.0, seed=0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(draft),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 2.0)
    peft.save_pretrained(root / "dpo", save_embedding_layers=False)
    prompts = prompt_file(root / "prompts.json", ["hi there", "tell me a story", "why is the sky blue"])
    return {"root": root, "target": target, "dpo": str(root / "dpo"), "prompts": prompts}


def study_config(m, out, **kw):
    from specalign.bench.w2s import W2SBenchConfig
    base = dict(model=m["target"], dpo=m["dpo"], judge="python:specalign.train.pipeline:vowel_judge",
                prompts=m["prompts"], limit=0, max_new_tokens=10, bon_n=8, draft_samples=4, sss_bon_n=2,
                shift_lambdas=[0.0, 3.0], shift_lambda=3.0, n=4, alpha=0.5, decision="tokens:4", gamma=3,
                methods=["sample", "best-of-n", "draft", "sss", "best-of-n+sss", "spr-judge", "spr+sss-implicit",
                         "spr-target-value"], threads=1, output_dir=str(out))
    base.update(kw)
    return W2SBenchConfig(**base)


def test_bench_w2s_costs_pairs_and_resumes(study_models, tmp_path):
    import json as _json
    import statistics

    from specalign.bench.common import expected_best_of
    from specalign.bench.w2s import run, write
    out = tmp_path / "study"
    report = run(study_config(study_models, out))
    write(report, out)
    agg, recs = report["results"], report["per_prompt"]
    assert report["prompts"] == 3 and report["skipped"] == {"spr-target-value": "no --target-value head"}
    rows = {m["label"]: m for m in agg["methods"]}
    assert set(rows) == {"sample", "best-of-n N=1", "best-of-n N=2", "best-of-n N=4", "best-of-n N=8", "draft",
                         "sss lambda=0", "sss lambda=3", "best-of-n+sss N=1", "best-of-n+sss N=2",
                         "spr-judge a=0.5", "spr+sss-implicit"}
    # the aligned draft alone costs no target compute; SSS and the SSS selectors do
    assert rows["draft"]["target_calls"] == 0 and rows["draft"]["target_positions"] == 0 and rows["draft"]["flops"] > 0
    assert all(rows[k]["target_calls"] > 0 for k in ("sss lambda=3", "spr+sss-implicit"))
    # Best-of-N at N = M costs exactly the measured batch; its score is each prompt's best sample
    bo8 = rows["best-of-n N=8"]
    assert bo8["target_calls"] == pytest.approx(statistics.fmean(r["best-of-n"]["target_calls"] for r in recs))
    assert bo8["mean_gold"] == pytest.approx(statistics.fmean(max(r["best-of-n"]["gold"]) for r in recs))
    # paired differences by hand: per-prompt expected best of N, difference, sample standard error
    for label, key, n in (("sss lambda=3", "sss@3", 1), ("draft", "draft", 1), ("best-of-n+sss N=2", "sss@3", 2)):
        d = [expected_best_of(r[key]["gold"], n) - statistics.fmean(r["best-of-n"]["gold"]) for r in recs]
        assert rows[label]["vs_sample"]["diff"] == pytest.approx(statistics.fmean(d))
        assert rows[label]["vs_sample"]["se"] == pytest.approx(statistics.stdev(d) / 3 ** 0.5)
    # Best-of-N at matched positions: the largest N whose target positions are at most the method's
    for m in agg["methods"]:
        match = m.get("vs_bon_matched_target_positions")
        if match is None:
            continue
        within = [b for b in agg["methods"] if b["method"] == "best-of-n"
                  and b["target_positions"] <= m["target_positions"] * (1 + 1e-9)]
        assert match["bon_n"] == (max(b["params"]["n"] for b in within) if within else 1)
    # the shift moves SSS: lambda = 3 tilts towards the adapter, lambda = 0 samples the target (same seeds)
    assert [r["sss@0"]["gold"] for r in recs] != [r["sss@3"]["gold"] for r in recs]
    # target log-prob per token: a number for every answer-producing method
    assert all(isinstance(rows[k]["target_logp_per_token"], float) and rows[k]["target_logp_per_token"] < 0
               for k in ("sample", "draft", "sss lambda=0", "sss lambda=3", "spr-judge a=0.5", "spr+sss-implicit"))
    # frontiers and targets
    for axis in ("target_calls", "target_positions"):
        front = agg[f"frontier_{axis}"]
        for lab in front:
            p = rows[lab]
            assert not any(o[axis] <= p[axis] and o["mean_gold"] >= p["mean_gold"]
                           and (o[axis] < p[axis] or o["mean_gold"] > p["mean_gold"]) for o in agg["methods"])
    assert "draft" in agg["frontier_target_calls"]  # no target call at all
    assert set(agg["targets"]) == {"sss_reaches_best_of_8", "sss_keeps_target_fluency", "sss_x_spr_on_frontier"}
    # files written and re-read
    saved = _json.loads((out / "results.json").read_text())
    assert saved["results"]["frontier_target_calls"] == agg["frontier_target_calls"]
    assert (out / "table.md").read_text().startswith("Target ") and (out / "frontier.png").stat().st_size > 5000
    # a re-run reuses every record; a new lambda runs only that lambda's records
    again = run(study_config(study_models, out))
    assert again["records_run"] == 0 and again["records_reused"] == 3 * 6
    assert _json.dumps(again["results"]) == _json.dumps(report["results"])
    # a new lambda runs only that lambda's records: shard processes fill their prompts, the full run the rest
    part = run(study_config(study_models, out, shift_lambdas=[0.0, 1.0, 3.0], shard="1/2"))
    assert part == {"shard": "1/2", "prompts": 1, "records_run": 1, "work_dir": str(out) + ".work"}
    more = run(study_config(study_models, out, shift_lambdas=[0.0, 1.0, 3.0]))
    assert more["records_run"] == 2
    assert {m["label"] for m in more["results"]["methods"]} >= {"sss lambda=1"}


def test_bench_w2s_input_errors(study_models, tmp_path):
    from specalign.bench.w2s import run
    from specalign.errors import SpecError
    with pytest.raises(SpecError, match="target-value"):
        run(study_config(study_models, tmp_path / "a", target_value=str(tmp_path / "missing")))
    with pytest.raises(SpecError, match="shift lambdas"):
        run(study_config(study_models, tmp_path / "b", shift_lambdas=[float("nan")]))
    with pytest.raises(SpecError, match="R/K"):
        run(study_config(study_models, tmp_path / "d", shard="2/2"))
    with pytest.raises(SpecError, match="power of 2"):
        run(study_config(study_models, tmp_path / "c", sss_bon_n=3))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bench_w2s_ranks_by_a_target_value_head_in_two_processes(study_models, tmp_path):
    """spr-target-value runs with a head on the study target's states (the sampler keeps them for it);
    spr+sss-target-value is listed as skipped; --num-processes 2 fills the same records as one process."""
    import json as _json

    import yaml

    from specalign.bench.w2s import main, run
    from specalign.models.loading import load_model
    from specalign.models.target_value import TargetValueHead, model_fingerprint
    judge = "python:specalign.train.pipeline:vowel_judge"
    target = load_model(study_models["target"], "float32")
    head = TargetValueHead(target.config.hidden_size, width=16, residual=True)
    with torch.no_grad():  # a correction that depends on the states: the head does not rank like the judge
        head.net[-1].weight.copy_(torch.randn(head.net[-1].weight.shape, generator=torch.Generator().manual_seed(0)))
    (tmp_path / "head").mkdir()
    head.save(tmp_path / "head", {"base_model": study_models["target"], "fingerprint": model_fingerprint(target),
                                  "scorer": judge})
    kw = dict(target_value=str(tmp_path / "head"), bon_n=4,
              methods=["best-of-n", "spr-judge", "spr-target-value", "spr+sss-target-value"])
    cfg = study_config(study_models, tmp_path / "two", **kw)
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({k: getattr(cfg, k) for k in ("model", "dpo", "judge", "prompts", "limit",
                                                                   "max_new_tokens", "n", "alpha", "decision",
                                                                   "gamma", "shift_lambda", "threads", "output_dir",
                                                                   "target_value", "bon_n", "methods")}))
    assert main(["--config", str(config), "--num_processes", "2"]) == 0
    two = _json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["records_run"] == 0 and two["records_reused"] == 3 * 3  # the shards ran every record
    assert list(two["skipped"]) == ["spr+sss-target-value"] and "resamples" in two["skipped"]["spr+sss-target-value"]
    one = run(study_config(study_models, tmp_path / "one", **kw))
    assert one["records_run"] == 3 * 3
    for a, b in zip(one["per_prompt"], two["per_prompt"]):  # same seeds: same answers, same costs
        for key in ("best-of-n", "spr-judge", "spr-target-value"):
            assert (a[key]["gold"], a[key]["positions"]) == (b[key]["gold"], b[key]["positions"])
    # the head, not the judge, chose which rows survived: some prompt ends with another answer
    assert any(r["spr-target-value"]["gold"] != r["spr-judge"]["gold"] for r in one["per_prompt"])
