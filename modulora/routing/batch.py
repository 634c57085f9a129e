"""Heterogeneous batches from Python: requests that each want different experts, answered
together by the engine (`engine.Engine`), every row following its own route.

    answers = generate_routed(base, expert_set, [
        EngineRequest("What is the capital of France?", {"geo": 1.0}),
        EngineRequest("Add 2 and 3.", Arrow(top_k=4)),
        EngineRequest("Reverse 'abc'.", {"strings": 0.5, "lists": 0.5}, mode="average"),
        EngineRequest("Hello!", None),                       # the base model alone
    ], explain=True)
    answers[1].experts     # mean Arrow weight per expert over the request's tokens and modules
    answers[1].per_layer   # the same per module (explain=True)

Routes may also name series, parallel or prefix adapters, given as `others` (see family.py):
bottleneck adapters mix by output, a prefix adapter is selected per request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .engine import Engine
from .experts import RoutingError
from .layer import install, installed
from .requests import Answer, EngineRequest


def generate_routed(base, expert_set, requests: list[EngineRequest], batch_size: int = 16,
                    explain: bool = False, others: dict | None = None,
                    on_token: Callable[[int, int], None] | None = None,
                    should_stop: Callable[[int], bool] | None = None, engine: Engine | None = None) -> list[Answer]:
    """Answers, in order, at most `batch_size` samples running at once (the engine's continuous
    batch: a finished row makes room for the next request at once).

    `expert_set`: the LoRA experts the routes choose among (an ExpertSet, the engine's slots, a
    list of experts, or None when no request routes LoRA); `others` maps names of series,
    parallel and prefix adapters to their experts (`load_family`). Hooks (optional, for
    streaming): `on_token(i, token_id)` as request i's tokens are chosen, `should_stop(i)` before
    every decode step; True stops request i there (finish_reason "stopped", its text so far kept).
    Every request is checked before any work (unknown experts, bad weights, bad Arrow settings,
    unknown modes, experts of different families in one request -> RoutingError). `engine`: the
    engine to run on (a Router keeps one); by default a new one, taken off the model afterwards.
    """
    if batch_size < 1:
        raise RoutingError(f"batch_size must be at least 1, got {batch_size}")
    for i, r in enumerate(requests):
        if not isinstance(r, EngineRequest):
            raise RoutingError(f"request {i} is a {type(r).__name__}, not an EngineRequest")
    eng = engine if engine is not None else Engine(base)
    found = installed(base.model)  # a temporary engine leaves the model as it found it
    experts = [] if expert_set is None else [e for e in getattr(expert_set, "experts", expert_set) if e is not None]
    eng.use_experts(experts, exclusive=True)
    eng.use_family(others or {})
    reqs = [dataclasses.replace(r, explain=r.explain or explain, **_hooks(i, on_token, should_stop))
            for i, r in enumerate(requests)]
    try:
        return eng.run(reqs, max_batch=batch_size)
    finally:
        if engine is None:
            eng.release()
            if found is not None and installed(base.model) is None:
                install(base.model, found)


def _hooks(i: int, on_token, should_stop) -> dict:
    """Request i's engine hooks from the batch-level ones."""
    out = {}
    if on_token is not None:
        out["on_token"] = lambda ev: on_token(i, ev.token) if ev.token >= 0 else None
    if should_stop is not None:
        out["should_stop"] = lambda: "stopped" if should_stop(i) else None
    return out


__all__ = ["generate_routed", "EngineRequest", "Answer"]
