"""Benchmarks: ``specalign bench NAME [flags]``. Each writes results.json, table.md (and plots) under
``--output-dir`` (default ``benchmarks/results/NAME``)."""

from __future__ import annotations

import importlib

from ..errors import SpecError

BENCHES = {
    "engine": "specalign.bench.engine",
    "spr": "specalign.bench.spr",
    "correlation": "specalign.bench.correlation",
    "speculative": "specalign.bench.speculative",
    "w2s": "specalign.bench.w2s",
    "draft": "specalign.bench.draft",
    "draft-speed": "specalign.bench.draft_speed",
}


def main(args: list[str]) -> int:
    if not args or args[0] not in BENCHES:
        raise SpecError(f"specalign bench needs a benchmark name: one of {', '.join(BENCHES)}")
    return importlib.import_module(BENCHES[args[0]]).main(args[1:])
