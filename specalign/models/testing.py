"""Tiny random models and a character tokenizer, built from configs (never downloaded).

Used by unit tests and smoke runs: ``tiny_llama(vocab_size=16)`` gives a model whose next-token
distributions are small enough to check exactly; ``char_tokenizer()`` gives a real fast
tokenizer (with a chat template) so text-level code paths run too.
"""

from __future__ import annotations

import string

import torch

SPECIALS = ["<pad>", "<bos>", "<eos>"]
CHARS = list(string.ascii_letters + string.digits + " .,!?'\n:-")
CHAT_TEMPLATE = ("{% for m in messages %}<bos>{{ m['role'] }}:{{ m['content'] }}<eos>{% endfor %}"
                 "{% if add_generation_prompt %}<bos>assistant:{% endif %}")


def char_tokenizer():
    """A character-level ``PreTrainedTokenizerFast``: 3 specials + 71 characters = 74 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  padding_side="left")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(vocab_size: int = len(SPECIALS) + len(CHARS), hidden_size: int = 32, num_layers: int = 2,
               seed: int = 0, num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 64,
               max_position_embeddings: int = 512, init_scale: float = 1.0, eos_token_id: int | None = 2):
    """A random Llama (fp32, eval mode). ``init_scale`` > 1 makes next-token distributions peakier."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
                         bos_token_id=1, eos_token_id=eos_token_id, pad_token_id=0, tie_word_embeddings=False,
                         initializer_range=0.02 * init_scale)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def perturbed_copy(model, scale: float = 0.5, seed: int = 1):
    """A copy of ``model`` with Gaussian noise on the output head: a draft that agrees only partly."""
    import copy
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = other.lm_head.weight
        w.add_(torch.randn(w.shape, generator=gen) * scale * w.std())
    return other
