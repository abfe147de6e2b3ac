"""``specalign train value --features target``: a value head on the target's own final hidden state
(``specalign.models.target_value``), free at decode time.

1. The target samples ``k`` responses per training prompt with the batched engine, recording its
   final hidden state at every response position while it generates (no second forward).
2. The learned scorer (any scorer spec) scores every response whole -- the regression target -- and,
   when the head takes it as an input, on its partial text at the training prefix lengths.
3. The head (an MLP on [h_k, h_0, log(1 + k), partial score]) is fitted by mean squared error on
   (prefix, final score) pairs of the training prompts.
4. ``value_report.json``: on held-out prompts (disjoint from training), the within-prompt correlation
   between the head's value after k tokens and the response's final score, at each report length,
   next to the scorer on the partial text and the Monte Carlo oracle (``specalign.decode.oracle``: the
   ceiling any prefix scorer can reach, split-half corrected) on the same prefixes.

The output directory records the base model (a head is refused for another ``--model``), the scorer
and the report; ``--scorer value:OUT`` uses it.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import SpecError
from ..models.loading import load_model, load_tokenizer
from ..models.scorers import Candidate, build_scorer
from ..models.target_value import TargetValueHead, model_fingerprint
from .common import StepArgs, atomic_dir, encode_prompts, prompt_split, report, setup_step, write_json
from .samples import autocast_weights, cached_samples


@dataclass
class TargetValueConfig(StepArgs):
    output_dir: str = field(default="", metadata={"help": "the head's directory (a value:DIR scorer)"})
    features: str = field(default="target", metadata={"help": "target: the target's own final hidden state"})
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "the target whose states the head reads"})
    scorer: str = field(default="judge:sentiment", metadata={"help": "the score the head learns (any scorer spec)"})
    prompts: str = field(default="alpaca_farm_eval", metadata={"help": "training prompts (data set name or file)"})
    exclude_prompts: str | None = field(default="alpaca_farm_100", metadata={
        "help": "prompts kept out of training and the report (e.g. the benchmark's)"})
    limit: int = field(default=0, metadata={"help": "use at most N prompts, training + held out (0 = all)"})
    eval_prompts: int = field(default=24, metadata={"help": "prompts held out for value_report.json"})
    max_prompt_tokens: int = field(default=256, metadata={"help": "drop longer prompts"})
    k: int = field(default=8, metadata={"help": "responses sampled per prompt"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens per response (as long as the decoding's)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    batch_rows: int = field(default=64, metadata={"help": "rows per sampling batch"})
    sample_autocast: bool = field(default=False, metadata={"help": "sample under bf16 autocast (faster on CPUs with "
                                                                   "AVX512-BF16 and on GPUs)"})
    train_lengths: str = field(default="1,2,3,4,6,8,12,16,24,32,48,64,96",
                               metadata={"help": "prefix lengths (tokens) the head is fitted on"})
    report_lengths: str = field(default="4,8,16,32", metadata={"help": "prefix lengths of value_report.json"})
    partial_input: bool = field(default=True, metadata={"help": "the scorer's partial-text score as an input"})
    residual: bool = field(default=True, metadata={
        "help": "the MLP learns a correction to the partial score, starting at zero (needs partial_input)"})
    width: int = field(default=256, metadata={"help": "MLP width"})
    dropout: float = field(default=0.2, metadata={"help": "dropout after each hidden layer"})
    val_prompts: int = field(default=30, metadata={
        "help": "training prompts held back to pick the epoch: the one whose head has the best within-prompt r at "
                "the report lengths (epoch 0 = the untrained head; 0 = keep the last epoch)"})
    epochs: int = field(default=30, metadata={"help": "passes over the training pairs"})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    batch_size: int = field(default=256, metadata={"help": "pairs per step"})
    oracle_m: int = field(default=4, metadata={"help": "Monte Carlo continuations per prefix in the report (even; "
                                                       "0 = no oracle)"})
    oracle_prompts: int = field(default=12, metadata={"help": "held-out prompts the oracle measures (its cost)"})
    seed: int = field(default=0, metadata={"help": "sampling and fitting seed"})

    def validate(self) -> "TargetValueConfig":
        if self.features != "target":
            raise SpecError(f"features must be 'target' here, got {self.features!r}")
        if not self.output_dir:
            raise SpecError("output_dir is required: set output_dir in the recipe or pass --output_dir DIR")
        if self.k < 2:
            raise SpecError(f"k must be >= 2 (within-prompt comparisons), got {self.k}")
        if self.residual and not self.partial_input:
            raise SpecError("residual: true corrects the partial score: it needs partial_input: true")
        if self.val_prompts < 0:
            raise SpecError(f"val_prompts must be >= 0, got {self.val_prompts}")
        if self.eval_prompts < 2:
            raise SpecError(f"eval_prompts must be >= 2, got {self.eval_prompts}")
        if self.oracle_m % 2 or self.oracle_m < 0:
            raise SpecError(f"oracle_m must be an even number >= 0 (split halves), got {self.oracle_m}")
        for name in ("train_lengths", "report_lengths"):
            lengths(getattr(self, name), name)
        return self


def lengths(spec: str, name: str = "lengths") -> list[int]:
    try:
        out = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise SpecError(f"{name} must be integers like 4,8,16: got {spec!r}") from None
    if not out or out[0] < 1:
        raise SpecError(f"{name} must be prefix lengths >= 1, got {spec!r}")
    return out


def within_r(groups: list[tuple[list[float], list[float]]]) -> float:
    """Pearson r after centring x and y on each group's mean, pooled over groups (groups of < 2 skipped)."""
    from ..decode.oracle import _pooled_within
    return _pooled_within([g[0] for g in groups], [g[1] for g in groups])


