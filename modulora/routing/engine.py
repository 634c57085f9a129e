"""The engine: the one owner of a routed base model. Requests in, answers out.

    engine = Engine(base, library)                       # once per base model
    answers = engine.run([EngineRequest("Peru", {"geo": 1.0}, params=SamplingParams(max_tokens=8))])
    ids = engine.encode_chat([{"role": "system", "content": "..."}, {"role": "user", "content": "Peru"}])
    answers = engine.run([EngineRequest(ids, {"geo": 1.0})])      # token ids are used as they are

or, as a server does, step by step (continuous batching):

    done = engine.add(requests)          # check the newcomers, prefill them (within one chunk's tokens)
    while engine.busy:
        done += engine.step()            # one token for every running sample, then the next chunk
    # done: (request, Answer) pairs

It installs the multi-expert layers on the model once, over the LoRA experts' preallocated slots
(`slots.ExpertSlots`, kept by `resident.ResidentExperts`: loading copies into a free slot,
evicting frees it), encodes (raw text, or a whole chat through the tokenizer's template), plans
the routes of the running rows, prefills newcomers (the shared chat-template prefix is computed
once per route and reused), steps one token for every row, samples per row (`sampling.choose`),
and scores prompts (log-probabilities of every prompt token: `modulora eval --loglik` and the
server's `echo` read the same numbers).

A request with n > 1 samples is prefilled once; its KV cache row is then copied n times. Rows
join between two decode steps and leave the step they finish; their KV caches are left padded to
a common width and stacked; position ids count each row's real tokens (a prefix adapter's leading
cache columns take none), so padding never changes a row's answer.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..compute import CPU_FP32
from ..data import Example, render_prompt
from ..forward import PREFIX_ATTR, empty_cache, forward
from ..generate import last_position, left_pad
from .arrow import Arrow
from .experts import RoutingError, normalise_route
from .family import FamilyPlan, PrefixExpert, prefix_block, split_route
from .layer import MODES, RoutingPlan, install, installed, routing, uninstall
from .requests import Answer, EngineRequest, Sample, TokenEvent, TokenLogprob, TokenRouting
from .resident import ResidentExperts
from .sampling import RowSampling, Text, choose, logprob_entries


@dataclass(eq=False)
class _Pending:
    """A request's state while any of its samples runs."""

    req: EngineRequest
    samples: list[Sample | None]
    ids: list[int] = field(default_factory=list)  # the prompt's token ids
    span: tuple[int, int] | None = None           # the request's own tokens among them
    lora: object = None          # the route the multi-expert layer gets (LoRA weights, Arrow, None)
    family: dict | None = None   # a series / parallel mixture, applied by hooks
    prefix: PrefixExpert | None = None  # a prefix adapter: its keys and values lead the row's cache
    prompt_logprobs: list[TokenLogprob | None] | None = None
    arrow_sums: dict[str, float] = field(default_factory=dict)
    module_sums: dict[str, dict[str, float]] = field(default_factory=dict)  # explain: per module
    arrow_tokens: float = 0.0
    modules: list[str] = field(default_factory=list)
    req_family_experts: dict = field(default_factory=dict)  # the family experts of `family`, by name
    left: int = 0  # samples still running

    def answer(self) -> Answer:
        return Answer(samples=list(self.samples), prompt_tokens=len(self.ids),
                      experts=self.experts(), per_layer=self.per_layer(), prompt_logprobs=self.prompt_logprobs)

    def per_layer(self) -> dict[str, dict[str, float]] | None:
        """module -> expert -> mean weight, when the request asked to explain."""
        if not self.req.explain:
            return None
        route = self.req.route
        if route is None:
            return {m: {} for m in self.modules}
        if isinstance(route, dict):
            sites = self.modules if self.family is None else sorted(
                {s for n in self.family for s in getattr(self.req_family_experts.get(n), "down", ())})
            return {m: self.experts() for m in sites}
        n = self.arrow_tokens
        return {m: dict(sorted(((e, v / n) for e, v in self.module_sums.get(m, {}).items() if v > 0 and n > 0),
                               key=lambda kv: -kv[1])) for m in self.modules}

    def experts(self) -> dict[str, float]:
        route = self.req.route
        if route is None:
            return {}
        if isinstance(route, dict):  # checked when the request was added
            return dict(sorted(normalise_route(route, lambda n: None).items(), key=lambda kv: -kv[1]))
        n = self.arrow_tokens * max(1, len(self.modules))
        pairs = [(k, v / n) for k, v in self.arrow_sums.items() if v > 0] if n > 0 else []
        return dict(sorted(pairs, key=lambda kv: -kv[1]))


@dataclass(eq=False)
class _Row:
    """One running sample."""

    pending: _Pending
    index: int
    sampling: RowSampling
    text: Text
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish: str | None = None
    stop: str | int | None = None
    routing: list[TokenRouting] | None = None  # per token, when the request asked


