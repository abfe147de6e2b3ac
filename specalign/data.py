"""Named data sets: the prompt sets and preference data recipes and benchmarks use, resolved by name.

A name (``--prompts alpaca_farm_100``, ``prompts: alpaca_farm_eval``, ``preferences: saferlhf``)
resolves first to a local copy in the data directory (``--data-dir`` or ``$SPECALIGN_DATA``), else
to the public dataset through ``datasets`` (the Hub id, config, split and columns below). The
project holds no copy of the texts; ``alpaca_farm_100`` is defined by its index list into
``alpaca_farm_eval``.

| name | rows | local file | public dataset |
|---|---|---|---|
| ``alpaca_farm_eval`` | 805 prompts | ``alpaca_farm_eval.json`` (``prompt``) | tatsu-lab/alpaca_eval, eval split, ``instruction`` |
| ``alpaca_farm_100`` | 100 of them | (from ``alpaca_farm_eval``) | (the same) |
| ``saferlhf`` | preference pairs | ``saferlhf_200.jsonl`` (``real`` / ``generated``) | PKU-Alignment/PKU-SafeRLHF, train split |
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import SpecError

ENV = "SPECALIGN_DATA"

# The Speculative Rejection paper's 100-prompt evaluation subset: indices into the 805 AlpacaFarm
# evaluation instructions, in the paper's order.
ALPACA_FARM_100 = (
    277, 562, 246, 69, 665, 381, 355, 510, 469, 787, 558, 100, 564, 579, 197, 753, 758, 303, 128, 707,
    375, 341, 5, 208, 373, 337, 148, 708, 83, 631, 258, 263, 737, 611, 595, 561, 12, 512, 301, 252,
    478, 563, 261, 287, 297, 679, 742, 93, 529, 409, 366, 635, 52, 33, 752, 191, 420, 331, 269, 727,
    162, 439, 161, 539, 39, 584, 228, 326, 641, 75, 415, 574, 362, 616, 202, 792, 685, 178, 8, 223,
    142, 803, 238, 747, 675, 719, 4, 320, 319, 459, 88, 506, 682, 442, 774, 402, 213, 237, 396, 123,
)


@dataclass(frozen=True)
class NamedData:
    kind: str                 # "prompts" | "preferences"
    file: str                 # the local copy's file name in the data directory
    hub: tuple[str, str | None, str]   # (dataset id, config, split) for datasets.load_dataset
    describe: str
    base: str | None = None   # a subset of this data set ...
    indices: tuple[int, ...] = ()   # ... at these rows


DATASETS: dict[str, NamedData] = {
    "alpaca_farm_eval": NamedData("prompts", "alpaca_farm_eval.json", ("tatsu-lab/alpaca_eval", "alpaca_eval", "eval"),
                                  "the 805 AlpacaFarm evaluation instructions"),
    "alpaca_farm_100": NamedData("prompts", "alpaca_farm_eval.json", ("tatsu-lab/alpaca_eval", "alpaca_eval", "eval"),
                                 "the Speculative Rejection paper's 100-prompt subset of alpaca_farm_eval",
                                 base="alpaca_farm_eval", indices=ALPACA_FARM_100),
    "saferlhf": NamedData("preferences", "saferlhf_200.jsonl", ("PKU-Alignment/PKU-SafeRLHF", None, "train"),
                          "SafeRLHF preference pairs (chosen = the safer response)"),
}


def data_dir() -> Path | None:
    """The local data directory: ``$SPECALIGN_DATA`` (``specalign --data-dir DIR`` sets it), else None."""
    value = os.environ.get(ENV, "").strip()
    return Path(value).expanduser() if value else None


def is_named(spec: str | None) -> bool:
    return isinstance(spec, str) and spec in DATASETS


def load_named(name: str) -> list[dict]:
    """Rows of a named data set: ``{"prompt": str}`` for prompt sets; ``chosen`` / ``rejected`` (and
    ``prompt``) rows for preference data, in a form ``train.data.to_conversational`` reads. One-line ``SpecError`` when neither copy is reachable."""
    entry = DATASETS[name]
    if entry.base:
        rows = load_named(entry.base)
        if max(entry.indices) >= len(rows):
            raise SpecError(f"data set '{entry.base}' has {len(rows)} rows, fewer than '{name}' indexes "
                            f"({max(entry.indices) + 1}): check the copy in {data_dir()}")
        return [rows[i] for i in entry.indices]
    folder = data_dir()
    if folder is not None and (folder / entry.file).is_file():
        return _local_rows(entry, folder / entry.file)
    try:
        return _hub_rows(entry)
    except Exception as exc:  # datasets raises many types when a dataset is unreachable
        where = f"{folder} has no {entry.file}" if folder is not None else f"${ENV} is not set"
        raise SpecError(f"data set '{name}' ({entry.describe}) not found: {where}, and the public dataset "
                        f"{entry.hub[0]} could not be loaded ({type(exc).__name__}); point ${ENV} (or --data-dir) "
                        f"at a folder holding {entry.file}, or go online once so datasets caches it") from None


def _local_rows(entry: NamedData, path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        rows = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if entry.kind == "prompts":
        return [{"prompt": r["prompt"] if isinstance(r, dict) else r} for r in rows]
    return [{"chosen": r["real"], "rejected": r["generated"]} for r in rows]  # whole conversations


def _hub_rows(entry: NamedData) -> list[dict]:
    from datasets import load_dataset
    dataset_id, config, split = entry.hub
    ds = load_dataset(dataset_id, config, split=split) if config else load_dataset(dataset_id, split=split)
    if entry.kind == "prompts":
        return [{"prompt": text} for text in ds["instruction"]]
    rows = []
    for r in ds:
        safer = int(r["safer_response_id"])
        rows.append({"prompt": r["prompt"], "chosen": r[f"response_{safer}"], "rejected": r[f"response_{1 - safer}"]})
    return rows
