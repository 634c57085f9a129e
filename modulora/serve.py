"""An OpenAI-compatible HTTP server over one base and one adapter library.

    modulora serve --library PATH --host 127.0.0.1 --port 8000 [--api-key KEY] [--base B]
                   [--max-resident-experts N] [--request-timeout S] [--log-format json|text]

Endpoints: `GET /health`, `GET /metrics`, `GET /v1/models`, `POST /v1/completions`,
`POST /v1/chat/completions`, `POST /v1/adapters`, `GET /v1/adapters/{name}`, `DELETE /v1/adapters/{name}`.
Uploads and their safety checks: `modulora.upload`; the Prometheus text: `modulora.prometheus`;
the per-request log: `modulora.request_log`.

API key (`--api-key`): GET endpoints are open (models, adapter info, health, metrics); every other
method under /v1/ needs `Authorization: Bearer KEY`: adapter uploads and deletes, and completions
(they spend the server's compute). An uploaded adapter is routable on the next request (the router
keys its caches by object ids); `DELETE /v1/adapters/{name}` removes all versions.

Requests:
- `model` is the route text (see `modulora.routing.api`): an adapter name, `a,b`, `a:0.7,b:0.3`,
  `arrow`, `retrieval`, `learned`, `uniform` or `base`. Extension fields: `top_k` (policies),
  `mode` (`mixture` | `average`), `adapter_weights` ({name: weight}, which becomes the route
  `a:0.7,b:0.3` and takes precedence over `model`), `timeout` (seconds, see below).
- Chat: the content of the last user message is the prompt; the routing code renders the base's
  chat template itself (earlier turns and system messages are not used).
- Decoding is greedy; `temperature`, `top_p` and other sampling fields are accepted and ignored.
- Every response carries `usage` (prompt tokens of the rendered prompt, completion tokens as
  generated, without the end token) and an extension field `routing`: one entry per choice,
  `{"index", "experts": {name: weight}}` ({} for the base alone).
- Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: unknown model or
  adapter -> 404, malformed JSON and other bad input -> 400, full queue -> 429 with Retry-After,
  missing or wrong API key (when one is set) -> 401, past the timeout -> 504 (below).

Scheduling (continuous batching, `modulora.routing.continuous`): one worker thread owns the model.
Each prompt is one item in a bounded queue (full -> 429). Between two decode steps the worker
takes what waits (when nothing runs it first waits `batch_wait_ms` for more to come together),
resolves the routes, makes sure the LoRA experts they need are resident, prefills them in one
pass and merges them into the running batch; every row leaves the batch the step it ends, so a
short answer never waits for a long one. Rows keep their own route, top_k, mode and max_tokens.
Routes naming series, parallel or prefix adapters are answered by `generate_routed` in a batch of
their own between two steps. An item whose route cannot be resolved fails alone (400).

Resident experts (`--max-resident-experts N`, `modulora.routing.resident`): at most N LoRA
experts in memory, least recently used evicted; a request whose experts do not fit beside the
ones running requests use waits (in order) until they finish. Arrow and `uniform` choose among
the whole library, so with more LoRA adapters than N they are refused (400); fixed routes and
retrieval / learned (which pick before generating) serve from a library of any size.

Streaming (`stream: true`): server-sent events in OpenAI's chunk shape, one as each token is
generated (text is held back only while it ends in an incomplete character or whitespace, so
the chunks join to exactly the non-streamed answer), then a final chunk with `finish_reason`,
`usage` and `routing`, then `data: [DONE]`. Errors found before the first token get their HTTP
status; a stream that fails later ends with one event holding the error object.

Stopping work: a client that disconnects (a stream closed early, or a plain request dropped; the
latter is noticed within 0.25 s) has its rows dropped at the next decode step. A request may run
at most `--request-timeout` seconds (server default, 300; 0: no limit) or its own `timeout` field
if smaller, queueing included; then its rows are dropped the same way and the answer is 504
`request_timeout` (504 rather than 408: the request arrived whole, it is the server that did not
finish in time). /metrics counts both (`modulora_requests_stopped_total{reason=...}`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hmac
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import upload
from .api_errors import APIError, error_body
from .prometheus import Metrics, endpoint_of
from .request_log import log_request
from .routing.api import POLICIES, Router, parse_fixed
from .routing.arrow import Arrow
from .routing.batch import Request, generate_routed
from .routing.continuous import ContinuousBatch, Job
from .routing.experts import RoutingError
from .routing.resident import ResidentExperts

SPECIAL_MODELS = ("base",) + POLICIES
DISCONNECT_POLL_S = 0.25  # how often a waiting plain (non-streamed) request checks its client


def _error(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI fields this server does not use are accepted

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    top_k: int = Field(default=1, ge=1)
    mode: Literal["mixture", "average"] = "mixture"
    adapter_weights: dict[str, float] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    timeout: float | None = Field(default=None, gt=0, allow_inf_nan=False)


class CompletionBody(_Body):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)


@dataclass(eq=False)  # compared by identity
class _Item:
    """One prompt on its way through the scheduler."""

    prompt: str
    route: str
    top_k: int
    mode: str
    max_new_tokens: int
    timeout: float | None = None  # seconds, for the error message
    deadline: float | None = None  # time.monotonic() past which the item gives up
    on_token: Callable[[int], None] | None = None  # called in the worker thread
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    stopped: str | None = None  # set by the handler: "client_disconnect", "timeout" or "abandoned"
    resolved: Any = None  # the route object, set by the worker

    def stop_reason(self) -> str | None:
        """Why this item should stop now (None: keep going); read by the worker before each step."""
        if self.stopped:
            return self.stopped
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "timeout"
        return None


@dataclass
class _Result:
    text: str
    experts: dict[str, float]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


def _timeout_error(seconds: float | None) -> APIError:
    limit = f" of {seconds:g} s" if seconds is not None else ""
    return APIError(504, f"the request did not finish within its timeout{limit}; ask for fewer max_tokens "
                         "or a longer timeout", "timeout_error", param="timeout", code="request_timeout")


def _stop_error(item: _Item, reason: str) -> APIError:
    if reason == "timeout":
        return _timeout_error(item.timeout)
    return APIError(499, f"the request was stopped ({reason.replace('_', ' ')})", code=reason)


class Scheduler:
    """One worker thread that owns the model: queued prompts join a continuously running batch."""

    def __init__(self, base, library, max_batch: int = 16, batch_wait_ms: float = 10, queue_size: int = 64,
                 max_resident_experts: int | None = None, prefix_cache: int = 32, join_min: int = 8,
                 join_wait_steps: int = 3):
        if max_batch < 1 or queue_size < 1:
            raise ValueError("max_batch and queue_size must be at least 1")
        if join_min < 1 or join_wait_steps < 0:
            raise ValueError("join_min must be at least 1 and join_wait_steps at least 0")
        self.base, self.router = base, Router(base, library)
        self.resident = ResidentExperts(library, base.fingerprint, capacity=max_resident_experts)
        self.engine = ContinuousBatch(base, prefix_entries=prefix_cache)
        self.max_batch, self.batch_wait = max_batch, batch_wait_ms / 1000.0
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.deferred: collections.deque[_Item] = collections.deque()  # resolved, waiting for expert room
        self._jobs: dict[int, _Item] = {}  # id(Job) -> its item, while admitted
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.batches = 0  # prefill passes (groups of prompts that joined together)
        self.steps = 0  # decode steps
        self.largest_batch = 0  # most rows in one pass
        self.metrics: Metrics = Metrics()
        # While rows are running, newcomers join in groups: a prefill has a fixed cost (every weight
        # is read once, as in a decode step) shared by the prompts it takes, so a few waiting
        # prompts wait up to `join_wait_steps` decode steps for `join_min` (or the free rows) to
        # gather. With nothing running they start at once (after `batch_wait_ms`).
        self.join_min, self.join_wait_steps = join_min, join_wait_steps
        self._holding_since: int | None = None  # the decode step at which waiting prompts were first held

    # -- lifecycle ---------------------------------------------------------------------------------

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
        shutting = APIError(503, "the server is shutting down", "server_error")
        for job in self.engine.clear("shutdown"):
            self._fail(self._jobs.pop(id(job), None), shutting)
        self.engine.release()
        while self.deferred:
            self._fail(self.deferred.popleft(), shutting)
        while True:
            try:
                self._fail(self.queue.get_nowait(), shutting)
            except queue.Empty:
                break

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def waiting(self) -> int:
        """Prompts not yet generating: queued, or resolved and waiting for room among the experts."""
        return self.queue.qsize() + len(self.deferred)

    def submit(self, items: list[_Item]) -> None:
        """Queue all items or none of them (429 when the queue cannot take them all)."""
        if not self.alive:
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
                item.future.set_exception(APIError(429, "the request queue is full; retry shortly",
                                                   "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}))

    # -- the worker --------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._hold():
                    self._admit()
                if self.engine.rows:
                    rows = len(self.engine.rows)
                    finished = self.engine.step()
                    self.steps += 1
                    self.largest_batch = max(self.largest_batch, rows)
                    self.metrics.step(rows)
                    self._deliver(finished)
            except Exception as e:  # noqa: BLE001 - the worker must survive any failure of one step
                for job in self.engine.clear("error"):
                    self._fail(self._jobs.pop(id(job), None), e)
                for item in list(self._jobs.values()):
                    self._fail(item, e)
                self._jobs.clear()

    def _hold(self) -> bool:
        """Whether to let waiting prompts gather for one more decode step before they join."""
        if not self.engine.rows:
            self._holding_since = None
            return False
        waiting = self.waiting()
        enough = min(self.join_min, self.max_batch - len(self.engine.rows))
        if waiting == 0 or waiting >= enough:
            self._holding_since = None
            return waiting == 0
        if self._holding_since is None:
            self._holding_since = self.steps
        if self.steps - self._holding_since >= self.join_wait_steps:
            self._holding_since = None
            return False
        return True

    def _take(self, n: int, wait: bool) -> list[_Item]:
        """Up to n queued items; with `wait`, block briefly for the first and then `batch_wait` for more."""
        items: list[_Item] = []
        if n <= 0:
            return items
        if wait:
            try:
                items.append(self.queue.get(timeout=0.1))
            except queue.Empty:
                return items
            deadline = time.monotonic() + self.batch_wait
            while len(items) < n:
                left = deadline - time.monotonic()
                try:
                    items.append(self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait())
                except queue.Empty:
                    break
            return items
        while len(items) < n:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _admit(self) -> None:
        """Let waiting items join the running batch (between two decode steps)."""
        free = self.max_batch - len(self.engine.rows)
        if free <= 0:
            return
        idle = not self.engine.rows and not self.deferred
        fresh = [it for it in self._take(free - len(self.deferred), wait=idle)
                 if it.future.set_running_or_notify_cancel()]
        if not fresh and not self.deferred:
            return
        fresh = self._live(fresh)
        self._resolve(fresh)
        fresh = [it for it in fresh if not it.future.done()]
        types = self.router.adapter_types() if fresh else {}
        family = [it for it in fresh if isinstance(it.resolved, dict)
                  and any(types.get(n) != "lora" for n in it.resolved)]
        if family:
            self._answer_family(family)
        candidates = self._live(list(self.deferred)) + [it for it in fresh if it not in family]
        self.deferred.clear()
        self._join(candidates, free)

    def _live(self, items: list[_Item]) -> list[_Item]:
        """The items still wanted; the others are answered with their stop reason."""
        out = []
        for it in items:
            reason = it.stop_reason()
            if reason:
                self._stopped(it, reason, 0)
            else:
                out.append(it)
        return out

    def _resolve(self, items: list[_Item]) -> None:
        """Set each item's route object; an item whose route fails is answered 400 alone."""
        by_k: dict[int, list[_Item]] = {}
        for it in items:
            by_k.setdefault(it.top_k, []).append(it)
        for k, group in by_k.items():
            try:
                routes = self.router.resolve([it.prompt for it in group], [it.route for it in group], top_k=k)
                for it, r in zip(group, routes):
                    it.resolved = r
            except RoutingError:  # find which ones fail, answer the rest
                for it in group:
                    try:
                        it.resolved = self.router.resolve([it.prompt], [it.route], top_k=k)[0]
                    except RoutingError as e:
                        self._fail(it, APIError(400, str(e), param="model"))

    def _needs(self, it: _Item) -> set[str]:
        """The LoRA experts an item's rows use."""
        if isinstance(it.resolved, Arrow):
            return set(self.router.lora_names())
        return set(it.resolved) if isinstance(it.resolved, dict) else set()

    def _pinned(self) -> set[str]:
        """The experts the running rows use (Arrow rows: every expert of the installed set)."""
        names: set[str] = set()
        for job in self.engine.rows:
            if isinstance(job.route, Arrow):
                names |= set(self.engine.expert_set.names)
            elif isinstance(job.route, dict):
                names |= set(job.route)
        return names

    def _join(self, candidates: list[_Item], free: int) -> None:
        """Admit candidates in order while their experts fit; the rest wait in `deferred`."""
        pinned = self._pinned()
        admit: list[_Item] = []
        blocked = False
        cap = self.resident.capacity
        for it in candidates:
            need = self._needs(it)
            if cap is not None and len(need) > cap:
                msg = (self.resident.needs_all_message(it.route, len(need))
                       if isinstance(it.resolved, Arrow) or it.route.strip() == "uniform" else
                       f"route {it.route!r} uses {len(need)} LoRA adapters at once, but this server keeps at most "
                       f"{cap} resident (--max-resident-experts)")
                self._fail(it, APIError(400, msg, param="model", code="too_many_experts"))
                continue
            if len(admit) >= free or (need and (blocked or not self.resident.fits(need, pinned))):
                blocked = blocked or bool(need)
                self.deferred.append(it)
                continue
            admit.append(it)
            pinned |= need
        if not admit:
            return
        needed = set().union(*(self._needs(it) for it in admit))
        if needed:
            try:
                self.engine.set_experts(self.resident.expert_set(needed, self._pinned()))
            except RoutingError as e:
                for it in admit:
                    if self._needs(it):
                        self._fail(it, APIError(400, str(e), param="model"))
                admit = [it for it in admit if not self._needs(it)]
                if not admit:
                    return
        jobs = [Job(it.prompt, it.resolved, mode=it.mode, max_new_tokens=it.max_new_tokens, on_token=it.on_token,
                    should_stop=it.stop_reason) for it in admit]
        for job, it in zip(jobs, admit):
            self._jobs[id(job)] = it
        try:
            finished = self.engine.add(jobs)
        except RoutingError as e:
            for job in jobs:
                self._fail(self._jobs.pop(id(job), None), APIError(400, str(e), param="model"))
            return
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(jobs))
        self.metrics.batch(len(jobs), sum(j.prompt_tokens for j in jobs))
        self._deliver(finished)

    def _answer_family(self, items: list[_Item]) -> None:
        """Series, parallel and prefix routes: one `generate_routed` batch of their own (the
        running rows wait for it); a batch refused as a whole is retried item by item."""
        types = self.router.adapter_types()
        named = {n for it in items for n in it.resolved}
        try:
            others = self.router.family_experts(sorted(n for n in named if types.get(n) != "lora"))
            lora = sorted(n for n in named if types.get(n) == "lora")
            if lora:  # a route mixing families is refused by generate_routed; it needs the set to say so
                self.engine.set_experts(self.resident.expert_set(set(lora), self._pinned()))
            requests = [Request(it.prompt, it.resolved, mode=it.mode, max_new_tokens=it.max_new_tokens)
                        for it in items]

            def on_token(i: int, token: int) -> None:
                if items[i].on_token is not None:
                    items[i].on_token(token)

            self.engine.ensure_installed()
            answers = generate_routed(self.base, self.engine.expert_set, requests, batch_size=len(requests),
                                      others=others, on_token=on_token,
                                      should_stop=lambda i: items[i].stop_reason() is not None)
        except RoutingError as e:
            if len(items) > 1:
                for it in items:
                    self._answer_family([it])
            else:
                self._fail(items[0], APIError(400, str(e), param="model"))
            return
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(items))
        self.metrics.batch(len(items), sum(a.prompt_tokens for a in answers))
        for it, a in zip(items, answers):
            if a.finish_reason == "stopped":
                self._stopped(it, it.stop_reason() or "abandoned", len(a.token_ids))
            else:
                self.metrics.finished(len(a.token_ids))
                it.future.set_result(_Result(a.text, a.experts, a.prompt_tokens, len(a.token_ids), a.finish_reason))

    def _deliver(self, jobs: list[Job]) -> None:
        tok = self.base.tokenizer
        for job in jobs:
            it = self._jobs.pop(id(job), None)
            if it is None:
                continue
            if job.finish_reason in ("stop", "length"):
                self.metrics.finished(len(job.tokens))
                it.future.set_result(_Result(tok.decode(job.tokens, skip_special_tokens=True).strip(), job.experts,
                                             job.prompt_tokens, len(job.tokens), job.finish_reason))
            else:
                self._stopped(it, job.finish_reason or "abandoned", len(job.tokens))

    def _stopped(self, it: _Item, reason: str, tokens: int) -> None:
        self.metrics.stop(reason, tokens)
        self._fail(it, _stop_error(it, reason))

    @staticmethod
    def _fail(it: _Item | None, exc: BaseException) -> None:
        if it is not None and not it.future.done():
            it.future.set_exception(exc)


