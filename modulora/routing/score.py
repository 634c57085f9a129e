"""Log-likelihood of given continuations under a routed model: multiple-choice scoring.

Each request's prompt is paired with each of its continuations; every pair is one row that follows
the request's route, and all rows of a batch go through one forward pass (no generation).
"""

from __future__ import annotations

import contextlib

import torch

from ..data import Example, render_prompt
from ..forward import forward
from ..generate import left_pad
from .arrow import Arrow
from .experts import RoutingError
from .family import FamilyPlan, split_route
from .layer import RoutingPlan, install, installed, routing, uninstall


@torch.inference_mode()
def continuation_logprobs(router, prompts: list[str], continuations: list[list[str]], routes: list[str],
                          top_k: int = 1, mode: str = "mixture", batch_size: int = 16,
                          exclude: list[list[str]] | None = None) -> list[list[float]]:
    """Per request, the summed log-probability of each continuation after the chat-rendered prompt.

    `router` is a `modulora.routing.api.Router`; routes are given as text, as for `Router.answer`.
    """
    if len(continuations) != len(prompts):
        raise RoutingError(f"{len(prompts)} prompts but {len(continuations)} lists of continuations")
    if any(not c for c in continuations):
        raise RoutingError("every request needs at least one continuation to score")
    resolved = router.resolve(prompts, routes, top_k, exclude)
    base = router.base
    model, tok = base.model, base.tokenizer
    types = router.adapter_types()
    named = {n for r in resolved if isinstance(r, dict) for n in r}
    others = router.family_experts(sorted(n for n in named if types.get(n) != "lora"))
    uses_lora = any(isinstance(r, Arrow) for r in resolved) or any(types.get(n) == "lora" for n in named)
    expert_set = router.experts() if uses_lora else None
    split = [split_route(r, mode, expert_set, others) for r in resolved]

    rows = []  # (request, prompt ids, continuation ids)
    for i, (p, conts) in enumerate(zip(prompts, continuations)):
        ids = tok(render_prompt(tok, Example("", p, "")), add_special_tokens=False)["input_ids"]
        for c in conts:
            cont = tok(c, add_special_tokens=False)["input_ids"]
            if not cont:
                raise RoutingError(f"request {i}: continuation {c!r} has no tokens")
            rows.append((i, ids, cont))

    current = installed(model)
    if current is not None and expert_set is not None and current is not expert_set:
        raise RoutingError("another expert set is installed on this model; uninstall it first")
    if current is None and expert_set is not None:
        install(model, expert_set)
    scores: list[float] = []
    try:
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            routes_ = [split[i] for i, _, _ in chunk]
            plan = None if expert_set is None else RoutingPlan(expert_set, [lr for lr, _ in routes_], mode)
            family = FamilyPlan(model, [fr for _, fr in routes_], others)
            ids, mask = left_pad([p + c for _, p, c in chunk], tok.pad_token_id)
            with routing(model, plan) if plan is not None else contextlib.nullcontext(), family.applied(model):
                logits, _ = forward(model, ids, mask)
            logp = torch.log_softmax(logits.float(), dim=-1)
            width = ids.shape[1]
            for row, (_, _, cont) in enumerate(chunk):
                n = len(cont)
                pos = torch.arange(width - n - 1, width - 1)
                scores.append(float(logp[row, pos, torch.tensor(cont)].sum()))
    finally:
        if current is None and expert_set is not None:
            uninstall(model)
    out: list[list[float]] = [[] for _ in prompts]
    for (i, _, _), v in zip(rows, scores):
        out[i].append(v)
    return out
