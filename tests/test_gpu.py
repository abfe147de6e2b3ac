"""On CUDA (``pytest -m gpu``; skipped where no CUDA device is present): Best-of-N, Speculative
Rejection and SSS on the bundled SmolLM2, through the default ``--device auto``, decode greedily to
exactly what ``transformers``' ``generate`` gives (float32, so batched and unbatched arithmetic agree).
SSS uses a freshly initialised LoRA adapter over a 2-layer cut of the target: Qr = Q0, so the tilted
target is the target itself."""

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pytest -m gpu)")]

PROMPT = "Write a kind note to a friend."
NEW = 24


@pytest.fixture(scope="module")
def target():
    from specalign.models.loading import chat_prompt, load_model, load_tokenizer
    model = load_model("smollm2-135m-instruct", dtype="float32")  # device auto
    assert next(model.parameters()).device.type == "cuda"
    tok = load_tokenizer("smollm2-135m-instruct")
    ids = chat_prompt(tok, PROMPT)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=NEW, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return model, tok, tok.decode(out[0, len(ids):], skip_special_tokens=True)


@pytest.fixture(scope="module")
def adapter_dir(target, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from specalign.models.draft import build_draft
    model, tok, _ = target
    root = tmp_path_factory.mktemp("gpu-draft")
    draft = build_draft(model, "layers:0,29")
    draft.save_pretrained(root / "draft")
    tok.save_pretrained(root / "draft")
    peft = get_peft_model(draft, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft.save_pretrained(root / "adapter")
    peft.peft_config["default"].base_model_name_or_path = str(root / "draft")
    peft.peft_config["default"].save_pretrained(root / "adapter")
    tok.save_pretrained(root / "adapter")
    return str(root / "adapter")


@pytest.mark.parametrize("method,extra", [("best-of-n", {"n": 3}),
                                          ("spec-rejection", {"n": 4, "alpha": "0.5", "decision": "tokens:8"}),
                                          ("sss", {"gamma": 3})])
def test_greedy_decoding_on_cuda_equals_generate(target, adapter_dir, method, extra):
    from specalign.decode import DecodeConfig, Decoder
    from specalign.decode.generators import SamplingGenerator
    model, tok, expected = target
    config = DecodeConfig(method=method, temperature=0.0, max_new_tokens=NEW, dtype="float32", seed=0,
                          scorer="judge:sentiment", draft=adapter_dir if method == "sss" else None, **extra)
    assert config.device == "auto"
    if method == "sss":
        decoder = Decoder(config)
    else:
        generator = SamplingGenerator(model, tok, config.sampling, NEW)
        decoder = Decoder(config, generator=generator)
    record = decoder.run([PROMPT], progress=False)[0]
    assert record["response"] == expected
    assert record["cost"]["target"]["positions"] > 0 and record["cost"]["wall_s"] > 0
