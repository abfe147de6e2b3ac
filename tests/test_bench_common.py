"""Benchmark helpers: Best-of-N order statistics against brute force, the improvement score,
log-linear speedups, files written and re-read, recorded and replayed generation (same rows and
exact costs as the engine, with and without pruning), and the spr / correlation benchmarks end to
end on a tiny model."""

import itertools
import json
import math

import pytest
import torch

from specalign.bench.common import (RecordingSampler, ReplayGenerator, expected_best_of, expected_worst_of,
                                    format_speedup, improvement_score, markdown_table, plot_score_vs_compute,
                                    powers_of_two, prefix_candidate, recorded_rows, reference_compute_for,
                                    speedup, write_results)
from specalign.decode import SamplingParams
from specalign.decode.best_of_n import BestOfN
from specalign.decode.spec_rejection import SpeculativeRejection
from specalign.models.loading import chat_prompt
from specalign.models.scorers import build_scorer


@pytest.mark.parametrize("values", [[0.3, -1.0, 2.5, 0.7, 0.7, 1.1], [1, 1, 1, 2], [5.0, 4.0, 3.0, 2.0, 1.0]])
def test_expected_best_and_worst_match_brute_force(values):
    for k in range(1, len(values) + 1):
        subsets = list(itertools.combinations(values, k))
        assert expected_best_of(values, k) == pytest.approx(sum(max(s) for s in subsets) / len(subsets), abs=1e-12)
        assert expected_worst_of(values, k) == pytest.approx(sum(min(s) for s in subsets) / len(subsets), abs=1e-12)
    lengths = [10 * (i + 1) for i in range(len(values))]
    for k in range(1, len(values) + 1):  # the attached value of each subset's best (ties: the later one)
        subsets = list(itertools.combinations(range(len(values)), k))
        brute = sum(lengths[max(s, key=lambda i: (values[i], i))] for s in subsets) / len(subsets)
        assert expected_best_of(values, k, lengths) == pytest.approx(brute, abs=1e-12)
    assert expected_best_of(values, 1) == pytest.approx(sum(values) / len(values))
    assert expected_best_of(values, len(values)) == max(values)
    with pytest.raises(ValueError):
        expected_best_of(values, len(values) + 1)


