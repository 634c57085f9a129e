"""The request bodies of the OpenAI-compatible endpoints, their checks, and what they turn into.

Every field of OpenAI's completions and chat completions requests is listed on its body, so a
client learns at once what this server does not do instead of having it silently dropped:

- Implemented (typed, checked, passed on): model, prompt (str | list[str] | list[int] |
  list[list[int]]), messages, max_tokens, max_completion_tokens (chat; wins over max_tokens),
  temperature, top_p, top_k (sampling, vLLM's meaning; -1 or 0: off), seed, stop, n,
  presence_penalty, frequency_penalty, logprobs (completions: int 0..20; chat: bool),
  top_logprobs (chat: int 0..20, needs logprobs), echo (completions), stream, stream_options
  ({include_usage}; only with stream), user (accepted and logged), and our extension fields
  route_top_k, mode, adapter_weights, timeout, ignore_eos, stop_token_ids, token_routing, fallback,
  arrow ({temperature, normalize, prototypes, modules}: Arrow's settings for `model: arrow` or
  `fallback: arrow`, see modulora.routing.arrow).
- Not implemented (`UNSUPPORTED`: OpenAI's tools, tool_choice, functions, function_call,
  response_format, logit_bias, suffix, best_of, audio, modalities, prediction,
  parallel_tool_calls, service_tier, store, metadata, reasoning_effort, web_search_options, ...
  and a few vLLM extras such as min_p or repetition_penalty): 400 `unsupported_field` naming the
  field, unless its value is null or a no-op (`tools: []`, `logit_bias: {}`,
  `response_format: {"type": "text"}`, `best_of` equal to n, `suffix: null`, `store: false`, ...),
  which is accepted: real clients send such defaults.
- Any other field: 400 `unknown_field` naming it.

`top_k` is sampling top_k; routing policies take `route_top_k` (default 1). For old clients that
sent `top_k` to routing: a request with `top_k` and no `route_top_k`, whose model is `arrow`,
`retrieval` or `learned` (no adapter_weights) and whose temperature is 0 or absent, has its
`top_k` read as route_top_k (sampling top_k stays off: it would do nothing under greedy decoding
anyway), and the answer carries the HTTP header
`Warning: 299 modulora "top_k on a routing policy is read as route_top_k; ..."` (the body is not
changed, so strict response parsers are not disturbed). Bodies keep such notes in `warnings`.

Defaults: temperature 0 (greedy; reproducible answers); max_tokens 16 for completions (OpenAI's)
and 128 for chat, each at most the server's `--max-tokens` (`check_bounds`, which also bounds the
prompts and messages of a request). `completion_params` / `chat_params` give the `SamplingParams`
of a body; `chat_messages` the checked message list for the tokenizer's chat template.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from ..routing.api import POLICIES
from ..routing.experts import RoutingError
from ..routing.requests import SamplingParams
from .errors import APIError, error_body

SPECIAL_MODELS = ("base",) + POLICIES
TOP_K_POLICIES = ("arrow", "retrieval", "learned")  # the policies that read route_top_k
COMPLETION_MAX_TOKENS, CHAT_MAX_TOKENS = 16, 128
MAX_LOGPROBS = SamplingParams.MAX_LOGPROBS
LEGACY_TOP_K_WARNING = ("top_k on a routing policy is read as route_top_k; send route_top_k "
                        "(top_k is now the sampling top_k, as in vLLM)")


def _error(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def json_dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


# -- fields this server does not implement, and the values that leave them a no-op -----------------

def _null(v) -> bool:
    return v is None


def _empty(v) -> bool:
    return v is None or v == [] or v == {} or v == ""


def _one_of(*ok):
    def check(v) -> bool:  # True == 1 in Python: a bool only matches a bool
        return v is None or (isinstance(v, bool) == isinstance(ok[0], bool) and v in ok)
    return check


def _text_format(v) -> bool:
    return v is None or v == {"type": "text"}


def _any_bool(v) -> bool:  # meaningless without tools, which are refused on their own
    return v is None or isinstance(v, bool)


_OPENAI_UNSUPPORTED = {
    "tools": _empty, "tool_choice": _one_of("none", "auto"), "functions": _empty,
    "function_call": _one_of("none", "auto"), "response_format": _text_format, "logit_bias": _empty,
    "suffix": _empty, "audio": _null, "modalities": _one_of(["text"]), "prediction": _null,
    "parallel_tool_calls": _any_bool, "service_tier": _one_of("auto", "default"), "store": _one_of(False),
    "metadata": _empty, "reasoning_effort": _null, "web_search_options": _null, "verbosity": _null,
    "prompt_cache_key": _null, "safety_identifier": _null,
}
# vLLM's extensions that a client written for vLLM may send; their no-op values are accepted.
_VLLM_UNSUPPORTED = {
    "min_p": _one_of(0, 0.0), "repetition_penalty": _one_of(1, 1.0), "min_tokens": _one_of(0),
    "length_penalty": _one_of(1, 1.0), "use_beam_search": _one_of(False), "prompt_logprobs": _null,
    "skip_special_tokens": _one_of(True), "spaces_between_special_tokens": _one_of(True),
    "include_stop_str_in_output": _one_of(False), "truncate_prompt_tokens": _null,
    "guided_json": _null, "guided_regex": _null, "guided_choice": _null, "guided_grammar": _null,
    "structured_outputs": _null, "chat_template": _null, "chat_template_kwargs": _empty,
    "continue_final_message": _one_of(False), "add_generation_prompt": _one_of(True),
    "documents": _null, "priority": _one_of(0), "request_id": _null,
}
UNSUPPORTED: dict[str, Any] = {**_OPENAI_UNSUPPORTED, **_VLLM_UNSUPPORTED}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = None


class ArrowSettings(BaseModel):
    """Arrow's settings beside route_top_k (modulora.routing.arrow.SETTINGS); unset ones default."""
    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    normalize: bool | None = None
    prototypes: Literal["product", "a", "spectral"] | None = None
    modules: str | None = None

    def given(self) -> tuple[tuple[str, Any], ...] | None:
        """The settings the client gave, as a hashable tuple (None: none)."""
        got = tuple((k, v) for k, v in self.model_dump().items() if v is not None)
        return got or None


