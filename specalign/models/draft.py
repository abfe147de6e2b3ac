"""Draft construction: a small causal LM that shares the target's tokenizer.

``build_draft(target, "spread:6")`` makes a new model of the target's class with 6 of its decoder
layers (chosen by ``layer_indices``) and copies of its embeddings, final norm and output head, so it
starts as a truncated target and speaks the same vocabulary. ``acceptance(target, draft, ...)``
measures what speculative decoding gains from it: the mean over response positions of
sum_v min(p, q) = 1 - TV(p, q), the probability that a drafted token is accepted.

Layer choices (``how``):
- ``first:K``  layers 0..K-1;
- ``spread:K`` K layers evenly spread from the first to the last (e.g. 0, 6, 12, 17, 23, 29 of 30);
- ``layers:0,6,12`` explicit indices (ascending, unique).
"""

from __future__ import annotations

import copy

import torch

from ..errors import SpecError

DRAFT_HELP = "first:K, spread:K, layers:I,J,... or a model spec (a small model of the same vocabulary)"


def num_layers(model) -> int:
    return int(model.config.num_hidden_layers)


def layer_indices(how: str, total: int) -> list[int]:
    """Indices of the target layers a draft keeps, from ``first:K``, ``spread:K`` or ``layers:I,J,...``."""
    kind, _, arg = how.partition(":")
    if kind == "layers":
        try:
            idx = [int(x) for x in arg.split(",") if x.strip()]
        except ValueError:
            raise SpecError(f"bad draft layers '{how}': write layers:0,6,12 (integers)") from None
        if not idx or sorted(set(idx)) != idx or idx[0] < 0 or idx[-1] >= total:
            raise SpecError(f"bad draft layers '{how}': give ascending unique indices in [0, {total - 1}]")
        return idx
    if kind not in ("first", "spread"):
        raise SpecError(f"bad draft layer choice '{how}': use {DRAFT_HELP}")
    try:
        k = int(arg)
    except ValueError:
        raise SpecError(f"bad draft layer choice '{how}': K must be an integer, e.g. spread:6") from None
    if not 1 <= k <= total:
        raise SpecError(f"draft of {k} layers from a target of {total}: choose K in [1, {total}]")
    if kind == "first":
        return list(range(k))
    if k == 1:
        return [0]
    return sorted({round(i * (total - 1) / (k - 1)) for i in range(k)})


def _layers(model):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise SpecError(f"cannot cut layers from a {type(model).__name__}: draft construction needs a decoder with "
                        "model.layers (Llama, Mistral, Qwen, ...); pass an existing small model as the draft instead")
    return layers


def build_draft(target, how: str = "spread:6"):
    """A new model of the target's class with the chosen layers and copies of embeddings/norm/head (fp32)."""
    total = num_layers(target)
    _layers(target)
    keep = layer_indices(how, total)
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:  # per-layer attention kinds (sliding / full)
        config.layer_types = [config.layer_types[i] for i in keep]
    config.draft_of = {"layers": keep, "target_layers": total, "how": how}
    draft = type(target)(config).to(torch.float32)
    source = target.state_dict()
    state = {}
    for name, tensor in source.items():
        parts = name.split(".")
        if "layers" in parts:
            at = parts.index("layers")
            old = int(parts[at + 1])
            if old not in keep:
                continue
            parts[at + 1] = str(keep.index(old))
        state[".".join(parts)] = tensor.detach().clone().float()
    missing, unexpected = draft.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise RuntimeError(f"draft weights do not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        draft.tie_weights()
    draft.eval()
    return draft


def check_same_vocab(target, draft, target_tok=None, draft_tok=None) -> None:
    """A draft must share the target's vocabulary (size and, when both tokenizers are given, tokens)."""
    tv = target.get_output_embeddings().weight.shape[0]
    dv = draft.get_output_embeddings().weight.shape[0]
    if tv != dv:
        raise SpecError(f"draft vocabulary ({dv}) differs from the target's ({tv}): use a draft with the target's "
                        "tokenizer, or build one from the target (first:K / spread:K)")
    if target_tok is not None and draft_tok is not None and target_tok.get_vocab() != draft_tok.get_vocab():
        raise SpecError("draft tokenizer differs from the target's: use a draft trained with the target's tokenizer")


def _padded(seqs: list[list[int]], pad_id: int):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def response_logits(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int = 0):
    """Logits predicting each response token, (B, R, V) right-aligned with left padding, and the (B, R) mask.

    Position j of row i predicts response token j (of a response right-aligned to width R).
    """
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    ids, mask = _padded(seqs, pad_id)
    device = next(model.parameters()).device
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    width_r = max(len(r) for r in responses)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                logits_to_keep=width_r + 1).logits[:, :-1]
    rmask = torch.zeros(len(seqs), width_r, dtype=torch.bool)
    for i, r in enumerate(responses):
        rmask[i, width_r - len(r):] = True
    return out, rmask.to(device)


def acceptance(target, draft, prompts: list[list[int]], responses: list[list[int]], pad_id: int = 0,
               batch_size: int = 8, temperature: float = 1.0, progress: bool = False) -> dict:
    """Mean of sum_v min(p, q) over all response positions (p = target, q = draft, at ``temperature``).

    Returns ``{"acceptance": mean, "positions": count, "per_position": [mean at response position 0, 1, ...]}``.
    """
    return acceptance_many(target, {"draft": draft}, prompts, responses, pad_id, batch_size, temperature,
                           progress)["draft"]


@torch.inference_mode()
def acceptance_many(target, drafts: dict, prompts: list[list[int]], responses: list[list[int]], pad_id: int = 0,
                    batch_size: int = 8, temperature: float = 1.0, progress: bool = False) -> dict:
    """``acceptance`` for several drafts against one target forward per batch: {name: result}."""
    from tqdm.auto import tqdm
    total = {name: 0.0 for name in drafts}
    count = 0
    by_pos = {name: {} for name in drafts}
    by_pos_n: dict[int, int] = {}
    order = [i for i in range(len(responses)) if responses[i]]
    for start in tqdm(range(0, len(order), batch_size), desc="acceptance", disable=not progress):
        idx = order[start:start + batch_size]
        b_prompts, b_resp = [prompts[i] for i in idx], [responses[i] for i in idx]
        lp, mask = response_logits(target, b_prompts, b_resp, pad_id)
        p = torch.softmax(lp.float() / temperature, -1)
        del lp
        count += int(mask.sum())
        width = mask.shape[1]
        for row, i in enumerate(idx):
            for j in range(len(responses[i])):
                by_pos_n[j] = by_pos_n.get(j, 0) + 1
        for name, draft in drafts.items():
            lq, _ = response_logits(draft, b_prompts, b_resp, pad_id)
            acc = torch.minimum(p, torch.softmax(lq.float().to(p.device) / temperature, -1)).sum(-1)  # (B, R)
            del lq
            total[name] += float(acc[mask].sum())
            for row, i in enumerate(idx):
                n = len(responses[i])
                for j, a in enumerate(acc[row, width - n:].tolist()):
                    by_pos[name][j] = by_pos[name].get(j, 0.0) + a
    return {name: {"acceptance": total[name] / max(count, 1), "positions": count,
                   "per_position": [by_pos[name][j] / by_pos_n[j] for j in sorted(by_pos_n)]} for name in drafts}