def test_powers_of_two():
    assert powers_of_two(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert powers_of_two(5) == [1, 2, 4]


def test_improvement_score():
    ref_best, ref_worst = [1.0, 10.0, 3.0], [0.0, 6.0, 3.0]  # prompt 3 has no spread: left out
    assert improvement_score(ref_best, ref_best, ref_worst) == (100.0, 2)
    # (1.5 - 1) / 1 = 0.5 and (8 - 10) / 4 = -0.5: mean 0
    assert improvement_score([1.5, 8.0, 99.0], ref_best, ref_worst) == (100.0, 2)
    assert improvement_score([2.0, 14.0, 0.0], ref_best, ref_worst) == (200.0, 2)
    score, used = improvement_score([1.0], [1.0], [1.0])
    assert math.isnan(score) and used == 0


def test_reference_compute_log_linear():
    compute, scores = [100, 200, 400], [1.0, 2.0, 3.0]
    assert reference_compute_for(2.5, compute, scores) == (pytest.approx(math.sqrt(200 * 400)), "=")
    assert reference_compute_for(1.25, compute, scores) == (pytest.approx(100 * 2 ** 0.25), "=")
    assert reference_compute_for(2.0, compute, scores) == (pytest.approx(200), "=")
    assert reference_compute_for(1.0, compute, scores) == (100, "=")
    assert reference_compute_for(3.5, compute, scores) == (400, ">=")
    assert reference_compute_for(0.5, compute, scores) == (100, "<=")
    # order does not matter, and a dip is flattened by the running max
    assert reference_compute_for(2.5, [400, 100, 200], [3.0, 1.0, 2.0])[0] == pytest.approx(math.sqrt(80000))
    assert reference_compute_for(2.5, [100, 200, 400, 800], [1.0, 3.0, 2.0, 4.0])[0] == pytest.approx(100 * 2 ** 0.75)
    s = speedup(2.5, 50.0, compute, scores)
    assert s["value"] == pytest.approx(math.sqrt(80000) / 50) and s["relation"] == "="
    assert format_speedup(speedup(3.5, 50.0, compute, scores)) == ">=8.00x"
    assert format_speedup(speedup(0.5, 50.0, compute, scores)) == "<=2.00x"
    assert format_speedup(None) == "-"


def test_markdown_table_and_results_round_trip(tmp_path):
    table = markdown_table([{"a": 1, "b": 0.123456, "c": None}, {"a": "x", "b": 123456.0}],
                           [("a", "A"), ("b", "B"), ("c", "C")])
    assert table == "| A | B | C |\n|---|---|---|\n| 1 | 0.1235 | - |\n| x | 1.235e+05 | - |\n"
    out = write_results(tmp_path / "r", {"x": [1.5, float("nan")], "y": {"z": float("inf")}}, table)
    assert json.loads((out / "results.json").read_text()) == {"x": [1.5, None], "y": {"z": None}}
    assert (out / "table.md").read_text() == table


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "curve.png"
    plot_score_vs_compute(path, [{"title": "t", "reference": {"x": [1, 2, 4], "y": [1, 2, 3], "labels": [1, 2, 4]},
                                  "points": [{"x": 1.5, "y": 2.5, "label": "p"},
                                             {"x": 3, "y": 1, "label": "q", "hollow": True}]}], "x", "y")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# -- recorded and replayed samples --------------------------------------------------------------------
def _sampler(tiny, tok, max_new=12):
    return RecordingSampler(tiny, tok, SamplingParams(1.0), max_new, eos_ids={tok.eos_token_id})


def test_recording_sampler_keeps_token_logps(tiny, tok):
    gen = _sampler(tiny, tok, 12)
    gen.start(chat_prompt(tok, "hi"), 6, torch.Generator().manual_seed(0))
    gen.advance()
    for row in gen.rows:
        assert len(row.stats["token_logps"]) == len(row.tokens)
        assert sum(row.stats["token_logps"]) == pytest.approx(row.stats["logp"], abs=1e-9)
    assert {r.reason for r in gen.rows} <= {"eos", "length"}


def test_prefix_candidate_is_what_the_generator_shows_at_k(tiny, tok):
    ids = chat_prompt(tok, "hi")
    gen = _sampler(tiny, tok, 16)
    gen.start(ids, 8, torch.Generator().manual_seed(3))
    gen.advance(5)
    at5 = [gen.candidate(i, "hi") for i in range(8)]
    for c in at5:  # a candidate's response_ids is the live row's token list: freeze it
        c.response_ids = list(c.response_ids)
    gen.advance()
    rows = recorded_rows(gen)
    for i, rec in enumerate(rows):
        c = prefix_candidate(tok, "hi", ids, rec, 5, gen.eos_ids)
        assert (c.response, c.finished, c.response_ids) == (at5[i].response, at5[i].finished, at5[i].response_ids)
        assert c.stats["logp"] == pytest.approx(at5[i].stats["logp"], abs=1e-9)
        whole = prefix_candidate(tok, "hi", ids, rec, 16, gen.eos_ids)
        final = gen.candidate(i, "hi")
        assert (whole.response, whole.finished, whole.response_ids) == (final.response, True, final.response_ids)


def test_replay_reproduces_best_of_n_rows_and_cost(tiny, tok):
    ids = chat_prompt(tok, "hi")
    scorer = build_scorer(lambda p, r, f: [len(x) for x in r])
    gen = _sampler(tiny, tok, 12)
    real = BestOfN(n=8).run(gen, scorer, "hi", ids, torch.Generator().manual_seed(1))
    replay = ReplayGenerator(tok, recorded_rows(gen), 12, gen.eos_ids)
    again = BestOfN(n=8).run(replay, scorer, "hi", ids, None)
    assert [c.response for c in again["candidates"]] == [c.response for c in real["candidates"]]
    assert again["best"] == real["best"]
    assert (replay.cost["target"].positions, replay.cost["target"].calls) == \
        (gen.cost["target"].positions, gen.cost["target"].calls)


def test_replay_of_a_pruned_run_gives_the_same_rounds_and_cost(tiny, tok):
    ids = chat_prompt(tok, "hi")
    scorer = build_scorer(lambda p, r, f: [sum(ch in "aeiou" for ch in x) + 0.01 * len(x) for x in r])
    spr = SpeculativeRejection(n=8, alpha=0.5, decision="tokens:3")
    gen = _sampler(tiny, tok, 20)
    real = spr.run(gen, scorer, "hi", ids, torch.Generator().manual_seed(2))
    assert any(r.reason == "pruned" for r in gen.rows)
    replay = ReplayGenerator(tok, recorded_rows(gen), 20, gen.eos_ids)
    again = spr.run(replay, scorer, "hi", ids, None)
    assert again["rounds"] == real["rounds"]
    assert again["best"] == real["best"] and again["scores"] == real["scores"]
    assert replay.cost["target"].positions == gen.cost["target"].positions


# -- the benchmarks end to end on a tiny model ------------------------------------------------------------
def test_bench_spr_and_correlation_end_to_end(tiny_dir, tmp_path):
    from specalign.bench import correlation, spr
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"prompt": "hi there"}, {"prompt": "tell me a story"}]))
    out, work = tmp_path / "spr", tmp_path / "work"
    args = ["--model", tiny_dir, "--prompts", str(prompts), "--bon-n", "8", "--max-new-tokens", "6",
            "--tasks", "loglik:self", "judge:inoffensive", "--spr", "8:0.5:tokens:2",
            "--simulate", "8:0.0:tokens:2", "4:0.5:tokens:2", "8:0.5:tokens:2", "--bon-direct", "4",
            "--rankers", "task", "oracle:2", "--output-dir", str(out), "--work-dir", str(work),
            "--threads", "1"]
    assert spr.main(args) == 0
    report = json.loads((out / "results.json").read_text())
    assert (out / "curve.png").stat().st_size > 5000 and (out / "curve_wall.png").is_file()
    assert "SpR (replayed, task)" in (out / "table.md").read_text()
    assert "SpR (replayed, oracle:2)" in (out / "table.md").read_text()
    records = [json.loads(x) for x in (work / "records.jsonl").read_text().splitlines()]
    assert len(records) == 2 and report["prompts"] == 2
    task = report["tasks"]["loglik:self"]
    methods = task["methods"]
    assert [m["params"]["n"] for m in methods if m["method"] == "best-of-n"] == [1, 2, 4, 8, 4]  # + direct
    bon = {m["params"]["n"]: m for m in methods if m["method"] == "best-of-n" and "direct" not in m["params"]}
    assert bon[2]["improvement_score"] == pytest.approx(100.0)
    assert bon[8]["mean_score"] == pytest.approx(sum(max(r["bon"]["scores"]["loglik:self"]) for r in records) / 2)
    full = sum(r["prompt_len"] + r["bon"]["decode_positions"] for r in records) / 2
    assert bon[8]["compute"]["target_positions"] == pytest.approx(full)
    assert bon[1]["compute"]["target_positions"] == pytest.approx(
        sum(r["prompt_len"] + r["bon"]["decode_positions"] / 8 for r in records) / 2)
    # replayed alpha = 0 is Best-of-8 exactly: same answers, same positions
    zero = next(m for m in methods if m["simulated"] and m["params"]["alpha"] == 0.0)
    assert zero["mean_score"] == pytest.approx(bon[8]["mean_score"])
    assert zero["compute"]["target_positions"] == pytest.approx(full)
    assert zero["speedup"]["value"] == pytest.approx(1.0)
    # per ranker: the oracle replays every entry too; at alpha = 0 it is Best-of-8 as well; its continuations
    # are counted apart (oracle_cost), not in the method's positions; standard errors over the 2 prompts
    oracle = [m for m in methods if m.get("ranker") == "oracle:2"]
    assert len(oracle) == 3
    zero_o = next(m for m in oracle if m["params"]["alpha"] == 0.0)
    assert zero_o["mean_score"] == pytest.approx(bon[8]["mean_score"])
    assert zero_o["compute"]["target_positions"] == pytest.approx(full)
    assert task["oracle_cost"]["oracle:2"]["target_positions"] > 0
    assert task["oracle_cost"]["oracle:2"]["target_positions"] == pytest.approx(
        sum(r["simulated"][f"loglik:self|{e}|oracle:2"]["oracle_positions"] for r in records
            for e in ("8:0.0:tokens:2", "4:0.5:tokens:2", "8:0.5:tokens:2")) / 2)
    terms = [100 * (1 + (max(r["bon"]["scores"]["loglik:self"]) - b) / (b - w)) for r in records
             for b, w in [(expected_best_of(r["bon"]["scores"]["loglik:self"], 2),
                           expected_worst_of(r["bon"]["scores"]["loglik:self"], 2))]]
    assert bon[8]["se"]["improvement_score"] == pytest.approx(abs(terms[0] - terms[1]) / 2)
    paired = task["replay_minus_measured"]
    assert [d["entry"] for d in paired] == ["8:0.5:tokens:2"]
    measured_pt = next(m for m in methods if m["method"] == "spec-rejection" and not m["simulated"])
    replayed_pt = next(m for m in methods if m["simulated"] and m["ranker"] == "task"
                       and m["params"]["n"] == 8 and m["params"]["alpha"] == 0.5)
    assert paired[0]["score_diff"] == pytest.approx(replayed_pt["mean_score"] - measured_pt["mean_score"])
    direct = next(m for m in methods if m["params"].get("direct"))
    assert direct["params"]["n"] == 4 and direct["wall_s"] > 0
    assert direct["mean_score"] == pytest.approx(
        sum(max(r["direct"]["4"]["scores"]["loglik:self"]) for r in records) / 2)
    assert direct["compute"]["target_positions"] == sum(r["direct"]["4"]["positions"] for r in records) / 2
    assert all(r["direct"]["4"]["positions"] < r["prompt_len"] + r["bon"]["decode_positions"] for r in records)
    measured = next(m for m in methods if m["method"] == "spec-rejection" and not m["simulated"])
    assert measured["wall_s"] > 0 and measured["compute"]["target_positions"] < full
    assert measured["cpu_s"] > 0 and bon[8]["cpu_s"] > 0 and direct["cpu_s"] > 0
    assert measured["vs_best_of_max"]["cpu_ratio"] == pytest.approx(bon[8]["cpu_s"] / measured["cpu_s"])
    # resuming reads the records instead of recomputing them, and adds the entries they lack
    more = [a if a != "4:0.5:tokens:2" else "4:0.5:tokens:2 8:0.75:tokens:3".split()[0] for a in args]
    more.insert(more.index("--simulate") + 1, "8:0.75:tokens:3")
    # (--oracle-simulate: the oracle replays only the entries named, so the new entry gets no oracle run)
    assert spr.main(more + ["--oracle-simulate", "8:0.5:tokens:2", "--aggregate-only"]) == 0
    again = [json.loads(x) for x in (work / "records.jsonl").read_text().splitlines()]
    assert len(again) == 2 and [r["bon"] for r in again] == [r["bon"] for r in records]
    assert all("loglik:self|8:0.75:tokens:3" in r["simulated"] for r in again)
    assert not any("loglik:self|8:0.75:tokens:3|oracle:2" in r["simulated"] for r in again)
    rows = json.loads((out / "results.json").read_text())["tasks"]["loglik:self"]["methods"]
    assert [m["params"]["alpha"] for m in rows if m.get("ranker") == "oracle:2"] == [0.5]
    assert [r["spr"] for r in again] == [r["spr"] for r in records]
    assert len((work / "samples.jsonl").read_text().splitlines()) == 2
    cout = tmp_path / "corr"
    assert correlation.main(["--model", tiny_dir, "--samples", str(work / "samples.jsonl"), "--ks", "2", "6",
                             "--tasks", "loglik:self", "--output-dir", str(cout), "--threads", "1"]) == 0
    corr = json.loads((cout / "results.json").read_text())
    at6 = corr["summary"]["loglik:self"][1]
    assert at6["k"] == 6 and at6["finished_share"] == 1.0
    assert at6["pearson"]["mean"] == pytest.approx(1.0) and at6["kendall"]["mean"] == pytest.approx(1.0)
    assert at6["best_survives"] == {"0.5": 1.0, "0.75": 1.0, "0.9": 1.0}
    assert (cout / "correlation.png").stat().st_size > 5000
    # the oracle ceiling and a ranker: at K = 6 every prefix is a whole response, so the oracle's values are
    # the final scores themselves (r = 1, reliability 1) at no target cost; at K = 2 it samples continuations
    oout = tmp_path / "oracle"
    assert correlation.main(["--model", tiny_dir, "--samples", str(work / "samples.jsonl"), "--ks", "2", "6",
                             "--tasks", "loglik:self", "--rankers", "judge:inoffensive", "--oracle", "2",
                             "--oracle-ks", "2", "6", "--oracle-prefixes", "4", "--output-dir", str(oout),
                             "--threads", "1"]) == 0
    orep = json.loads((oout / "results.json").read_text())
    assert orep["max_new_tokens"] == 6 and "judge:inoffensive -> loglik:self" in orep["summary"]
    at2, at6 = orep["oracle"]["by_k"]
    assert at6["k"] == 6 and at6["r"] == pytest.approx(1.0) and at6["r_corrected"] == pytest.approx(1.0)
    assert at6["partial_r"]["loglik:self"] == pytest.approx(1.0)
    assert at2["k"] == 2 and -1 <= at2["r"] <= 1 and at2["prefixes"] == 8
    assert orep["oracle"]["target_positions_per_prompt"] > 0
    assert "Ceiling" in (oout / "table.md").read_text()


