"""Log-likelihood of given continuations under a routed model: multiple-choice scoring.

Each request's prompt is paired with each of its continuations; every pair is one row that follows
the request's route, and all rows of a batch go through one forward pass (no generation).
"""

from __future__ import annotations

from .experts import RoutingError
from .requests import EngineRequest, SamplingParams


def continuation_logprobs(router, prompts: list[str], continuations: list[list[str]], routes: list[str],
                          top_k: int = 1, mode: str = "mixture", batch_size: int = 16,
                          exclude: list[list[str]] | None = None, fallback: str | None = None,
                          arrow: dict | None = None) -> list[list[float]]:
    """Per request, the summed log-probability of each continuation after the chat-rendered prompt:
    the engine's prompt log-probabilities (the numbers the server's `echo` + `logprobs` gives).

    `router` is a `modulora.routing.api.Router`; routes are given as text (and `arrow` settings),
    as for `Router.answer`.
    """
    if len(continuations) != len(prompts):
        raise RoutingError(f"{len(prompts)} prompts but {len(continuations)} lists of continuations")
    if any(not c for c in continuations):
        raise RoutingError("every request needs at least one continuation to score")
    resolved = router.resolve(prompts, routes, top_k, exclude, fallback, arrow)
    others, uses_lora = router.family_for(resolved)
    eng = router.engine()
    eng.use_experts(router.experts() if uses_lora else [], exclusive=True)
    eng.use_family(others)
    tok = router.base.tokenizer
    reqs, owners, lengths = [], [], []
    params = SamplingParams(max_tokens=0, prompt_logprobs=True)
    for i, (p, conts) in enumerate(zip(prompts, continuations)):
        ids, _ = eng.encode_prompt(p)
        for c in conts:
            cont = tok(c, add_special_tokens=False)["input_ids"]
            if not cont:
                raise RoutingError(f"request {i}: continuation {c!r} has no tokens")
            reqs.append(EngineRequest(ids + cont, resolved[i], mode=mode, params=params))
            owners.append(i)
            lengths.append(len(cont))
    try:
        answers = eng.run(reqs, max_batch=batch_size)
    finally:
        eng.release()
    out: list[list[float]] = [[] for _ in prompts]
    for i, n, a in zip(owners, lengths, answers):
        out[i].append(float(sum(e.logprob for e in a.prompt_logprobs[-n:])))
    return out
