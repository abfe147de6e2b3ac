"""The batched KV-cache engine: one model's cache for a batch of rows.

``LMState`` is the only place that calls a model during decoding. It keeps

- ``cache``: a transformers ``DynamicCache`` with one batch row per sequence;
- ``mask``: the 2-D attention mask over cached slots (0 for left padding and for slots a
  speculative block rejected);
- ``lengths``: valid tokens per row, so each row's next position id is its own length.

Operations (all in place, no re-prefill of anything kept):

- ``prefill(rows_of_ids)``: left-padded prefill of ragged prompts; returns last-position logits.
- ``extend(tokens)``: a multi-token forward of (B, L) new tokens; returns (B, L, V) logits.
- ``rollback(keep)``: of the last L slots, row i keeps ``keep[i]``; the rest are masked, and
  columns no row keeps are cropped.
- ``select(idx)``: keep only rows ``idx`` (cache, mask, lengths); ``repeat(n)``: fan out each row n times.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cost import ModelCost, count_params

# The KV cache's keyword and output field: ``cache`` in recent transformers 5.x, ``past_key_values`` before
# (recent versions still take the old name, with a deprecation warning).
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class LMState:
    def __init__(self, model, cost: ModelCost | None = None, pad_id: int = 0, adapter_enabled: bool | None = None):
        self.model = model
        self.cost = cost if cost is not None else ModelCost(params=count_params(model))
        if not self.cost.params:
            self.cost.params = count_params(model)
        self.pad_id = pad_id
        # For a PEFT model: False runs the base model (adapter disabled), one set of weights.
        self.adapter_enabled = adapter_enabled
        self.device = next(model.parameters()).device
        self.reset()

    def reset(self) -> None:
        self.cache = DynamicCache()
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self.lengths = torch.zeros(0, dtype=torch.long, device=self.device)

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def _context(self):
        if self.adapter_enabled is False:
            return self.model.disable_adapter()
        return nullcontext()

    @torch.inference_mode()
    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, logits_to_keep: int = 0):
        # No padding and no rejected slot anywhere: let attention take its plain causal path.
        mask = None if bool(self.mask.all()) else self.mask
        with self.cost.forward(input_ids.numel()), self._context():
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                             use_cache=True, logits_to_keep=logits_to_keep, **{CACHE_FIELD: self.cache})
        self.cache = getattr(out, CACHE_FIELD)
        return out.logits

    def prefill(self, rows: list[list[int]]) -> torch.Tensor:
        """Left-padded prefill of ragged token lists; returns next-token logits (B, V)."""
        self.reset()
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device=self.device)
        self.mask = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            self.mask[i, width - len(r):] = 1
        self.lengths = self.mask.sum(1)
        positions = (self.mask.cumsum(1) - 1).clamp(min=0)
        return self._forward(ids, positions, logits_to_keep=1)[:, -1, :]

    def extend(self, tokens: torch.Tensor, keep_logits: int = 0) -> torch.Tensor:
        """Append (B, L) tokens to every row; returns logits (B, L, V) (the last ``keep_logits`` if > 0)."""
        length = tokens.shape[1]
        positions = self.lengths[:, None] + torch.arange(length, device=self.device)[None, :]
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.batch_size, length)], dim=1)
        self.lengths = self.lengths + length
        return self._forward(tokens.to(self.device), positions, logits_to_keep=keep_logits)

    def rollback(self, keep: torch.Tensor, appended: int) -> None:
        """Of the last ``appended`` slots, row i keeps the first ``keep[i]``; rejected slots are masked out."""
        keep = keep.to(self.device)
        drop = appended - int(keep.max()) if keep.numel() else appended
        if drop > 0:
            self.cache.crop(-drop)
            self.mask = self.mask[:, :-drop]
        width = appended - max(drop, 0)
        if width > 0:
            cols = torch.arange(width, device=self.device)[None, :]
            self.mask[:, -width:] = (cols < keep[:, None]).long()
        self.lengths = self.lengths - appended + keep

    def select(self, idx) -> None:
        """Keep only rows ``idx`` (in that order): cache, mask and lengths; survivors are not recomputed."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.device)
        if idx.numel() == self.batch_size and torch.equal(idx, torch.arange(self.batch_size, device=self.device)):
            return
        if idx.numel() == 0:
            self.reset()
            return
        self.cache.batch_select_indices(idx)
        self.mask = self.mask[idx]
        self.lengths = self.lengths[idx]
        self._trim_left()

    def _trim_left(self) -> None:
        """Drop leading columns that every remaining row masks (padding of rows that left)."""
        if self.mask.shape[1] == 0:
            return
        used = self.mask.any(0)
        first = int(used.float().argmax()) if used.any() else self.mask.shape[1]
        if first > 0:
            for layer in self.cache.layers:
                if getattr(layer, "keys", None) is not None and layer.keys.numel():
                    layer.keys = layer.keys[..., first:, :]
                    layer.values = layer.values[..., first:, :]
            self.mask = self.mask[:, first:]

    def repeat(self, n: int) -> None:
        """Fan out: each row becomes n consecutive identical rows sharing its prefill."""
        if n == 1:
            return
        self.cache.batch_repeat_interleave(n)
        self.mask = self.mask.repeat_interleave(n, dim=0)
        self.lengths = self.lengths.repeat_interleave(n, dim=0)
