"""The completions and chat handlers: turn a body into engine requests, queue them, wait for the
answers or stream them, and shape OpenAI's responses.

`Serving` holds what the handlers share (the scheduler, the tokenizer, the library's adapter
names and the server's request timeout); the app's routes call `completions` and `chat`.

Choices: a completions request with P prompts and n samples has P*n choices, choice index
p*n + s (as OpenAI numbers them). `usage` counts each prompt once and every sample's tokens.
Text is the model's own (raw decode, cut before a stop string), not stripped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse

from ..routing.api import parse_fixed
from ..routing.arrow import arrow_route
from ..routing.experts import RoutingError
from ..routing.requests import Answer, SamplingParams, TokenEvent, TokenLogprob
from .errors import APIError
from .protocol import (SPECIAL_MODELS, ChatBody, CompletionBody, _Body, chat_messages, chat_params, completion_params,
                       completion_prompts, json_dumps)
from .scheduler import Scheduler, _Item, _timeout_error

DISCONNECT_POLL_S = 0.25  # how often a waiting plain (non-streamed) request checks its client


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


class _Prompt:
    """One prompt of a request: its token ids, the text routers read, and its own span."""

    def __init__(self, ids: list[int], query: str, span: tuple[int, int] | None = None):
        self.ids, self.query, self.span = ids, query, span


class Serving:
    """The handlers' logic over one scheduler; `adapter_names` lists the library's adapters."""

    def __init__(self, scheduler: Scheduler, tokenizer, adapter_names: Callable[[], Awaitable[set[str]]],
                 request_timeout: float | None):
        self.scheduler, self.tok, self.adapter_names = scheduler, tokenizer, adapter_names
        self.engine = scheduler.engine
        self.request_timeout = request_timeout

    def timeout_of(self, body: _Body) -> float | None:
        limits = [t for t in (self.request_timeout, body.timeout) if t is not None]
        return min(limits) if limits else None

    # -- queueing and waiting --------------------------------------------------------------------

    async def start(self, request: HTTPRequest, body: _Body, prompts: list[_Prompt], params: SamplingParams,
                    on_token: Callable[[int, TokenEvent], None] | None = None) -> tuple[list[_Item], float | None]:
        """Queue the prompts of one request (after checking its route); its items and timeout."""
        log = request.state.log
        log.update(route=body.model if body.adapter_weights is None else "adapter_weights", stream=bool(body.stream))
        route = _route_of(body, await self.adapter_names())
        if body.fallback is not None and route not in ("retrieval", "learned"):
            raise APIError(400, f"fallback applies to the retrieval and learned routes, not to {route!r}",
                           param="fallback")
        arrow = body.arrow.given() if body.arrow is not None else None
        if arrow is not None and route != "arrow" and body.fallback != "arrow":
            raise APIError(400, f"arrow settings apply to model 'arrow' or fallback 'arrow', not to {route!r}",
                           param="arrow")
        if arrow is not None:
            try:
                arrow_route(body.route_top_k, dict(arrow))
            except RoutingError as e:
                raise APIError(400, str(e), param="arrow") from None
        for p in prompts:
            self._check_ids(p.ids)
            self._check_length(len(p.ids), params.max_tokens)
        timeout = self.timeout_of(body)
        deadline = None if timeout is None else time.monotonic() + timeout
        items = [_Item(p.ids, p.query, route, route_top_k=body.route_top_k, mode=body.mode, params=params,
                       fallback=body.fallback, arrow=arrow,
                       content_span=p.span, timeout=timeout, deadline=deadline, token_routing=bool(body.token_routing),
                       on_token=None if on_token is None else (lambda ev, i=i: on_token(i, ev)))
                 for i, p in enumerate(prompts)]
        self.scheduler.submit(items)
        return items, timeout

    @staticmethod
    def abandon(items: list[_Item], reason: str) -> None:
        for it in items:
            if not it.future.done() and not it.stopped:
                it.stopped = reason

    async def wait_for(self, request: HTTPRequest, items: list[_Item], timeout: float | None, until) -> Any:
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
                    self.abandon(items, "timeout")
                    raise _timeout_error(timeout)
                if await request.is_disconnected():
                    self.abandon(items, "client_disconnect")
                    raise APIError(499, "the client closed the request", code="client_disconnect")
        finally:
            if not task.done():
                task.cancel()
                task.add_done_callback(lambda t: t.cancelled() or t.exception())  # no "never retrieved" log

    async def answer(self, request: HTTPRequest, body: _Body, prompts: list[_Prompt],
                     params: SamplingParams) -> list[Answer]:
        items, timeout = await self.start(request, body, prompts, params)
        try:
            answers = await self.wait_for(request, items, timeout,
                                          asyncio.gather(*(asyncio.wrap_future(it.future) for it in items)))
        except BaseException:
            self.abandon(items, "abandoned")  # e.g. one prompt of several failed: the others stop too
            raise
        self.record(request, answers)
        return answers

    # -- shaping ---------------------------------------------------------------------------------

    def record(self, request: HTTPRequest, answers: list[Answer]) -> None:
        reasons = [s.finish_reason for a in answers for s in a.samples]
        request.state.log.update(
            experts=answers[0].experts if len(answers) == 1 else [a.experts for a in answers],
            prompt_tokens=sum(a.prompt_tokens for a in answers),
            completion_tokens=sum(a.completion_tokens for a in answers),
            finish_reason=reasons[0] if len(reasons) == 1 else reasons)

    @staticmethod
    def usage(answers: list[Answer]) -> dict:
        p = sum(a.prompt_tokens for a in answers)
        c = sum(a.completion_tokens for a in answers)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    @staticmethod
    def trace(index: int, a: Answer) -> dict:
        """One choice's routing trace: expert weights, the library version of each expert, and
        (retrieval / learned with a fallback) the abstention's decision."""
        trace = {"index": index, "experts": a.experts, "versions": a.versions or {}}
        if a.abstention is not None:
            trace["abstention"] = a.abstention.as_dict()
        return trace

    def routing(self, answers: list[Answer], n: int) -> list[dict]:
        return [self.trace(i * n + s, a) for i, a in enumerate(answers) for s in range(n)]

    @staticmethod
    def token_routing(pieces: list[str], routing: list | None) -> list[dict] | None:
        """The `token_routing` of a choice: per token, its text and the experts that made it."""
        if routing is None:
            return None
        return [{"token": text, "experts": r.experts, "layers": r.layers} for text, r in zip(pieces, routing)]

    def sample_routing(self, s) -> list[dict] | None:
        return self.token_routing([self.piece(t) for t in s.token_ids], s.routing)

    def piece(self, token: int) -> str:
        return self.tok.decode([token], skip_special_tokens=False)

    def completion_logprobs(self, entries: list[TokenLogprob | None], offset: int = 0) -> dict:
        """OpenAI's legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
        tokens, lps, tops, offsets = [], [], [], []
        for e in entries:
            if e is None:  # the first prompt token: nothing predicts it
                continue
            text = self.piece(e.token)
            offsets.append(offset)
            offset += len(text)
            tokens.append(text)
            lps.append(e.logprob)
            tops.append({self.piece(t): lp for t, lp in e.top})
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, entries: list[TokenLogprob]) -> dict:
        """OpenAI's chat logprobs: {"content": [{token, logprob, bytes, top_logprobs}]}."""
        def one(t: int, lp: float) -> dict:
            text = self.piece(t)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return {"content": [dict(one(e.token, e.logprob), top_logprobs=[one(t, lp) for t, lp in e.top])
                            for e in entries]}


    @staticmethod
    def _headers(body: _Body) -> dict:
        return {"Warning": f'299 modulora "{body.warnings[0]}"'} if body.warnings else {}

    # -- streaming ---------------------------------------------------------------------------------

    async def stream(self, request: HTTPRequest, body: _Body, prompts: list[_Prompt], params: SamplingParams,
                     head: list[dict], piece_chunk: Callable[[int, TokenEvent], dict | None],
                     end_chunk: Callable[[int, int, Answer], dict], usage_chunk: Callable[[list[Answer]], dict]):
        """Server-sent events as the tokens come: `head` first, then `piece_chunk(prompt, event)`
        per token (None: nothing to send), `end_chunk(prompt, sample, answer)` for each sample
        as its prompt ends (the last one also carries `usage`), `usage_chunk(answers)` (no
        choices) when the client asked for `stream_options.include_usage`, then [DONE]."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_token(i: int, ev: TokenEvent) -> None:  # in the worker thread
            loop.call_soon_threadsafe(events.put_nowait, (i, ev))

        items, timeout = await self.start(request, body, prompts, params, on_token)
        for i, it in enumerate(items):  # after its tokens: the worker queues both in order
            it.future.add_done_callback(lambda f, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, None)))
        end = None if timeout is None else loop.time() + timeout
        try:  # an error before the first token is an ordinary HTTP error
            first = await self.wait_for(request, items, timeout, events.get())
        except BaseException:
            self.abandon(items, "abandoned")
            raise
        if first[1] is None and items[first[0]].future.exception() is not None:
            self.abandon(items, "abandoned")
            raise items[first[0]].future.exception()
        log = request.state.log

        async def gen():
            answers: list[Answer | None] = [None] * len(items)
            sent_tokens = 0
            ended = False
            try:
                for chunk in head:
                    yield f"data: {json_dumps(chunk)}\n\n"
                ev = first
                while True:
                    i, token = ev
                    if token is not None:
                        sent_tokens += token.token >= 0
                        chunk = piece_chunk(i, token)
                        if chunk is not None:
                            yield f"data: {json_dumps(chunk)}\n\n"
                    else:
                        exc = items[i].future.exception()
                        if exc is not None:
                            err = exc if isinstance(exc, APIError) else APIError(500, f"{type(exc).__name__}: {exc}",
                                                                                 "server_error")
                            log.update(status=err.status, error=err.message)
                            yield f"data: {json_dumps(err.body())}\n\n"
                            ended = True
                            return
                        a = answers[i] = items[i].future.result()
                        last = all(x is not None for x in answers)
                        for s in range(len(a.samples)):
                            chunk = end_chunk(i, s, a)
                            if last and s == len(a.samples) - 1:
                                chunk = dict(chunk, usage=self.usage(answers))
                            yield f"data: {json_dumps(chunk)}\n\n"
                        if last:
                            self.record(request, answers)
                            if body.stream_options is not None and body.stream_options.include_usage:
                                yield f"data: {json_dumps(usage_chunk(answers))}\n\n"
                            break
                    left = None if end is None else end - loop.time()
                    try:
                        ev = await asyncio.wait_for(events.get(), left) if left is None or left > 0 else None
                    except asyncio.TimeoutError:
                        ev = None
                    if ev is None:
                        self.abandon(items, "timeout")
                        err = _timeout_error(timeout)
                        log.update(status=err.status, error=err.message)
                        yield f"data: {json_dumps(err.body())}\n\n"
                        ended = True
                        return
                yield "data: [DONE]\n\n"
                ended = True
            finally:
                if not ended:  # the client went away (the response task was cancelled)
                    self.abandon(items, "client_disconnect")
                    log.update(status=499, error="client disconnected", completion_tokens=sent_tokens)

        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", **self._headers(body)})

    # -- the endpoints -------------------------------------------------------------------------------

    def _check_length(self, n: int, max_tokens: int, at_least: bool = False) -> None:
        """400 when a prompt and max_tokens pass the model's context (checked before queueing)."""
        try:
            self.engine.check_length(n, max_tokens, at_least)
        except RoutingError as e:
            raise APIError(400, str(e), param="prompt") from None

    def _completion_prompts(self, body: CompletionBody, max_tokens: int) -> list[_Prompt]:
        """The prompts' token ids (run off the event loop: tokenizing is CPU work); a text far
        too long for the context is refused before it is tokenized."""
        texts = completion_prompts(body)
        for p in texts:
            if isinstance(p, str):
                self._check_length(self.engine.least_tokens(p), max_tokens, at_least=True)
        out = []
        for p in texts:
            if isinstance(p, str):
                out.append(_Prompt(self.engine.encode_text(p), p))
            else:
                self._check_ids(p)  # before decoding: the tokenizer overflows on ids past 2**63
                out.append(_Prompt(list(p), self.engine.decode(list(p))))
        return out

    def _check_ids(self, ids: list[int]) -> None:
        """400 for token ids outside the model's vocabulary."""
        vocab = self.engine.model.config.vocab_size
        if max(ids, default=0) >= vocab:
            raise APIError(400, f"prompt holds token id {max(ids)}; this model's vocabulary has {vocab}",
                           param="prompt")

    async def completions(self, request: HTTPRequest, body: CompletionBody):
        params = completion_params(body)
        prompts = await asyncio.to_thread(self._completion_prompts, body, params.max_tokens)
        n = params.n
        rid, created = f"cmpl-{request.state.request_id}", int(time.time())
        base_chunk = {"id": rid, "object": "text_completion", "created": created, "model": body.model}
        want_lp = body.logprobs is not None
        if body.stream:
            if body.echo:
                raise APIError(400, "echo is not supported with stream: true", param="echo")

            def piece(i, ev):
                if not ev.text and not (want_lp and ev.logprob is not None) and ev.routing is None:
                    return None
                lp = self.completion_logprobs([ev.logprob]) if want_lp and ev.logprob is not None else None
                choice = {"index": i * n + ev.index, "text": ev.text, "logprobs": lp, "finish_reason": None}
                if ev.routing is not None:
                    choice["token_routing"] = self.token_routing([ev.text], [ev.routing])
                return dict(base_chunk, choices=[choice])

            def ending(i, s, a):
                sample = a.samples[s]
                return dict(base_chunk, choices=[{"index": i * n + s, "text": "", "logprobs": None,
                                                  "finish_reason": sample.finish_reason, "stop_reason": sample.stop}],
                            routing=[self.trace(i * n + s, a)])

            def usage(answers):
                return dict(base_chunk, choices=[], usage=self.usage(answers))

            return await self.stream(request, body, prompts, params, [], piece, ending, usage)
        answers = await self.answer(request, body, prompts, params)
        choices = []
        for i, (p, a) in enumerate(zip(prompts, answers)):
            prefix = self.engine.decode(p.ids) if body.echo else ""
            for s in a.samples:
                lp = None
                if want_lp:
                    echoed = list(a.prompt_logprobs or [None])[1:] if body.echo else []
                    lp = self.completion_logprobs(echoed + list(s.logprobs or []))
                    if body.echo:  # the first prompt token is listed too, with null values
                        lp = self._with_first(lp, p.ids[0])
                choices.append({"index": i * n + s.index, "text": prefix + s.text, "logprobs": lp,
                                "finish_reason": s.finish_reason, "stop_reason": s.stop})
                if s.routing is not None:
                    choices[-1]["token_routing"] = self.sample_routing(s)
        return JSONResponse({**base_chunk, "choices": choices, "usage": self.usage(answers),
                             "routing": self.routing(answers, n)}, headers=self._headers(body))

    def _with_first(self, lp: dict, first: int) -> dict:
        """Put the prompt's first token at the head of echoed logprobs, with null values."""
        text = self.piece(first)
        return {"tokens": [text] + lp["tokens"], "token_logprobs": [None] + lp["token_logprobs"],
                "top_logprobs": [None] + lp["top_logprobs"],
                "text_offset": [0] + [o + len(text) for o in lp["text_offset"]]}

    def _chat_prompt(self, messages: list[dict], max_tokens: int) -> _Prompt:
        """A chat through the template (off the event loop), the last user message as the text a
        router reads; a chat far too long for the context is refused before it is tokenized."""
        least = sum(self.engine.least_tokens(m["content"]) for m in messages)
        self._check_length(least, max_tokens, at_least=True)
        try:
            ids = self.engine.encode_chat(messages)
        except RoutingError as e:
            raise APIError(400, str(e), param="messages") from None
        users = [m["content"] for m in messages if m["role"] == "user"]
        query = users[-1] if users else messages[-1]["content"]
        own, span = self.engine.encode_prompt(query)
        return _Prompt(ids, query, span if own == ids else None)

    async def chat(self, request: HTTPRequest, body: ChatBody):
        params = chat_params(body)
        messages = chat_messages(body)
        prompts = [await asyncio.to_thread(self._chat_prompt, messages, params.max_tokens)]
        n = params.n
        rid, created = f"chatcmpl-{request.state.request_id}", int(time.time())
        base_chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model}
        if body.stream:
            head = [dict(base_chunk, choices=[{"index": s, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None} for s in range(n)])]

            def piece(i, ev):
                if not ev.text and not (body.logprobs and ev.logprob is not None) and ev.routing is None:
                    return None
                lp = self.chat_logprobs([ev.logprob]) if body.logprobs and ev.logprob is not None else None
                choice = {"index": ev.index, "delta": {"content": ev.text}, "logprobs": lp, "finish_reason": None}
                if ev.routing is not None:
                    choice["token_routing"] = self.token_routing([ev.text], [ev.routing])
                return dict(base_chunk, choices=[choice])

            def ending(i, s, a):
                return dict(base_chunk, choices=[{"index": s, "delta": {}, "logprobs": None,
                                                  "finish_reason": a.samples[s].finish_reason}],
                            routing=[self.trace(s, a)])

            def usage(answers):
                return dict(base_chunk, choices=[], usage=self.usage(answers))

            return await self.stream(request, body, prompts, params, head, piece, ending, usage)
        a = (await self.answer(request, body, prompts, params))[0]
        choices = [{"index": s.index, "message": {"role": "assistant", "content": s.text},
                    "logprobs": self.chat_logprobs(s.logprobs) if body.logprobs else None,
                    "finish_reason": s.finish_reason, "stop_reason": s.stop} for s in a.samples]
        for c, s in zip(choices, a.samples):
            if s.routing is not None:
                c["token_routing"] = self.sample_routing(s)
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                             "choices": choices, "usage": self.usage([a]), "routing": self.routing([a], n)},
                            headers=self._headers(body))


__all__ = ["Serving", "DISCONNECT_POLL_S"]