class _TextStream:
    """Text deltas of one row's tokens that join to exactly `decode(tokens).strip()`.

    A few tokens before the newest are decoded again with it, so a tokenizer whose pieces depend
    on their neighbours (a leading space, a character split over byte tokens) still comes out as
    the full decode does; text ending in U+FFFD (an incomplete character) or in whitespace (which
    the final strip may remove) is held back until more text follows."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.start = self.read = 0  # the window decoded again / what was already turned into text
        self.raw = ""
        self.sent = ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.start:self.read], skip_special_tokens=True)
        now = self.tok.decode(self.ids[self.start:], skip_special_tokens=True)
        if len(now) > len(before) and not now.endswith("\ufffd") and now.startswith(before):
            self.raw += now[len(before):]
            self.start, self.read = self.read, len(self.ids)
        return self._emit(self.raw.strip())

    def finish(self, final: str) -> str:
        """The rest of the answer `final` (the non-streamed text)."""
        return self._emit(final)

    def _emit(self, text: str) -> str:
        if not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece


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


_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class _Gate:
    """Plain ASGI middleware (it never buffers a stream): the API key on writes, the request
    metrics, an `x-request-id` header and one log line per request, written when the response
    has ended (a handler adds its fields to `request.state.log`)."""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        method, path = scope["method"], scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"], state["log"] = rid, {}
        status, counted = 500, False

        async def send_(message):
            nonlocal status, counted
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
                if not counted:
                    counted = True
                    self.metrics.request(method, endpoint_of(path), status, time.perf_counter() - start)
            await send(message)

        try:
            # GET (and HEAD) are open; every other method under /v1/ needs the key when one is set:
            # adapter uploads and deletes, and completions (they spend the server's compute).
            if (self.api_key is not None and path.startswith("/v1/") and method not in ("GET", "HEAD", "OPTIONS")
                    and not hmac.compare_digest(headers.get("authorization", "").encode(),
                                                f"Bearer {self.api_key}".encode())):
                await _error(401, "missing or wrong API key (Authorization: Bearer KEY)",
                             code="invalid_api_key")(scope, receive, send_)
                return
            await self.app(scope, receive, send_)
        finally:
            if not counted:
                self.metrics.request(method, endpoint_of(path), 500, time.perf_counter() - start)
            fields = {"request_id": rid, "method": method, "path": path, "status": status}
            fields.update(state.get("log", {}))
            fields["latency_s"] = round(time.perf_counter() - start, 4)
            log_request(fields)


def create_app(base, library, api_key: str | None = None, max_batch: int = 16, batch_wait_ms: float = 10,
               queue_size: int = 64, max_upload_bytes: int = 256 << 20, max_resident_experts: int | None = None,
               request_timeout: float | None = 300.0, prefix_cache: int = 32) -> FastAPI:
    """The FastAPI app; its worker thread starts and stops with the app's lifespan.

    `max_upload_bytes` bounds an adapter upload's request body and, separately, the unpacked
    size of an uploaded archive; `max_resident_experts` the LoRA experts in memory (None: no
    bound); `request_timeout` a request's seconds (None: no limit; a request may ask for less);
    `prefix_cache` the routes whose chat-template KV is kept (0: none)."""
    if request_timeout is not None and request_timeout <= 0:
        raise ValueError("request_timeout must be > 0 (None: no limit)")
    scheduler = Scheduler(base, library, max_batch=max_batch, batch_wait_ms=batch_wait_ms, queue_size=queue_size,
                          max_resident_experts=max_resident_experts, prefix_cache=prefix_cache)
    metrics = scheduler.metrics
    tok = base.tokenizer

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="modulora", lifespan=lifespan)
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    app.add_middleware(_Gate, api_key=api_key, metrics=metrics)

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

    async def adapter_names() -> set[str]:
        return {r.name for r in await asyncio.to_thread(library.list)}

    @app.get("/health")
    async def health():
        alive = scheduler.alive
        return JSONResponse({"status": "ok" if alive else "stopped", "queued": scheduler.waiting(),
                             "running": len(scheduler.engine.rows)}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics_text():
        eng = scheduler.engine
        return PlainTextResponse(metrics.render(scheduler.waiting(), len(eng.rows), scheduler.resident.stats(),
                                                (eng.prefix_hits, eng.prefix_misses)),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/adapters", status_code=201)
    async def upload_adapter(request: HTTPRequest):
        created = False
        try:
            body = await upload.read_body(request, max_upload_bytes)
            fields, files = upload.parse_multipart(body, request.headers.get("content-type", ""))
            del body
            name = upload.check_upload_name(fields.get("name", ""), SPECIAL_MODELS)
            request.state.log["adapter"] = name
            adapter_files = await asyncio.to_thread(upload.adapter_files, files, max_upload_bytes)
            del files
            rec = await asyncio.to_thread(upload.add_to_library, library, name, adapter_files, base.fingerprint)
            created = True
        finally:
            metrics.upload(created)
        return JSONResponse({"object": "adapter", "id": rec.name, "name": rec.name, "version": rec.version,
                             "type": rec.type, "object_id": rec.object_id, "created": rec.created,
                             "num_params": rec.num_params}, status_code=201)

    async def on_adapter(call, name: str):
        """Run a library call for one named adapter off the event loop; unknown names -> 404."""
        from .library import LibraryError

        try:
            return await asyncio.to_thread(call, name)
        except LibraryError as e:
            raise APIError(404, str(e), param="name", code="adapter_not_found") from None

    @app.get("/v1/adapters/{name}")
    async def show_adapter(name: str):
        info = await on_adapter(library.show, name)
        info.pop("path", None)  # the server's file system is not the client's business
        return info

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str):
        n = await on_adapter(library.remove, name)
        metrics.delete()
        return {"object": "adapter.deleted", "id": name, "name": name, "deleted": True, "versions_removed": n}

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        names = sorted(await adapter_names()) + list(SPECIAL_MODELS)
        return {"object": "list",
                "data": [{"id": n, "object": "model", "created": created, "owned_by": "modulora"} for n in names]}

    # -- completions -------------------------------------------------------------------------------

    def timeout_of(body: _Body) -> float | None:
        limits = [t for t in (request_timeout, body.timeout) if t is not None]
        return min(limits) if limits else None

    async def start(request: HTTPRequest, body: _Body, prompts: list[str], max_new: int,
                    on_token: Callable[[int, int], None] | None = None) -> tuple[list[_Item], float | None]:
        """Queue the prompts of one request (after checking its route); its items and timeout."""
        log = request.state.log
        log.update(route=body.model if body.adapter_weights is None else "adapter_weights", stream=body.stream)
        route = _route_of(body, await adapter_names())
        timeout = timeout_of(body)
        deadline = None if timeout is None else time.monotonic() + timeout
        items = [_Item(p, route, body.top_k, body.mode, max_new, timeout=timeout, deadline=deadline,
                       on_token=None if on_token is None else (lambda t, i=i: on_token(i, t)))
                 for i, p in enumerate(prompts)]
        scheduler.submit(items)
        return items, timeout

    def abandon(items: list[_Item], reason: str) -> None:
        for it in items:
            if not it.future.done() and not it.stopped:
                it.stopped = reason

    async def wait_for(request: HTTPRequest, items: list[_Item], timeout: float | None, until) -> Any:
        """Await `until` (an awaitable) while watching the client and the clock: a client gone ->
        its items stop (499), the timeout passed -> they stop and 504."""
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        task = asyncio.ensure_future(until)
        try:
            while True:
                wait = DISCONNECT_POLL_S if end is None else max(0.0, min(DISCONNECT_POLL_S, end - loop.time()))
                done, _ = await asyncio.wait({task}, timeout=wait)
                if done:
                    return task.result()
                if end is not None and loop.time() >= end:
                    abandon(items, "timeout")
                    raise _timeout_error(timeout)
                if await request.is_disconnected():
                    abandon(items, "client_disconnect")
                    raise APIError(499, "the client closed the request", code="client_disconnect")
        finally:
            if not task.done():
                task.cancel()

    def record(request: HTTPRequest, results: list[_Result]) -> None:
        request.state.log.update(
            experts=results[0].experts if len(results) == 1 else [r.experts for r in results],
            prompt_tokens=sum(r.prompt_tokens for r in results),
            completion_tokens=sum(r.completion_tokens for r in results),
            finish_reason=results[0].finish_reason if len(results) == 1 else [r.finish_reason for r in results])

    def usage(results: list[_Result]) -> dict:
        p = sum(r.prompt_tokens for r in results)
        c = sum(r.completion_tokens for r in results)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def routing(results: list[_Result]) -> list[dict]:
        return [{"index": i, "experts": r.experts} for i, r in enumerate(results)]

    async def answer(request: HTTPRequest, body: _Body, prompts: list[str], max_new: int) -> list[_Result]:
        items, timeout = await start(request, body, prompts, max_new)
        try:
            results = await wait_for(request, items, timeout,
                                     asyncio.gather(*(asyncio.wrap_future(it.future) for it in items)))
        except BaseException:
            abandon(items, "abandoned")  # e.g. one prompt of several failed: the others stop too
            raise
        record(request, results)
        return results

    async def stream(request: HTTPRequest, body: _Body, prompts: list[str], max_new: int, head: list[dict],
                     piece_chunk: Callable[[int, str], dict],
                     end_chunk: Callable[[int, _Result, list[_Result] | None], dict]):
        """Server-sent events as the tokens come: `head` first, then `piece_chunk(index, text)` per
        text delta, `end_chunk(index, result, all_results)` as each prompt ends (all_results is
        given with the last one, None before), then [DONE]."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_token(i: int, token: int) -> None:  # in the worker thread
            loop.call_soon_threadsafe(events.put_nowait, (i, token))

        items, timeout = await start(request, body, prompts, max_new, on_token)
        for i, it in enumerate(items):  # after its tokens: the worker queues both in order
            it.future.add_done_callback(lambda f, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, None)))
        end = None if timeout is None else loop.time() + timeout
        try:  # an error before the first token is an ordinary HTTP error
            first = await wait_for(request, items, timeout, events.get())
        except BaseException:
            abandon(items, "abandoned")
            raise
        if first[1] is None and items[first[0]].future.exception() is not None:
            abandon(items, "abandoned")
            raise items[first[0]].future.exception()
        log = request.state.log

        async def gen():
            texts = [_TextStream(tok) for _ in items]
            results: list[_Result | None] = [None] * len(items)
            ended = False
            try:
                for chunk in head:
                    yield f"data: {json_dumps(chunk)}\n\n"
                ev = first
                while True:
                    i, token = ev
                    if token is not None:
                        piece = texts[i].add(token)
                        if piece:
                            yield f"data: {json_dumps(piece_chunk(i, piece))}\n\n"
                    else:
                        exc = items[i].future.exception()
                        if exc is not None:
                            err = exc if isinstance(exc, APIError) else APIError(500, f"{type(exc).__name__}: {exc}",
                                                                                 "server_error")
                            log.update(status=err.status, error=err.message)
                            yield f"data: {json_dumps(err.body())}\n\n"
                            ended = True
                            return
                        r = results[i] = items[i].future.result()
                        rest = texts[i].finish(r.text)
                        if rest:
                            yield f"data: {json_dumps(piece_chunk(i, rest))}\n\n"
                        last = all(x is not None for x in results)
                        yield f"data: {json_dumps(end_chunk(i, r, results if last else None))}\n\n"
                        if last:
                            record(request, results)
                            break
                    left = None if end is None else end - loop.time()
                    try:
                        ev = await asyncio.wait_for(events.get(), left) if left is None or left > 0 else None
                    except asyncio.TimeoutError:
                        ev = None
                    if ev is None:
                        abandon(items, "timeout")
                        err = _timeout_error(timeout)
                        log.update(status=err.status, error=err.message)
                        yield f"data: {json_dumps(err.body())}\n\n"
                        ended = True
                        return
                yield "data: [DONE]\n\n"
                ended = True
            finally:
                if not ended:  # the client went away (the response task was cancelled)
                    abandon(items, "client_disconnect")
                    log.update(status=499, error="client disconnected",
                               completion_tokens=sum(len(t.ids) for t in texts))

        return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest, body: CompletionBody):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        max_new = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default for completions
        rid, created = f"cmpl-{request.state.request_id}", int(time.time())
        base_chunk = {"id": rid, "object": "text_completion", "created": created, "model": body.model}
        if body.stream:
            def piece(i, text):
                return dict(base_chunk, choices=[{"index": i, "text": text, "logprobs": None, "finish_reason": None}])

            def ending(i, r, everything):
                c = dict(base_chunk, choices=[{"index": i, "text": "", "logprobs": None,
                                               "finish_reason": r.finish_reason}],
                         routing=[{"index": i, "experts": r.experts}])
                return c if everything is None else dict(c, usage=usage(everything))

            return await stream(request, body, prompts, max_new, [], piece, ending)
        results = await answer(request, body, prompts, max_new)
        return {**base_chunk,
                "choices": [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                            for i, r in enumerate(results)],
                "usage": usage(results), "routing": routing(results)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest, body: ChatBody):
        users = [m for m in body.messages if m.role == "user"]
        if not users:
            raise APIError(400, "messages holds no user message", param="messages")
        prompt = _message_text(users[-1].content)
        max_new = 128 if body.max_tokens is None else body.max_tokens
        rid, created = f"chatcmpl-{request.state.request_id}", int(time.time())
        base_chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model}
        if body.stream:
            head = [dict(base_chunk, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                               "finish_reason": None}])]

            def piece(i, text):
                return dict(base_chunk, choices=[{"index": 0, "delta": {"content": text}, "finish_reason": None}])

            def ending(i, r, everything):
                return dict(base_chunk, choices=[{"index": 0, "delta": {}, "finish_reason": r.finish_reason}],
                            usage=usage([r]), routing=routing([r]))

            return await stream(request, body, [prompt], max_new, head, piece, ending)
        r = (await answer(request, body, [prompt], max_new))[0]
        return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text},
                             "finish_reason": r.finish_reason}],
                "usage": usage([r]), "routing": routing([r])}

    return app


