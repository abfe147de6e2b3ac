"""A value head on the target's own final hidden state: E[final score | prefix] at no extra forward.

While the target generates, every running row's last-layer state (the final norm's output, which its
LM head turns into the next-token logits) is computed anyway. After k response tokens that state
summarises prompt + prefix; a small MLP on it predicts the final score of the whole response:

    v(prefix) = s_k + MLP([h_k, h_0, log(1 + k), s_k])      (residual; or MLP(...) alone)

with h_k the state after the k-th response token, h_0 the state after the prompt (the prompt's
baseline), and s_k the learned scorer on the partial text (optional). With ``residual`` the MLP
learns a correction to s_k and starts at zero (its last layer zero-initialised), so an untrained or
early-stopped head ranks exactly like the scorer on partial text. Features and target are
standardised with the training set's statistics (kept in the head). ``TargetValueScorer`` (``--scorer value:DIR`` on such a directory) reads h_k / h_0 from the
candidates the sampling generator hands it (``SamplingGenerator.track_hidden``); finished rows score
the learned scorer's final score, so all candidates compete on one scale. It costs no target position.

A head directory holds ``target_value.json`` (base model, its fingerprint, the scorer, sizes) and
``target_value.safetensors``.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from torch import nn

from ..errors import SpecError
from .scorers import Candidate, Scorer

META = "target_value.json"
WEIGHTS = "target_value.safetensors"


def is_target_value_dir(directory) -> bool:
    return (Path(directory) / META).is_file()


def model_fingerprint(model) -> str:
    """A short digest of the weights the head reads through (the final norm and the first embedding rows),
    so a head is never applied to another model's states."""
    from .loading import final_norm
    norm = final_norm(model).weight.detach().float().cpu()
    emb = model.get_input_embeddings().weight[:4].detach().float().cpu()
    values = torch.cat([norm.flatten(), emb.flatten()]).round(decimals=2).numpy().tobytes()
    return hashlib.sha1(values).hexdigest()[:16]


class TargetValueHead(nn.Module):
    def __init__(self, hidden_size: int, width: int = 256, partial: bool = True, residual: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        if residual and not partial:
            raise SpecError("a residual value head corrects the partial score: it needs partial=True")
        self.hidden_size, self.width, self.partial, self.residual = hidden_size, width, partial, residual
        dim = 2 * hidden_size + 1 + int(partial)
        self.net = nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, width),
                                 nn.GELU(), nn.Dropout(dropout), nn.Linear(width, 1))
        if residual:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)
        self.register_buffer("x_mean", torch.zeros(dim))
        self.register_buffer("x_std", torch.ones(dim))
        self.register_buffer("y_mean", torch.zeros(()))
        self.register_buffer("y_std", torch.ones(()))

    def features(self, h: torch.Tensor, h0: torch.Tensor, k: torch.Tensor, partial: torch.Tensor | None) -> torch.Tensor:
        cols = [h.float(), h0.float(), torch.log1p(k.float())[:, None]]
        if self.partial:
            cols.append(partial.float()[:, None])
        return torch.cat(cols, dim=1)

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """What the MLP corrects: the partial score (last feature) for a residual head, else 0."""
        return x[:, -1] if self.residual else torch.zeros_like(x[:, 0])

    def standardize(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Fix the feature / target statistics (the target: y minus the base) from the training set."""
        t = y - self.base(x)
        self.x_mean.copy_(x.mean(0))
        self.x_std.copy_(x.std(0).clamp(min=1e-4))
        self.y_mean.copy_(t.mean())
        self.y_std.copy_(t.std().clamp(min=1e-6))

    def standardized_target(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (y - self.base(x) - self.y_mean) / self.y_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted final score, on the scorer's scale."""
        return self.net((x - self.x_mean) / self.x_std).squeeze(-1) * self.y_std + self.y_mean + self.base(x)

    def save(self, directory, meta: dict) -> None:
        from safetensors.torch import save_file
        directory = Path(directory)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / WEIGHTS))
        (directory / META).write_text(json.dumps({**meta, "hidden_size": self.hidden_size, "width": self.width,
                                                  "partial": self.partial, "residual": self.residual}, indent=2))

    @classmethod
    def load(cls, directory) -> tuple["TargetValueHead", dict]:
        from safetensors.torch import load_file
        directory = Path(directory)
        meta = json.loads((directory / META).read_text())
        head = cls(meta["hidden_size"], meta["width"], meta["partial"], meta.get("residual", False))
        head.load_state_dict(load_file(str(directory / WEIGHTS)))
        return head.eval(), meta


class TargetValueScorer(Scorer):
    """``value:DIR`` for a head on the target's hidden states (see module doc). ``needs_hidden`` asks the
    generator to keep its rows' states; ``cost.positions`` stays 0 (the learned scorer's own cost is added)."""

    needs_hidden = True

    def __init__(self, directory: str, generator_model, max_batch_tokens: int = 16384):
        super().__init__(max_batch_tokens=max_batch_tokens)
        from .scorers import build_scorer
        self.name = f"value:{directory}"
        self.head, self.meta = TargetValueHead.load(directory)
        if generator_model is None:
            raise SpecError(f"value head {directory} reads the target's hidden states: use it with a decoding "
                            "generator (specalign decode / Decoder)")
        size = getattr(generator_model.config, "hidden_size", None)
        if size != self.meta["hidden_size"] or model_fingerprint(generator_model) != self.meta["fingerprint"]:
            raise SpecError(f"value head {directory} was trained on the hidden states of {self.meta['base_model']}, "
                            f"not of this --model: decode with --model {self.meta['base_model']} or train a head "
                            "for this model (specalign train value --features target)")
        self.head.to(next(generator_model.parameters()).device)
        self.final = build_scorer(self.meta["scorer"], max_batch_tokens=max_batch_tokens)

    def _score(self, candidates: list[Candidate]) -> list[float]:
        out = [math.nan] * len(candidates)
        ended = [i for i, c in enumerate(candidates) if c.finished]
        running = [i for i, c in enumerate(candidates) if not c.finished]
        if any("hidden" not in candidates[i].stats for i in running):
            raise SpecError(f"scorer {self.name} ranks running responses by the target's hidden states, and these "
                            "candidates carry none: use the sample generator (it keeps them once track_hidden() "
                            "is called, as Decoder does)")
        for i, s in zip(ended, self.final([candidates[i] for i in ended])):
            out[i] = s
        if running:
            cands = [candidates[i] for i in running]
            partial = torch.tensor(self.final(cands)) if self.head.partial else None
            device = self.head.x_mean.device
            with torch.no_grad():
                x = self.head.features(torch.stack([c.stats["hidden"] for c in cands]).to(device),
                                       torch.stack([c.stats["prompt_hidden"] for c in cands]).to(device),
                                       torch.tensor([len(c.response_ids) for c in cands], device=device),
                                       None if partial is None else partial.to(device))
                values = self.head(x).tolist()
            for i, v in zip(running, values):
                out[i] = v
        return out
