"""Guard: no tracked file names a path outside the repository or narrates the history of the work.

Every file ``git ls-files`` lists (binary files skipped) is checked line by line for

- paths outside the repository: the shared folder beside the clone, absolute work / home / root
  paths, home-relative paths other than dot directories (a user's cache directory is fine), and
  the design file that lives outside the repository;
- work-history phrases: numbered work sessions, a machine the work ran on before, a draft or run
  from before, figures left un-measured since a change, and the like (the patterns below).

Only ``.ci/run`` may name the shared data folder: it points ``SPECALIGN_DATA`` at it when it exists.
The patterns are written so that this file passes its own check.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Files that may name the shared data folder (the CI entry point exports SPECALIGN_DATA).
SHARED_DATA_ALLOWED = {".ci/run"}

OUTSIDE = [
    ("path outside the repository (the shared folder)", re.compile(r"\.\./shared")),
    ("absolute path of a development machine",
     re.compile(r"(?<![\w.\-/:])/(?:work|root|home|Users|mnt/data)/", re.IGNORECASE)),
    ("home-relative path outside a dot directory", re.compile(r"(?<![\w.\-/])~[/](?![.\s])")),
    ("the design file outside the repository (say docs/architecture.md)", re.compile(r"\bDESIGN\.md\b")),
]

HISTORY = [
    ("numbered work session", re.compile(r"\bsessions?[\s_-]*\d+", re.IGNORECASE)),
    ("a machine the work ran on before",
     re.compile(r"\b(?:previous|earlier|former|old|current),?\s+(?:\w+,?\s+)?machines?\b", re.IGNORECASE)),
    ("a change of machine", re.compile(r"\bmachine\s+changed\b", re.IGNORECASE)),
    ("a draft, run or session from before", re.compile(r"\bearlier\s+(?:drafts?|sessions?|runs?|machines?)\b", re.IGNORECASE)),
    ("figures that were not re-run",
     re.compile(r"\b(?:was|were|been|is|are)\s+not\s+(?:yet\s+)?(?:re-?run|re-?measured|repeated)\s+(?:with|on|since|after|here|for)\b"
                r"|\(not\s+re-?run\b|\bnot\s+(?:re-?run|repeated)\s+(?:with|on|since|after)\b", re.IGNORECASE)),
]


def violations(relpath: str, text: str) -> list[tuple[int, str, str]]:
    """(line number, rule, line) for every violation in one file's text."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for rule, pattern in OUTSIDE + HISTORY:
            for match in pattern.finditer(line):
                if relpath in SHARED_DATA_ALLOWED and line[match.start():].startswith(".." + "/shared/data"):
                    continue
                found.append((number, rule, line.strip()))
                break
    return found


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p]


def read_text(path: Path) -> str | None:
    """The file's text, or None for a binary file (NUL bytes or not UTF-8) or one deleted from the work tree."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_no_tracked_file_names_outside_paths_or_work_history():
    files = tracked_files()
    assert "tests/test_repo_guard.py" in files or len(files) > 10, "git ls-files found no tracked files"
    report = []
    checked = 0
    for rel in files:
        text = read_text(ROOT / rel)
        if text is None:
            continue
        checked += 1
        report += [f"{rel}:{n}: {rule}: {line[:160]}" for n, rule, line in violations(rel, text)]
    assert checked > 10
    assert not report, f"{len(report)} violation(s):\n" + "\n".join(report)


def test_guard_catches_an_absolute_path_in_a_recipe(tmp_path):
    recipe = (ROOT / "recipes" / "smollm2" / "draft.yaml").read_text()
    assert violations("recipes/smollm2/draft.yaml", recipe) == []
    bad_dir = "/" + "work/x"
    edited = re.sub(r"(?m)^output_dir:.*$", f"output_dir: {bad_dir}", recipe)
    assert edited != recipe
    copy = tmp_path / "draft.yaml"
    copy.write_text(edited)
    found = violations("recipes/smollm2/draft.yaml", copy.read_text())
    assert [(rule, line) for _, rule, line in found] == [("absolute path of a development machine",
                                                          f"output_dir: {bad_dir}")]
    line_no = edited.splitlines().index(f"output_dir: {bad_dir}") + 1
    assert found[0][0] == line_no
    for bad in ("/" + "root/models/x", "/" + "home/me/data.json", "/" + "Users/me/run", "~" + "/artifacts/draft"):
        assert violations("recipes/smollm2/dpo.yaml", f"draft: {bad}\n"), bad


def test_guard_catches_shared_paths_outside_ci():
    line = "export SPECALIGN_DATA=" + ".." + "/shared/data"
    assert violations(".ci/run", line) == []
    assert len(violations("README.md", line)) == 1
    assert len(violations(".ci/run", "cp x " + ".." + "/shared/other")) == 1
    assert len(violations("docs/x.md", "see " + "DESIGN" + ".md")) == 1


@pytest.mark.parametrize("line", [
    "in sess" + "ion 3 we measured it",
    "(Sess" + "ion 4's run.)",
    "on the prev" + "ious, faster mach" + "ine it reached 0.46",
    "the prev" + "ious machine",
    "measured with the earl" + "ier draft",
    "these figures were not re-" + "run with the new draft",
    "(not re-" + "run on this machine)",
    "then the mach" + "ine changed again",
    "the run below was not rep" + "eated with the new draft",
    "measured on the curr" + "ent machine",
])
def test_guard_catches_work_history(line):
    assert len(violations("docs/example.md", f"ok line\n{line}\n")) == 1


@pytest.mark.parametrize("line", [
    "weights are cached under ~/.cache/specalign",
    "prompts already recorded there are not re-run; entries they lack are added",
    "specalign train draft --config recipes/smollm2/draft.yaml --output_dir outputs/smollm2/draft",
    "see https://github.com/huggingface/transformers/blob/main/README.md",
    "the previous decision's scores",
    "2-core CPU, no GPU",
    "put a proxy that authenticates in front of it before letting other machines reach it",
    "on a faster machine the ratio stays the same",
])
def test_guard_allows_ordinary_text(line):
    assert violations("docs/example.md", line) == []