class _Body(BaseModel):
    """What completions and chat share; unsupported and unknown fields are refused after parsing."""

    model_config = ConfigDict(extra="allow")  # collected, then refused by name in `_refuse`

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=-1)  # sampling; -1 or 0: off
    seed: int | None = Field(default=None, ge=-(2 ** 63), le=2 ** 63 - 1)
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, ge=1, le=SamplingParams.MAX_N)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    best_of: int | None = None  # not implemented: only best_of == n (a no-op) is accepted
    # extension fields
    route_top_k: int = Field(default=1, ge=1)
    mode: Literal["mixture", "average"] = "mixture"
    adapter_weights: dict[str, float] | None = None
    timeout: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = None
    token_routing: bool | None = False  # each generated token's experts (choices[i].token_routing)
    fallback: Literal["base", "uniform", "arrow"] | None = None  # retrieval / learned: abstain to this
    arrow: ArrowSettings | None = None  # Arrow's settings (model arrow, or fallback arrow)
    # OpenAI's fields this server does not implement (see UNSUPPORTED for their no-op values)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    logit_bias: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    parallel_tool_calls: Any = None
    service_tier: Any = None
    store: Any = None
    metadata: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None

    _warnings: list[str] = PrivateAttr(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        """Notes for the client (sent as `Warning` headers), e.g. the legacy top_k reading."""
        return self._warnings

    @model_validator(mode="after")
    def _checked(self):
        self._refuse()
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise APIError(400, f"best_of={self.best_of} is not supported (only best_of equal to n)",
                           param="best_of", code="unsupported_field")
        for t in self.stop_token_ids or ():
            if t < 0:
                raise APIError(400, f"stop_token_ids holds {t}; token ids are >= 0", param="stop_token_ids")
        self._legacy_top_k()
        return self

    def _refuse(self) -> None:
        for name in self.model_fields_set:
            ok = UNSUPPORTED.get(name)
            if ok is not None and not ok(getattr(self, name)):
                raise APIError(400, f"{name!r} is not supported by this server (send it null or leave it out)",
                               param=name, code="unsupported_field")
        for name, value in (self.model_extra or {}).items():
            ok = UNSUPPORTED.get(name)
            if ok is None:
                raise APIError(400, f"unknown field {name!r}", param=name, code="unknown_field")
            if not ok(value):
                raise APIError(400, f"{name!r} is not supported by this server (send it null or leave it out)",
                               param=name, code="unsupported_field")

    def _legacy_top_k(self) -> None:
        """Old clients sent routing's k as `top_k`; see the module docstring."""
        if ("top_k" in self.model_fields_set and "route_top_k" not in self.model_fields_set
                and self.top_k is not None and self.top_k >= 1 and self.adapter_weights is None
                and self.model.strip() in TOP_K_POLICIES and not self.temperature):
            self.route_top_k, self.top_k = self.top_k, None
            self._warnings.append(LEGACY_TOP_K_WARNING)


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    suffix: Any = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # refused by name in `chat_messages`

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return self


# -- what a body turns into --------------------------------------------------------------------------

def _params(body: _Body, max_tokens: int, logprobs: int | None, prompt_logprobs: bool) -> SamplingParams:
    params = SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature or 0.0,
        top_p=1.0 if body.top_p is None else body.top_p, top_k=max(0, body.top_k or 0), seed=body.seed,
        stop=body.stop or (), stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=bool(body.ignore_eos),
        n=body.n or 1, presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    try:
        params.validate()
    except RoutingError as e:
        raise APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None
    return params


def completion_params(body: CompletionBody) -> SamplingParams:
    """The sampling of a completions request. `echo` with `logprobs` asks for the prompt's
    log-probabilities; echoing the prompt text itself is the handler's part."""
    max_tokens = COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    return _params(body, max_tokens, body.logprobs, bool(body.echo) and body.logprobs is not None)


def chat_params(body: ChatBody) -> SamplingParams:
    """The sampling of a chat request (max_completion_tokens wins over max_tokens)."""
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return _params(body, CHAT_MAX_TOKENS if limit is None else limit, logprobs, False)


def check_text(text: str, param: str) -> str:
    """`text`, or 400 naming `param` when it is not valid Unicode (a lone surrogate, such as
    JSON's "\\ud800", which no tokenizer can encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{param} holds a lone surrogate (U+{ord(text[e.start]):04X} at character {e.start}); "
                            "text must be valid Unicode", param=param) from None
    return text


def check_bounds(body: _Body, max_tokens: int, max_items: int) -> None:
    """400 when a body asks for more than the server's `max_tokens`, or holds more prompts
    (completions) or messages (chat) than `max_items`; a body that leaves max_tokens out gets
    the default or `max_tokens`, whichever is smaller."""
    if isinstance(body, ChatBody):
        items, what, param = len(body.messages), "messages", "messages"
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        default = CHAT_MAX_TOKENS
    else:
        items, what, param = len(completion_prompts(body)), "prompts", "prompt"
        field, default = "max_tokens", COMPLETION_MAX_TOKENS
    if items > max_items:
        raise APIError(400, f"{param} holds {items} {what}; this server takes at most {max_items} per request",
                       param=param)
    asked = getattr(body, field)
    if asked is None:
        body.max_tokens = min(default, max_tokens)
    elif asked > max_tokens:
        raise APIError(400, f"{field} is {asked}; this server generates at most {max_tokens} tokens per request",
                       param=field)


def completion_prompts(body: CompletionBody) -> list[str | list[int]]:
    """The prompts of a completions request, one per choice: each text or token ids (raw, no
    template). 400 for an empty batch, an empty list of token ids or text that is not valid Unicode."""
    p = body.prompt
    prompts: list = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
    if not prompts:
        raise APIError(400, "prompt is empty", param="prompt")
    for ids in prompts:
        if isinstance(ids, str):
            check_text(ids, "prompt")
        elif isinstance(ids, list):
            if not ids:
                raise APIError(400, "prompt holds an empty list of token ids", param="prompt")
            if min(ids) < 0:
                raise APIError(400, "prompt holds a negative token id", param="prompt")
    return prompts


CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_ASSISTANT_NOOP = {"tool_calls": _empty, "function_call": _null, "refusal": _null, "audio": _null}


def chat_messages(body) -> list[dict]:
    """The message list of `body.messages` as `[{"role", "content": str}]` for the chat
    template: developer becomes system; text parts are joined with newlines (as vLLM does);
    tool messages, image or audio parts, and other message fields -> 400 naming them."""
    out = []
    for i, m in enumerate(body.messages):
        where = f"messages[{i}]"
        role = CHAT_ROLES.get(m.role)
        if role is None:
            why = "tools are not supported" if m.role in ("tool", "function") else "roles are system, user, assistant"
            raise APIError(400, f"{where}.role {m.role!r} is not supported ({why})", param=f"{where}.role")
        for name, value in (m.model_extra or {}).items():
            noop = _ASSISTANT_NOOP.get(name) if role == "assistant" else _null if name == "name" else None
            if noop is not None and noop(value):
                continue
            raise APIError(400, f"{where}.{name} is not supported", param=f"{where}.{name}",
                           code="unsupported_field")
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type")
                if kind != "text":
                    raise APIError(400, f"{where}.content[{j}] is a {kind!r} part; only text parts are supported",
                                   param=f"{where}.content[{j}].type", code="unsupported_content")
                if not isinstance(part.get("text"), str):
                    raise APIError(400, f"{where}.content[{j}].text must be a string",
                                   param=f"{where}.content[{j}].text")
                extra = set(part) - {"type", "text"}
                if extra:
                    raise APIError(400, f"{where}.content[{j}].{sorted(extra)[0]} is not supported",
                                   param=f"{where}.content[{j}]", code="unsupported_field")
                texts.append(part["text"])
            content = "\n".join(texts)
        if content is None:
            if role != "assistant":
                raise APIError(400, f"{where} has no content", param=f"{where}.content")
            content = ""
        check_text(content, f"{where}.content")
        out.append({"role": role, "content": content})
    return out


def _message_text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type", "text") == "text")


# -- tokenizer and adapter-loading endpoints (vLLM's shapes) -------------------------------------------

class TokenizeBody(BaseModel):
    """POST /tokenize: a raw `prompt`, or chat `messages` rendered through the chat template."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (vLLM's)
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "send either prompt or messages", param="prompt")
        if self.messages == []:  # the chat template raises on an empty conversation
            raise APIError(400, "messages is empty", param="messages")
        return self


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


