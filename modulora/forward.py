"""One forward pass shared by training, scoring and generation.

It owns the two things every caller would otherwise get subtly different: position ids from the
attention mask (so left padding works) and the prefix-tuning cache (learned keys and values that
sit before every sequence but take no position).

The prefix here is an attached prefix adapter's, the same for every row
(`modulora.adapters.prefix.Prefix`); the engine puts per-request prefixes in its own cache.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

PREFIX_ATTR = "modulora_prefix"  # the attached prefix adapter's module (`.keys`, `.values` [L, kv, P, hd])


def empty_cache() -> DynamicCache:
    """A cache whose every layer keeps every column. Callers that merge and crop rows (the engine)
    manage the columns themselves; a sliding-window model's own cache layers would drop columns
    and count their own length. The model's attention mask still applies its window."""
    return DynamicCache()


def new_cache(model: torch.nn.Module, batch_size: int) -> DynamicCache:
    """An empty KV cache, or one holding the attached prefix adapter's keys and values for every
    row of the batch."""
    cache = empty_cache()
    prefix = getattr(model, PREFIX_ATTR, None)
    if prefix is not None:
        dtype = next(model.parameters()).dtype
        for layer in range(prefix.keys.shape[0]):
            k = prefix.keys[layer].unsqueeze(0).expand(batch_size, -1, -1, -1)
            v = prefix.values[layer].unsqueeze(0).expand(batch_size, -1, -1, -1)
            cache.update(k.to(dtype), v.to(dtype), layer)
    return cache


def _prefix_mask(model: torch.nn.Module, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """The attention mask's columns for the prefix slots in the cache (None without a prefix)."""
    prefix = getattr(model, PREFIX_ATTR, None)
    if prefix is None:
        return None
    return attention_mask.new_ones(attention_mask.shape[0], prefix.keys.shape[-2])


def forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            cache: DynamicCache | None = None, positions: torch.Tensor | None = None,
            **kwargs) -> tuple[torch.Tensor, DynamicCache]:
    """Logits for `input_ids` and the updated cache.

    `attention_mask` covers every token seen so far in this sequence (earlier steps and this one),
    not the prefix; rows may be left padded. `positions` [b, t], when given, are the position ids
    of this forward's tokens (a caller that keeps per-row prefixes in the cache as ordinary
    columns knows them); by default they count the real tokens of `attention_mask`.
    """
    b, t = input_ids.shape
    if cache is None:
        cache = new_cache(model, b)
    mask = attention_mask
    prefix_mask = _prefix_mask(model, attention_mask)
    if prefix_mask is not None:
        mask = torch.cat([prefix_mask, attention_mask], dim=1)
    if positions is None:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                past_key_values=cache, use_cache=True, **kwargs)
    return out.logits, cache
