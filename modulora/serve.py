"""An OpenAI-compatible HTTP server over one base and one adapter library (first increment).

    modulora serve --library PATH --host 127.0.0.1 --port 8000 [--api-key KEY] [--base B]

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`.

- `model` is the route text (see `modulora.routing.api`): an adapter name, `a,b`, `a:0.7,b:0.3`,
  `arrow`, `retrieval`, `learned`, `uniform` or `base`. Extension fields: `top_k` (policies),
  `mode` (`mixture` | `average`), `adapter_weights` ({name: weight}, which becomes the route
  `a:0.7,b:0.3` and takes precedence over `model`).
- Chat: the content of the last user message is the prompt; the routing code renders the base's
  chat template itself (earlier turns and system messages are not used in this increment).
- Decoding is greedy; `temperature`, `top_p` and other sampling fields are accepted and ignored.
- Every response carries `usage` (prompt tokens of the rendered prompt, completion tokens of the
  answer, both counted with the base's tokenizer) and an extension field `routing`: one entry per
  choice, `{"index", "experts": {name: weight}}` ({} for the base alone).
- Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: unknown model or
  adapter -> 404, malformed JSON and other bad input -> 400, full queue -> 429 with Retry-After,
  missing or wrong API key (when one is set) -> 401.

Scheduling: one worker thread owns the model. Each prompt is one item in a bounded queue; the
worker takes the first waiting item, waits `batch_wait_ms` for more, takes up to `max_batch`, and
answers them all in ONE batched generation in which every row follows its own route (and its own
`top_k`, `mode` and `max_tokens`). Results go back through futures that the async handlers await.
An item whose route cannot be resolved fails alone; the rest of its batch is still answered.

Streaming (`stream: true`) is simulated in this increment: the answer is generated in full, then
sent as server-sent events in OpenAI's chunk shape (one chunk per word), ending with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .routing.api import POLICIES, Router, parse_fixed
from .routing.batch import Request, generate_routed
from .routing.experts import RoutingError

SPECIAL_MODELS = ("base",) + POLICIES


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def _error(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI fields this server does not use are accepted

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    top_k: int = Field(default=1, ge=1)
    mode: Literal["mixture", "average"] = "mixture"
    adapter_weights: dict[str, float] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)


class CompletionBody(_Body):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)


@dataclass
class _Item:
    prompt: str
    route: str
    top_k: int
    mode: str
    max_new_tokens: int
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class _Result:
    text: str
    experts: dict[str, float]
    prompt_tokens: int
    completion_tokens: int


class Scheduler:
    """One worker thread that owns the model and answers queued items in shared batches."""

    def __init__(self, base, library, max_batch: int = 16, batch_wait_ms: float = 10, queue_size: int = 64):
        if max_batch < 1 or queue_size < 1:
            raise ValueError("max_batch and queue_size must be at least 1")
        self.base, self.router = base, Router(base, library)
        self.max_batch, self.batch_wait = max_batch, batch_wait_ms / 1000.0
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.batches = 0  # batched generations run (for tests and, later, metrics)
        self.largest_batch = 0

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="modulora-serve-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        while True:  # fail whatever is still waiting
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            item.future.set_exception(APIError(503, "the server is shutting down", "server_error"))

    def submit(self, items: list[_Item]) -> None:
        """Queue all items or none of them (429 when the queue cannot take them all)."""
        if self._thread is None or not self._thread.is_alive():
            raise APIError(503, "the server is not running", "server_error")
        with self.queue.mutex:
            room = self.queue.maxsize - len(self.queue.queue)
        if len(items) > room:
            raise APIError(429, f"the request queue is full ({self.queue.maxsize} waiting); retry shortly",
                           "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        for item in items:
            try:
                self.queue.put_nowait(item)
            except queue.Full:  # raced with another handler: fail the rest of this request
                err = APIError(429, "the request queue is full; retry shortly", "rate_limit_error",
                               code="queue_full", headers={"Retry-After": "1"})
                item.future.set_exception(err)

    def _take(self) -> list[_Item]:
        try:
            first = self.queue.get(timeout=0.1)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.batch_wait
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                batch.append(self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._take()
            if not batch:
                continue
            batch = [it for it in batch if it.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                results = self._answer(batch)
            except Exception as e:  # noqa: BLE001 - the worker must survive any failure of one batch
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(e)
                continue
            for it, res in zip(batch, results):
                if isinstance(res, BaseException):
                    it.future.set_exception(res)
                else:
                    it.future.set_result(res)

    def _resolve(self, items: list[_Item]) -> list:
        """A route object per item, or the RoutingError of that item alone."""
        out: list = [None] * len(items)
        by_k: dict[int, list[int]] = {}
        for i, it in enumerate(items):
            by_k.setdefault(it.top_k, []).append(i)
        for k, idx in by_k.items():
            try:
                routes = self.router.resolve([items[i].prompt for i in idx], [items[i].route for i in idx], top_k=k)
                for i, r in zip(idx, routes):
                    out[i] = r
            except RoutingError:  # find which ones fail, answer the rest
                for i in idx:
                    try:
                        out[i] = self.router.resolve([items[i].prompt], [items[i].route], top_k=k)[0]
                    except RoutingError as e:
                        out[i] = e
        return out

    def _answer(self, items: list[_Item]) -> list:
        """One batched generation for every item that resolved (as `Router.answer`, but each row
        with its own top_k, mode and max_new_tokens)."""
        from .data import Example, render_prompt
        from .routing.arrow import Arrow

        resolved = self._resolve(items)
        ok = [i for i, r in enumerate(resolved) if not isinstance(r, BaseException)]
        results: list = list(resolved)
        if ok:
            router = self.router
            types = router.adapter_types()
            named = {n for i in ok if isinstance(resolved[i], dict) for n in resolved[i]}
            others = router.family_experts(sorted(n for n in named if types.get(n) != "lora"))
            uses_lora = (any(isinstance(resolved[i], Arrow) for i in ok)
                         or any(types.get(n) == "lora" for n in named))
            requests = [Request(items[i].prompt, resolved[i], mode=items[i].mode,
                                max_new_tokens=items[i].max_new_tokens) for i in ok]
            answers = generate_routed(self.base, router.experts() if uses_lora else None, requests,
                                      batch_size=max(len(requests), 1), others=others)
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(requests))
            tok = self.base.tokenizer
            for i, ans in zip(ok, answers):
                rendered = render_prompt(tok, Example("", items[i].prompt, ""))
                results[i] = _Result(
                    text=ans.text, experts={n: float(w) for n, w in ans.experts.items()},
                    prompt_tokens=len(tok(rendered, add_special_tokens=False)["input_ids"]),
                    # re-tokenized answer text, capped at max_new_tokens (decoding can split byte tokens)
                    completion_tokens=min(len(tok(ans.text, add_special_tokens=False)["input_ids"]),
                                          items[i].max_new_tokens) if ans.text else 0)
        return results


def _route_of(body: _Body, names: set[str]) -> str:
    """The route text of a request; unknown adapters -> 404, malformed routes -> 400."""
    if body.adapter_weights is not None:
        if not body.adapter_weights:
            raise APIError(400, "adapter_weights is empty", param="adapter_weights")
        spec = ",".join(f"{n}:{w!r}" for n, w in body.adapter_weights.items())
        param = "adapter_weights"
    else:
        spec, param = body.model.strip(), "model"
        if spec in SPECIAL_MODELS or spec in names:
            return spec
    try:
        route = parse_fixed(spec)
    except RoutingError as e:
        if param == "model" and ":" not in spec and "," not in spec:
            raise APIError(404, f"the model {spec!r} does not exist", param=param, code="model_not_found") from None
        raise APIError(400, str(e), param=param) from None
    unknown = [n for n in route if n not in names]
    if unknown:
        raise APIError(404, f"the model {unknown[0]!r} does not exist; GET /v1/models lists them", param=param,
                       code="model_not_found")
    return spec


def _message_text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type", "text") == "text")


def _split_stream(text: str) -> list[str]:
    """Pieces that join back to `text` exactly: each word with the whitespace before it."""
    return re.findall(r"\s*\S+|\s+$", text) or [""]


def create_app(base, library, api_key: str | None = None, max_batch: int = 16, batch_wait_ms: float = 10,
               queue_size: int = 64) -> FastAPI:
    """The FastAPI app; its worker thread starts and stops with the app's lifespan."""
    scheduler = Scheduler(base, library, max_batch=max_batch, batch_wait_ms=batch_wait_ms, queue_size=queue_size)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="modulora", lifespan=lifespan)
    app.state.scheduler = scheduler

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return _error(400, f"malformed JSON body: {first.get('ctx', {}).get('error', 'cannot parse')}")
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
                        for e in errors[:5])
        return _error(400, msg or "invalid request", param=".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500
                      else "server_error")

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):
        return _error(500, f"{type(exc).__name__}: {exc}", "server_error")

    @app.middleware("http")
    async def _auth(request: HTTPRequest, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return _error(401, "missing or wrong API key (Authorization: Bearer KEY)",
                              code="invalid_api_key")
        return await call_next(request)

    async def adapter_names() -> set[str]:
        return {r.name for r in await asyncio.to_thread(library.list)}

    @app.get("/health")
    async def health():
        alive = scheduler._thread is not None and scheduler._thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "stopped", "queued": scheduler.queue.qsize()},
                            status_code=200 if alive else 503)

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        names = sorted(await adapter_names()) + list(SPECIAL_MODELS)
        return {"object": "list",
                "data": [{"id": n, "object": "model", "created": created, "owned_by": "modulora"} for n in names]}

    async def run(body: _Body, prompts: list[str], default_max: int) -> list[_Result]:
        route = _route_of(body, await adapter_names())
        max_new = default_max if body.max_tokens is None else body.max_tokens
        items = [_Item(p, route, body.top_k, body.mode, max_new) for p in prompts]
        scheduler.submit(items)
        try:
            return list(await asyncio.gather(*(asyncio.wrap_future(it.future) for it in items)))
        except RoutingError as e:
            raise APIError(400, str(e), param="model") from None

    def usage(results: list[_Result]) -> dict:
        p = sum(r.prompt_tokens for r in results)
        c = sum(r.completion_tokens for r in results)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def finish(r: _Result, max_new: int) -> str:
        return "length" if max_new is not None and r.completion_tokens >= max_new else "stop"

    def routing(results: list[_Result]) -> list[dict]:
        return [{"index": i, "experts": r.experts} for i, r in enumerate(results)]

    def sse(chunks):
        async def gen():
            for c in chunks:
                yield f"data: {json.dumps(c)}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        max_new = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default for completions
        results = await run(body, prompts, max_new)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            chunks = []
            for i, r in enumerate(results):
                for piece in _split_stream(r.text):
                    chunks.append({"id": rid, "object": "text_completion", "created": created, "model": body.model,
                                   "choices": [{"index": i, "text": piece, "logprobs": None, "finish_reason": None}]})
                chunks.append({"id": rid, "object": "text_completion", "created": created, "model": body.model,
                               "choices": [{"index": i, "text": "", "logprobs": None,
                                            "finish_reason": finish(r, max_new)}],
                               "routing": [{"index": i, "experts": r.experts}]})
            chunks[-1]["usage"] = usage(results)
            return sse(chunks)
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": i, "text": r.text, "logprobs": None, "finish_reason": finish(r, max_new)}
                            for i, r in enumerate(results)],
                "usage": usage(results), "routing": routing(results)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        users = [m for m in body.messages if m.role == "user"]
        if not users:
            raise APIError(400, "messages holds no user message", param="messages")
        prompt = _message_text(users[-1].content)
        max_new = 128 if body.max_tokens is None else body.max_tokens
        results = await run(body, [prompt], max_new)
        r = results[0]
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            base_chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model}
            chunks = [dict(base_chunk, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "finish_reason": None}])]
            chunks += [dict(base_chunk, choices=[{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
                       for piece in _split_stream(r.text)]
            chunks.append(dict(base_chunk, choices=[{"index": 0, "delta": {}, "finish_reason": finish(r, max_new)}],
                               usage=usage(results), routing=routing(results)))
            return sse(chunks)
        return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text},
                             "finish_reason": finish(r, max_new)}],
                "usage": usage(results), "routing": routing(results)}

    return app


def cmd_serve(args) -> None:
    import uvicorn

    from .base import load_base
    from .library import Library

    base = load_base(args.base)
    app = create_app(base, Library(args.library), api_key=args.api_key, max_batch=args.max_batch,
                     batch_wait_ms=args.batch_wait_ms, queue_size=args.queue_size)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def add_serve_command(subparsers) -> None:
    """`modulora serve`; `--library` may come before or after `serve`."""
    import argparse

    s = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server over the library")
    s.add_argument("--library", default=argparse.SUPPRESS,
                   help="library folder (as the top-level --library; default $MODULORA_HOME/library)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ endpoints")
    s.add_argument("--base", default=None, help="base model (default: the bundled SmolLM2)")
    s.add_argument("--max-batch", type=int, default=16, help="requests answered together at most")
    s.add_argument("--batch-wait-ms", type=float, default=10, help="wait this long for more requests to batch")
    s.add_argument("--queue-size", type=int, default=64, help="waiting requests at most (more -> 429)")
    s.add_argument("--log-level", default="info")
    s.set_defaults(func=cmd_serve)


__all__ = ["create_app", "add_serve_command", "Scheduler"]