def mean_within_r(records: list[dict], pairs: list[dict], values: list[float], lens: list[int]) -> float:
    """The within-prompt r of ``values`` with the final scores, averaged over the prefix lengths ``lens``."""
    rs = []
    for k in lens:
        by_prompt: dict[int, tuple[list, list]] = {}
        for p, v in zip(pairs, values):
            if p["k"] == k:
                xs, ys = by_prompt.setdefault(records[p["rec"]]["prompt_index"], ([], []))
                xs.append(v)
                ys.append(records[p["rec"]]["score"])
        r = within_r(list(by_prompt.values()))
        if not math.isnan(r):
            rs.append(r)
    return sum(rs) / len(rs) if rs else -math.inf


def _visible(rec: dict, eos: set[int]) -> list[int]:
    ids = rec["response_ids"]
    return ids[:-1] if ids and ids[-1] in eos else ids


def pairs_of(records: list[dict], texts: list[str], tok, scorer, lens: list[int], eos: set[int],
             partial: bool) -> list[dict]:
    """(record index, k, partial score) for every record still running after k tokens (k < its length)."""
    out = []
    for r, rec in enumerate(records):
        hidden = rec["hidden"]
        for k in lens:
            if k < len(rec["response_ids"]) and k < hidden.shape[0]:
                out.append({"rec": r, "k": k})
    if partial and out:
        cands = [Candidate(texts[p["rec"]], tok.decode(records[p["rec"]]["response_ids"][:p["k"]],
                                                       skip_special_tokens=True), False,
                           records[p["rec"]]["prompt_ids"], records[p["rec"]]["response_ids"][:p["k"]])
                 for p in out]
        for p, s in zip(out, scorer(cands)):
            p["partial"] = s
    return out


def tensors(head: TargetValueHead, records: list[dict], pairs: list[dict]):
    h = torch.stack([records[p["rec"]]["hidden"][p["k"]] for p in pairs])
    h0 = torch.stack([records[p["rec"]]["hidden"][0] for p in pairs])
    k = torch.tensor([p["k"] for p in pairs])
    partial = torch.tensor([p.get("partial", 0.0) for p in pairs]) if head.partial else None
    return head.features(h, h0, k, partial), torch.tensor([records[p["rec"]]["score"] for p in pairs])


