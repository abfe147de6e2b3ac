"""``--num-processes K``: run one command as K child processes, one shard of the prompts each.

A 2-core CPU decodes faster as two one-thread processes than as one two-thread process, so the
commands that loop over prompts (``specalign decode``, ``specalign bench w2s``) can split their
prompts: child R handles the prompts with index % K == R (``--shard R/K``) and writes resumable
records; the parent then merges them.
"""

from __future__ import annotations

import os
import subprocess
import sys

from .errors import SpecError


def spawn_shards(command: list[str], args: list[str], processes: int) -> None:
    """Run ``python -m specalign.cli COMMAND ARGS --num_processes 1 --shard R/K`` for R < K, with the
    machine's cores split evenly between them; raises if any child fails."""
    threads = max(1, (os.cpu_count() or 1) // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen([sys.executable, "-m", "specalign.cli", *command, *args, "--num_processes", "1",
                               "--shard", f"{r}/{processes}"], env=env)
             for r in range(processes)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SpecError(f"{' '.join(command)} shards exited with codes {codes}: see their messages above; re-run "
                        "the same command to resume")