@dataclass(eq=False)
class _Prefill:
    """Prompts being prefilled together, a chunk of columns at a time (`Engine.prefill_chunk`)."""

    group: list[_Pending]
    seqs: list[list[int]]        # the token ids fed (after a shared template prefix)
    ids: torch.Tensor            # [b, W], left padded
    mask: torch.Tensor           # [b, lead + W]: the cache's leading columns (template, prefix adapter), then ids'
    positions: torch.Tensor      # [b, W]
    offset: torch.Tensor         # [b]: leading cache columns that take no position (prefix adapters)
    spans: list[tuple[int, int]]  # each row's own tokens, in ids' columns (Arrow reports count only those)
    cache: DynamicCache | None
    shared: bool                 # the cache starts with the shared chat-template prefix
    done: int = 0                # columns of ids fed so far
    last: torch.Tensor | None = None  # logits of the last column fed [b, V]

    @property
    def width(self) -> int:
        return self.ids.shape[1]


class Engine:
    """The routed model of one base, its running rows and their KV cache (see module docstring).

    `library` (optional) is where named LoRA experts are loaded from, at most `max_resident` at
    once (None: no bound); `use_experts` loads given experts instead (tests, benchmarks).
    `prefill_chunk` bounds the prompt tokens fed between two decode steps: a long prompt is
    prefilled a chunk per step, so the running rows wait at most one chunk's time for their next
    token, and a prompt's activations (and its prompt logits) are held one chunk at a time.
    """

    def __init__(self, base, library=None, max_resident: int | None = None, prefix_entries: int = 32,
                 prefill_chunk: int = 512):
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be at least 1 token")
        self.base, self.model, self.tok = base, base.model, base.tokenizer
        self.eos_id, self.pad_id = self.tok.eos_token_id, self.tok.pad_token_id
        self.device = device = next(self.model.parameters()).device
        self.compute = getattr(base, "compute", CPU_FP32)  # the autocast every forward runs under
        self.experts = ResidentExperts(library, base.fingerprint, capacity=max_resident, device=device)
        self.rows: list[_Row] = []
        self.prefilling: list[_Prefill] = []       # admitted prompts not yet fully prefilled, in order
        self.prefill_chunk = self._budget = prefill_chunk  # _budget: prompt tokens left before the next decode
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None      # [rows, T]: 1 where a cached token is real
        self.pending: torch.Tensor | None = None   # [rows]: each row's last token, fed at the next step
        self.offset: torch.Tensor | None = None    # [rows]: cache columns of a row's prefix adapter (no position)
        self.family: dict = {}                     # name -> series / parallel / prefix expert (`use_family`)
        self.plan: RoutingPlan | None = None       # for the running rows; None when they change
        self.family_plan: FamilyPlan | None = None
        self._plan_version = -1
        self._wrapped = 0  # modules of the slots wrapped on the model
        marker = "\x00"
        before, _, after = render_prompt(self.tok, Example("", marker, "")).partition(marker)
        self.template = self.tok(before, add_special_tokens=False)["input_ids"] if before else []
        self.n_after = len(self.tok(after, add_special_tokens=False)["input_ids"]) if after else 0
        self.prefix_entries = prefix_entries
        self._prefixes: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.prefix_hits = self.prefix_misses = 0
        self._longest_token: int | None = None  # UTF-8 bytes of the vocabulary's longest token (least_tokens)

    # -- encoding ------------------------------------------------------------------------------

    def encode_text(self, text: str) -> list[int]:
        """Raw text to token ids, as the tokenizer adds special tokens by default (a BOS where
        the model wants one); no template."""
        return self.tok(text)["input_ids"]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """A whole message list through the tokenizer's chat template, ready for the answer."""
        if not getattr(self.tok, "chat_template", None):
            raise RoutingError("this base model's tokenizer has no chat template; use raw completions")
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode_prompt(self, prompt: str) -> tuple[list[int], tuple[int, int]]:
        """One user prompt as the adapters were trained on it (`data.render_prompt`), and the
        span of its own tokens (without the template around it)."""
        ids = self.tok(render_prompt(self.tok, Example("", prompt, "")), add_special_tokens=False)["input_ids"]
        lo, hi = len(self.template), len(ids) - self.n_after
        return ids, ((lo, hi) if 0 <= lo < hi and ids[:lo] == self.template else (0, len(ids)))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    # -- experts -------------------------------------------------------------------------------

    def use_experts(self, experts: list, exclusive: bool = False) -> None:
        """Load these LoRA experts into the slots (an expert object already there is kept, a
        same-named other one replaced). `exclusive`: evict every other expert too, so routes that
        choose among all loaded experts (Arrow) choose among exactly these."""
        if exclusive:
            if self.busy:
                raise RoutingError("the engine is serving other requests; cannot replace its experts")
            keep = {e.name for e in experts}
            for name in self.experts.slots.loaded():
                if name not in keep:
                    self.experts._evict(name, counted=False)
        self.experts.put(experts)
        self._sync_layers()

    def use_family(self, experts: dict) -> None:
        """Make series, parallel and prefix adapters (name -> expert, `family.load_family`)
        routable, beside those already known (same names are replaced)."""
        self.family.update(experts)

    def ensure_experts(self, names: set[str], pins: dict[str, tuple[int, str]] | None = None) -> None:
        """Make the named library experts resident (the versions in `pins` where given), beside
        the ones the running rows and prefills use."""
        self.experts.ensure(names, self.pinned(), pins)
        self._sync_layers()

    def pinned(self) -> set[str]:
        """The experts the running rows use (Arrow rows: every loaded expert)."""
        names: set[str] = set()
        for p in self._row_pendings() + [p for pf in self.prefilling for p in pf.group]:
            route = p.lora
            if isinstance(route, Arrow):
                names |= set(self.experts.slots.loaded())
            elif isinstance(route, dict):
                names |= set(route)
        return names

    def _sync_layers(self) -> None:
        """Our layers on the model: installed once, later only modules new to the slots. (Another
        engine over the same model object, as two test servers in one process have, takes its
        own back before it runs.)"""
        slots = self.experts.slots
        if self._wrapped == len(slots.A) and (not slots.A or self._owns_layers()):
            return  # the per-step fast path: one module looked up
        current = installed(self.model)
        if current is not None and current is not slots:
            uninstall(self.model)
        if slots.A:
            install(self.model, slots)
        self._wrapped = len(slots.A)

    def _owns_layers(self) -> bool:
        layer = self.model.get_submodule(next(iter(self.experts.slots.A)))
        return getattr(layer, "router", None) is not None and layer.router.expert_set is self.experts.slots

    # -- joining ---------------------------------------------------------------------------------

    def check(self, req: EngineRequest) -> None:
        """RoutingError naming what is wrong with a request, before any work."""
        if req.mode not in MODES:
            raise RoutingError(f"unknown mode {req.mode!r}; use 'mixture' or 'average'")
        req.params.validate()
        ids, _ = self._prompt(req)
        if not ids:
            raise RoutingError("the prompt has no tokens")
        vocab = self.model.config.vocab_size
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise RoutingError(f"prompt token ids must be integers in [0, {vocab})")
        self.check_length(len(ids), req.params.max_tokens)
        self._split(req)

    def check_length(self, n: int, max_tokens: int, at_least: bool = False) -> None:
        """RoutingError if a prompt of `n` tokens (`at_least`: n is a lower bound) and `max_tokens`
        new ones pass the model's context."""
        context = getattr(self.model.config, "max_position_embeddings", None)
        if context and n + max_tokens > context:
            raise RoutingError(f"the prompt has {'at least ' if at_least else ''}{n} tokens and max_tokens is "
                               f"{max_tokens}: together more than this model's context of {context} tokens; "
                               "shorten the prompt or ask for fewer tokens")

    def least_tokens(self, text: str) -> int:
        """A lower bound on the tokens of `text`, found without tokenizing it (its UTF-8 bytes over
        the longest token's), so that a huge prompt is refused at once."""
        if self._longest_token is None:
            self._longest_token = max(len(t.encode("utf-8", "surrogatepass")) for t in self.tok.get_vocab())
        return -(-len(text.encode("utf-8", "surrogatepass")) // max(1, self._longest_token))

    def _prompt(self, req: EngineRequest) -> tuple[list[int], tuple[int, int] | None]:
        """A request's token ids and own span (text is rendered as adapters are trained)."""
        if isinstance(req.prompt, str):
            return self.encode_prompt(req.prompt)
        if not isinstance(req.prompt, (list, tuple)):
            raise RoutingError(f"a prompt is text or a list of token ids, got {type(req.prompt).__name__}")
        return list(req.prompt), req.content_span

    def _split(self, req: EngineRequest) -> tuple:
        """(LoRA route, family route, prefix expert) of a request; RoutingError if it cannot run."""
        slots = self.experts.slots
        lora, fam = split_route(req.route, req.mode, slots if slots.loaded() else None, self.family)
        if isinstance(lora, Arrow):
            lora.candidates(slots)
        prefix = None
        if fam is not None and isinstance(self.family[next(iter(fam))], PrefixExpert):
            prefix, fam = self.family[next(iter(fam))], None
        return lora, fam, prefix

    @torch.inference_mode()
    def add(self, requests: list[EngineRequest]) -> list[tuple[EngineRequest, Answer]]:
        """Check and prefill `requests`, merge their samples into the running batch; returns the
        requests already finished (max_tokens 0, eos at once, stopped). RoutingError for a bad
        request (none of them is started then)."""
        if getattr(self.model, PREFIX_ATTR, None) is not None:
            raise RoutingError("a prefix adapter is attached to the model; the engine needs none")
        for i, r in enumerate(requests):
            try:
                self.check(r)
            except RoutingError as e:
                raise RoutingError(f"request {i}: {e}" if len(requests) > 1 else str(e)) from None
        self._sync_layers()
        done: list[tuple[EngineRequest, Answer]] = []
        live = []
        for r in requests:
            lora, fam, prefix = self._split(r)
            ids, span = self._prompt(r)
            p = _Pending(r, [None] * r.params.n, ids=ids, span=span, lora=lora, family=fam, prefix=prefix,
                         left=r.params.n,
                         modules=self.experts.slots.modules,
                         req_family_experts={n: self.family[n] for n in (fam or {})})
            reason = r.should_stop() if r.should_stop is not None else None
            if reason:
                p.samples = [Sample(i, [], "", reason) for i in range(r.params.n)]
                done.append((r, p.answer()))
            else:
                live.append(p)
        P = len(self.template) if self.prefix_entries > 0 else 0
        reuse = [p for p in live if P and not p.req.params.prompt_logprobs and p.prefix is None
                 and len(p.ids) > P and p.ids[:P] == self.template]
        rest = [p for p in live if p not in reuse]
        for group, shared in ((reuse, True), (rest, False)):
            for part in self._chunkable(group, P if shared else 0):
                self.prefilling.append(self._prefill(part, shared))
        return done + self._prefill_some()

    @property
    def busy(self) -> bool:
        """Whether rows run or prompts wait to be prefilled."""
        return bool(self.rows or self.prefilling)

    @property
    def load(self) -> int:
        """Samples running or being prefilled (what a batch bound counts)."""
        return len(self.rows) + sum(p.req.params.n for pf in self.prefilling for p in pf.group)

    def _chunkable(self, group: list[_Pending], skip: int) -> list[list[_Pending]]:
        """`group` in order, cut so that each part's padded prompt tokens fit one chunk (a longer
        prompt is a part alone, prefilled over several steps)."""
        parts: list[list[_Pending]] = []
        width = 0
        for p in group:
            n = len(p.ids) - skip
            if parts and max(width, n) * (len(parts[-1]) + 1) <= self.prefill_chunk:
                parts[-1].append(p)
                width = max(width, n)
            else:
                parts.append([p])
                width = n
        return parts

    def _prefill(self, group: list[_Pending], shared: bool) -> _Prefill:
        """Set up a group's prefill: padded ids, mask, positions and the cache it starts from
        (the shared template prefix, or prefix adapters' keys and values)."""
        P = len(self.template) if shared else 0
        seqs = [p.ids[P:] for p in group]
        ids, mask = (t.to(self.device) for t in left_pad(seqs, self.pad_id))
        width = ids.shape[1]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        if shared:
            cache, lead = self._template_cache(group), mask.new_ones(len(group), P)
            positions = positions + P
        else:
            cache, lead = self._prefix_cache(group)
        offset = mask.new_zeros(len(group), dtype=torch.long) if shared or lead is None else lead.sum(1)
        full_mask = mask if lead is None else torch.cat([lead.to(mask), mask], dim=1)
        spans = []  # an Arrow report counts the request's own text, not the template
        for p, seq in zip(group, seqs):
            lo, hi = p.span or (P, len(p.ids))
            lo, hi = max(lo - P, 0), max(hi - P, 0)
            spans.append((width - len(seq) + lo, width - len(seq) + hi) if lo < hi else (width - len(seq), width))
        for p in group:  # from the start (again, when a group was cut)
            p.prompt_logprobs = [None] if p.req.params.prompt_logprobs else None  # the first token has none
            p.arrow_sums, p.module_sums, p.arrow_tokens = {}, {}, 0.0
        return _Prefill(group, seqs, ids, full_mask, positions, offset, spans, cache, shared)

    def _prefill_some(self) -> list[tuple[EngineRequest, Answer]]:
        """Feed waiting prompts, in order, within the tokens left before the next decode step
        (all of `prefill_chunk` when no row runs: nobody waits then); finished prefills join."""
        if not self.rows:
            self._budget = self.prefill_chunk
        done: list[tuple[EngineRequest, Answer]] = []
        while self.prefilling and self._budget > 0:
            pf = self.prefilling[0]
            cols = min(pf.width - pf.done, max(1, self._budget // len(pf.group)))
            self._budget -= cols * len(pf.group)
            done += self._advance(pf, cols)
        return done

    def _advance(self, pf: _Prefill, cols: int) -> list[tuple[EngineRequest, Answer]]:
        """Feed the next `cols` columns of a prefill; when its prompts are done, their samples start."""
        c0, c1 = pf.done, pf.done + cols
        plan, family = self._plans_for(pf.group)
        if plan is not None:
            plan.content_spans = [(min(max(lo - c0, 0), cols), min(max(hi - c0, 0), cols)) for lo, hi in pf.spans]
        full = any(p.req.params.prompt_logprobs for p in pf.group)
        ids = pf.ids[:, c0:c1]
        lead = pf.mask.shape[1] - pf.width
        with self._applied(plan, family):
            logits, pf.cache = forward(self.model, ids, pf.mask[:, :lead + c1], pf.cache,
                                       positions=pf.positions[:, c0:c1],
                                       logits_to_keep=0 if full else last_position(ids))
        self._harvest(plan, pf.group)
        logits = logits.float()
        if full:
            self._prompt_logprobs(pf, logits, c0, c1)
        pf.done, pf.last = c1, logits[:, -1, :]
        if pf.done < pf.width:
            return []
        self.prefilling.remove(pf)
        return self._start_samples(pf.group, pf.last, pf.cache, pf.mask, pf.offset)

    def _start_samples(self, group: list[_Pending], last: torch.Tensor, cache: DynamicCache, mask: torch.Tensor,
                       offset: torch.Tensor) -> list[tuple[EngineRequest, Answer]]:
        """Each request's n samples take their first token from its prompt's logits; the ones
        still running join the batch (the prompt's cache row copied per sample)."""
        expand = [i for i, p in enumerate(group) for _ in range(p.req.params.n)]
        rows = [_Row(p, s, RowSampling.new(p.req.params, s), Text(self.tok, p.req.params.stop),
                     logprobs=[] if p.req.params.logprobs is not None else None,
                     routing=[] if p.req.token_routing else None)
                for p in group for s in range(p.req.params.n)]
        for r in rows:
            if r.pending.req.params.max_tokens == 0:
                r.finish = "length"
        active = [i for i, r in enumerate(rows) if r.finish is None]
        routing = [TokenRouting(rows[i].pending.experts()) if rows[i].routing is not None else None for i in active]
        keep = self._take([rows[i] for i in active], last[[expand[i] for i in active]], routing)
        kept = [active[i] for i in keep]
        finished = self._finish([r for r in rows if r.finish is not None])
        if kept:
            order = [expand[i] for i in kept]
            idx = torch.tensor(order, device=self.device)
            if order != list(range(len(group))):
                cache.batch_select_indices(idx)
            nxt = torch.tensor([rows[i].tokens[-1] for i in kept], device=self.device)
            self._merge([rows[i] for i in kept], cache, mask[idx], nxt, offset[idx])
        return finished

    def _template_cache(self, group: list[_Pending]) -> DynamicCache:
        """A cache holding each request's shared template prefix (computed once per route)."""
        entries = self._prefix_entries(group)
        cache = empty_cache()
        for layer in range(len(entries[0])):
            cache.update(torch.stack([e[layer][0] for e in entries]), torch.stack([e[layer][1] for e in entries]),
                         layer)
        return cache

    def _prefix_cache(self, group: list[_Pending]) -> tuple[DynamicCache | None, torch.Tensor | None]:
        """For requests with prefix adapters: a cache whose leading columns hold each row's
        prefix keys and values (right-aligned, the rest masked), and that mask; else (None, None)."""
        rp = prefix_block(self.model, [p.prefix for p in group])
        if rp is None:
            return None, None
        cache = empty_cache()
        dtype = next(self.model.parameters()).dtype
        for layer in range(rp.keys.shape[0]):
            cache.update(rp.keys[layer].to(dtype), rp.values[layer].to(dtype), layer)
        return cache, rp.row_mask

    def _prompt_logprobs(self, pf: _Prefill, logits: torch.Tensor, c0: int, c1: int) -> None:
        """Append the log-probabilities of the prompt tokens in columns (c0, c1] given the tokens
        before them: logits [b, c1 - c0, V] of this chunk, column c0's from the chunk before."""
        for row, (p, seq) in enumerate(zip(pf.group, pf.seqs)):
            if not p.req.params.prompt_logprobs:
                continue
            first = pf.width - len(seq) + 1  # the first scored column: the prompt's second token
            k = p.req.params.logprobs or 0
            if pf.last is not None and c0 >= first:
                p.prompt_logprobs += logprob_entries(torch.log_softmax(pf.last[row:row + 1], -1),
                                                     [int(pf.ids[row, c0])], k)
            lo = max(first, c0 + 1)
            if lo < c1:
                logp = torch.log_softmax(logits[row, lo - 1 - c0:c1 - 1 - c0], dim=-1)
                p.prompt_logprobs += logprob_entries(logp, pf.ids[row, lo:c1].tolist(), k)

    def _take(self, rows: list[_Row], logits: torch.Tensor,
              routing: list[TokenRouting | None] | None = None) -> list[int]:
        """Choose and record each row's next token (and, where asked, the experts that made it);
        the indices of the rows still running."""
        if not rows:
            return []
        tokens, entries = choose(logits, [r.sampling for r in rows])
        routing = routing or [None] * len(rows)
        keep = []
        for i, (r, t, e, how) in enumerate(zip(rows, tokens, entries, routing)):
            params = r.pending.req.params
            r.tokens.append(t)
            if r.logprobs is not None:
                r.logprobs.append(e)
            if r.routing is not None:
                r.routing.append(how)
            if (t == self.eos_id and not params.ignore_eos) or t in params.stop_token_ids:
                # the end token is an output token (its logprob too, as lm-eval's loglikelihood
                # reads it), but adds no text
                r.finish = "stop"
                r.stop = t if t in params.stop_token_ids else None
                if r.pending.req.on_token is not None:
                    r.pending.req.on_token(TokenEvent(r.index, t, "", e, how))
                continue
            r.sampling.seen(t)
            piece = r.text.add(t)
            if r.text.stopped_by is not None:
                r.finish, r.stop = "stop", r.text.stopped_by
            elif len(r.tokens) >= params.max_tokens:
                r.finish = "length"
            if r.pending.req.on_token is not None:
                r.pending.req.on_token(TokenEvent(r.index, t, piece, e, how))
            if r.finish is None:
                keep.append(i)
        return keep

    def _finish(self, rows: list[_Row]) -> list[tuple[EngineRequest, Answer]]:
        """Turn finished rows into samples; the requests whose last sample this was."""
        done = []
        for r in rows:
            p = r.pending
            rest = r.text.finish()
            if rest and p.req.on_token is not None:
                p.req.on_token(TokenEvent(r.index, -1, rest, None))
            p.samples[r.index] = Sample(r.index, r.tokens, r.text.text, r.finish, r.logprobs, r.stop, r.routing)
            p.left -= 1
            if p.left == 0:
                done.append((p.req, p.answer()))
        return done

    def _merge(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor, pending: torch.Tensor,
               offset: torch.Tensor) -> None:
        self._harvest(self.plan, self._row_pendings())
        self.plan = self.family_plan = None
        if self.cache is None:
            self.rows, self.cache, self.mask, self.pending, self.offset = list(rows), cache, mask, pending, offset
            return
        width = max(self.mask.shape[1], mask.shape[1])

        def widen(x: torch.Tensor, dim_from_end: int) -> torch.Tensor:
            extra = width - x.shape[-dim_from_end]
            return x if extra == 0 else F.pad(x, [0, 0] * (dim_from_end - 1) + [extra, 0])

        merged = empty_cache()
        for layer, (a, b) in enumerate(zip(self.cache.layers, cache.layers)):
            merged.update(torch.cat([widen(a.keys, 2), widen(b.keys, 2)]),
                          torch.cat([widen(a.values, 2), widen(b.values, 2)]), layer)
        self.cache = merged
        self.mask = torch.cat([widen(self.mask, 1), widen(mask, 1)])
        self.pending = torch.cat([self.pending, pending])
        self.offset = torch.cat([self.offset, offset])
        self.rows = self.rows + list(rows)

    # -- the shared template prefix, per route ---------------------------------------------------

    def _route_key(self, p: _Pending) -> tuple:
        req = p.req
        if req.route is None:
            return ("base",)
        if p.family is not None:
            return ("family", tuple(sorted((n, p.req_family_experts[n].object_id or f"mem-{id(p.req_family_experts[n])}",
                                            round(w, 12)) for n, w in p.family.items())))
        slots = self.experts.slots

        def oid(name):
            e = slots.experts[slots.index(name)]
            return e.object_id or f"mem-{id(e)}"

        if isinstance(req.route, Arrow):
            return ("arrow", req.route, req.mode, tuple((n, oid(n)) for n in slots.loaded()))
        route = slots.normalise(req.route)
        mode = "average" if req.mode == "average" and len(route) > 1 else "mixture"
        return ("seq", mode, tuple(sorted((n, oid(n), round(w, 12)) for n, w in route.items())))

    def _prefix_entries(self, group: list[_Pending]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per request, the template prefix's (keys, values) per layer under its route; missing
        routes are computed together in one forward (every row the same length: no padding)."""
        keys = [self._route_key(p) for p in group]
        todo: dict[tuple, _Pending] = {}
        for k, p in zip(keys, group):
            if k in self._prefixes:
                self._prefixes.move_to_end(k)
                self.prefix_hits += 1
            elif k not in todo:
                todo[k] = p
                self.prefix_misses += 1
            else:
                self.prefix_hits += 1
        if todo:
            pend = list(todo.values())
            ids = torch.tensor([self.template] * len(pend), device=self.device)
            with self._applied(*self._plans_for(pend)):
                _, cache = forward(self.model, ids, torch.ones_like(ids),
                                   logits_to_keep=last_position(ids))
            for r, k in enumerate(todo):
                self._prefixes[k] = [(layer.keys[r].clone(), layer.values[r].clone()) for layer in cache.layers]
        got = {k: self._prefixes[k] for k in set(keys)}
        while len(self._prefixes) > self.prefix_entries:
            self._prefixes.popitem(last=False)
        return [got[k] for k in keys]

    # -- decoding ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[tuple[EngineRequest, Answer]]:
        """Drop rows and prefills whose request asks to stop, then one decode step for the rest
        and a chunk of the waiting prompts; returns the requests that finished."""
        asked: dict[int, str | None] = {}

        def reason(req: EngineRequest) -> str | None:
            if req.should_stop is not None and id(req) not in asked:
                asked[id(req)] = req.should_stop()
            return asked.get(id(req))

        for r in self.rows:
            r.finish = reason(r.pending.req) or r.finish
        done = self._finish([r for r in self.rows if r.finish is not None])
        if done or any(r.finish for r in self.rows):
            self._drop([i for i, r in enumerate(self.rows) if r.finish is None])
        for pf in [pf for pf in self.prefilling if any(reason(p.req) for p in pf.group)]:
            self.prefilling.remove(pf)  # a group stops whole; the others are started again
            done += self._end([p for p in pf.group if reason(p.req)], asked)
            rest = [p for p in pf.group if not reason(p.req)]
            if rest:
                self.prefilling.insert(0, self._prefill(rest, pf.shared))
        if self.rows:
            done += self._decode()
            self._budget = self.prefill_chunk
        return done + self._prefill_some()

    def _end(self, pendings: list[_Pending], reasons: dict[int, str | None]) -> list[tuple[EngineRequest, Answer]]:
        """Answer requests that stopped before their first token (every sample with the reason)."""
        for p in pendings:
            p.samples = [Sample(i, [], "", reasons[id(p.req)]) for i in range(p.req.params.n)]
        return [(p.req, p.answer()) for p in pendings]

    def _decode(self) -> list[tuple[EngineRequest, Answer]]:
        """One token for every running row."""
        self._sync_layers()
        if self.plan is None and self.family_plan is None or self._plan_version != self.experts.slots.version:
            self._harvest(self.plan, self._row_pendings())
            self.plan, self.family_plan = self._plans_for(self._row_pendings())
            self._plan_version = self.experts.slots.version
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        positions = (mask.sum(1, keepdim=True) - 1 - self.offset.unsqueeze(1)).clamp(min=0)
        with self._applied(self.plan, self.family_plan):
            logits, self.cache = forward(self.model, self.pending.unsqueeze(1), mask, self.cache, positions=positions)
        self.mask = mask
        routing = self._step_routing() if any(r.routing is not None for r in self.rows) else None
        keep = self._take(self.rows, logits[:, -1, :].float(), routing)
        done = self._finish([r for r in self.rows if r.finish is not None])
        self.pending = torch.tensor([r.tokens[-1] if r.tokens else self.pad_id for r in self.rows], device=self.device)
        if len(keep) < len(self.rows):
            self._drop(keep)
        return done

    def _step_routing(self) -> list[TokenRouting | None]:
        """Per running row that asked: the experts of the step just taken (an Arrow row's weights
        of this one token, per layer and averaged; a sequence route's own weights). Arrow's
        statistics are moved into the requests every step then, so each step reads its own."""
        plan = self.plan
        sums = plan.weight_sums if plan is not None and plan.arrows else {}
        names = plan.expert_set.names if sums else []
        out: list[TokenRouting | None] = []
        for i, r in enumerate(self.rows):
            if r.routing is None:
                out.append(None)
            elif isinstance(r.pending.lora, Arrow) and sums:
                layers: dict[int, torch.Tensor] = {}
                for m, t in sums.items():
                    key = layer_of(m)
                    layers[key] = layers.get(key, 0) + t[i]
                per_layer = [v / max(float(v.sum()), 1e-12) for _, v in sorted(layers.items())]
                mean = sum(per_layer) / len(per_layer)
                out.append(TokenRouting(named(mean, names), [named(v, names) for v in per_layer]))
            else:
                out.append(TokenRouting(r.pending.experts()))
        self._harvest(plan, self._row_pendings())
        return out

    def _drop(self, keep: list[int]) -> None:
        """Keep only rows `keep`; cut the leading cache columns no remaining row uses."""
        self._harvest(self.plan, self._row_pendings())
        self.plan = self.family_plan = None
        if not keep:
            self.rows, self.cache, self.mask, self.pending, self.offset = [], None, None, None, None
            return
        idx = torch.tensor(keep, device=self.device)
        self.rows = [self.rows[i] for i in keep]
        self.cache.batch_select_indices(idx)
        self.mask, self.pending, self.offset = self.mask[idx], self.pending[idx], self.offset[idx]
        used = self.mask.any(0)
        cut = int(used.to(torch.int8).argmax()) if bool(used.any()) else 0
        if cut:
            self.mask = self.mask[:, cut:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]

    def clear(self, reason: str) -> list[tuple[EngineRequest, Answer]]:
        """End every running row and waiting prefill with `reason` (after a failure); returns
        their requests."""
        for r in self.rows:
            r.finish = r.finish or reason
        done = self._finish(self.rows)
        waiting = [p for pf in self.prefilling for p in pf.group]
        self.prefilling = []
        done += self._end(waiting, {id(p.req): reason for p in waiting})
        self.rows, self.cache, self.mask, self.pending, self.offset = [], None, None, None, None
        self.plan = self.family_plan = None
        return done

    def run(self, requests: list[EngineRequest], max_batch: int = 16) -> list[Answer]:
        """Answers for `requests`, in order, at most `max_batch` samples running at once."""
        for i, r in enumerate(requests):
            try:
                self.check(r)
            except RoutingError as e:
                raise RoutingError(f"request {i}: {e}") from None
        if self.busy:
            raise RoutingError("the engine is serving other requests; use add/step")
        answers: dict[int, Answer] = {}
        queue = list(requests)
        try:
            while queue or self.busy:
                room = max_batch - self.load
                take = []
                while queue and (not take and not self.busy or room >= queue[0].params.n):
                    room -= queue[0].params.n
                    take.append(queue.pop(0))
                done = self.add(take) if take else []
                done += self.step()
                for req, a in done:
                    answers[id(req)] = a
        finally:
            self.clear("error")
        return [answers[id(r)] for r in requests]

    # -- routing plans and their reports -----------------------------------------------------------

    def _row_pendings(self) -> list[_Pending]:
        return [r.pending for r in self.rows]

    def _plans_for(self, pendings: list[_Pending]) -> tuple[RoutingPlan | None, FamilyPlan | None]:
        """The LoRA routing plan and the bottleneck hooks' plan of these rows (None: not needed)."""
        plan = None
        if any(p.lora is not None for p in pendings):
            plan = RoutingPlan(self.experts.slots, [p.lora for p in pendings], [p.req.mode for p in pendings])
        family = None
        if any(p.family is not None for p in pendings):
            family = FamilyPlan(self.model, [p.family for p in pendings], self.family)
        return plan, family

    def _applied(self, plan: RoutingPlan | None, family: FamilyPlan | None):
        """The context of one forward: the base's autocast, the routing plan, the bottleneck hooks."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.compute.autocast())
        if plan is not None:
            stack.enter_context(routing(self.model, plan))
        if family is not None:
            stack.enter_context(family.applied(self.model))
        return stack

    @staticmethod
    def _harvest(plan: RoutingPlan | None, pendings: list[_Pending]) -> None:
        """Move a plan's Arrow statistics into its requests before its rows change."""
        if plan is None or not plan.arrows:
            return
        sums = plan.weight_sums
        total = sum(sums.values()) if sums else None  # [rows, E]: summed over modules
        names = plan.expert_set.names
        for i, p in enumerate(pendings):
            if not isinstance(p.lora, Arrow):
                continue
            p.arrow_tokens += float(plan.tokens_seen[i])
            if total is not None:
                row = total[i]
                for e in row.nonzero().flatten().tolist():
                    p.arrow_sums[names[e]] = p.arrow_sums.get(names[e], 0.0) + float(row[e])
            if p.req.explain:
                for m, t in sums.items():
                    mine = p.module_sums.setdefault(m, {})
                    for e in t[i].nonzero().flatten().tolist():
                        mine[names[e]] = mine.get(names[e], 0.0) + float(t[i, e])
        plan.weight_sums = {}
        plan.tokens_seen.zero_()

    def release(self) -> None:
        """Take the multi-expert layers off the model (leave it as found)."""
        if installed(self.model) is self.experts.slots:
            uninstall(self.model)


def layer_of(module: str) -> int:
    """The transformer layer index in a module path (`model.layers.3.self_attn.q_proj` -> 3)."""
    for part, nxt in zip(module.split("."), module.split(".")[1:]):
        if part in ("layers", "h", "blocks", "layer") and nxt.isdigit():
            return int(nxt)
    return -1


def named(weights: torch.Tensor, names: list[str | None]) -> dict[str, float]:
    """{expert: weight} of a weight vector over slots, largest first, zeros left out."""
    pairs = [(names[j], float(weights[j])) for j in weights.nonzero().flatten().tolist() if names[j]]
    return dict(sorted(pairs, key=lambda kv: -kv[1]))


__all__ = ["Engine"]
