"""Prompt sources: one text, a named data set (``alpaca_farm_eval``, ``alpaca_farm_100``: see
``specalign.data``), a JSON list / JSON list of objects / JSONL with a ``prompt`` field, or a
datasets spec ``hf:NAME[:SPLIT[:COLUMN]]`` (local or cached offline)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SpecError


def _field(item, where: str) -> str:
    if isinstance(item, str):
        text = item
    elif isinstance(item, dict) and "prompt" in item:
        text = item["prompt"]
    else:
        raise SpecError(f"{where}: no 'prompt' field; each entry must be a string or an object with a 'prompt' key")
    if not isinstance(text, str) or not text.strip():
        raise SpecError(f"{where}: empty prompt; remove it or give it text")
    return text


def load_prompts(prompt: str | None = None, prompts: str | None = None, limit: int = 0) -> list[str]:
    if prompt is not None and prompts is not None:
        raise SpecError("give --prompt TEXT or --prompts FILE, not both")
    if prompt is not None:
        return [_field(prompt, "--prompt")]
    if prompts is None:
        raise SpecError("no prompts: pass --prompt TEXT or --prompts FILE")
    from ..data import DATASETS, is_named, load_named
    if is_named(prompts):
        if DATASETS[prompts].kind != "prompts":
            raise SpecError(f"data set '{prompts}' holds preference pairs, not prompts: use "
                            f"{', '.join(k for k, v in DATASETS.items() if v.kind == 'prompts')}")
        out = [_field(row, f"{prompts} row {i}") for i, row in enumerate(load_named(prompts))]
    elif prompts.startswith("hf:"):
        out = _from_datasets(prompts)
    else:
        path = Path(prompts)
        if not path.is_file():
            raise SpecError(f"prompts file not found: {prompts} (check the path, or use a data set name: "
                            f"{', '.join(k for k, v in DATASETS.items() if v.kind == 'prompts')})")
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise SpecError(f"prompts file {prompts} is empty: add prompts (JSON list or JSONL with 'prompt')")
        try:
            data = json.loads(text)
            items = data if isinstance(data, list) else [data]
            out = [_field(x, f"{prompts} entry {i}") for i, x in enumerate(items)]
        except json.JSONDecodeError:
            out = []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    out.append(_field(json.loads(line), f"{prompts} line {n}"))
                except json.JSONDecodeError as exc:
                    raise SpecError(f"{prompts} line {n} is not valid JSON ({exc.msg}): use a JSON list or "
                                    "JSONL with a 'prompt' field") from None
    if not out:
        raise SpecError(f"prompts source {prompts} holds no prompts")
    return out[:limit] if limit and limit > 0 else out


def _from_datasets(spec: str) -> list[str]:
    parts = spec[3:].split(":")
    name, split, column = parts[0], (parts[1] if len(parts) > 1 else "train"), (parts[2] if len(parts) > 2 else "prompt")
    try:
        from datasets import load_dataset
        ds = load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types for a missing dataset
        raise SpecError(f"cannot load dataset '{name}' split '{split}' ({type(exc).__name__}): give a local "
                        "dataset path or a cached dataset name") from None
    if column not in ds.column_names:
        raise SpecError(f"dataset {name} has no column '{column}' (columns: {ds.column_names}); use hf:NAME:SPLIT:COLUMN")
    return [_field({"prompt": x}, f"{name} row {i}") for i, x in enumerate(ds[column])]
