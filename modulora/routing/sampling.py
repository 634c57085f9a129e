"""Choosing each row's next token under its own SamplingParams, and the text a row has made.

`choose` takes one decode step's logits for the running rows and returns their tokens, the
log-probability entries the rows asked for, in one pass: greedy rows by one argmax, sampled
rows by temperature, top-k and top-p over their rows together, then one uniform draw per row
from the row's own generator (so a seeded row draws the same numbers alone or in any batch).

`Text` turns a row's tokens into text as they come: it cuts at the first stop string, and holds
back what could still become one (or an incomplete character), so the pieces it hands out join
to exactly the final text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .requests import SamplingParams, TokenLogprob


@dataclass(eq=False)
class RowSampling:
    """One running sample's sampling state: its params, generator and token counts (penalties)."""

    params: SamplingParams
    generator: torch.Generator | None = None
    counts: dict[int, int] | None = None

    @classmethod
    def new(cls, params: SamplingParams, index: int) -> "RowSampling":
        gen = None
        if not params.greedy:
            gen = torch.Generator()
            gen.manual_seed((params.seed + index) % (2 ** 63) if params.seed is not None
                            else int(torch.randint(0, 2 ** 62, (1,))))
        penal = params.presence_penalty != 0 or params.frequency_penalty != 0
        return cls(params, gen, {} if penal else None)

    def seen(self, token: int) -> None:
        if self.counts is not None:
            self.counts[token] = self.counts.get(token, 0) + 1


def logprob_entries(logp: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """Per row of log-probabilities [n, V]: the given token's entry with the top k alternatives."""
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device).unsqueeze(1)).squeeze(1).tolist()
    if k > 0:
        vals, idx = logp.topk(k, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
    else:
        tops = [[] for _ in tokens]
    return [TokenLogprob(t, c, top) for t, c, top in zip(tokens, chosen, tops)]


def choose(logits: torch.Tensor, rows: list[RowSampling]) -> tuple[list[int], list[TokenLogprob | None]]:
    """Next token per row for logits [rows, V] (float32), and each row's logprob entry (None
    where the row did not ask for logprobs)."""
    n = logits.shape[0]
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    logp = torch.log_softmax(logits[want], dim=-1) if want else None
    penal = [i for i, r in enumerate(rows) if r.counts]
    if penal:
        logits = logits.clone()
        for i in penal:
            p = rows[i].params
            toks = torch.tensor(list(rows[i].counts), device=logits.device)
            cnt = torch.tensor(list(rows[i].counts.values()), dtype=logits.dtype, device=logits.device)
            logits[i, toks] -= p.presence_penalty + p.frequency_penalty * cnt
    tokens = [0] * n
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    if greedy:
        best = (logits if len(greedy) == n else logits[greedy]).argmax(-1).tolist()
        for i, t in zip(greedy, best):
            tokens[i] = t
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        for i, t in zip(sampled, _sample(logits[sampled], [rows[i] for i in sampled])):
            tokens[i] = t
    entries: list[TokenLogprob | None] = [None] * n
    if want:
        k = max(rows[i].params.logprobs for i in want)
        for i, e in zip(want, logprob_entries(logp, [tokens[i] for i in want], k)):
            e.top = e.top[:rows[i].params.logprobs]
            entries[i] = e
    return tokens, entries


def _sample(logits: torch.Tensor, rows: list[RowSampling]) -> list[int]:
    """Temperature, then top-k, then top-p (nucleus), then one draw per row from its generator."""
    temps = torch.tensor([r.params.temperature for r in rows], dtype=logits.dtype, device=logits.device)
    probs = torch.softmax(logits / temps.unsqueeze(1), dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    V = probs.shape[1]
    rank = torch.arange(V, device=probs.device).unsqueeze(0)
    top_k = torch.tensor([r.params.top_k or V for r in rows], device=probs.device).unsqueeze(1)
    top_p = torch.tensor([r.params.top_p for r in rows], dtype=probs.dtype, device=probs.device).unsqueeze(1)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the more likely tokens
    keep = (rank < top_k) & (before < top_p)
    keep[:, 0] = True
    sorted_p = sorted_p * keep
    cum = sorted_p.cumsum(-1)
    draws = torch.cat([torch.rand(1, generator=r.generator) for r in rows]).to(probs)
    pos = torch.searchsorted(cum, (draws * cum[:, -1]).unsqueeze(1)).clamp(max=V - 1)
    # never land on a token the filters dropped (a draw at the very end of the mass)
    pos = torch.minimum(pos, keep.sum(-1, keepdim=True) - 1)
    return order.gather(1, pos).squeeze(1).tolist()


class Text:
    """A sample's text as its tokens arrive, cut at the first stop string (see module docstring)."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tok, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""       # the text so far (cut at a stop string once one is found)
        self.sent = 0        # characters of `text` already handed out
        self.stopped_by: str | None = None

    def add(self, token: int) -> str:
        """Take one token; the new text that is safe to hand out now."""
        self.ids.append(token)
        full = self.tok.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            lo = max(0, self.sent - max(len(s) for s in self.stop))
            hits = [(full.find(s, lo), s) for s in self.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                i, s = min(hits)
                self.text, self.stopped_by = full[:i], s
                return self._emit(len(self.text))
        self.text = full
        safe = len(full)
        if full.endswith("\ufffd"):
            safe = len(full.rstrip("\ufffd"))
        for s in self.stop:  # a tail that could still grow into a stop string waits
            for n in range(min(len(s) - 1, safe), 0, -1):
                if full[:safe].endswith(s[:n]):
                    safe -= n
                    break
        return self._emit(safe)

    def finish(self) -> str:
        """The rest of the text, when the sample ends."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.sent)
        piece = self.text[self.sent:upto]
        self.sent = upto
        return piece


__all__ = ["RowSampling", "choose", "logprob_entries", "Text"]
