"""``specalign train value``: a value-head reward model whose score after every response prefix
predicts the final reward of the whole response.

Data: scored responses (``samples.jsonl`` of ``train preferences``: prompt, response, final score,
finished). Loss, per response: mean over its prefixes (prefix length 0 = after the prompt, ...,
the full response + EOS) of (v(prefix) - z)^2, z = the final score standardized over the training
set; optionally + ``bt_weight`` x a Bradley-Terry term -log sigmoid(v(a) - v(b)) over finished
responses a, b of one prompt with score(a) > score(b). Output: a ``value:DIR`` scorer directory and
``value_report.json`` with the correlation between prefix values and final scores on held-out
prompts at several prefix lengths, next to the same correlation for the plain reward scored on the
partial text.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics
import time
from pathlib import Path

import torch
from transformers import Trainer

from ..errors import SpecError
from ..models.loading import chat_prompt, load_tokenizer
from ..models.scorers import Candidate, build_scorer
from ..models.value_head import ValueHeadModel, prefix_values, value_sequences
from .common import drop_checkpoints, finalize, plain_load, report, resume_from, setup_step, train_summary
from .value_config import ValueConfig


def load_samples(source: str, limit: int = 0) -> tuple[list[dict], str | None]:
    """Scored responses (prompt, response, score, finished) and the scorer that made them, if recorded."""
    path = Path(source)
    scorer = None
    if path.is_dir():
        report_file = path / "preferences_report.json"
        if report_file.is_file():
            scorer = json.loads(report_file.read_text()).get("scorer")
        path = path / "samples.jsonl"
    if not path.is_file():
        raise SpecError(f"scored samples not found: {source} (a `train preferences` output dir or a JSONL file)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SpecError(f"{path} line {n} is not valid JSON ({exc.msg})") from None
        for key in ("prompt", "response", "score"):
            if key not in row:
                raise SpecError(f"{path} line {n} has no '{key}': each sample needs prompt, response and score")
        if not math.isfinite(float(row["score"])):
            raise SpecError(f"{path} line {n}: score {row['score']} is not a finite number")
        rows.append({"prompt": row["prompt"], "response": row["response"], "score": float(row["score"]),
                     "finished": bool(row.get("finished", True))})
        if limit and len(rows) >= limit:
            break
    if len(rows) < 4:
        raise SpecError(f"{source} holds {len(rows)} scored samples: a value model needs at least 4")
    return rows, scorer


def split_by_prompt(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    random.Random(seed).shuffle(prompts)
    n_eval = max(1, round(len(prompts) * eval_fraction)) if eval_fraction > 0 else 0
    if n_eval >= len(prompts):
        raise SpecError(f"eval_fraction {eval_fraction} leaves no training prompts out of {len(prompts)}")
    held = set(prompts[len(prompts) - n_eval:])
    return [r for r in rows if r["prompt"] not in held], [r for r in rows if r["prompt"] in held]


def encode(tok, row: dict, max_length: int) -> tuple[list[int], int]:
    prompt = chat_prompt(tok, row["prompt"])
    response = tok(row["response"], add_special_tokens=False)["input_ids"]
    room = max(0, max_length - len(prompt) - 1)
    ended = row["finished"] and len(response) <= room
    return value_sequences(tok, prompt, response[:room], ended), len(prompt)


class GroupDataset(torch.utils.data.Dataset):
    """One item per prompt: all its scored responses (so a batch can hold Bradley-Terry pairs)."""

    def __init__(self, rows, tok, max_length, mean, std):
        self.groups = []
        for _, group in itertools.groupby(sorted(rows, key=lambda r: r["prompt"]), key=lambda r: r["prompt"]):
            items = []
            for r in group:
                seq, start = encode(tok, r, max_length)
                items.append({"seq": seq, "start": start, "target": (r["score"] - mean) / std,
                              "finished": r["finished"]})
            self.groups.append(items)

    def __len__(self):
        return len(self.groups)

    def __getitem__(self, i):
        return self.groups[i]


def collate(groups: list[list[dict]], pad_id: int = 0) -> dict:
    items = [(g, it) for g, group in enumerate(groups) for it in group]
    width = max(len(it["seq"]) for _, it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    value_mask = torch.zeros(len(items), width, dtype=torch.bool)
    for row, (_, it) in enumerate(items):
        n = len(it["seq"])
        ids[row, width - n:] = torch.tensor(it["seq"])
        mask[row, width - n:] = 1
        value_mask[row, width - n + it["start"] - 1:] = True  # prefixes of length 0 .. full
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0),
            "value_mask": value_mask, "targets": torch.tensor([it["target"] for _, it in items]),
            "group": torch.tensor([g for g, _ in items]),
            "finished": torch.tensor([it["finished"] for _, it in items])}


def value_loss(values, value_mask, targets, group, finished, bt_weight: float = 0.0) -> torch.Tensor:
    """Per-response mean squared error over its prefixes, averaged over responses, + optional BT term."""
    err = (values.float() - targets[:, None].float()) ** 2 * value_mask
    loss = (err.sum(1) / value_mask.sum(1).clamp(min=1)).mean()
    if bt_weight > 0:
        last = values[:, -1].float()
        better = (group[:, None] == group[None, :]) & finished[:, None] & finished[None, :] & \
                 (targets[:, None] > targets[None, :])
        if better.any():
            diff = last[:, None] - last[None, :]
            loss = loss + bt_weight * -torch.nn.functional.logsigmoid(diff[better]).mean()
    return loss


class ValueTrainer(Trainer):
    def __init__(self, *args, bt_weight: float = 0.0, **kw):
        super().__init__(*args, **kw)
        self.bt_weight = bt_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        values = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       position_ids=inputs["position_ids"])
        loss = value_loss(values, inputs["value_mask"], inputs["targets"], inputs["group"], inputs["finished"],
                          self.bt_weight)
        return (loss, values) if return_outputs else loss


def _corr(xs: list[float], ys: list[float]) -> dict:
    from scipy.stats import pearsonr, spearmanr
    if len(xs) < 3 or statistics.pstdev(xs) == 0 or statistics.pstdev(ys) == 0:
        return {"pearson": None, "spearman": None, "n": len(xs)}
    return {"pearson": float(pearsonr(xs, ys)[0]), "spearman": float(spearmanr(xs, ys)[0]), "n": len(xs)}


def correlation_report(model: ValueHeadModel, tok, held: list[dict], lengths: list[int], max_length: int,
                       baseline=None) -> dict:
    """Correlation with the final score of (a) the value after L response tokens, (b) the baseline
    scorer on the first L tokens' text, over held-out responses longer than L (truly partial)."""
    encoded = [encode(tok, r, max_length) for r in held]
    values = prefix_values(model, [e[0] for e in encoded], [e[1] for e in encoded], tok.pad_token_id or 0)
    out = {}
    for length in lengths + ["final"]:
        rows = [i for i, (seq, start) in enumerate(encoded)
                if length == "final" or len(seq) - start > length]
        if not rows:
            continue
        finals = [held[i]["score"] for i in rows]
        at = [values[i][-1] if length == "final" else values[i][length] for i in rows]
        entry = {"value": _corr(at, finals)}
        if baseline is not None and length != "final":
            cands = []
            for i in rows:
                seq, start = encoded[i]
                cands.append(Candidate(held[i]["prompt"], tok.decode(seq[start:start + length],
                                                                     skip_special_tokens=True), False))
            entry["baseline"] = _corr(baseline(cands), finals)
        out[str(length)] = entry
    return out


