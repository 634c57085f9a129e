"""Continuous batching for routed LoRA generation: requests join the running batch between decode
steps and leave it the step they finish, instead of a batch running until its longest row ends.

    engine = ContinuousBatch(base)
    engine.set_experts(expert_set)                     # LoRA experts the rows may use (or None)
    done = engine.add([Job("Peru", {"geo": 1.0}), Job("12 + 3", Arrow(top_k=2))])   # prefill, join
    while engine.rows:
        done += engine.step()                          # one token for every running row

Each row keeps its own route (a dict of LoRA weights, an Arrow spec, or None for the base), mode
and max_new_tokens, as in `generate_routed`. Newcomers are prefilled in one forward of their own
(left padded), then their KV cache is merged into the running one: both are left padded to the
wider of the two and stacked on the batch axis; position ids come from the attention mask
(`modulora.forward`), so a row's positions do not depend on the padding it gets. Finished rows
are dropped from the cache and leading columns that no row uses any more are cut. Greedy only.

The shared chat-template prefix (the system prompt and the turn header, the same tokens before
every request's own text) is computed once per route and kept (`prefix_entries` routes, least
recently used dropped): its keys and values depend on the route, since the LoRA deltas act on
them, so the cache is keyed by the route, its mode and the experts' object ids (for Arrow, every
expert of the set: any of them may win a token). A newcomer then prefills only its own text.

Hooks per job: `on_token(token_id)` as each token is chosen, `should_stop()` before each step (a
reason string ends the row at once: a client that went away, a deadline). Routing reports: the
normalised weights for sequence routes; for Arrow the mean weight per expert over the request's
own prompt text and the tokens it fed back, gathered from each routing plan the row went
through. Unlike `generate_ids`, the token that ends a row at max_new_tokens is not fed back (it
would cost a forward for nothing), so an Arrow report counts one token fewer in that case.

Series, parallel and prefix adapters are not batched here (their hooks and per-row prefixes are
built per fixed batch); `generate_routed` answers those.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..data import Example, render_prompt
from ..forward import PREFIX_ATTR, forward
from ..generate import last_position, left_pad
from .arrow import Arrow
from .experts import ExpertSet, RoutingError, normalise_route
from .layer import MODES, RoutingPlan, install, installed, routing, uninstall


@dataclass(eq=False)  # jobs are compared by identity
class Job:
    """One request in the engine; the engine fills in the fields after `should_stop`."""

    prompt: str
    route: dict[str, float] | Arrow | None = None
    mode: str = "mixture"
    max_new_tokens: int = 64
    on_token: Callable[[int], None] | None = None
    should_stop: Callable[[], str | None] | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (eos), "length", or the reason should_stop gave
    prompt_tokens: int = 0
    reused_prefix: bool = False  # whether the shared template prefix came from the cache
    _ids: list[int] = field(default_factory=list, repr=False)
    _arrow_sums: dict[str, float] = field(default_factory=dict, repr=False)
    _arrow_tokens: float = 0.0
    _modules: int = 1

    @property
    def experts(self) -> dict[str, float]:
        """Expert -> weight the row used (largest first): the route's normalised weights, or for
        Arrow the mean weight over its tokens and modules; {} for the base alone."""
        if self.route is None:
            return {}
        if isinstance(self.route, dict):
            return dict(sorted(normalise_route(self.route, lambda n: None).items(), key=lambda kv: -kv[1]))
        n = self._arrow_tokens * self._modules
        if n <= 0:
            return {}
        pairs = [(k, v / n) for k, v in self._arrow_sums.items() if v > 0]
        return dict(sorted(pairs, key=lambda kv: -kv[1]))


class ContinuousBatch:
    """The running rows of one model, their KV cache, and the shared-prefix cache."""

    def __init__(self, base, prefix_entries: int = 32):
        self.model, self.tok = base.model, base.tokenizer
        self.eos_id, self.pad_id = self.tok.eos_token_id, self.tok.pad_token_id
        self.rows: list[Job] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None      # [rows, T]: 1 where a cached token is real
        self.pending: torch.Tensor | None = None   # [rows]: each row's last token, fed at the next step
        self.plan: RoutingPlan | None = None       # for the running rows, rebuilt when they change
        self.expert_set: ExpertSet | None = None
        marker = "\x00"
        before, _, after = render_prompt(self.tok, Example("", marker, "")).partition(marker)
        self.template = self.tok(before, add_special_tokens=False)["input_ids"] if before else []
        self.n_after = len(self.tok(after, add_special_tokens=False)["input_ids"]) if after else 0
        self.prefix_entries = prefix_entries
        self._prefixes: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.prefix_hits = self.prefix_misses = 0

    # -- experts -----------------------------------------------------------------------------------

    def set_experts(self, expert_set: ExpertSet | None) -> None:
        """Install `expert_set` on the model for the rows to use (None: the base alone). Running
        rows keep going: their routes name experts, which the new set must hold."""
        if expert_set is self.expert_set:
            return
        for j in self.rows:
            if isinstance(j.route, dict):
                missing = [n for n in j.route if expert_set is None or n not in expert_set.names]
                if missing:
                    raise RoutingError(f"a running request uses {missing[0]!r}, which the new expert set lacks")
            elif isinstance(j.route, Arrow) and expert_set is None:
                raise RoutingError("a running request routes by Arrow, and the new expert set is empty")
        self._harvest()
        self.expert_set = expert_set
        self.plan = None
        self.ensure_installed()

    def ensure_installed(self) -> None:
        """Make sure our expert set is the one on the model (another user of the model, such as
        `generate_routed` or a second server in one process, may have changed it)."""
        current = installed(self.model)
        if current is self.expert_set:
            return
        if current is not None:
            uninstall(self.model)
        if self.expert_set is not None:
            install(self.model, self.expert_set)

    def release(self) -> None:
        """Take our expert set off the model (leave it as found); the next step puts it back."""
        if self.expert_set is not None and installed(self.model) is self.expert_set:
            uninstall(self.model)

    # -- joining -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def add(self, jobs: list[Job]) -> list[Job]:
        """Prefill `jobs` and merge them into the running batch; returns those already finished
        (eos or max_new_tokens reached by the first token, max_new_tokens 0, stopped). Every job
        is checked first (mode, max_new_tokens, route against the expert set): RoutingError."""
        if getattr(self.model, PREFIX_ATTR, None) is not None:
            raise RoutingError("a prefix adapter is attached to the model; continuous batching needs none")
        self.ensure_installed()
        for i, j in enumerate(jobs):
            if j.mode not in MODES:
                raise RoutingError(f"request {i}: unknown mode {j.mode!r}; use 'mixture' or 'average'")
            if isinstance(j.max_new_tokens, bool) or not isinstance(j.max_new_tokens, int) or j.max_new_tokens < 0:
                raise RoutingError(f"request {i}: max_new_tokens must be an integer >= 0, got {j.max_new_tokens!r}")
            if j.route is not None:
                if self.expert_set is None:
                    raise RoutingError(f"request {i} routes LoRA experts, and no expert set is installed")
                if isinstance(j.route, Arrow):
                    j.route.candidates(self.expert_set)
                else:
                    self.expert_set.normalise(j.route)
            j._ids = self.tok(render_prompt(self.tok, Example("", j.prompt, "")), add_special_tokens=False)["input_ids"]
            j.prompt_tokens = len(j._ids)
            j._modules = len(self.expert_set.modules) if self.expert_set is not None else 1
        finished = [j for j in jobs if self._stop_reason(j) or j.max_new_tokens == 0]
        for j in finished:
            j.finish_reason = j.finish_reason or "length"
        live = [j for j in jobs if j.finish_reason is None]
        P = len(self.template) if self.prefix_entries > 0 else 0
        with_prefix = [j for j in live if P and len(j._ids) > P and j._ids[:P] == self.template]
        without = [j for j in live if j not in with_prefix]
        for group, reuse in ((with_prefix, True), (without, False)):
            if group:
                finished += self._prefill(group, reuse)
        return finished

    def _prefill(self, jobs: list[Job], reuse: bool) -> list[Job]:
        P = len(self.template) if reuse else 0
        seqs = [j._ids[P:] for j in jobs]
        ids, mask = left_pad(seqs, self.pad_id)
        width = ids.shape[1]
        cache = None
        if reuse:
            entries = self._prefix_entries(jobs)
            cache = DynamicCache(config=self.model.config)
            for layer in range(len(entries[0])):
                cache.update(torch.stack([e[layer][0] for e in entries]), torch.stack([e[layer][1] for e in entries]),
                             layer)
            mask = torch.cat([torch.ones(len(jobs), P, dtype=mask.dtype), mask], dim=1)
        plan = self._plan_for(jobs)
        if plan is not None:  # an Arrow report counts the request's own text, not the template
            spans = []
            for s in seqs:
                lo, hi = width - len(s) + (0 if reuse else len(self.template)), width - self.n_after
                spans.append((lo, hi) if lo < hi else (width - len(s), width))
            plan.content_spans = spans
        with routing(self.model, plan) if plan is not None else contextlib.nullcontext():
            logits, cache = forward(self.model, ids, mask, cache, logits_to_keep=last_position(ids))
        self._harvest_plan(plan, jobs)
        for j in jobs:
            j.reused_prefix = reuse
        first = logits[:, -1, :].float().argmax(-1)
        keep = self._take_tokens(jobs, first)
        finished = [j for i, j in enumerate(jobs) if i not in keep]
        if keep:
            idx = torch.tensor(keep)
            if len(keep) < len(jobs):
                cache.batch_select_indices(idx)
            self._merge([jobs[i] for i in keep], cache, mask[idx], first[idx])
        return finished

    def _take_tokens(self, jobs: list[Job], tokens: torch.Tensor) -> list[int]:
        """Record each job's new token; the indices of the jobs still running."""
        keep = []
        for i, (j, t) in enumerate(zip(jobs, tokens.tolist())):
            if t == self.eos_id:
                j.finish_reason = "stop"
                continue
            j.tokens.append(t)
            if j.on_token is not None:
                j.on_token(t)
            if len(j.tokens) >= j.max_new_tokens:
                j.finish_reason = "length"
            else:
                keep.append(i)
        return keep

    def _merge(self, jobs: list[Job], cache: DynamicCache, mask: torch.Tensor, pending: torch.Tensor) -> None:
        self._harvest()
        if self.cache is None:
            self.rows, self.cache, self.mask, self.pending = list(jobs), cache, mask, pending
            self.plan = None
            return
        width = max(self.mask.shape[1], mask.shape[1])

        def widen(x: torch.Tensor, dim_from_end: int) -> torch.Tensor:
            extra = width - x.shape[-dim_from_end]
            if extra == 0:
                return x
            pad = [0, 0] * (dim_from_end - 1) + [extra, 0]
            return F.pad(x, pad)

        merged = DynamicCache(config=self.model.config)
        for layer, (a, b) in enumerate(zip(self.cache.layers, cache.layers)):
            merged.update(torch.cat([widen(a.keys, 2), widen(b.keys, 2)]),
                          torch.cat([widen(a.values, 2), widen(b.values, 2)]), layer)
        self.cache = merged
        self.mask = torch.cat([widen(self.mask, 1), widen(mask, 1)])
        self.pending = torch.cat([self.pending, pending])
        self.rows = self.rows + list(jobs)
        self.plan = None

    # -- the shared template prefix, per route -----------------------------------------------------

    def _route_key(self, j: Job) -> tuple:
        if j.route is None:
            return ("base",)
        es = self.expert_set

        def oid(name):
            e = es.experts[es.index(name)]
            return e.object_id or f"mem-{id(e)}"

        if isinstance(j.route, Arrow):
            return ("arrow", j.route, j.mode, tuple((n, oid(n)) for n in es.names))
        route = es.normalise(j.route)
        mode = "average" if j.mode == "average" and len(route) > 1 else "mixture"
        return ("seq", mode, tuple(sorted((n, oid(n), round(w, 12)) for n, w in route.items())))

    def _prefix_entries(self, jobs: list[Job]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per job, the template prefix's (keys, values) per layer under its route; missing routes
        are computed together in one forward (every row the same length: no padding)."""
        keys = [self._route_key(j) for j in jobs]
        todo: dict[tuple, Job] = {}
        for k, j in zip(keys, jobs):
            if k in self._prefixes:
                self._prefixes.move_to_end(k)
                self.prefix_hits += 1
            elif k not in todo:
                todo[k] = j
                self.prefix_misses += 1
            else:
                self.prefix_hits += 1
        if todo:
            group = list(todo.values())
            P = len(self.template)
            ids = torch.tensor([self.template] * len(group))
            plan = self._plan_for(group)
            with routing(self.model, plan) if plan is not None else contextlib.nullcontext():
                _, cache = forward(self.model, ids, torch.ones(len(group), P, dtype=torch.long),
                                   logits_to_keep=last_position(ids))
            for r, k in enumerate(todo):
                self._prefixes[k] = [(layer.keys[r].clone(), layer.values[r].clone()) for layer in cache.layers]
        got = {k: self._prefixes[k] for k in set(keys)}
        while len(self._prefixes) > self.prefix_entries:
            self._prefixes.popitem(last=False)
        return [got[k] for k in keys]

    # -- decoding ------------------------------------------------------------------------------------

    @staticmethod
    def _stop_reason(j: Job) -> str | None:
        if j.should_stop is None:
            return None
        reason = j.should_stop()
        if reason:
            j.finish_reason = reason
        return reason

    @torch.inference_mode()
    def step(self) -> list[Job]:
        """Drop rows asked to stop, then one decode step for the rest; returns the finished jobs."""
        finished = [j for j in self.rows if self._stop_reason(j)]
        if finished:
            self._drop([i for i, j in enumerate(self.rows) if j.finish_reason is None])
        if not self.rows:
            return finished
        self.ensure_installed()
        if self.plan is None:
            self.plan = self._plan_for(self.rows)
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        with routing(self.model, self.plan) if self.plan is not None else contextlib.nullcontext():
            logits, self.cache = forward(self.model, self.pending.unsqueeze(1), mask, self.cache)
        self.mask = mask
        nxt = logits[:, -1, :].float().argmax(-1)
        keep = self._take_tokens(self.rows, nxt)
        finished += [j for i, j in enumerate(self.rows) if i not in keep]
        self.pending = nxt
        if len(keep) < len(self.rows):
            self._drop(keep)
        return finished

    def _drop(self, keep: list[int]) -> None:
        """Keep only rows `keep`; cut the leading cache columns no remaining row uses."""
        self._harvest()
        self.plan = None
        if not keep:
            self.rows, self.cache, self.mask, self.pending = [], None, None, None
            return
        idx = torch.tensor(keep)
        self.rows = [self.rows[i] for i in keep]
        self.cache.batch_select_indices(idx)
        self.mask, self.pending = self.mask[idx], self.pending[idx]
        used = self.mask.any(0)
        cut = int(used.to(torch.int8).argmax()) if bool(used.any()) else 0
        if cut:
            self.mask = self.mask[:, cut:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]

    def clear(self, reason: str) -> list[Job]:
        """End every running row with `reason` (after a failure); returns them."""
        rows = self.rows
        for j in rows:
            j.finish_reason = j.finish_reason or reason
        self.rows, self.cache, self.mask, self.pending, self.plan = [], None, None, None, None
        return rows

    # -- routing plans and their reports -----------------------------------------------------------

    def _plan_for(self, jobs: list[Job]) -> RoutingPlan | None:
        if all(j.route is None for j in jobs):
            return None
        return RoutingPlan(self.expert_set, [j.route for j in jobs], [j.mode for j in jobs])

    def _harvest(self) -> None:
        """Move the running plan's Arrow statistics into its jobs before the rows change."""
        self._harvest_plan(self.plan, self.rows)
        self.plan = None

    @staticmethod
    def _harvest_plan(plan: RoutingPlan | None, jobs: list[Job]) -> None:
        if plan is None or not plan.arrows:
            return
        sums = plan.weight_sums
        total = sum(sums.values()) if sums else None  # [rows, E]: summed over modules
        names = plan.expert_set.names
        for i, j in enumerate(jobs):
            if not isinstance(j.route, Arrow):
                continue
            j._arrow_tokens += float(plan.tokens_seen[i])
            if total is not None:
                row = total[i]
                for e in row.nonzero().flatten().tolist():
                    j._arrow_sums[names[e]] = j._arrow_sums.get(names[e], 0.0) + float(row[e])
        plan.weight_sums = {}
        plan.tokens_seen.zero_()


__all__ = ["Job", "ContinuousBatch"]