def fit(head: TargetValueHead, x: torch.Tensor, y: torch.Tensor, cfg: TargetValueConfig,
        validate=None) -> tuple[list[float], list[float], int]:
    """AdamW on mean squared error (standardised target). ``validate(head) -> r`` after every epoch (and
    before the first): the head keeps the weights of the best epoch. Returns (loss per epoch, validation r
    per epoch from epoch 0, the epoch kept)."""
    from tqdm.auto import trange
    head.standardize(x, y)
    target = head.standardized_target(x, y)
    val_r = [validate(head)] if validate else []
    best = (val_r[0], {k: v.clone() for k, v in head.state_dict().items()}, 0) if validate else None
    opt = torch.optim.AdamW(head.net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps = cfg.epochs * math.ceil(len(x) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.learning_rate, total_steps=max(steps, 1))
    losses = []
    head.train()
    for _ in trange(cfg.epochs, desc="fit value head", unit="epoch"):
        order, total = torch.randperm(len(x), generator=gen), 0.0
        for start in range(0, len(x), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            pred = head.net((x[idx] - head.x_mean) / head.x_std).squeeze(-1)
            loss = torch.nn.functional.mse_loss(pred, target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(x))
        if validate:
            head.eval()
            val_r.append(validate(head))
            head.train()
            if val_r[-1] > best[0]:
                best = (val_r[-1], {k: v.clone() for k, v in head.state_dict().items()}, len(losses))
    head.eval()
    if best is not None:
        head.load_state_dict(best[1])
    return losses, val_r, best[2] if best is not None else len(losses)


def evaluate(head, records, texts, pairs, cfg, model, tok, scorer, eos, rng) -> dict:
    """value_report.json's correlations on held-out records (see module doc)."""
    from tqdm.auto import tqdm
    from ..decode.oracle import bootstrap_se, mc_values, split_half
    from ..decode.sampling import SamplingParams
    x, _ = tensors(head, records, pairs)
    with torch.no_grad():
        values = head(x).tolist()
    out = {}
    for k in tqdm(lengths(cfg.report_lengths), desc="value report" + (" (Monte Carlo oracle)" if cfg.oracle_m else ""),
                  unit="length"):
        at = [(p, v) for p, v in zip(pairs, values) if p["k"] == k]
        by_prompt: dict[int, list] = {}
        for p, v in at:
            by_prompt.setdefault(records[p["rec"]]["prompt_index"], []).append((p, v))
        groups = list(by_prompt.values())
        final = [[records[p["rec"]]["score"] for p, _ in g] for g in groups]
        entry = {"prompts": sum(len(g) >= 2 for g in groups), "prefixes": len(at),
                 "value_head_r": within_r([([v for _, v in g], f) for g, f in zip(groups, final)]),
                 "partial_text_r": within_r([([p.get("partial", math.nan) for p, _ in g], f)
                                             for g, f in zip(groups, final)]) if head.partial else None}
        if not head.partial:
            cands = [[Candidate(texts[p["rec"]], tok.decode(records[p["rec"]]["response_ids"][:k],
                                                            skip_special_tokens=True), False) for p, _ in g]
                     for g in groups]
            entry["partial_text_r"] = within_r([(scorer(c), f) for c, f in zip(cands, final)])
        if cfg.oracle_m:
            mc, finals, vh = [], [], []
            for g, f in list(zip(groups, final))[:cfg.oracle_prompts]:
                if len(g) < 2:
                    continue
                rec0 = records[g[0][0]["rec"]]
                mc.append(mc_values(model, tok, rec0["prompt_ids"], [records[p["rec"]]["response_ids"][:k] for p, _ in g],
                                    scorer, cfg.oracle_m, cfg.max_new_tokens, rng, SamplingParams(cfg.temperature),
                                    prompt=texts[g[0][0]["rec"]], eos_ids=eos))
                finals.append(f)
                vh.append([v for _, v in g])
            oracle = split_half(mc, finals)
            entry["oracle"] = {**oracle, "r_corrected_se": bootstrap_se(mc, finals), "m": cfg.oracle_m}
            # the head and the judge on exactly the oracle's prompts, for a like-for-like ratio
            entry["value_head_r_on_oracle_prompts"] = within_r(list(zip(vh, finals)))
            ceiling = oracle["r_corrected"]
            entry["value_head_share_of_ceiling"] = (entry["value_head_r_on_oracle_prompts"] / ceiling
                                                    if ceiling and ceiling > 0 else None)
        out[str(k)] = entry
    return out


def run(cfg: TargetValueConfig) -> dict:
    from ..decode.generators import eos_ids_of
    from ..decode.sampling import SamplingParams
    cfg.validate()
    started = time.perf_counter()
    work = setup_step(cfg)
    model, tok = load_model(cfg.model, "float32", "auto"), load_tokenizer(cfg.model)
    scorer = build_scorer(cfg.scorer, generator_model=model, generator_tokenizer=tok)
    texts_all, ids_all = encode_prompts(tok, prompt_split(cfg.prompts, cfg.exclude_prompts, cfg.limit),
                                        cfg.max_prompt_tokens)
    if len(texts_all) <= cfg.eval_prompts + 1:
        raise SpecError(f"{len(texts_all)} prompts leave none to train on after {cfg.eval_prompts} held out: raise "
                        "limit or lower eval_prompts")
    order = list(range(len(texts_all)))
    random.Random(cfg.seed).shuffle(order)
    held = set(order[:cfg.eval_prompts])
    device = next(model.parameters()).device.type
    with contextlib.ExitStack() as stack:
        if cfg.sample_autocast:
            stack.enter_context(torch.autocast(device, dtype=torch.bfloat16))
            stack.enter_context(autocast_weights(model))
        meta = {"model": cfg.model, "kind": "target-value", **({"autocast": "bfloat16"} if cfg.sample_autocast else {})}
        records = cached_samples(work / "samples", model, tok, ids_all, meta, n=cfg.k, batch_rows=cfg.batch_rows,
                                 max_new_tokens=cfg.max_new_tokens, params=SamplingParams(cfg.temperature),
                                 seed=cfg.seed, hidden=True, desc="target samples")
    sample_s = time.perf_counter() - started
    eos = eos_ids_of(model, tok)
    texts = [texts_all[r["prompt_index"]] for r in records]
    for rec in records:
        rec["hidden"] = rec["hidden"].float()
    finals = scorer([Candidate(t, tok.decode(_visible(r, eos), skip_special_tokens=True), True, r["prompt_ids"],
                               _visible(r, eos), {"logp": r["logp"]}, r["reason"]) for t, r in zip(texts, records)])
    for rec, s in zip(records, finals):
        rec["score"] = s
    val = set(order[cfg.eval_prompts:cfg.eval_prompts + cfg.val_prompts])
    if len(ids_all) - len(held) - len(val) < 2:
        raise SpecError(f"{len(ids_all)} prompts leave fewer than 2 to fit on after {len(held)} held out and "
                        f"{len(val)} for validation: raise limit or lower eval_prompts / val_prompts")
    part = {name: [i for i, r in enumerate(records) if which(r["prompt_index"])]
            for name, which in (("fit", lambda q: q not in held and q not in val), ("val", val.__contains__),
                                ("held", held.__contains__))}
    head = TargetValueHead(model.config.hidden_size, cfg.width, cfg.partial_input, cfg.residual, cfg.dropout)
    train_recs = [records[i] for i in part["fit"]]
    train_pairs = pairs_of(train_recs, [texts[i] for i in part["fit"]], tok, scorer, lengths(cfg.train_lengths), eos,
                           cfg.partial_input)
    x, y = tensors(head, train_recs, train_pairs)
    validate = None
    if val:
        val_recs = [records[i] for i in part["val"]]
        val_pairs = pairs_of(val_recs, [texts[i] for i in part["val"]], tok, scorer, lengths(cfg.report_lengths), eos,
                             cfg.partial_input)
        xv, _ = tensors(head, val_recs, val_pairs)

        def validate(h):
            with torch.no_grad():
                return mean_within_r(val_recs, val_pairs, h(xv).tolist(), lengths(cfg.report_lengths))
    report(f"value head: {len(train_pairs)} (prefix, final score) pairs from {len(train_recs)} responses of "
           f"{len(ids_all) - len(held) - len(val)} prompts; {len(val)} prompts pick the epoch; {len(held)} held out")
    torch.manual_seed(cfg.seed)
    losses, val_r, kept = fit(head, x, y, cfg, validate)
    if val_r:
        report(f"kept epoch {kept} of {cfg.epochs}: validation within-prompt r {val_r[kept]:.3f} "
               f"(epoch 0, the partial score alone for a residual head: {val_r[0]:.3f})")
    held_idx = part["held"]
    held_recs = [records[i] for i in held_idx]
    held_texts = [texts[i] for i in held_idx]
    held_pairs = pairs_of(held_recs, held_texts, tok, scorer, lengths(cfg.report_lengths), eos, cfg.partial_input)
    rng = torch.Generator().manual_seed(cfg.seed + 1)
    table = evaluate(head, held_recs, held_texts, held_pairs, cfg, model, tok, scorer, eos, rng)
    result = {"base_model": cfg.model, "features": "target", "scorer": cfg.scorer, "residual": cfg.residual,
              "train_prompts": len(ids_all) - len(held) - len(val), "val_prompts": len(val),
              "eval_prompts": len(held), "k": cfg.k, "max_new_tokens": cfg.max_new_tokens, "train_pairs": len(train_pairs),
              "loss_first_last": [losses[0], losses[-1]] if losses else None, "val_r_by_epoch": val_r,
              "epoch_kept": kept, "by_prefix_length": table,
              "sample_s": round(sample_s, 1), "wall_s": round(time.perf_counter() - started, 1)}
    for k, e in table.items():
        line = f"k={k}: value head r {e['value_head_r']:.3f}, partial text r {e['partial_text_r']:.3f}"
        if "oracle" in e:
            line += f", oracle r {e['oracle']['r_corrected']:.3f} (corrected)"
        report(line)
    with atomic_dir(cfg.output_dir) as tmp:
        head.save(tmp, {"base_model": cfg.model, "fingerprint": model_fingerprint(model), "scorer": cfg.scorer,
                        "max_new_tokens": cfg.max_new_tokens, "train_lengths": lengths(cfg.train_lengths)})
        write_json(Path(tmp) / "value_report.json", result)
    report(f"value head saved to {cfg.output_dir} (use --scorer value:{cfg.output_dir})")
    return result


def main(args: list[str]) -> int:
    from ..cli import parse_config
    (cfg,) = parse_config([TargetValueConfig], args, "specalign train value --features target")
    run(cfg)
    return 0
