"""Crash-safe, resumable run files: one complete JSON line per finished prompt.

- Each record is written as one line, flushed and fsynced before the next prompt starts.
- On resume, a torn last line (a crash mid-write: no newline, or unparsable) is cut off the file,
  never parsed as data; prompts whose records are present are skipped.
- The run's parameters live beside the output (``OUT.params.json``, written with the first
  record); resuming with different parameters is an error naming the differing keys.
- Sharded runs (``--num-processes`` or ``accelerate launch``) write ``OUT.shard-R-of-K.jsonl``
  each and merge them into ``OUT`` in prompt order (atomic rename) once every shard is complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import SpecError


def params_path(out: str | Path) -> Path:
    return Path(f"{out}.params.json")


def shard_path(out: str | Path, rank: int, world: int) -> Path:
    return Path(f"{out}.shard-{rank}-of-{world}.jsonl")


class RunFile:
    def __init__(self, path: str | Path, params: dict):
        self.path = Path(path)
        self.params = params

    def load_done(self) -> dict[int, dict]:
        """Records already written, by prompt index; a torn tail is truncated away."""
        if not self.path.exists():
            return {}
        self.check_params()
        data = self.path.read_bytes()
        done, good_end, start = {}, 0, 0
        while start < len(data):
            end = data.find(b"\n", start)
            if end < 0:
                break  # no newline: torn
            try:
                record = json.loads(data[start:end])
                done[int(record["index"])] = record
            except (ValueError, KeyError, TypeError):
                break  # unparsable: torn (only ever the last line, since lines are written whole)
            good_end = start = end + 1
        if good_end < len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(good_end)
                os.fsync(handle.fileno())
        return done

    def check_params(self) -> None:
        stored_path = params_path(self.path)
        if not stored_path.exists():
            return
        stored = json.loads(stored_path.read_text())
        differ = sorted(k for k in set(stored) | set(self.params) if stored.get(k) != self.params.get(k))
        if differ:
            detail = ", ".join(f"{k}: {stored.get(k)!r} -> {self.params.get(k)!r}" for k in differ)
            raise SpecError(f"{self.path} was written with different parameters ({detail}): use the same "
                            "parameters to resume, or a new --out")

    def append(self, record: dict) -> None:
        stored_path = params_path(self.path)
        if not stored_path.exists():
            tmp = stored_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.params, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, stored_path)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def merge_shards(out: str | Path, world: int, total: int, params: dict) -> list[dict]:
    """Merge complete shards into ``out`` in prompt order (atomic); returns the records."""
    records = {}
    for rank in range(world):
        records.update(RunFile(shard_path(out, rank, world), params).load_done())
    missing = sorted(set(range(total)) - set(records))
    if missing:
        raise SpecError(f"shards of {out} lack prompts {missing[:5]}...: re-run the same command to finish them")
    ordered = [records[i] for i in range(total)]
    tmp = Path(f"{out}.merging")
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in ordered:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, out)
    pp = params_path(out)
    if not pp.exists():
        pp.write_text(json.dumps(params, indent=1, sort_keys=True) + "\n")
    return ordered
