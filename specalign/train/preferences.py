"""``specalign train preferences``: sample k responses per prompt from a policy, score them, keep pairs.

On-policy preference data for DPO of the draft: the policy (the draft) samples ``k`` responses per
prompt with the project's engine (batched, cached chunk by chunk), a scorer (``build_scorer``:
judge, reward model, value model, callable) scores every response, and each prompt gives its
best-vs-worst pair (or every pair, ``pairing: all``) above ``min_margin``. Or: load existing
preference data through a column mapping (``from_data`` + ``columns``), optionally rescored.

Output directory: ``data.jsonl`` (conversational prompt / chosen / rejected + score_chosen /
score_rejected; ``datasets.load_dataset("json", data_files=...)`` reads it), ``samples.jsonl`` (every
sampled response with its score: training data for ``train value``), ``preferences_report.json``.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time

from ..decode.sampling import SamplingParams
from ..models.loading import load_model, load_tokenizer
from ..models.scorers import Candidate, build_scorer
from .common import (atomic_dir, encode_prompts, is_main_process, prompt_split, report, setup_step,
                     wait_for_everyone, world_rank, write_json)
from .data import load_preferences, prompt_text, response_text
from .preferences_config import PreferencesConfig
from .samples import cached_samples


def pairs_of(scores: list[float], pairing: str, min_margin: float) -> list[tuple[int, int]]:
    """(chosen, rejected) index pairs of one prompt's responses: best-vs-worst or every ordered pair."""
    if pairing == "best-worst":
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        worst = min(range(len(scores)), key=lambda i: (scores[i], i))
        return [(best, worst)] if scores[best] - scores[worst] > min_margin else []
    out = []
    for i, j in itertools.combinations(range(len(scores)), 2):
        if abs(scores[i] - scores[j]) > min_margin:
            out.append((i, j) if scores[i] > scores[j] else (j, i))
    return out


def _write_jsonl(path, rows) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def sample_and_score(cfg: PreferencesConfig, work) -> tuple[list[dict], list[dict], dict]:
    model = load_model(cfg.policy, cfg.dtype, cfg.device)
    tok = load_tokenizer(cfg.policy)
    prompts, ids = encode_prompts(tok, prompt_split(cfg.prompts, cfg.exclude_prompts, cfg.limit), cfg.max_prompt_tokens)
    kw = dict(n=cfg.k, batch_rows=cfg.batch_rows, max_new_tokens=cfg.max_new_tokens,
              params=SamplingParams(cfg.temperature, cfg.top_k, cfg.top_p), seed=cfg.seed, desc="policy samples")
    rank, world = world_rank()
    if world > 1:  # data-parallel processes share the sampling
        cached_samples(work / "samples", model, tok, ids, {"model": cfg.policy}, shard=(rank, world), **kw)
        wait_for_everyone()
    if not is_main_process():
        return [], [], {}
    recs = cached_samples(work / "samples", model, tok, ids, {"model": cfg.policy}, **kw)
    eos = tok.eos_token_id
    candidates = []
    for r in recs:
        resp = r["response_ids"][:-1] if r["reason"] == "eos" and r["response_ids"][-1:] == [eos] else r["response_ids"]
        candidates.append(Candidate(prompts[r["prompt_index"]], tok.decode(resp, skip_special_tokens=True),
                                    r["reason"] == "eos", r["prompt_ids"], resp, {"logp": r["logp"]}, r["reason"]))
    scorer = build_scorer(cfg.scorer, generator_model=model, generator_tokenizer=tok, dtype=cfg.dtype,
                          device=cfg.device, max_batch_tokens=cfg.max_batch_tokens)
    start = time.perf_counter()
    scores = scorer(candidates)
    samples = [{"prompt": c.prompt, "response": c.response, "score": s, "finished": c.finished,
                "num_tokens": len(c.response_ids), "prompt_index": r["prompt_index"], "sample": r["sample"]}
               for c, s, r in zip(candidates, scores, recs)]
    rows = []
    for index, group in itertools.groupby(samples, key=lambda s: s["prompt_index"]):
        group = list(group)
        for ci, ri in pairs_of([g["score"] for g in group], cfg.pairing, cfg.min_margin):
            rows.append({"prompt": [{"role": "user", "content": group[ci]["prompt"]}],
                         "chosen": [{"role": "assistant", "content": group[ci]["response"]}],
                         "rejected": [{"role": "assistant", "content": group[ri]["response"]}],
                         "score_chosen": group[ci]["score"], "score_rejected": group[ri]["score"]})
    stats = {"prompts": len(prompts), "samples": len(samples), "scorer": cfg.scorer,
             "scorer_s": round(time.perf_counter() - start, 2), "scorer_cost": scorer.cost.as_dict(),
             "mean_score": statistics.fmean(scores)}
    return rows, samples, stats


def from_existing(cfg: PreferencesConfig) -> tuple[list[dict], list[dict], dict]:
    rows = load_preferences(cfg.from_data, cfg.columns, cfg.limit)
    stats = {"source": cfg.from_data, "columns": cfg.columns}
    if cfg.rescore:
        scorer = build_scorer(cfg.scorer, dtype=cfg.dtype, device=cfg.device, max_batch_tokens=cfg.max_batch_tokens)
        cands = [Candidate(prompt_text(r["prompt"]), response_text(r[side])) for r in rows
                 for side in ("chosen", "rejected")]
        scores = scorer(cands)
        for i, r in enumerate(rows):
            r["score_chosen"], r["score_rejected"] = scores[2 * i], scores[2 * i + 1]
        stats["scorer"] = cfg.scorer
    return rows, [], stats


def run(cfg: PreferencesConfig) -> dict:
    cfg.validate()
    started = time.perf_counter()
    work = setup_step(cfg)
    rows, samples, stats = from_existing(cfg) if cfg.from_data else sample_and_score(cfg, work)
    result = {}
    if is_main_process():
        if not rows:
            from ..errors import SpecError
            raise SpecError("no preference pairs: every prompt's responses scored within min_margin; lower min_margin "
                            "or raise k")
        result = dict(stats, pairs=len(rows), pairing=cfg.pairing if not cfg.from_data else None)
        scored = [r for r in rows if "score_chosen" in r and "score_rejected" in r]
        if scored:
            result["mean_score_chosen"] = statistics.fmean(r["score_chosen"] for r in scored)
            result["mean_score_rejected"] = statistics.fmean(r["score_rejected"] for r in scored)
            margins = sorted(r["score_chosen"] - r["score_rejected"] for r in scored)
            result["min_margin"] = cfg.min_margin
            result["pair_margin"] = {"mean": statistics.fmean(margins), "median": statistics.median(margins),
                                     "min": margins[0]}
        if stats.get("prompts"):
            result["prompts_with_pairs"] = len({prompt_text(r["prompt"]) for r in rows})
        result["wall_s"] = round(time.perf_counter() - started, 1)
        with atomic_dir(cfg.output_dir) as tmp:
            _write_jsonl(tmp / "data.jsonl", rows)
            if samples:
                _write_jsonl(tmp / "samples.jsonl", samples)
            write_json(tmp / "preferences_report.json", result)
        report(f"wrote {len(rows)} preference pairs to {cfg.output_dir}/data.jsonl"
               + (f" ({len(samples)} scored samples in samples.jsonl)" if samples else ""))
    wait_for_everyone()
    return result


def main(args: list[str]) -> int:
    from ..cli import parse_config
    (cfg,) = parse_config([PreferencesConfig], args, "specalign train preferences")
    run(cfg)
    return 0