MALLOC_KEEP_BYTES = 32 << 20  # glibc's largest mmap threshold (HEAP_MAX_SIZE / 2 on 64-bit)


def keep_freed_memory(keep_bytes: int = MALLOC_KEEP_BYTES) -> bool:
    """Ask glibc's malloc to serve blocks up to `keep_bytes` from its heaps and keep freed memory
    there (mallopt M_MMAP_THRESHOLD, M_TRIM_THRESHOLD) instead of mapping and unmapping it.

    Every forward allocates activations, logits and a grown KV cache of a few hundred KiB to a
    few MiB; by default such blocks are mmap'ed, and each one's pages fault in afresh when first
    written, which on a virtual machine can cost as much as the arithmetic (a batched prefill
    took about twice as long). Kept memory is reused by the next forward, so the server's memory
    stays bounded by its largest step. False where this is not glibc (nothing changed)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    ok = mallopt(M_MMAP_THRESHOLD, int(keep_bytes)) == 1
    return bool(mallopt(M_TRIM_THRESHOLD, int(4 * keep_bytes)) == 1 and ok)


def json_dumps(obj) -> str:
    import json

    return json.dumps(obj, separators=(",", ":"))


def cmd_serve(args) -> None:
    import uvicorn

    from .base import load_base
    from .library import Library
    from .request_log import configure

    configure(args.log_format)
    keep_freed_memory()
    base = load_base(args.base)
    app = create_app(base, Library(args.library), api_key=args.api_key, max_batch=args.max_batch,
                     batch_wait_ms=args.batch_wait_ms, queue_size=args.queue_size,
                     max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
                     max_resident_experts=args.max_resident_experts or None,
                     request_timeout=args.request_timeout or None, prefix_cache=args.prefix_cache)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)


def add_serve_command(subparsers) -> None:
    """`modulora serve`; `--library` may come before or after `serve`."""
    import argparse

    def at_least(lo: float, kind=int):
        def parse(text: str):
            try:
                v = kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
            if not v >= lo:
                raise argparse.ArgumentTypeError(f"must be at least {lo}, got {text}")
            return v
        return parse

    s = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server over the library")
    s.add_argument("--library", default=argparse.SUPPRESS,
                   help="library folder (as the top-level --library; default $MODULORA_HOME/library)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/ endpoints other than GET")
    s.add_argument("--base", default=None, help="base model (default: the bundled SmolLM2)")
    s.add_argument("--max-batch", type=at_least(1), default=16, help="prompts generating together at most")
    s.add_argument("--batch-wait-ms", type=at_least(0, float), default=10,
                   help="when idle, wait this long for more requests to start together")
    s.add_argument("--queue-size", type=at_least(1), default=64, help="waiting requests at most (more -> 429)")
    s.add_argument("--max-upload-mb", type=at_least(0, float), default=256,
                   help="largest adapter upload, and largest unpacked archive, in MiB (more -> 413)")
    s.add_argument("--max-resident-experts", type=at_least(0), default=0,
                   help="LoRA experts kept in memory at most, least recently used evicted (0: no bound)")
    s.add_argument("--request-timeout", type=at_least(0, float), default=300,
                   help="seconds a request may take, queueing included, before it is stopped with 504 "
                        "(0: no limit; a request's own 'timeout' field may ask for less)")
    s.add_argument("--prefix-cache", type=at_least(0), default=32,
                   help="routes whose chat-template keys/values are kept for reuse (0: none)")
    s.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="one line per request on stderr: key=value text, or JSON")
    s.add_argument("--log-level", default="info", help="uvicorn's own log level")
    s.set_defaults(func=cmd_serve)


__all__ = ["create_app", "add_serve_command", "Scheduler", "Metrics"]
