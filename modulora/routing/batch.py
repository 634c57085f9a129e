"""Heterogeneous batches: requests that each want different experts, answered together by the
engine (`engine.Engine`), every row following its own route; greedy, for the CLI and Python API.

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

from collections.abc import Callable
from dataclasses import dataclass

from ..data import Example, render_prompt
from .arrow import Arrow
from .experts import RoutingError
from .layer import MODES, install, installed


@dataclass
class Request:
    prompt: str
    route: dict[str, float] | Arrow | None = None  # names LoRA experts, or the `others` of one family
    mode: str = "mixture"  # "mixture": sum_e w_e B_e A_e x; "average": (sum w B)(sum w A) x
    max_new_tokens: int = 64
    prompt_ids: list[int] | None = None  # the prompt as token ids, used as given (no template)
    params: object = None  # a SamplingParams (its max_tokens wins); None: greedy, max_new_tokens


@dataclass
class RoutedAnswer:
    text: str
    experts: dict[str, float]  # expert -> weight (sequence route) or mean weight (Arrow); {} = base
    per_layer: dict[str, dict[str, float]] | None = None  # module -> expert -> mean weight (explain)
    token_ids: list[int] | None = None  # the generated tokens (no eos)
    finish_reason: str | None = None  # "stop" (eos), "length" (max_new_tokens) or "stopped" (should_stop)
    prompt_tokens: int = 0  # tokens of the rendered prompt


def generate_routed(base, expert_set, requests: list[Request], batch_size: int = 16,
                    explain: bool = False, others: dict | None = None,
                    on_token: Callable[[int, int], None] | None = None,
                    should_stop: Callable[[int], bool] | None = None, engine=None) -> list[RoutedAnswer]:
    """Greedy answers, in order, at most `batch_size` requests running at once (the engine's
    continuous batch: a finished row makes room for the next request at once).

    `expert_set`: the LoRA experts the routes choose among (an ExpertSet, the engine's slots, a
    list of experts, or None when no request routes LoRA); `others` maps names of series,
    parallel and prefix adapters to their experts (`load_family`). Hooks (optional, for
    streaming): `on_token(i, token_id)` as request i's tokens are chosen, `should_stop(i)` before
    every decode step; True stops request i there (finish_reason "stopped", its text so far kept).
    Every request is checked before any work (unknown experts, bad weights, bad Arrow settings,
    unknown modes, experts of different families in one request -> RoutingError). `engine`: the
    engine to run on (a Router keeps one); by default a new one, taken off the model afterwards.
    """
    from .engine import Engine
    from .requests import EngineRequest, SamplingParams

    if batch_size < 1:
        raise RoutingError(f"batch_size must be at least 1, got {batch_size}")
    for i, r in enumerate(requests):
        if not isinstance(r, Request):
            raise RoutingError(f"request {i} is a {type(r).__name__}, not a Request")
        if r.mode not in MODES:
            raise RoutingError(f"request {i}: unknown mode {r.mode!r}; use 'mixture' or 'average'")
        if isinstance(r.max_new_tokens, bool) or not isinstance(r.max_new_tokens, int) or r.max_new_tokens < 0:
            raise RoutingError(f"request {i}: max_new_tokens must be an integer >= 0, got {r.max_new_tokens!r}")
    eng = engine if engine is not None else Engine(base)
    found = installed(base.model)  # a temporary engine leaves the model as it found it
    experts = [] if expert_set is None else [e for e in getattr(expert_set, "experts", expert_set) if e is not None]
    eng.use_experts(experts, exclusive=True)
    eng.use_family(others or {})
    stopped: set[int] = set()

    def hooks(i: int) -> dict:
        out = {}
        if on_token is not None:
            out["on_token"] = lambda ev, i=i: on_token(i, ev.token) if ev.token >= 0 else None
        if should_stop is not None:
            def stop(i=i):
                if should_stop(i):
                    stopped.add(i)
                    return "stopped"
                return None
            out["should_stop"] = stop
        return out

    reqs = []
    for i, r in enumerate(requests):
        ids, span = (list(r.prompt_ids), None) if r.prompt_ids is not None else eng.encode_prompt(r.prompt)
        params = r.params if r.params is not None else SamplingParams(max_tokens=r.max_new_tokens)
        reqs.append(EngineRequest(ids, r.route, mode=r.mode, params=params,
                                  content_span=span, explain=explain, **hooks(i)))
    try:
        answers = eng.run(reqs, max_batch=batch_size)
    finally:
        if engine is None:
            eng.release()
            if found is not None and installed(base.model) is None:
                install(base.model, found)
    out = []
    for a in answers:
        s = a.samples[0]
        ids = list(s.token_ids)
        if s.finish_reason == "stop" and s.stop is None and ids:  # ended by eos: not part of the answer
            ids = ids[:-1]
        out.append(RoutedAnswer(text=s.text.strip(), experts=a.experts, per_layer=a.per_layer,
                                token_ids=ids, finish_reason=s.finish_reason,
                                prompt_tokens=a.prompt_tokens))
    return out


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
