"""What every training step shares: prompt sets, the work directory (checkpoints, caches), atomic
output directories, process-group awareness under ``accelerate launch``, and thread settings.

Layout of a step's files, for ``output_dir: OUT``:

- ``OUT``          the final result, written to ``OUT.tmp-<random>`` and renamed when complete (never half-written);
- ``OUT.work/``    checkpoints (``checkpoint-STEP``, for ``--resume``), sample caches, logs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import SpecError


# --------------------------------------------------------------------------------------------
# prompts
def read_prompts(source: str) -> list[str]:
    """Prompt texts from a JSON list / JSONL (``prompt`` field) or ``hf:NAME[:SPLIT[:COLUMN]]``."""
    from ..decode.prompts import load_prompts
    return load_prompts(prompts=source)


def prompt_split(source: str, exclude: str | None = None, limit: int = 0) -> list[str]:
    """Unique prompts of ``source`` in order, minus those in ``exclude`` (e.g. held-out benchmark prompts)."""
    prompts = list(dict.fromkeys(read_prompts(source)))
    if exclude:
        drop = set(read_prompts(exclude))
        prompts = [p for p in prompts if p not in drop]
    if not prompts:
        raise SpecError(f"no prompts left from {source} after excluding {exclude}: check the two files")
    return prompts[:limit] if limit and limit > 0 else prompts


def encode_prompts(tokenizer, prompts: list[str], max_prompt_tokens: int = 0, chat: bool = True):
    """(kept prompts, their token ids): prompts longer than ``max_prompt_tokens`` (> 0) are dropped."""
    from ..models.loading import chat_prompt
    kept, ids = [], []
    for p in prompts:
        enc = chat_prompt(tokenizer, p, chat=chat)
        if max_prompt_tokens and len(enc) > max_prompt_tokens:
            continue
        kept.append(p)
        ids.append(enc)
    if not kept:
        raise SpecError(f"every prompt is longer than max_prompt_tokens={max_prompt_tokens}: raise it")
    return kept, ids


# --------------------------------------------------------------------------------------------
# config fields every step has (mixed into each step's config dataclass)
@dataclass
class StepArgs:
    """Fields shared by every step's config (besides the Trainer's own ``output_dir``, ``seed``...)."""
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in OUT.work/"})
    work_dir: str | None = field(default=None, metadata={"help": "checkpoints and caches (default: OUT.work)"})
    keep_checkpoints: bool = field(default=False, metadata={"help": "keep OUT.work/checkpoint-* after success"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing OUT"})
    torch_threads: int = field(default=0, metadata={"help": "torch CPU threads per process (0 = torch default)"})

    def __post_init__(self):
        # Several DeepSpeed processes on a machine without GPUs: accelerate finds no backend for them and
        # counts one process while DeepSpeed counts all; naming gloo makes both agree (tested, 2 CPU processes).
        # Several plain (DDP) processes on such a machine: run them as CPU processes, which accelerate joins
        # with gloo (MULTI_CPU); otherwise it finds no backend and each process would train alone.
        if getattr(self, "ddp_backend", "set") is None and world_size() > 1 and not torch.cuda.is_available():
            if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" or getattr(self, "deepspeed", None):
                self.ddp_backend = "gloo"
            else:
                self.use_cpu = True
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()


def work_dir_of(args) -> Path:
    return Path(args.work_dir or f"{str(args.output_dir).rstrip('/')}.work")


def setup_step(args) -> Path:
    """Check the output dir, make the work dir (and the output's parent folders), set threads; returns the work dir."""
    out = Path(args.output_dir)
    if out.exists() and not args.overwrite and not getattr(args, "resume", False):
        raise SpecError(f"output {out} already exists: pass --overwrite true to replace it, or another --output_dir")
    if out.parent.exists() and not out.parent.is_dir():
        raise SpecError(f"output_dir {out}: {out.parent} is a file, not a directory: choose another --output_dir")
    if args.torch_threads and args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    if world_size() > 1:
        from transformers import TrainingArguments
        if isinstance(args, TrainingArguments):
            _ = args.device  # TrainingArguments sets up the process group (DDP / DeepSpeed) here
        else:
            from accelerate import PartialState
            PartialState(cpu=not torch.cuda.is_available())  # a process group for the barriers (gloo on CPU)
    work = work_dir_of(args)
    work.mkdir(parents=True, exist_ok=True)
    return work


def last_checkpoint(work: Path) -> str | None:
    """The newest complete ``checkpoint-STEP`` in ``work`` (the Trainer writes them), or None."""
    from transformers.trainer_utils import get_last_checkpoint
    return get_last_checkpoint(str(work)) if work.is_dir() else None


def resume_from(args, work: Path) -> str | None:
    if not args.resume:
        return None
    ckpt = last_checkpoint(work)
    if ckpt is None:
        print(f"--resume: no checkpoint in {work}; starting from scratch", flush=True)
    return ckpt


def checkpoint_step(checkpoint: str | None) -> int:
    """The global step a Trainer checkpoint was saved at (0 for None)."""
    if checkpoint is None:
        return 0
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])


