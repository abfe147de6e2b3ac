"""A value-head reward model: a causal-LM backbone and a linear head giving a score at every position.

Trained (``specalign train value``) so that the score after each response prefix predicts the final
reward of the full response: a value function of partial responses, which is what Speculative
Rejection needs at its decision points (the SpR paper's suggested future work). One forward over
prompt + response gives the value of every prefix at once.

On disk (a directory): ``config.json`` (the backbone's config), ``model.safetensors`` (backbone
weights as ``backbone.*`` and the head as ``head.weight`` / ``head.bias``), ``value_head.json`` (the
target normalization and format), and the tokenizer. ``ValueHeadModel.from_pretrained(dir)`` loads
it; ``build_scorer("value:DIR")`` gives a ``ValueScorer``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import SpecError
from .scorers import Candidate, Scorer

VALUE_FILE = "value_head.json"


class ValueHeadModel(nn.Module):
    """``backbone`` (a transformers base model, no LM head) + ``head`` (hidden -> 1) at every position."""

    def __init__(self, backbone, target_mean: float = 0.0, target_std: float = 1.0):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.target_mean, self.target_std = float(target_mean), float(target_std)

    @classmethod
    def from_causal_lm(cls, spec: str, dtype="float32", **kw) -> "ValueHeadModel":
        """A fresh head on the body of a causal LM (e.g. the draft); the LM head is dropped."""
        from .loading import load_model
        lm = load_model(spec, dtype, adapter=False)
        body = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
        body.requires_grad_(True)
        return cls(body, **kw)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
        """Normalized values (B, T): the score predicted after reading each token."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)

    def denormalize(self, values: torch.Tensor) -> torch.Tensor:
        return values * self.target_std + self.target_mean

    # -- persistence ------------------------------------------------------------------------
    def describe(self) -> dict:
        return {"format": "specalign-value-head", "version": 1, "target_mean": self.target_mean,
                "target_std": self.target_std, "hidden_size": int(self.config.hidden_size)}

    def save_pretrained(self, directory) -> None:
        from safetensors.torch import save_file
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(directory)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  directory / "model.safetensors", metadata={"format": "pt"})
        (directory / VALUE_FILE).write_text(json.dumps(self.describe(), indent=2))

    @classmethod
    def from_pretrained(cls, directory, dtype="auto", device: str = "auto") -> "ValueHeadModel":
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel

        from .loading import check_device, torch_dtype
        directory = Path(directory)
        meta_file = directory / VALUE_FILE
        if not meta_file.is_file():
            raise SpecError(f"{directory} is not a value-head model (no {VALUE_FILE}): train one with "
                            "`specalign train value`")
        meta = json.loads(meta_file.read_text())
        config = AutoConfig.from_pretrained(directory)
        model = cls(AutoModel.from_config(config), meta["target_mean"], meta["target_std"])
        state = load_file(directory / "model.safetensors")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise SpecError(f"value model {directory} does not match its config (missing {missing[:2]}, unexpected "
                            f"{unexpected[:2]}): re-save it with `specalign train value`")
        model.to(device=check_device(device), dtype=torch_dtype(dtype, device)).eval()
        model.requires_grad_(False)
        return model


def value_sequences(tokenizer, prompt_ids: list[int], response_ids: list[int], with_eos: bool):
    """Prompt + response (+ EOS when the response ended with it): the sequence a value model reads."""
    eos = [tokenizer.eos_token_id] if with_eos and tokenizer.eos_token_id is not None else []
    return list(prompt_ids) + list(response_ids) + eos


@torch.inference_mode()
def prefix_values(model: ValueHeadModel, seqs: list[list[int]], starts: list[int], pad_id: int = 0,
                  max_batch_tokens: int = 16384) -> list[list[float]]:
    """Denormalized values after each response prefix: row i gets len(seq) - starts[i] + 1 values
    (prefix length 0 = after the prompt, ..., the whole sequence), in one forward per batch."""
    out: list[list[float]] = [[] for _ in seqs]
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    batch: list[int] = []

    def flush(batch):
        width = max(len(seqs[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, width - len(seqs[i]):] = torch.tensor(seqs[i], dtype=torch.long)
            mask[row, width - len(seqs[i]):] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        values = model.denormalize(model(ids.to(device), mask.to(device), positions.to(device)).float())
        for row, i in enumerate(batch):
            first = width - len(seqs[i]) + starts[i] - 1  # the last prompt token: prefix length 0
            out[i] = values[row, first:].tolist()

    for i in order:
        if batch and (len(batch) + 1) * max(len(seqs[j]) for j in batch + [i]) > max_batch_tokens:
            flush(batch)
            batch = []
        batch.append(i)
    if batch:
        flush(batch)
    return out


class ValueScorer(Scorer):
    """``value:DIR``: the value of each (partial) response, every candidate of a batch in one forward.

    Candidates' token ids are used directly when the value model shares the generator's tokenizer
    (checked by re-encoding the prompt once); otherwise the texts are re-tokenized.
    """

    def __init__(self, directory: str, dtype="auto", device: str = "auto", max_batch_tokens: int = 16384):
        super().__init__(max_batch_tokens=max_batch_tokens)
        from .loading import prepare_tokenizer
        from transformers import AutoTokenizer
        self.name = f"value:{directory}"
        self.model = ValueHeadModel.from_pretrained(directory, dtype, device)
        self.tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(directory))
        self._prompt_cache: dict[str, list[int]] = {}

    def _prompt_ids(self, prompt: str) -> list[int]:
        from .loading import chat_prompt
        if prompt not in self._prompt_cache:
            self._prompt_cache[prompt] = chat_prompt(self.tokenizer, prompt)
        return self._prompt_cache[prompt]

    def encode(self, c: Candidate) -> tuple[list[int], int]:
        """(sequence, response start) for one candidate, reusing its ids when the tokenizers agree."""
        prompt_ids = self._prompt_ids(c.prompt)
        if c.prompt_ids and list(c.prompt_ids) == prompt_ids:
            response = list(c.response_ids)
        else:
            response = self.tokenizer(c.response, add_special_tokens=False)["input_ids"]
        ended = c.reason == "eos" if c.reason is not None else c.finished
        return value_sequences(self.tokenizer, prompt_ids, response, ended), len(prompt_ids)

    def score_prefixes(self, candidates: list[Candidate]) -> list[list[float]]:
        """Every prefix's value per candidate (index j = after j response tokens)."""
        encoded = [self.encode(c) for c in candidates]
        seqs = [e[0] for e in encoded]
        self.cost.positions += sum(len(s) for s in seqs)
        return prefix_values(self.model, seqs, [e[1] for e in encoded], self.tokenizer.pad_token_id or 0,
                             self.max_batch_tokens)

    def _score(self, candidates):
        return [values[-1] for values in self.score_prefixes(candidates)]
