"""What goes into the engine and what comes out: one request type, one answer type.

    params = SamplingParams(max_tokens=32, temperature=0.7, top_p=0.9, seed=1, stop=["\\n"], n=2,
                            logprobs=3)
    req = EngineRequest("Peru", route={"geo": 1.0}, params=params)   # or token ids
    req = EngineRequest(engine.encode_chat([{"role": "system", ...}, ...]), ...)
    answer = engine.run([req])[0]
    answer.samples[0].text, answer.samples[0].finish_reason, answer.samples[0].logprobs

Prompts are a user's text (rendered as adapters are trained) or token ids: the engine's
`encode_text` (raw, no template) and `encode_chat` (a whole message list through the tokenizer's
chat template) make them, so every entry point encodes the same way. Routes are resolved objects (a dict name -> weight, an `Arrow`, or None for the base
alone), as `modulora.routing.api.Router.resolve` returns them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from .arrow import Arrow
from .experts import RoutingError


@dataclass
class SamplingParams:
    """How one request's tokens are chosen; checked by `validate` before any work.

    temperature 0 is greedy (the default: answers are reproducible); top_k 0 and top_p 1 switch
    those filters off. `seed` makes sampling reproducible per request, whatever else shares the
    batch (sample i of n uses seed + i). Penalties act on the tokens generated so far, as in
    OpenAI's API: logit -= presence * (count > 0) + frequency * count. `logprobs`: None for none,
    k >= 0 for each chosen token's log-probability and the k most likely alternatives (from the
    model's own distribution, before temperature and penalties). `prompt_logprobs` (echo): the
    log-probability of every prompt token after the first, with the same k alternatives.
    `stop`: strings that end a sample; the text is cut before the first one found and
    finish_reason is "stop". `max_tokens` 0 generates nothing (useful with prompt_logprobs).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: bool = False

    MAX_LOGPROBS = 20
    MAX_N = 16

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop or ())
        self.stop_token_ids = tuple(self.stop_token_ids or ())

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        """RoutingError naming the first field that cannot be honoured."""
        _int("max_tokens", self.max_tokens, 0)
        _int("n", self.n, 1, self.MAX_N)
        _int("top_k", self.top_k, 0)
        _real("temperature", self.temperature, 0.0, 100.0)
        _real("top_p", self.top_p, 0.0, 1.0)
        if self.top_p == 0:
            raise RoutingError("top_p must be > 0 (1 keeps every token)")
        _real("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _real("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.seed is not None:
            _int("seed", self.seed, -(2 ** 63), 2 ** 63 - 1)
        if self.logprobs is not None:
            _int("logprobs", self.logprobs, 0, self.MAX_LOGPROBS)
        if not isinstance(self.prompt_logprobs, bool) or not isinstance(self.ignore_eos, bool):
            raise RoutingError("prompt_logprobs and ignore_eos are true or false")
        if len(self.stop) > 16 or any(not isinstance(s, str) or not s for s in self.stop):
            raise RoutingError("stop is at most 16 non-empty strings")
        for t in self.stop_token_ids:  # n greedy samples are n copies of one answer: allowed, as OpenAI
            _int("stop_token_ids", t, 0)


def _int(name: str, v, lo: int, hi: int | None = None) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise RoutingError(f"{name} must be an integer {bound}, got {v!r}")


def _real(name: str, v, lo: float, hi: float) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise RoutingError(f"{name} must be a number in [{lo:g}, {hi:g}], got {v!r}")


@dataclass
class TokenLogprob:
    """One position's token, its log-probability, and the `top` alternatives (token, logprob),
    most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class TokenEvent:
    """What a streaming caller hears as sample `index` of a request gets a token: the token, the
    text it adds (held back while it could still turn into a stop string or an incomplete
    character; the pieces join to the sample's final text) and its log-probability entry."""

    index: int
    token: int
    text: str
    logprob: TokenLogprob | None = None
    routing: TokenRouting | None = None  # with EngineRequest.token_routing


@dataclass
class TokenRouting:
    """Which experts made one generated token: `experts` their weights (Arrow: this token's,
    averaged over the layers; a sequence route: the route's own weights; {} for the base) and,
    for Arrow, `layers` one dict of weights per transformer layer. The first token of an Arrow
    answer has the prompt's mean weights (the step that made it read the whole prompt)."""

    experts: dict[str, float]
    layers: list[dict[str, float]] | None = None


@dataclass(eq=False)  # compared by identity
class EngineRequest:
    """One prompt, its route, and how to sample. `prompt` is a user's text, which the engine
    renders through the base's chat template as adapters are trained (`data.render_prompt`), or
    token ids, used as they are (the server's raw completions and whole chats come as ids).
    `content_span` [lo, hi) marks the request's own tokens within token ids (without a chat
    template around them), which an Arrow report averages over (None: all; for text the engine
    knows it). Routes may name LoRA experts (loaded in the engine's slots), Arrow, or series /
    parallel / prefix adapters the engine knows (`Engine.use_family`); one request's experts are
    of one family (see `family.split_route`).

    Hooks, called in the engine's thread: `on_token(event)` as each sample gets a token;
    `should_stop()` before every step: a reason string ("client_disconnect", "timeout") ends
    every sample of the request at once, with that finish reason."""

    prompt: str | list[int]
    route: dict[str, float] | Arrow | None = None
    mode: str = "mixture"
    params: SamplingParams = field(default_factory=SamplingParams)
    content_span: tuple[int, int] | None = None
    explain: bool = False  # the answer's per_layer: mean weight per expert of every module
    token_routing: bool = False  # each generated token's TokenRouting (events and samples)
    on_token: Callable[[TokenEvent], None] | None = None
    should_stop: Callable[[], str | None] | None = None


@dataclass
class Sample:
    """One of a request's n answers. `token_ids` are every token it generated, the end token
    (eos or a stop token) included, as vLLM counts them; `text` is theirs without it."""

    index: int
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (eos, stop token or string), "length", or the reason should_stop gave
    logprobs: list[TokenLogprob] | None = None
    stop: str | int | None = None  # the stop string or token that ended it, if any
    routing: list[TokenRouting] | None = None  # per token, when the request asked for token_routing


@dataclass
class Answer:
    """What the engine gives back for one EngineRequest."""

    samples: list[Sample]
    prompt_tokens: int
    experts: dict[str, float]  # expert -> weight (sequence route) or mean weight (Arrow); {} = base
    per_layer: dict[str, dict[str, float]] | None = None  # module -> expert -> mean weight (explain)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first entry None: nothing predicts it
    versions: dict[str, int] | None = None  # expert -> library version that answered (set by the server)
    abstention: object = None  # the abstention's Decision (abstain.py) for retrieval/learned with a fallback

    @property
    def text(self) -> str:
        """The first sample's text (the model's own: not stripped)."""
        return self.samples[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.samples[0].token_ids

    @property
    def finish_reason(self) -> str:
        return self.samples[0].finish_reason

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.samples)


__all__ = ["SamplingParams", "TokenLogprob", "TokenEvent", "TokenRouting", "EngineRequest", "Sample", "Answer"]
