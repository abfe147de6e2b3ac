"""Sampling settings and the processed next-token distribution (temperature, top-k, top-p).

The warpers are transformers' own logits processors, so "processed" means what ``generate``
means. ``temperature == 0`` is greedy: the processed distribution is one-hot at the argmax.
Speculative generators apply the same processing to draft and target, so they stay exact for
the processed target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from ..errors import SpecError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise SpecError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise SpecError(f"top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SpecError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def warpers(self) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if not self.greedy and self.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k > 0:
            procs.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            procs.append(TopPLogitsWarper(self.top_p))
        return procs


def processed_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probabilities of the processed distribution, shape of ``logits`` (any leading dims)."""
    shape = logits.shape
    flat = logits.reshape(-1, shape[-1]).float()
    if params.greedy:
        out = torch.full_like(flat, float("-inf"))
        out.scatter_(1, flat.argmax(-1, keepdim=True), 0.0)
        return out.reshape(shape)
    warpers = params.warpers()
    if len(warpers):
        flat = warpers(None, flat)
    return torch.log_softmax(flat, dim=-1).reshape(shape)


def sample(logprobs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logprobs`` (B, V) -> (B,)."""
    return sample_from(logprobs.exp(), generator)


def uniform(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """Uniforms drawn on the generator's device (a CPU stream serves a CUDA batch: same seed, same draws)."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, dtype=dtype, device=where).to(device)


def sample_from(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of unnormalised non-negative weights (B, V) -> (B,).

    Inverse-CDF sampling in float64: one uniform per row, so a (128, 49152) batch costs ~4 ms where
    ``torch.multinomial`` (an exponential draw per vocabulary entry) costs ~140 ms on this CPU. A token of
    weight 0 is never drawn (the first cumulative weight strictly above u is taken)."""
    cum = probs.to(torch.float64).cumsum(-1)
    u = uniform((cum.shape[0], 1), generator, cum.device, torch.float64) * cum[:, -1:]
    return torch.searchsorted(cum, u, right=True).squeeze(-1).clamp_(max=cum.shape[-1] - 1)
