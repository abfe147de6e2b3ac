"""Preference data: one reader for every source, one conversational form for every trainer.

A preference row, as the ``preferences`` step writes it and as DPO / reward training read it
(TRL's conversational preference format, explicit prompt):

    {"prompt":   [{"role": "user", "content": "..."}],
     "chosen":   [{"role": "assistant", "content": "..."}],
     "rejected": [{"role": "assistant", "content": "..."}],
     "score_chosen": 0.8, "score_rejected": -0.1}          # scores kept when known

``load_preferences(source, columns)`` reads a directory written by ``specalign train preferences``
(``data.jsonl``), a JSON / JSONL file, a named data set (``saferlhf``, see ``specalign.data``) or
``hf:NAME[:SPLIT]``; ``columns`` maps names, e.g. ``chosen=real,rejected=generated``. Rows may be conversational with the
prompt inside chosen/rejected (implicit prompt: the shared leading messages become the prompt) or
plain strings (``prompt`` / ``chosen`` / ``rejected`` texts).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SpecError

FIELDS = ("prompt", "chosen", "rejected", "score_chosen", "score_rejected")


def parse_columns(spec: str | None) -> dict[str, str]:
    """``chosen=real,rejected=generated`` -> {"chosen": "real", "rejected": "generated"}."""
    mapping: dict[str, str] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise SpecError(f"bad column mapping '{part}': write FIELD=COLUMN, e.g. chosen=real,rejected=generated")
        key, _, value = (x.strip() for x in part.partition("="))
        if key not in FIELDS:
            raise SpecError(f"bad column mapping '{part}': FIELD must be one of {', '.join(FIELDS)}")
        mapping[key] = value
    return mapping


def _read_rows(source: str) -> list[dict]:
    from ..data import is_named, load_named
    if is_named(source):
        return load_named(source)
    if source.startswith("hf:"):
        parts = source[3:].split(":")
        try:
            from datasets import load_dataset
            ds = load_dataset(parts[0], split=parts[1] if len(parts) > 1 else "train")
        except Exception as exc:  # datasets raises many types for a missing dataset
            raise SpecError(f"cannot load dataset '{parts[0]}' ({type(exc).__name__}): give a local file or a "
                            "cached dataset name") from None
        return [dict(r) for r in ds]
    path = Path(source)
    if path.is_dir():
        path = path / "data.jsonl"
    if not path.is_file():
        raise SpecError(f"preference data not found: {source} (a preferences output dir, JSON/JSONL file or hf:NAME)")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SpecError(f"{source} line {n} is not valid JSON ({exc.msg})") from None
        return rows


def _messages(value, role: str, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise SpecError(f"{where}: expected a text or a list of chat messages ({{role, content}})")


def to_conversational(row: dict, where: str = "row") -> dict:
    """Normalize one mapped row to explicit-prompt conversational form (see module doc)."""
    for key in ("chosen", "rejected"):
        if key not in row:
            raise SpecError(f"{where}: no '{key}' field; map it with columns: {key}=YOUR_COLUMN")
    chosen = _messages(row["chosen"], "assistant", f"{where} chosen")
    rejected = _messages(row["rejected"], "assistant", f"{where} rejected")
    if "prompt" in row and row["prompt"] is not None:
        prompt = _messages(row["prompt"], "user", f"{where} prompt")
    else:  # implicit prompt: the messages chosen and rejected share, up to the last assistant turn
        shared = 0
        while (shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]):
            shared += 1
        if shared == 0:
            raise SpecError(f"{where}: no prompt field and chosen/rejected share no leading messages: map a prompt "
                            "column (columns: prompt=COLUMN)")
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    if not chosen or not rejected or not any(m["content"].strip() for m in chosen + rejected):
        raise SpecError(f"{where}: empty chosen or rejected response")
    out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    for key in ("score_chosen", "score_rejected"):
        if row.get(key) is not None:
            out[key] = float(row[key])
    return out


def load_preferences(source: str, columns: str | None = None, limit: int = 0) -> list[dict]:
    """Preference rows in conversational form from any supported source (see module doc)."""
    mapping = parse_columns(columns)
    rows = _read_rows(source)
    out = []
    for i, raw in enumerate(rows):
        if not isinstance(raw, dict):
            raise SpecError(f"{source} row {i}: expected an object with chosen/rejected fields")
        missing = [col for col in mapping.values() if col not in raw]
        if missing:
            raise SpecError(f"{source} row {i} has no column {missing[0]!r} (columns: {sorted(raw)}): fix `columns`")
        mapped = {k: raw[k] for k in FIELDS if k in raw}
        mapped.update({field: raw[col] for field, col in mapping.items()})
        out.append(to_conversational(mapped, f"{source} row {i}"))
        if limit and len(out) >= limit:
            break
    if not out:
        raise SpecError(f"{source} holds no preference rows")
    return out


def split_rows(rows: list, eval_fraction: float, seed: int = 0) -> tuple[list, list]:
    """(train, held-out): a seeded shuffle, the last ``eval_fraction`` held out (at least one row if > 0)."""
    import random
    if not 0 <= eval_fraction < 1:
        raise SpecError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * eval_fraction)) if eval_fraction > 0 else 0
    if n_eval >= len(rows):
        raise SpecError(f"eval_fraction {eval_fraction} leaves no training rows out of {len(rows)}")
    cut = len(rows) - n_eval
    return [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]]


def prompt_text(messages: list[dict]) -> str:
    """The last user message of a conversational prompt (what scorers and chat_prompt take)."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else messages[-1]["content"]


def response_text(messages: list[dict]) -> str:
    return "".join(m["content"] for m in messages if m["role"] == "assistant")
