"""One forward pass shared by training, scoring and generation.

It owns the two things every caller would otherwise get subtly different: position ids from the
attention mask (so left padding works) and the prefix-tuning cache (learned keys and values that
sit before every sequence but take no position).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

PREFIX_ATTR = "modulora_prefix"  # set on the model by a prefix adapter: `.keys`, `.values` [L, kv, P, hd]


def prefix_length(model: torch.nn.Module) -> int:
    prefix = getattr(model, PREFIX_ATTR, None)
    return 0 if prefix is None else prefix.keys.shape[2]


def new_cache(model: torch.nn.Module, batch_size: int) -> DynamicCache:
    """An empty KV cache, or one holding the attached prefix for every row of the batch."""
    cache = DynamicCache(config=model.config)
    prefix = getattr(model, PREFIX_ATTR, None)
    if prefix is not None:
        dtype = next(model.parameters()).dtype
        for layer in range(prefix.keys.shape[0]):
            k = prefix.keys[layer].unsqueeze(0).expand(batch_size, -1, -1, -1).to(dtype)
            v = prefix.values[layer].unsqueeze(0).expand(batch_size, -1, -1, -1).to(dtype)
            cache.update(k, v, layer)
    return cache


def forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            cache: DynamicCache | None = None, **kwargs) -> tuple[torch.Tensor, DynamicCache]:
    """Logits for `input_ids` and the updated cache.

    `attention_mask` covers every token seen so far in this sequence (earlier steps and this one),
    not the prefix; rows may be left padded.
    """
    b, t = input_ids.shape
    if cache is None:
        cache = new_cache(model, b)
    p = prefix_length(model)
    mask = attention_mask
    if p:
        mask = torch.cat([attention_mask.new_ones(b, p), attention_mask], dim=1)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                past_key_values=cache, use_cache=True, **kwargs)
    return out.logits, cache