def run(cfg: ValueConfig) -> dict:
    cfg.validate()
    started = time.perf_counter()
    work = setup_step(cfg)
    rows, samples_scorer = load_samples(cfg.samples, cfg.limit)
    train_rows, held = split_by_prompt(rows, cfg.eval_fraction, cfg.seed)
    scores = [r["score"] for r in train_rows]
    mean, std = statistics.fmean(scores), (statistics.pstdev(scores) or 1.0)
    tok = load_tokenizer(cfg.backbone)
    with plain_load():
        model = ValueHeadModel.from_causal_lm(cfg.backbone, cfg.dtype, target_mean=mean, target_std=std)
    if cfg.freeze_backbone:
        model.backbone.requires_grad_(False)
    model.train()
    dataset = GroupDataset(train_rows, tok, cfg.max_length, mean, std)
    report(f"value: {len(train_rows)} training responses ({len(dataset)} prompts), {len(held)} held out; "
           f"score mean {mean:.4f} std {std:.4f}")
    result = {"backbone": cfg.backbone, "samples": cfg.samples, "train_samples": len(train_rows),
              "held_out_samples": len(held), "target_mean": mean, "target_std": std, "bt_weight": cfg.bt_weight}
    cfg.output_dir, final_dir = str(work), cfg.output_dir
    try:
        trainer = ValueTrainer(model=model, args=cfg, train_dataset=dataset,
                               data_collator=lambda groups: collate(groups, tok.pad_token_id or 0),
                               bt_weight=cfg.bt_weight)
        resume = resume_from(cfg, work)
        out = trainer.train(resume_from_checkpoint=resume)
    finally:
        cfg.output_dir = final_dir
    result.update(train_summary(trainer, out, resume))

    def describe(tmp: Path):
        model.config.save_pretrained(tmp)
        (tmp / "value_head.json").write_text(json.dumps(model.describe(), indent=2))
        tok.save_pretrained(tmp)
        if held:
            spec = cfg.baseline_scorer or samples_scorer
            baseline = build_scorer(spec) if spec and spec != "none" else None
            loaded = ValueHeadModel.from_pretrained(tmp)  # what value:DIR loads
            result["baseline_scorer"] = spec if baseline is not None else None
            result["correlation"] = correlation_report(loaded, tok, held, cfg.prefix_list(), cfg.max_length,
                                                       baseline)
            for length, entry in result["correlation"].items():
                line = f"prefix {length}: value r={_fmt(entry['value']['pearson'])}"
                if "baseline" in entry:
                    line += f", {spec} on partial text r={_fmt(entry['baseline']['pearson'])}"
                report(line + f" (n={entry['value']['n']})")
        result["wall_s"] = round(time.perf_counter() - started, 1)
        return {"value_report.json": result}

    finalize(trainer, final_dir, describe)
    drop_checkpoints(cfg, work)
    report(f"value model saved to {final_dir} (use it as scorer value:{final_dir})")
    return result


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def main(args: list[str]) -> int:
    from ..cli import parse_config
    (cfg,) = parse_config([ValueConfig], args, "specalign train value")
    run(cfg)
    return 0