def test_bench_bad_input(tmp_path):
    from specalign.bench import correlation, spr
    from specalign.errors import SpecError
    for args, match in ((["--bon-n", "12"], "power of 2"), (["--reference-n", "1"], "reference-n"),
                        (["--spr", "128:0.9"], "N:ALPHA:DECISION"), (["--spr", "8:auto:tokens:4"], "auto"),
                        (["--simulate", "256:0.5:tokens:8"], "divide"), (["--nonsense", "1"], "unknown"),
                        (["--rankers", "oracle:3"], "even"), (["--rankers", "nothing"], "unknown ranker"),
                        (["--simulate", "8:0.5:tokens:2", "--oracle-simulate", "8:0.9:tokens:2"], "not one of")):
        with pytest.raises(SpecError, match=match):
            spr.main(args + ["--output-dir", str(tmp_path / "o")])
    with pytest.raises(SpecError, match="samples file not found"):
        correlation.main(["--samples", str(tmp_path / "none.jsonl")])
    with pytest.raises(SpecError, match="oracle must be an even number"):
        correlation.main(["--oracle", "3"])


def test_replayed_and_measured_spr_agree_over_seeds(tok):
    """The bench's paired design: a measured run with the prompt's seed shares the Best-of-M batch's
    first round (same rows, same survivors), then samples fresh continuations where the replay reads the
    recorded ones. Over many seeds the paired difference of the answer's score is centred on 0 (within
    4 standard errors): the replay has no systematic gap (rows, ties, schedule, finished rows)."""
    from specalign.models.testing import tiny_llama
    model = tiny_llama(init_scale=1.0)  # a flat model: continuations differ a lot between samples
    ids = chat_prompt(tok, "hi")
    spr = SpeculativeRejection(n=16, alpha=0.75, decision="tokens:3")
    scorer = build_scorer("loglik:self")
    diffs, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny forwards: one thread is several times faster on a busy machine
    try:
        _paired_runs(model, tok, ids, spr, scorer, diffs)
    finally:
        torch.set_num_threads(threads)
    mean = sum(diffs) / len(diffs)
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
    assert se > 0.005  # continuations really differ: the check has power
    assert abs(mean) < 4 * se


def _paired_runs(model, tok, ids, spr, scorer, diffs):
    for seed in range(40):
        bon = _sampler(model, tok, 12)
        bon.start(ids, 16, torch.Generator().manual_seed(seed))
        bon.advance()
        rows = recorded_rows(bon)
        replay = ReplayGenerator(tok, rows, 12, bon.eos_ids)
        replayed = spr.run(replay, scorer, "hi", ids, None)
        gen = _sampler(model, tok, 12)
        measured = spr.run(gen, scorer, "hi", ids, torch.Generator().manual_seed(seed))
        assert measured["rounds"][0]["kept_ids"] == replayed["rounds"][0]["kept_ids"]  # same first round
        assert [r.tokens[:3] for r in gen.rows] == [r.tokens[:3] for r in rows]
        diffs.append(replayed["scores"][replayed["best"]] - measured["scores"][measured["best"]])
