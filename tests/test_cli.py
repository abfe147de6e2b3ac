"""The decode CLI and API: records written and re-read, YAML + overrides, errors exit 2 with one line."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from specalign.cli import main
from specalign.decode import DecodeConfig, Decoder

ROOT = Path(__file__).resolve().parents[1]


def _decode(args, capsys):
    code = main(["decode", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_decode_writes_records_and_yaml_overrides(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"prompt": "good day"}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_dir}\nmethod: best-of-n\nn: 2\nscorer: loglik:self\nmax_new_tokens: 5\n")
    out = tmp_path / "o.jsonl"
    code, _, err = _decode(["--config", str(cfg), "--n", "3", "--prompts", str(prompts), "--out", str(out),
                            "--return-candidates", "true"], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["hello", "good day"]
    for r in records:
        assert r["params"]["n"] == 3 and r["params"]["max_new_tokens"] == 5  # flag beat YAML; YAML beat default
        assert len(r["candidates"]) == 3
        assert r["score"] == max(c["score"] for c in r["candidates"])
        assert r["method"] == "best-of-n"
        assert set(r["cost"]) >= {"target", "scorer", "wall_s"}
        assert set(r["cost"]["target"]) >= {"positions", "calls", "flops"}


def test_same_seed_same_records(tiny_dir, tmp_path):
    cfg = dict(model=tiny_dir, method="best-of-n", n=3, scorer="loglik:self", max_new_tokens=6, seed=3)
    a = Decoder(DecodeConfig(**cfg)).run(["hi", "yo"], progress=False)
    b = Decoder(DecodeConfig(**cfg)).run(["yo"], progress=False)  # prompt 'yo' alone, at index 0
    assert a[0]["response"] != a[1]["response"] or a[0]["score"] != a[1]["score"]
    again = Decoder(DecodeConfig(**cfg)).run(["hi", "yo"], progress=False)
    assert [r["response"] for r in a] == [r["response"] for r in again]
    assert b[0]["prompt"] == "yo"


def test_best_of_n_picks_argmax_and_chunks(tiny_dir):
    from specalign.decode import BestOfN
    scores_seen = []

    def by_length(prompts, responses, finished):
        scores_seen.append([len(r) for r in responses])
        return [len(r) for r in responses]

    from specalign.decode import SamplingGenerator
    from specalign.models.loading import load_model, load_tokenizer
    gen = SamplingGenerator(load_model(tiny_dir), load_tokenizer(tiny_dir), max_new_tokens=8, eos_ids=set())
    dec = Decoder(DecodeConfig(model=tiny_dir, max_new_tokens=8), generator=gen, selector=BestOfN(n=5),
                  scorer=by_length)
    prompt_len = len(dec.encode("hey"))
    dec.selector.max_batch_tokens = 2 * (prompt_len + 8)  # room for 2 rows per chunk
    rec = dec.run(["hey"], progress=False)[0]
    assert len(scores_seen[0]) == 5
    assert len(rec["response"]) == max(scores_seen[0])
    # 5 rows in chunks of 2, 2, 1: each chunk = 1 prefill + 7 decode steps
    assert dec.selector.chunk_size(prompt_len, 8) == 2
    assert rec["cost"]["target"]["calls"] == 3 * 8
    assert rec["cost"]["target"]["positions"] == 3 * prompt_len + 7 * (2 + 2 + 1)


@pytest.mark.parametrize("args,pattern", [
    (["--method", "nope"], "unknown method"),
    (["--n", "0"], "n must be >= 1"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top_p", "0"], r"top-p must be in \(0, 1\]"),
    (["--top_p", "1.5"], r"top-p must be in \(0, 1\]"),
    (["--gamma", "0"], "gamma must be >= 1"),
    (["--alpha", "1.0", "--method", "spec-rejection"], r"alpha must be in \[0, 1\)"),
    (["--scorer", "judge:unknown"], "unknown scorer"),
    (["--model", "/no/such/model/dir"], "model path not found"),
    (["--model", "/no/such/file.gguf"], "GGUF file not found"),
    (["--prompts", "/no/such/prompts.json"], "prompts file not found"),
    (["--prompt", "   "], "empty prompt"),
    (["--out", "/no/such/dir/o.jsonl"], "does not exist"),
    (["--method", "speculative"], "needs --draft"),
    (["--scorer", "python:math:nan_scorer_missing"], "cannot import"),
    (["--scorer", "python:tests_nan_scorer:score"], "non-finite score"),
    (["--scorer", "python:tests_nan_scorer:too_few"], "returned 1 scores for 2"),
    (["--prompt", "hello " * 200], "exceeds the model's context of 512.*--truncate"),
    (["--num_processes", "0"], "num-processes must be >= 1"),
    (["--method", "spec-rejection", "--decision", "tokens:x"], "decision must be tokens:K"),
])
def test_bad_input_is_one_line_exit_2(args, pattern, tiny_dir, tmp_path, capsys, monkeypatch):
    import types
    mod = types.ModuleType("tests_nan_scorer")
    mod.score = lambda p, r, f: [float("nan")] * len(r)
    mod.too_few = lambda p, r, f: [1.0]
    monkeypatch.setitem(sys.modules, "tests_nan_scorer", mod)
    if "too_few" in " ".join(args):
        args = args + ["--n", "2"]
    out = tmp_path / "o.jsonl"
    base = ["--model", tiny_dir, "--max_new_tokens", "2"]
    if not {"--prompt", "--prompts"} & set(args):
        base += ["--prompt", "hello"]
    if "--out" not in args:
        base += ["--out", str(out)]
    code, _, err = _decode(base + args, capsys)
    assert code == 2
    # progress-bar frames (erased on a terminal with \r) are not message lines
    lines = [l for l in err.replace("\r", "\n").splitlines() if l.strip() and "prompt/s]" not in l]
    assert len(lines) == 1 and lines[0].startswith("error:") and re.search(pattern, lines[0]), err
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing written, not even a params file


def test_prompt_file_errors(tiny_dir, tmp_path, capsys):
    cases = {"empty.json": ("", "is empty"), "bad.jsonl": ('{"prompt": "a"}\n{oops\n', "line 2 is not valid JSON"),
             "nofield.json": ('[{"text": "a"}]', "no 'prompt' field"),
             "blank.json": ('[{"prompt": ""}]', "empty prompt")}
    for name, (text, pattern) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        out = tmp_path / f"{name}.out.jsonl"
        code, _, err = _decode(["--model", tiny_dir, "--prompts", str(path), "--out", str(out)], capsys)
        assert code == 2 and re.search(pattern, err), (name, err)
        assert not out.exists()


def test_draft_vocabulary_mismatch_via_cli(tiny_dir, tmp_path, capsys):
    from specalign.models.testing import tiny_llama
    small = tmp_path / "small-vocab-draft"
    tiny_llama(vocab_size=16).save_pretrained(small)
    capsys.readouterr()  # the save's progress bar is not part of the command's output
    out = tmp_path / "o.jsonl"
    code, _, err = _decode(["--model", tiny_dir, "--method", "speculative", "--draft", str(small), "--prompt", "hi",
                            "--max_new_tokens", "4", "--out", str(out)], capsys)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and "output tokens" in lines[0] and "vocabulary" in lines[0], err
    assert not out.exists()


def test_long_prompt_truncated_with_warning(tiny_dir, tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    with pytest.warns(UserWarning, match="prompt truncated"):
        code, _, err = _decode(["--model", tiny_dir, "--prompt", "hello " * 200, "--max_new_tokens", "4",
                                "--n", "1", "--truncate", "--out", str(out)], capsys)
    assert code == 0, err
    assert json.loads(out.read_text())["num_tokens"] >= 1


def test_malformed_yaml(tiny_dir, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: [unclosed\n")
    code, _, err = _decode(["--config", str(cfg), "--prompt", "hi"], capsys)
    assert code == 2 and "not valid YAML" in err and err.count("\n") == 1
    cfg.write_text("- just\n- a list\n")
    code, _, err = _decode(["--config", str(cfg), "--prompt", "hi"], capsys)
    assert code == 2 and "YAML mapping" in err


def test_unknown_yaml_key_and_flag(tiny_dir, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_dir}\nnumber_of_samples: 3\n")
    code, _, err = _decode(["--config", str(cfg), "--prompt", "hi"], capsys)
    assert code == 2 and "unknown recipe keys" in err and "number_of_samples" in err
    code, _, err = _decode(["--model", tiny_dir, "--prompt", "hi", "--bogus-flag", "1"], capsys)
    assert code == 2 and "unknown flags" in err and "--bogus-flag" in err


def test_acceptance_command_on_smollm2(smollm2, tmp_path):
    """The issue's acceptance command, as a subprocess through the console script."""
    out = tmp_path / "o.jsonl"
    exe = Path(sys.executable).parent / "specalign"
    proc = subprocess.run([str(exe), "decode", "--method", "best-of-n", "--n", "4", "--prompt",
                           "Write a kind note to a friend.", "--scorer", "judge:sentiment", "--max-new-tokens", "32",
                           "--seed", "0", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["method"] == "best-of-n" and record["response"]
    assert -1 <= record["score"] <= 1
    assert record["cost"]["target"]["positions"] > 0 and record["cost"]["target"]["calls"] <= 32


def test_readme_python_example_runs(smollm2):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Python API.*?```python\n(.*?)```", text, re.S).group(1)
    exec(compile(block, "README.md", "exec"), {})


def _every_command():
    from specalign.bench import BENCHES
    from specalign.train.cli import STEPS
    return [["decode"], ["run"], ["serve"], *(["bench", b] for b in BENCHES), *(["train", s] for s in STEPS)]


@pytest.mark.parametrize("command", _every_command(), ids=" ".join)
def test_every_command_prints_its_help(command, capsys):
    """--help of every command renders (a stray % in a flag's help text breaks argparse's formatting)."""
    try:
        code = main([*command, "--help"])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "usage:" in out.out and "--" in out.out, out.out[:300]