MAX_PATH_BYTES, MAX_NAME_BYTES = 4095, 255  # Linux's PATH_MAX - 1 and NAME_MAX


class LoadLoRABody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_path: str

    @model_validator(mode="after")
    def _checked(self):
        """Text the file system cannot take is a 400 here, not an OSError (-> 500) when the path
        is resolved: a lone surrogate, a path or one of its names too long (ENAMETOOLONG)."""
        check_text(self.lora_name, "lora_name")
        check_text(self.lora_path, "lora_path")
        if (len(self.lora_path.encode()) > MAX_PATH_BYTES
                or any(len(part.encode()) > MAX_NAME_BYTES for part in self.lora_path.split("/"))):
            raise APIError(400, f"lora_path is too long (at most {MAX_PATH_BYTES} bytes, {MAX_NAME_BYTES} per name)",
                           param="lora_path")
        return self


class UnloadLoRABody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_int_id: int | None = None  # vLLM's; names are what this server keys adapters by

    @model_validator(mode="after")
    def _checked(self):
        """A lone surrogate cannot reach the library's index (sqlite encodes it: 500): 400 here."""
        check_text(self.lora_name, "lora_name")
        return self


# The completions' 200 is JSON, or server-sent events with stream: true.
STREAM_OK = {200: {"description": "The completion (JSON), or with stream: true its chunks as server-sent events",
                   "content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}}}}
# POST /v1/adapters reads its multipart body itself (`upload.parse_multipart`); this documents it.
UPLOAD_OPENAPI = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["name", "file"],
    "properties": {
        "name": {"type": "string", "description": "the adapter's name"},
        "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                 "description": "adapter_config.json and adapter_model.safetensors (card.json, README.md "
                                "optional), or one .tar.gz/.tgz/.zip archive holding them"}}}}}}}


__all__ = ["SPECIAL_MODELS", "STREAM_OK", "UPLOAD_OPENAPI", "UNSUPPORTED", "CompletionBody", "ChatBody", "ChatMessage", "StreamOptions",
           "TokenizeBody", "DetokenizeBody", "LoadLoRABody", "UnloadLoRABody", "completion_params",
           "chat_params", "completion_prompts", "chat_messages", "check_bounds", "check_text", "json_dumps"]
