"""Heterogeneous batches: requests that each want different experts, answered together in one
left-padded, KV-cached, greedy generation in which every row follows its own route.

    answers = generate_routed(base, expert_set, [
        Request("What is the capital of France?", {"geo": 1.0}),
        Request("Add 2 and 3.", Arrow(top_k=4)),
        Request("Reverse 'abc'.", {"strings": 0.5, "lists": 0.5}, mode="average"),
        Request("Hello!", None),                       # the base model alone
    ], explain=True)
    answers[1].experts     # mean Arrow weight per expert over the request's tokens and modules
    answers[1].per_layer   # the same per module (explain=True)

Routes may also name series, parallel or prefix adapters, given as `others` (see family.py):
bottleneck adapters mix by output, a prefix adapter is selected per request.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from ..data import Example, render_prompt
from ..generate import generate_ids
from .arrow import Arrow
from .experts import ExpertSet, RoutingError
from .family import FamilyPlan, split_route
from .layer import MODES, RoutingPlan, install, installed, routing, uninstall


@dataclass
class Request:
    prompt: str
    route: dict[str, float] | Arrow | None = None  # names LoRA experts, or the `others` of one family
    mode: str = "mixture"  # "mixture": sum_e w_e B_e A_e x; "average": (sum w B)(sum w A) x
    max_new_tokens: int = 64
    prompt_ids: list[int] | None = None  # the prompt as token ids, used as given (no template)


@dataclass
class RoutedAnswer:
    text: str
    experts: dict[str, float]  # expert -> weight (sequence route) or mean weight (Arrow); {} = base
    per_layer: dict[str, dict[str, float]] | None = None  # module -> expert -> mean weight (explain)
    token_ids: list[int] | None = None  # the generated tokens (no eos)
    finish_reason: str | None = None  # "stop" (eos), "length" (max_new_tokens) or "stopped" (should_stop)
    prompt_tokens: int = 0  # tokens of the rendered prompt


def generate_routed(base, expert_set: ExpertSet | None, requests: list[Request], batch_size: int = 16,
                    explain: bool = False, others: dict | None = None,
                    on_token: Callable[[int, int], None] | None = None,
                    should_stop: Callable[[int], bool] | None = None) -> list[RoutedAnswer]:
    """Greedy answers, in order, `batch_size` requests per batched generation.

    Hooks (optional, for streaming servers): `on_token(i, token_id)` is called as request i's
    tokens are chosen, and `should_stop(i)` before every decode step; True stops request i there
    (finish_reason "stopped", its text so far kept) and its row costs nothing more.

    `others` maps names of series, parallel and prefix adapters to their experts (`load_family`);
    `expert_set` (the LoRA experts) may be None when no request routes LoRA.
    Every request is checked before any work (unknown experts, bad weights, bad Arrow settings,
    unknown modes, experts of different families in one request -> RoutingError). Routing is
    installed on `base.model` for the call unless this expert set already is; the model is left
    as it was found.
    """
    if batch_size < 1:
        raise RoutingError(f"batch_size must be at least 1, got {batch_size}")
    for i, r in enumerate(requests):
        if not isinstance(r, Request):
            raise RoutingError(f"request {i} is a {type(r).__name__}, not a Request")
        if r.mode not in MODES:
            raise RoutingError(f"request {i}: unknown mode {r.mode!r}; use 'mixture' or 'average'")
        if isinstance(r.max_new_tokens, bool) or not isinstance(r.max_new_tokens, int) or r.max_new_tokens < 0:
            raise RoutingError(f"request {i}: max_new_tokens must be an integer >= 0, got {r.max_new_tokens!r}")
    model, tok = base.model, base.tokenizer
    others = others or {}
    split = []  # per request: (route for the LoRA layer, route of another family)
    for i, r in enumerate(requests):
        try:
            split.append(split_route(r.route, r.mode, expert_set, others))
        except RoutingError as e:
            raise RoutingError(f"request {i}: {e}") from None
    chunks, plans = [], []
    for s in range(0, len(requests), batch_size):
        chunk, routes = requests[s:s + batch_size], split[s:s + batch_size]
        lora = (None if expert_set is None else
                RoutingPlan(expert_set, [lr for lr, _ in routes], [r.mode for r in chunk], explain=explain))
        chunks.append(chunk)
        plans.append((lora, FamilyPlan(model, [fr for _, fr in routes], others)))

    current = installed(model)
    if current is not None and expert_set is not None and current is not expert_set:
        raise RoutingError("another expert set is installed on this model; uninstall it first")
    if current is None and expert_set is not None:
        install(model, expert_set)
    try:
        answers: list[RoutedAnswer] = []
        for start, chunk, (plan, family) in zip(range(0, len(requests), batch_size), chunks, plans):
            prompts = [list(r.prompt_ids) if r.prompt_ids is not None else
                       tok(render_prompt(tok, Example("", r.prompt, "")), add_special_tokens=False)["input_ids"]
                       for r in chunk]
            longest = max(r.max_new_tokens for r in chunk)
            if plan is not None:
                plan.content_spans = content_spans(tok, prompts)
            stopped: set[int] = set()

            def stop(i, start=start, stopped=stopped):
                if should_stop is not None and should_stop(start + i):
                    stopped.add(i)
                    return True
                return False

            emit = None if on_token is None else (lambda i, t, start=start: on_token(start + i, t))

            def narrow(rows, plan=plan, family=family):
                if plan is not None:
                    plan.select(rows)
                family.select(rows)

            with routing(model, plan) if plan is not None else contextlib.nullcontext(), family.applied(model):
                outs = generate_ids(model, prompts, tok.eos_token_id, tok.pad_token_id, longest, on_token=emit,
                                    stop=stop if should_stop is not None else None,
                                    row_limits=[r.max_new_tokens for r in chunk], on_select=narrow)
            for i, (r, ids) in enumerate(zip(chunk, outs)):
                if family.routes[i] is not None:
                    experts, per_layer = family.report(i, explain)
                elif plan is not None:
                    experts, per_layer = plan.report(i)
                else:
                    experts, per_layer = {}, None
                ids = ids[:r.max_new_tokens]
                text = tok.decode(ids, skip_special_tokens=True).strip()
                finish = "stopped" if i in stopped else "length" if len(ids) >= r.max_new_tokens else "stop"
                answers.append(RoutedAnswer(text=text, experts=experts, per_layer=per_layer, token_ids=list(ids),
                                            finish_reason=finish, prompt_tokens=len(prompts[i])))
        return answers
    finally:
        if current is None and expert_set is not None:
            uninstall(model)


def content_spans(tok, prompts: list[list[int]]) -> list[tuple[int, int]]:
    """Per left-padded prompt, [lo, hi) of the request's own tokens: without the chat template
    around it, which is the same for every request and would dominate a per-token summary."""
    marker = "\x00"
    rendered = render_prompt(tok, Example("", marker, ""))
    before, _, after = rendered.partition(marker)
    n_before = len(tok(before, add_special_tokens=False)["input_ids"]) if before else 0
    n_after = len(tok(after, add_special_tokens=False)["input_ids"]) if after else 0
    width = max(len(p) for p in prompts)
    spans = []
    for p in prompts:
        lo, hi = width - len(p) + n_before, width - n_after
        spans.append((lo, hi) if lo < hi else (width - len(p), width))
    return spans


__all__ = ["Request", "RoutedAnswer", "generate_routed"]
