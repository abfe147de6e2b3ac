"""``specalign`` command line: a thin layer over the Python API.

    specalign decode [--config x.yaml] [--flag value ...]    decode prompts (see DecodeConfig)
    specalign bench NAME [--flag value ...]                  benchmarks (engine, spr, correlation, speculative, w2s, draft, draft-speed)
    specalign train STEP --config recipe.yaml [...]          training steps (draft, preferences, dpo, value, reward)
    specalign run RECIPE [--budget smoke|full]               the weak-to-strong pipeline, resumable
    specalign serve [--config x.yaml] [--host H --port P]    an OpenAI-compatible HTTP server (docs/serve.md)

Flags override YAML keys (TrlParser). Input errors print one line ``error: ...`` and exit 2.
``--data-dir DIR`` (any command) is where named data sets (alpaca_farm_eval, alpaca_farm_100,
saferlhf) are looked up first; it sets ``$SPECALIGN_DATA``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

from .errors import SpecError

COMMANDS = {
    "decode": "specalign.cli:decode_main",
    "bench": "specalign.bench:main",
    "train": "specalign.train.cli:main",
    "run": "specalign.train.pipeline:main",
    "serve": "specalign.serve:main",
}


def parse_config(dataclass_types, args, prog: str):
    """TrlParser over dataclasses: ``--config`` YAML, flags override; unknown keys are a SpecError."""
    from trl import TrlParser
    parser = TrlParser(dataclass_types, prog=prog)
    if "--config" in args:
        i = args.index("--config")
        if i + 1 >= len(args):
            raise SpecError("--config needs a YAML file path")
        if not os.path.isfile(args[i + 1]):
            raise SpecError(f"config file not found: {args[i + 1]}")
    try:
        return parser.parse_args_and_config(args)
    except ValueError as exc:
        msg = str(exc).splitlines()[0]
        if "Unknown arguments" in msg:
            raise SpecError(f"unknown recipe keys {msg.split(':', 1)[1].split('. Please')[0].strip()}: remove them "
                            f"or check their spelling (`{prog} --help` lists the keys)") from None
        if "not used by the HfArgumentParser" in msg:
            raise SpecError(f"unknown flags {msg.split(':', 1)[1].strip()}: check their spelling "
                            f"(`{prog} --help` lists the flags)") from None
        raise SpecError(f"bad config: {msg}") from None
    except Exception as exc:  # yaml errors
        if type(exc).__module__.startswith("yaml"):
            raise SpecError(f"config is not valid YAML ({str(exc).splitlines()[0]}): fix the file") from None
        raise


def _launched_world() -> tuple[int, int]:
    """(rank, world) when started by ``accelerate launch`` / torchrun, else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)


def decode_main(args: list[str]) -> int:
    from .decode.api import DecodeConfig, Decoder, run_params
    from .decode.prompts import load_prompts
    from .decode.runs import merge_shards
    from .shards import spawn_shards
    show = "--show" in args
    args = [a for a in args if a != "--show"]
    (config,) = parse_config([DecodeConfig], args, "specalign decode")
    config.validate()
    prompts = load_prompts(config.prompt, config.prompts, config.limit)
    rank, world = _launched_world()
    if config.shard:
        rank, world = (int(x) for x in config.shard.split("/"))
    if (config.num_processes > 1 or world > 1) and not config.out:
        raise SpecError("multi-process decoding writes shards: pass --out FILE.jsonl")
    if config.out:  # a resume with other parameters fails before any model is loaded
        from .decode.runs import RunFile, shard_path
        paths = [config.out] + [shard_path(config.out, r, k) for k in {world, config.num_processes} if k > 1
                                for r in range(k)]
        for path in paths:
            RunFile(path, run_params(config, prompts)).check_params()
    if config.num_processes > 1 and world == 1:
        checker = Decoder(config)
        for p in prompts:  # fail once, here, before any shard starts
            checker.encode(p)
        del checker
        spawn_shards(["decode"], args, config.num_processes)
        records = merge_shards(config.out, config.num_processes, len(prompts), run_params(config, prompts))
    else:
        decoder = Decoder(config)
        records = decoder.run(prompts, out=config.out, shard=(rank, world))
        if world > 1 and not config.shard:  # accelerate launch: rank 0 merges once all ranks are done
            from accelerate import PartialState
            state = PartialState()
            state.wait_for_everyone()
            if state.is_main_process:
                records = merge_shards(config.out, world, len(prompts), run_params(config, prompts))
            else:
                records = []
    for rec in records if (show or not config.out) else []:
        print(f"\n=== prompt {rec['index']}: {rec['prompt']}")
        print(f"--- response (score {rec['score']:.4f}, {rec['num_tokens']} tokens):\n{rec['response']}")
        print(f"--- cost: {json.dumps(rec['cost'])}")
    if config.out and records:
        print(f"wrote {len(records)} record(s) to {config.out}", file=sys.stderr)
    return 0


def _take_data_dir(argv: list[str]) -> list[str]:
    """``--data-dir DIR`` / ``--data_dir DIR`` anywhere in argv: checked, exported as $SPECALIGN_DATA, removed."""
    from .data import ENV
    out, i = [], 0
    while i < len(argv):
        flag, _, value = argv[i].partition("=")
        if flag in ("--data-dir", "--data_dir"):
            if not value:
                if i + 1 >= len(argv):
                    raise SpecError("--data-dir needs a directory")
                value, i = argv[i + 1], i + 1
            if not os.path.isdir(value):
                raise SpecError(f"--data-dir {value}: not a directory (it should hold alpaca_farm_eval.json, ...)")
            os.environ[ENV] = os.path.abspath(value)
        else:
            out.append(argv[i])
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = _take_data_dir(argv)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command '{argv[0]}': use one of {', '.join(COMMANDS)} (specalign --help)",
              file=sys.stderr)
        return 2
    module, _, func = COMMANDS[argv[0]].partition(":")
    try:
        return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
