"""Batched sampling of many prompts with the project's decode engine, for training data.

``MultiPromptSampler`` is a ``SamplingGenerator`` whose batch holds different prompts (one
left-padded prefill), so a policy's samples for a whole prompt set come out in batches of 32-64
rows. With ``topk > 0`` it also records, at every emitted position, the sampler's top-k
log-probabilities (raw, temperature 1); with ``hidden`` the model's final hidden state there (the
output of its final norm, which its head turns into exactly the logits the token was sampled from).
Either way the teacher signal for distillation comes free with the teacher's own samples.

``sample_responses(model, tokenizer, prompts, ...)`` -> list of dicts per (prompt, sample):
``prompt_index``, ``prompt_ids``, ``response_ids`` (EOS kept when the row ended with it),
``reason``, ``logp`` and, with ``topk``, ``topk_ids`` (R, K) int32 / ``topk_logp`` (R, K) float16,
with ``hidden``, ``hidden`` (R, H) in the dtype the head computes in (bfloat16 under bf16 autocast).
"""

from __future__ import annotations

import contextlib

import torch

from ..decode.generators import Row, SamplingGenerator
from ..decode.sampling import SamplingParams
from ..models.attention import GROUPED, register
from ..models.loading import final_norm


class MultiPromptSampler(SamplingGenerator):
    name = "sample-multi"

    def __init__(self, model, tokenizer, params: SamplingParams | None = None, max_new_tokens: int = 128,
                 stop=(), eos_ids=None, topk: int = 0, hidden: bool = False, attn_implementation: str | None = GROUPED):
        super().__init__(model, tokenizer, params, max_new_tokens, stop, eos_ids)
        self.topk, self.hidden = topk, hidden
        # grouped attention (eager's arithmetic, the GQA cache read in place): see models/attention.py
        if attn_implementation == GROUPED:
            register()
        self.attn_implementation = attn_implementation
        self.last_hidden: torch.Tensor | None = None  # (active rows, H): the state behind next_logits
        self.norm = final_norm(model) if hidden else None

    def _keep_last_hidden(self, module, args, output):
        # as the head will see it: under autocast it rounds to the autocast dtype first (lossless to keep that)
        device = output.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else output.dtype
        self.last_hidden = output[:, -1, :].to(dtype)

    def sample(self, prompts_ids: list[list[int]], rng: torch.Generator | None = None) -> list:
        """Every row to the end (``start_many`` + ``advance``); returns the rows."""
        hook = self.norm.register_forward_hook(self._keep_last_hidden) if self.hidden else None
        try:
            with attention(self.target.model, self.attn_implementation):
                self.start_many(prompts_ids, rng)
                self.advance()
        finally:
            if hook is not None:
                hook.remove()
        return self.rows

    def start_many(self, prompts_ids: list[list[int]], rng: torch.Generator | None = None) -> None:
        """One left-padded prefill of different prompts, one row each."""
        self.rng = rng
        self.prompts_ids = [list(p) for p in prompts_ids]
        self.prompt_ids = []
        self.rows = [Row() for _ in prompts_ids]
        self.active = list(range(len(prompts_ids)))
        self.next_logits = self.target.prefill(self.prompts_ids)
        if self.topk:
            for row in self.rows:
                row.stats["topk_ids"], row.stats["topk_logp"] = [], []
        if self.hidden:
            for row in self.rows:
                row.stats["hidden"] = []

    def _step(self):
        if self.topk:
            logp = torch.log_softmax(self.next_logits.float(), dim=-1)
            vals, ids = logp.topk(self.topk, dim=-1)
            for pos, i in enumerate(self.active):
                self.rows[i].stats["topk_ids"].append(ids[pos].to(torch.int32).cpu())
                self.rows[i].stats["topk_logp"].append(vals[pos].to(torch.float16).cpu())
        if self.hidden:
            states = self.last_hidden.cpu()
            for pos, i in enumerate(self.active):
                self.rows[i].stats["hidden"].append(states[pos])
        super()._step()


@contextlib.contextmanager
def attention(model, implementation: str | None):
    """Run ``model`` with another attention implementation (same result), restoring its own afterwards."""
    own = getattr(model.config, "_attn_implementation", None)
    if implementation is None or own == implementation or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(own)


@contextlib.contextmanager
def autocast_weights(model, dtype=torch.bfloat16):
    """Hold ``model``'s linear weights in ``dtype`` for a while, restoring the originals (and ties) afterwards.

    Under autocast a frozen weight (requires_grad False) is cast again at every call -- for sampling a
    full model copy per token step; cast once, the matmuls see the same values (12% more tokens/s for
    128 rows here)."""
    swapped = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype != dtype and not module.weight.requires_grad:
            swapped.append((module, module.weight))
            module.weight = torch.nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
    try:
        yield
    finally:
        for module, weight in swapped:
            module.weight = weight


def _jobs(prompts_ids, n):
    """(prompt index, sample index) pairs sorted by prompt length, so each batch pads little."""
    return sorted([(i, k) for i in range(len(prompts_ids)) for k in range(n)],
                  key=lambda job: (len(prompts_ids[job[0]]), job))


def _sample_chunk(sampler: MultiPromptSampler, prompts_ids, chunk, rng) -> list[dict]:
    recs = []
    rows = sampler.sample([prompts_ids[i] for i, _ in chunk], rng)
    with torch.autocast("cpu", enabled=False):  # CPU autocast refuses to stack float16 tensors
        for (i, k), row in zip(chunk, rows):
            recs.append(_record(sampler, prompts_ids, i, k, row))
    return recs


