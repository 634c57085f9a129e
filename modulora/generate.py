"""Batched generation with a KV cache and left padding, on whatever adapter is attached."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .data import Example, render_prompt
from .forward import forward


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids, mask


def last_position(ids: torch.Tensor) -> torch.Tensor:
    """`logits_to_keep` for the last position only, as a 1-D index tensor rather than the int 1:
    the model then takes the last hidden states as one contiguous [b, 1, d] copy, so the head is
    one [b, d] x [d, vocab] matmul; the int gives a strided view, which torch multiplies as a
    batched matmul reading the head's weights once per row (with b rows, b times the time)."""
    return torch.tensor([ids.shape[1] - 1])


@torch.inference_mode()
def generate_ids(model, prompts: list[list[int]], eos_id: int, pad_id: int, max_new_tokens: int = 64,
                 temperature: float = 0.0, seed: int = 0) -> list[list[int]]:
    """New token ids for each prompt on whatever adapter is attached; greedy when temperature is
    0. Stops a row at `eos_id`. Finished rows leave the batch (once they are a quarter of it, so
    the KV cache is not copied every step): a batch costs about the sum of its rows' lengths
    rather than its size times the longest. (Routed, streamed or sampled-per-request generation
    is the engine's: `modulora.routing.engine`.)
    """
    ids, mask = left_pad(prompts, pad_id)
    gen = torch.Generator().manual_seed(seed)
    logits, cache = forward(model, ids, mask, logits_to_keep=last_position(ids))
    done = [max_new_tokens <= 0] * len(prompts)
    rows = list(range(len(prompts)))  # the prompt of each batch position
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        keep = [p for p, i in enumerate(rows) if not done[i]]
        if not keep:
            break
        if len(rows) - len(keep) >= max(1, len(rows) // 4):
            idx = torch.tensor(keep)
            cache.batch_select_indices(idx)
            mask, logits = mask[idx], logits[idx]
            rows = [rows[p] for p in keep]
        last = logits[:, -1, :].float()
        if temperature > 0:
            nxt = torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=gen).squeeze(1)
        else:
            nxt = last.argmax(-1)
        for i, tok in zip(rows, nxt.tolist()):
            if not done[i]:
                if tok == eos_id:
                    done[i] = True
                else:
                    out[i].append(tok)
                    done[i] = len(out[i]) >= max_new_tokens
        running = torch.tensor([not done[i] for i in rows])
        if not running.any():
            break
        nxt = torch.where(running, nxt, torch.full_like(nxt, pad_id))
        mask = torch.cat([mask, running.long().unsqueeze(1)], dim=1)
        logits, cache = forward(model, nxt.unsqueeze(1), mask, cache)
    return out


def generate(model, tokenizer, inputs: list[str | Example], max_new_tokens: int = 64, batch_size: int = 16,
             temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Answers for plain prompts (wrapped in the chat template) or Examples, in batches."""
    texts = [render_prompt(tokenizer, x if isinstance(x, Example) else Example("", x, ""))
             for x in inputs]
    answers: list[str] = []
    for start in range(0, len(texts), batch_size):
        chunk = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[start:start + batch_size]]
        for ids in generate_ids(model, chunk, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                max_new_tokens, temperature, seed):
            answers.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return answers


@contextlib.contextmanager
def using_adapter(base, path: str | Path | None):
    """Attach the adapter at `path` (checked against the base) for the duration of a block."""
    if path is None:
        yield base.model
        return
    from .adapters import detach, load_adapter, read_adapter
    from .base import check_fingerprint

    cfg, tensors, card = read_adapter(path)
    if card and card.get("base_fingerprint"):
        check_fingerprint(card["base_fingerprint"], base.fingerprint, what=f"adapter {Path(path).name}")
    load_adapter(base.model, (cfg, tensors, card))
    try:
        yield base.model
    finally:
        detach(base.model)