def train_summary(trainer, out, resume: str | None) -> dict:
    """What every Trainer-based step reports about its training run."""
    import math
    return {"train_steps": int(out.global_step), "steps_this_run": int(out.global_step) - checkpoint_step(resume),
            "resumed_from": resume,
            "train_loss": float(out.training_loss) if math.isfinite(out.training_loss) else None,
            "distributed": distributed_info(trainer)}


def drop_checkpoints(args, work: Path) -> None:
    if args.keep_checkpoints or not is_main_process():
        return
    for ckpt in work.glob("checkpoint-*"):
        shutil.rmtree(ckpt, ignore_errors=True)


def swap_in(tmp: Path, target: Path) -> None:
    """Move a complete directory ``tmp`` to ``target`` (replacing an old ``target``) by renames."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(target: str | os.PathLike):
    """Yield a temp dir beside ``target``; on success it replaces ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        swap_in(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def finalize(trainer, final_dir: str | os.PathLike, describe=None) -> None:
    """Save ``trainer.model`` into ``.NAME.partial`` beside ``final_dir`` (every process takes part, so
    DeepSpeed ZeRO-3 can gather its shards), let the main process add files (``describe(dir) -> {name:
    json}``), then rename it to ``final_dir``. A crash leaves only the partial directory."""
    final = Path(final_dir)
    partial = final.parent / f".{final.name}.partial"
    if is_main_process() and partial.exists():
        shutil.rmtree(partial)
    wait_for_everyone()
    trainer.save_model(str(partial))
    wait_for_everyone()
    try:
        if is_main_process():
            with plain_load():  # describe() loads the saved model whole to measure it
                files = describe(partial) if describe else {}
            for name, data in files.items():
                write_json(partial / name, data)
            (partial / "training_args.bin").unlink(missing_ok=True)
            swap_in(partial, final)
    finally:
        if is_main_process() and partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    wait_for_everyone()


def write_json(path: str | os.PathLike, data) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


@contextmanager
def plain_load():
    """Load models whole even under DeepSpeed ZeRO-3 (no ``zero.Init`` partitioning at load time).

    Teachers, measurements and the models about to be trained are all loaded whole; ZeRO-3 shards
    the trained one when the Trainer wraps it, and gathers it again when saving. (Partitioning at load
    time only matters for models too big for one device, which is not what a draft is.)"""
    from transformers.integrations import deepspeed as hf_ds
    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


# --------------------------------------------------------------------------------------------
# processes (plain run, or one of several under accelerate launch / deepspeed)
def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def world_rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), world_size()


def wait_for_everyone() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


@contextmanager
def main_process_first():
    """The main process runs the block first (e.g. fills a cache); the others run it after (and read it)."""
    if world_size() > 1:
        from accelerate import PartialState
        with PartialState().main_process_first():
            yield
    else:
        yield


def distributed_info(trainer) -> dict:
    """How the Trainer ran: accelerate's distributed type, process count, DeepSpeed ZeRO stage."""
    acc = trainer.accelerator
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    return {"type": str(acc.distributed_type).split(".")[-1], "processes": acc.num_processes,
            "zero_stage": plugin.zero_stage if plugin is not None else None}


def report(message: str) -> None:
    if is_main_process():
        print(message, flush=True)