def _record(sampler, prompts_ids, i: int, k: int, row) -> dict:
    rec = {"prompt_index": i, "sample": k, "prompt_ids": list(prompts_ids[i]), "response_ids": list(row.tokens),
           "reason": row.reason, "logp": row.stats["logp"]}
    if sampler.topk:
        rec["topk_ids"] = torch.stack(row.stats["topk_ids"])
        rec["topk_logp"] = torch.stack(row.stats["topk_logp"])
    if sampler.hidden:
        rec["hidden"] = torch.stack(row.stats["hidden"])
    return rec


def chunk_seed(seed: int, b: int) -> int:
    return seed * 1_000_003 + b


def sample_responses(model, tokenizer, prompts_ids: list[list[int]], n: int = 1, batch_rows: int = 48,
                     max_new_tokens: int = 128, params: SamplingParams | None = None, seed: int = 0,
                     topk: int = 0, hidden: bool = False, progress: bool = True,
                     desc: str = "sampling") -> list[dict]:
    """``n`` samples for each prompt, in batches of ``batch_rows`` rows (prompts sorted by length)."""
    from tqdm.auto import tqdm
    jobs = _jobs(prompts_ids, n)
    sampler = MultiPromptSampler(model, tokenizer, params or SamplingParams(), max_new_tokens, topk=topk, hidden=hidden)
    out: list[dict] = []
    bar = tqdm(total=len(jobs), desc=desc, unit="row", disable=not progress)
    for b, start in enumerate(range(0, len(jobs), batch_rows)):
        chunk = jobs[start:start + batch_rows]
        rng = torch.Generator(device="cpu").manual_seed(chunk_seed(seed, b))
        out.extend(_sample_chunk(sampler, prompts_ids, chunk, rng))
        bar.update(len(chunk))
    bar.close()
    out.sort(key=lambda r: (r["prompt_index"], r["sample"]))
    return out


def cached_samples(cache_dir, model, tokenizer, prompts_ids: list[list[int]], meta: dict, n: int = 1,
                   batch_rows: int = 48, max_new_tokens: int = 128, params: SamplingParams | None = None,
                   seed: int = 0, topk: int = 0, hidden: bool = False, progress: bool = True,
                   desc: str = "sampling", shard: tuple[int, int] | None = None) -> list[dict] | None:
    """``sample_responses`` with an on-disk cache that is filled chunk by chunk (resumable).

    ``cache_dir`` holds ``meta.json`` (what was sampled: ``meta`` plus the sampling settings and the
    prompts' hash) and one ``chunk-NNNNN.pt`` per batch, each written atomically. A later call with the
    same settings reads the chunks and samples only the missing ones; different settings are an error.
    ``shard=(rank, world)``: only fill chunks b with b % world == rank and return None (data-parallel
    processes share the sampling, then each reads everything).
    """
    import hashlib
    import json
    import os
    from pathlib import Path

    from tqdm.auto import tqdm

    from ..errors import SpecError

    params = params or SamplingParams()
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(json.dumps(prompts_ids).encode()).hexdigest()
    full_meta = dict(meta, n=n, batch_rows=batch_rows, max_new_tokens=max_new_tokens, temperature=params.temperature,
                     top_k=params.top_k, top_p=params.top_p, seed=seed, topk=topk, prompts_sha1=digest,
                     num_prompts=len(prompts_ids), **({"hidden": True} if hidden else {}))
    meta_file = cache / "meta.json"
    if meta_file.is_file():
        old = json.loads(meta_file.read_text())
        if old != full_meta:
            diff = sorted(k for k in set(old) | set(full_meta) if old.get(k) != full_meta.get(k))
            raise SpecError(f"sample cache {cache} was made with other settings ({', '.join(diff)}): delete it or "
                            "set another samples cache path")
    else:
        tmp = meta_file.with_suffix(f".tmp{os.getpid()}")  # several processes may write the same content
        tmp.write_text(json.dumps(full_meta, indent=1))
        os.replace(tmp, meta_file)
    jobs = _jobs(prompts_ids, n)
    chunks = list(range(0, len(jobs), batch_rows))
    out: list[dict] = []
    sampler = None
    bar = tqdm(total=len(jobs), desc=desc, unit="row", disable=not progress)
    for b, start in enumerate(chunks):
        path = cache / f"chunk-{b:05d}.pt"
        chunk = jobs[start:start + batch_rows]
        if shard is not None:
            if b % shard[1] == shard[0] and not path.is_file():
                rng = torch.Generator(device="cpu").manual_seed(chunk_seed(seed, b))
                if sampler is None:
                    sampler = MultiPromptSampler(model, tokenizer, params, max_new_tokens, topk=topk, hidden=hidden)
                _save(_sample_chunk(sampler, prompts_ids, chunk, rng), path)
            bar.update(len(chunk))
            continue
        if path.is_file():
            recs = torch.load(path, weights_only=False)
        else:
            if sampler is None:
                sampler = MultiPromptSampler(model, tokenizer, params, max_new_tokens, topk=topk, hidden=hidden)
            rng = torch.Generator(device="cpu").manual_seed(chunk_seed(seed, b))
            recs = _sample_chunk(sampler, prompts_ids, chunk, rng)
            _save(recs, path)
        out.extend(recs)
        bar.update(len(chunk))
    bar.close()
    if shard is not None:
        return None
    out.sort(key=lambda r: (r["prompt_index"], r["sample"]))
    return out


def _save(recs, path) -> None:
    import os
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(recs, tmp)
    os.replace(tmp, path)


def read_sample_cache(cache_dir) -> list[dict]:
    """Every record in a ``cached_samples`` cache directory, sorted by (prompt index, sample)."""
    from pathlib import Path
    out: list[dict] = []
    for path in sorted(Path(cache_dir).glob("chunk-*.pt")):
        out.extend(torch.load(path, weights_only=False))
    out.sort(key=lambda r: (r["prompt_index"], r["sample"]))
    return out
