"""The decode API: load models and a scorer from specs, compose generator x selector x scorer,
run it on prompts, get one record per prompt (the same records ``specalign decode`` writes).

    from specalign.decode import DecodeConfig, Decoder
    decoder = Decoder(DecodeConfig(model="smollm2-135m-instruct", method="best-of-n", n=4,
                                   scorer="judge:sentiment", max_new_tokens=32, seed=0))
    records = decoder.run(["Write a kind note to a friend."])

Lower level: build a ``SamplingGenerator`` (or a speculative / SSS one), a selector (``BestOfN``,
``SpeculativeRejection``) and a scorer (``build_scorer``) yourself and pass them to ``Decoder``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

import torch

from ..errors import SpecError
from ..models.loading import chat_prompt, clock, load_model, load_tokenizer
from ..models.scorers import Scorer, build_scorer
from .best_of_n import BestOfN
from .generators import Generator, SamplingGenerator
from .sampling import SamplingParams

METHODS = ("sample", "best-of-n", "spec-rejection", "speculative", "sss")
GENERATORS = ("sample", "speculative", "sss")


@dataclass
class DecodeConfig:
    """Every decode setting; the CLI's flags and YAML keys are these field names (dashes or underscores)."""
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "target model spec"})
    method: str = field(default="best-of-n", metadata={"help": f"one of {', '.join(METHODS)}"})
    generator: str = field(default="", metadata={"help": "sample | speculative | sss (default: from --method)"})
    n: int = field(default=4, metadata={"help": "samples per prompt (best-of-n, spec-rejection)"})
    scorer: str = field(default="judge:sentiment", metadata={"help": "scorer spec"})
    prompt: str | None = field(default=None, metadata={"help": "one prompt text"})
    prompts: str | None = field(default=None, metadata={"help": "JSON list / JSONL with 'prompt', or hf:NAME[:split]"})
    limit: int = field(default=0, metadata={"help": "use only the first N prompts (0 = all)"})
    max_new_tokens: int = field(default=128, metadata={"help": "new tokens per response"})
    temperature: float = field(default=1.0, metadata={"help": "0 = greedy"})
    top_k: int = field(default=0, metadata={"help": "0 = off"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus mass in (0, 1]"})
    seed: int = field(default=0, metadata={"help": "base seed; each prompt gets its own stream"})
    stop: list[str] = field(default_factory=list, metadata={"help": "stop strings"})
    max_batch_tokens: int = field(default=32768, metadata={"help": "rows x tokens per forward batch"})
    chat: bool = field(default=True, metadata={"help": "wrap prompts in the chat template"})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when available, else CPU) | cpu | cuda[:N]"})
    out: str | None = field(default=None, metadata={"help": "output JSONL file"})
    return_candidates: bool = field(default=False, metadata={"help": "keep every candidate with its score"})
    truncate: bool = field(default=False, metadata={"help": "left-truncate prompts too long for the context "
                                                             "(with a warning) instead of failing"})
    num_processes: int = field(default=1, metadata={"help": "split prompts across K processes (shards merged)"})
    shard: str = field(default="", metadata={"help": "internal: R/K, this process's shard"})
    # speculative / SSS
    draft: str | None = field(default=None, metadata={"help": "draft model spec (SSS: DPO adapter dir = Qr)"})
    draft_ref: str | None = field(default=None, metadata={"help": "SSS: separate unaligned draft Q0"})
    gamma: int = field(default=4, metadata={"help": "draft tokens per block"})
    sss_rule: str = field(default="exact", metadata={"help": "exact | paper"})
    shift_lambda: float = field(default=1.0, metadata={"help": "SSS shift strength: t ~ p (qr/q0)^lambda"})
    # speculative rejection
    alpha: str = field(default="0.5", metadata={"help": "rejection rate in [0, 1), or auto"})
    decision: str = field(default="tokens:16", metadata={"help": "tokens:K | budget"})

    def validate(self) -> "DecodeConfig":
        if self.method not in METHODS:
            raise SpecError(f"unknown method '{self.method}': use one of {', '.join(METHODS)}")
        if self.generator and self.generator not in GENERATORS:
            raise SpecError(f"unknown generator '{self.generator}': use one of {', '.join(GENERATORS)}")
        if self.n < 1:
            raise SpecError(f"n must be >= 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise SpecError(f"max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.gamma < 1:
            raise SpecError(f"gamma must be >= 1, got {self.gamma}")
        if self.num_processes < 1:
            raise SpecError(f"num-processes must be >= 1, got {self.num_processes}")
        if self.max_batch_tokens < 1:
            raise SpecError(f"max-batch-tokens must be >= 1, got {self.max_batch_tokens}")
        SamplingParams(self.temperature, self.top_k, self.top_p)
        if self.alpha != "auto":
            try:
                alpha = float(self.alpha)
            except ValueError:
                raise SpecError(f"alpha must be a number in [0, 1) or 'auto', got {self.alpha!r}") from None
            if not 0 <= alpha < 1:
                raise SpecError(f"alpha must be in [0, 1), got {alpha}")
        if self.method == "spec-rejection":
            from .spec_rejection import parse_decision
            parse_decision(self.decision)
        if self.generator_kind in ("speculative", "sss") and not self.draft:
            raise SpecError(f"the {self.generator_kind} generator needs --draft MODEL")
        if self.out and not os.path.isdir(os.path.dirname(os.path.abspath(self.out))):
            raise SpecError(f"--out {self.out}: directory {os.path.dirname(os.path.abspath(self.out))} does not exist; "
                            "create it first")
        return self

    @property
    def generator_kind(self) -> str:
        if self.generator:
            return self.generator
        return self.method if self.method in ("speculative", "sss") else "sample"

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p)

    def method_params(self) -> dict:
        keep = {"model", "method", "generator", "n", "scorer", "max_new_tokens", "temperature", "top_k", "top_p",
                "seed", "stop", "max_batch_tokens", "chat", "dtype"}
        if self.generator_kind != "sample":
            keep |= {"draft", "draft_ref", "gamma"}
        if self.generator_kind == "sss":
            keep |= {"sss_rule", "shift_lambda"}
        if self.method == "spec-rejection":
            keep |= {"alpha", "decision"}
        return {k: v for k, v in asdict(self).items() if k in keep}


def prompt_seed(seed: int, index: int) -> int:
    """Each prompt's own random stream: independent of batching and of which prompts ran before."""
    return (seed * 1_000_003 + index * 7_919 + 12_345) % (2**63 - 1)


def build_generator(config: DecodeConfig, model, tokenizer) -> Generator:
    kind = config.generator_kind
    if kind == "sample":
        return SamplingGenerator(model, tokenizer, config.sampling, config.max_new_tokens, config.stop)
    if kind == "speculative":
        from .speculative import SpeculativeGenerator
        return SpeculativeGenerator.from_specs(model, tokenizer, config)  # loads the draft, checks vocabularies
    from .sss import SSSGenerator
    return SSSGenerator.from_specs(model, tokenizer, config)


def build_selector(config: DecodeConfig):
    if config.method == "spec-rejection":
        if str(config.alpha).strip() == "auto":
            from .adaptive import AdaptiveRejection
            return AdaptiveRejection.from_config(config)
        from .spec_rejection import SpeculativeRejection
        return SpeculativeRejection.from_config(config)
    n = config.n if config.method == "best-of-n" else 1
    return BestOfN(n=n, max_batch_tokens=config.max_batch_tokens,
                   name="best-of-n" if config.method == "best-of-n" else config.method)


def run_params(config: DecodeConfig, prompts: list[str]) -> dict:
    """What a resumed run must share with the run it continues."""
    import hashlib
    digest = hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()[:16]
    return {**config.method_params(), "truncate": config.truncate, "num_prompts": len(prompts),
            "prompts_sha256": digest}


class Decoder:
    """generator x selector x scorer, run prompt by prompt; each prompt gets its own seeded stream."""

    def __init__(self, config: DecodeConfig | None = None, *, generator: Generator | None = None,
                 selector=None, scorer: Scorer | str | None = None, **overrides):
        config = config or DecodeConfig()
        for k, v in overrides.items():
            if k not in {f.name for f in fields(DecodeConfig)}:
                raise SpecError(f"unknown decode option '{k}'")
            setattr(config, k, v)
        self.config = config.validate()
        if generator is None:
            model = load_model(config.model, config.dtype, config.device)
            tokenizer = load_tokenizer(config.model)
            generator = build_generator(config, model, tokenizer)
        self.generator = generator
        self.tokenizer = generator.tokenizer
        self.selector = selector or build_selector(config)
        spec = scorer if scorer is not None else config.scorer
        self.scorer = build_scorer(spec, generator_model=getattr(generator, "model", None),
                                   generator_tokenizer=self.tokenizer, dtype=config.dtype, device=config.device,
                                   max_batch_tokens=config.max_batch_tokens) if spec else None
        if getattr(self.scorer, "needs_hidden", False):  # a value head on the target's own hidden states
            if not hasattr(self.generator, "track_hidden"):
                raise SpecError(f"scorer {self.scorer.name} reads the target's hidden states while it samples: use "
                                f"it with the sample generator, not {config.generator_kind}")
            self.generator.track_hidden()

    def encode(self, prompt: str) -> list[int]:
        """Chat-templated ids; a prompt that cannot fit the context is an error (or, with truncate, cut)."""
        ids = chat_prompt(self.tokenizer, prompt, chat=self.config.chat)
        model = getattr(self.generator, "model", None)
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        room = limit - self.config.max_new_tokens if limit else None
        if room is not None and len(ids) > room:
            if not self.config.truncate:
                raise SpecError(f"prompt of {len(ids)} tokens + max-new-tokens {self.config.max_new_tokens} exceeds "
                                f"the model's context of {limit}: shorten it, lower --max-new-tokens, or pass "
                                "--truncate")
            if room < 1:
                raise SpecError(f"max-new-tokens {self.config.max_new_tokens} leaves no room for a prompt in the "
                                f"context of {limit}: lower --max-new-tokens")
            import warnings
            warnings.warn(f"prompt truncated from {len(ids)} to its last {room} tokens to fit the context")
            ids = ids[-room:]
        return ids

    def decode_one(self, prompt: str, index: int = 0, ids: list[int] | None = None) -> dict:
        """One prompt -> one record: response, score, method, params, cost, (candidates, rounds)."""
        ids = self.encode(prompt) if ids is None else ids
        rng = torch.Generator(device="cpu").manual_seed(prompt_seed(self.config.seed, index))
        self.generator.reset_cost()
        if self.scorer is not None:
            self.scorer.cost = type(self.scorer.cost)()
        start = clock()
        result = self.selector.run(self.generator, self.scorer, prompt, ids, rng)
        wall = clock() - start
        best = result["candidates"][result["best"]]
        record = {
            "index": index,
            "prompt": prompt,
            "response": best.response,
            "score": result["scores"][result["best"]],
            "method": self.method_name,
            "params": self.config.method_params(),
            "finished": best.finished,
            "finish_reason": best.reason,
            "num_tokens": len(best.response_ids),
            "cost": self.cost_record(wall),
        }
        for key in ("rounds",):
            if key in result:
                record[key] = result[key]
        if self.config.return_candidates:
            record["candidates"] = [{"response": c.response, "score": s, "finished": c.finished,
                                     "num_tokens": len(c.response_ids)}
                                    for c, s in zip(result["candidates"], result["scores"])]
        return record

    @property
    def method_name(self) -> str:
        """``best-of-n``, ``sss``, or a composition such as ``best-of-n+sss``."""
        kind = self.config.generator_kind
        return self.selector.name if kind == "sample" or self.selector.name == kind else f"{self.selector.name}+{kind}"

    def cost_record(self, wall: float) -> dict:
        cost = {name: c.as_dict() for name, c in self.generator.cost.items()}
        cost.update(getattr(self.generator, "stats", lambda: {})())
        cost["scorer"] = self.scorer.cost.as_dict() if self.scorer is not None else {"positions": 0, "calls": 0}
        cost["wall_s"] = round(wall, 4)
        return cost

    def run_params(self, prompts: list[str]) -> dict:
        return run_params(self.config, prompts)

    def run(self, prompts: list[str], out: str | None = None, progress: bool = True,
            shard: tuple[int, int] = (0, 1)) -> list[dict]:
        """Decode every prompt (of this shard); with ``out``, one fsynced JSON line per finished prompt.

        Re-running with the same ``out`` resumes: prompts already written are skipped and their
        records returned as written (per-prompt seeds make the rest identical to an uninterrupted run).
        """
        from tqdm.auto import tqdm
        from .runs import RunFile, shard_path
        rank, world = shard
        encoded = [self.encode(p) for p in prompts]  # every prompt checked before anything is written
        check = getattr(self.selector, "check", None)  # and that it fits --max-batch-tokens
        for ids in encoded if check is not None else ():
            check(len(ids), self.config.max_new_tokens)
        mine = [i for i in range(len(prompts)) if i % world == rank]
        run_file = None
        done: dict[int, dict] = {}
        if out:
            path = out if world == 1 else shard_path(out, rank, world)
            run_file = RunFile(path, self.run_params(prompts))
            done = run_file.load_done()
        records = []
        todo = [i for i in mine if i not in done]
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"decode {self.method_name}", unit="prompt",
                   disable=not progress)
        try:
            for i in mine:
                if i in done:
                    records.append(done[i])
                    continue
                record = self.decode_one(prompts[i], i, encoded[i])
                if run_file is not None:
                    run_file.append(record)
                records.append(record)
                bar.update(1)
        except BaseException:
            bar.leave = False  # an error message follows: do not leave a half bar above it
            raise
        finally:
            bar.close()
        return records
