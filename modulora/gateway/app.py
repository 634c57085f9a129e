"""The gateway's FastAPI app and `modulora gateway`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..routing.api import POLICIES, Router
from ..routing.experts import RoutingError
from ..routing.merge import MergeError
from .derive import build_folder, upstream_name
from .upstream import GatewayError, UpstreamAdapters, upstream_message

_log = logging.getLogger("modulora.gateway")

ARROW_REFUSED = ("per-token Arrow routing needs modulora's own engine: use `modulora serve` (the gateway turns "
                 "a route into one LoRA for the upstream, and Arrow picks experts per token and layer)")
# modulora's extension fields: read here, never forwarded (vLLM does not know them)
EXTENSIONS = ("adapter_weights", "route_top_k", "mode", "token_routing", "fallback", "arrow")


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "upstream_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def route_spec(body: dict) -> str:
    """The route text of a request: `adapter_weights` ({name: weight}) or else `model`."""
    weights = body.get("adapter_weights")
    if weights is not None:
        if not isinstance(weights, dict) or not weights:
            raise GatewayError(400, "adapter_weights must be a non-empty object {name: weight}", param="adapter_weights")
        return ",".join(f"{n}:{w!r}" for n, w in weights.items())
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise GatewayError(400, "model is missing: give a route (an adapter name, a mixture a:0.7,b:0.3, "
                                "retrieval, learned, uniform or base)", param="model")
    return model.strip()


def routing_texts(path: str, body: dict) -> list[str] | None:
    """What retrieval / learned routing reads, one text per prompt (chat: the last user message);
    None for prompts given as token ids."""
    if path.endswith("chat/completions"):
        users = [m.get("content") for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
        last = users[-1] if users else ""
        if isinstance(last, list):  # content parts
            last = " ".join(p.get("text", "") for p in last if isinstance(p, dict))
        return [last if isinstance(last, str) else ""]
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    return None


def route_top_k(body: dict, spec: str) -> int:
    """`route_top_k` (default 1); as `modulora serve` does for old clients, a greedy request to a
    routing policy that sends `top_k` without `route_top_k` means it for routing."""
    if ("top_k" in body and "route_top_k" not in body and spec in ("retrieval", "learned")
            and "adapter_weights" not in body and not body.get("temperature")):
        body["route_top_k"] = body.pop("top_k")
    k = body.get("route_top_k", 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise GatewayError(400, f"route_top_k must be an integer >= 1, got {k!r}", param="route_top_k")
    return k


class Gateway:
    """Resolves routes against the library and makes their LoRAs available on the upstream."""

    def __init__(self, library, client: httpx.AsyncClient, adapter_dir: Path, upstream_adapter_dir: str,
                 max_loras: int):
        self.library, self.client = library, client
        self.adapter_dir, self.upstream_adapter_dir = adapter_dir, upstream_adapter_dir.rstrip("/")
        self.router = Router(None, library)  # routes only: no base model in the gateway
        self.adapters = UpstreamAdapters(client, max_loras)
        self.base_model: str | None = None
        self._build_locks: dict[str, asyncio.Lock] = {}
        self._route_lock = threading.Lock()  # routers keep caches: one resolve at a time

    async def start(self) -> None:
        """Learn the upstream's base model name and which gateway adapters it already holds."""
        try:
            listed = await self.models()
        except GatewayError as e:
            _log.warning("%s; will retry on the first request", e.message)
            return
        await self.adapters.sync(listed)

    async def models(self) -> list[dict]:
        try:
            resp = await self.client.get("/v1/models")
        except httpx.HTTPError as e:
            raise GatewayError(502, f"the upstream did not answer /v1/models: {e!r}", code="upstream_unreachable") from None
        if resp.status_code != 200:
            raise GatewayError(502, f"the upstream's /v1/models answered HTTP {resp.status_code}: "
                                    f"{upstream_message(resp)}", code="upstream_error")
        listed = resp.json().get("data") or []
        bases = [m["id"] for m in listed if m.get("parent") is None]
        self.base_model = bases[0] if bases else (listed[0].get("root") or listed[0]["id"]) if listed else None
        return listed

    def resolve(self, spec: str, texts: list[str] | None, top_k: int, fallback=None
                ) -> tuple[dict[str, float] | None, dict | None]:
        """The request's route as {name: weight} (None: the base alone), checked for the upstream,
        and the abstention's decision (with a fallback)."""
        if spec == "arrow" or fallback == "arrow":
            raise GatewayError(400, ARROW_REFUSED, code="needs_modulora_engine",
                               param="model" if spec == "arrow" else "fallback")
        if fallback is not None and spec not in ("retrieval", "learned"):
            raise GatewayError(400, f"fallback applies to the retrieval and learned routes, not to {spec!r}",
                               param="fallback")
        if spec in ("retrieval", "learned") and texts is None:
            raise GatewayError(400, f"{spec} routing reads the prompt's text; this prompt is token ids",
                               param="prompt")
        texts = texts or [""]
        try:
            with self._route_lock:
                routes, decisions = self.router.resolve_traced(texts, [spec] * len(texts), top_k=top_k,
                                                               fallback=fallback)
        except RoutingError as e:
            status = 404 if str(e).startswith("unknown adapter") else 400
            raise GatewayError(status, str(e), param="model",
                               code="model_not_found" if status == 404 else None) from None
        except AttributeError:  # a learned router trained on the base model's embeddings
            raise GatewayError(400, f"{spec} routing here needs the base model, which the gateway does not load: "
                                    "retrain the router with --embedder minilm, or use `modulora serve`") from None
        if any(r != routes[0] for r in routes):
            raise GatewayError(400, "the prompts of this request route to different adapters; the gateway sends "
                                    "one LoRA per request: send one request per prompt", param="prompt")
        route = routes[0]
        types = self.router.adapter_types()
        for name in route or {}:
            if types.get(name) != "lora":
                raise GatewayError(400, f"adapter {name} is a {types.get(name)} adapter; a vLLM upstream serves LoRA "
                                        "adapters only: use `modulora serve` for it", param="model")
        return route, decisions[0].as_dict() if decisions[0] is not None else None

    async def prepare(self, route: dict[str, float]) -> tuple[str, dict]:
        """(upstream name, versions used) for the route's LoRA, loaded on the upstream and
        marked in use (the caller releases it)."""
        records = {r.name: r for r in await asyncio.to_thread(self.library.list)}
        missing = [n for n in route if n not in records]
        if missing:
            raise GatewayError(409, f"adapter {missing[0]} was removed while this request was routed; retry",
                               code="adapter_changed")
        name = upstream_name(route, {n: records[n].object_id for n in route})
        async with self._build_locks.setdefault(name, asyncio.Lock()):
            try:
                name, _ = await asyncio.to_thread(build_folder, self.library, route, records, self.adapter_dir)
            except MergeError as e:
                raise GatewayError(400, f"cannot make one LoRA of this route: {e}", param="model") from None
        await self.adapters.acquire(name, f"{self.upstream_adapter_dir}/{name}")
        return name, {n: records[n].version for n in route}


def create_gateway(library, upstream: str, adapter_dir: str | Path, *, upstream_adapter_dir: str | None = None,
                   max_loras: int = 8, api_key: str | None = None, upstream_api_key: str | None = None,
                   timeout: float = 600.0) -> FastAPI:
    """The gateway app: modulora's routing in front of a vLLM-compatible `upstream` URL.

    `adapter_dir`: where the gateway writes the LoRA folders the upstream loads;
    `upstream_adapter_dir`: the same folder as the upstream sees it (default: the same path);
    `max_loras`: adapters the gateway keeps loaded on the upstream at most."""
    adapter_dir = Path(adapter_dir).resolve()
    adapter_dir.mkdir(parents=True, exist_ok=True)
    headers = {"Authorization": f"Bearer {upstream_api_key}"} if upstream_api_key else {}
    state: dict[str, Gateway] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with httpx.AsyncClient(base_url=upstream.rstrip("/"), headers=headers,
                                     timeout=httpx.Timeout(timeout, connect=10)) as client:
            gw = Gateway(library, client, adapter_dir, upstream_adapter_dir or str(adapter_dir), max_loras)
            await gw.start()
            state["gw"] = app.state.gateway = gw
            yield

    app = FastAPI(title="modulora gateway", lifespan=lifespan)

    @app.exception_handler(GatewayError)
    async def on_error(request: Request, e: GatewayError):
        return error_body(e.status, e.message, e.code, e.param)

    def check_key(request: Request) -> None:
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            raise GatewayError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key")

    @app.get("/health")
    async def health():
        try:
            resp = await state["gw"].client.get("/health")
            up = "ok" if resp.status_code == 200 else f"HTTP {resp.status_code}"
        except httpx.HTTPError:
            up = "unreachable"
        return JSONResponse({"status": "ok" if up == "ok" else "degraded", "upstream": up},
                            200 if up == "ok" else 503)

    @app.get("/v1/models")
    async def models():
        gw = state["gw"]
        names = [r.name for r in await asyncio.to_thread(library.list) if r.type == "lora"]
        ids = names + [p for p in POLICIES if p != "arrow"] + ["base"]
        return {"object": "list", "data": [{"id": i, "object": "model", "owned_by": "modulora",
                                            "root": gw.base_model, "parent": None if i == "base" else gw.base_model}
                                           for i in ids]}

    async def forward(request: Request, path: str):
        check_key(request)
        try:
            body = await request.json()
        except ValueError:
            raise GatewayError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise GatewayError(400, "the request body must be a JSON object")
        gw = state["gw"]
        requested = body.get("model")
        spec = route_spec(body)
        for key in ("token_routing", "arrow"):
            if body.get(key):
                raise GatewayError(400, f"{key} needs modulora's own engine: use `modulora serve`", param=key)
        route, decision = await asyncio.to_thread(gw.resolve, spec, routing_texts(path, body),
                                                  route_top_k(body, spec), body.get("fallback"))
        said = {"abstention": decision} if decision else {}
        mode = body.get("mode", "mixture")
        if mode not in ("mixture", "average"):
            raise GatewayError(400, f"mode must be 'mixture' or 'average', got {mode!r}", param="mode")
        if mode == "average" and route is not None and len(route) > 1:
            raise GatewayError(400, "mode 'average' (parameter averaging) needs modulora's own engine: use "
                                    "`modulora serve`; the gateway serves output mixtures", param="mode")
        for key in EXTENSIONS:
            body.pop(key, None)
        if route is None:
            if gw.base_model is None:
                await gw.models()
            body["model"] = gw.base_model
            return await send(gw, path, body, requested, None, {"experts": {}, "versions": {}, **said})
        name, versions = await gw.prepare(route)
        body["model"] = name
        return await send(gw, path, body, requested, name, {"experts": route, "versions": versions, **said})

    async def send(gw: Gateway, path: str, body: dict, requested, name: str | None, trace: dict):
        """Forward the body; the slot `name` is released when the answer is done (streams: at
        their end)."""
        req = gw.client.build_request("POST", path, json=body)
        try:
            resp = await gw.client.send(req, stream=True)
        except BaseException as e:
            if name is not None:
                gw.adapters.release(name)
            if not isinstance(e, httpx.HTTPError):
                raise
            raise GatewayError(502, f"the upstream did not answer {path}: {e!r}", code="upstream_unreachable") from None
        if resp.status_code != 200 or not body.get("stream"):
            try:
                raw = await resp.aread()
            finally:
                await resp.aclose()
                if name is not None:
                    gw.adapters.release(name)
            if resp.status_code != 200:
                return Response(raw, resp.status_code, media_type=resp.headers.get("content-type"))
            data = json.loads(raw)
            add_trace(data, requested, trace)
            return JSONResponse(data)

        async def close() -> None:
            await resp.aclose()
            if name is not None:
                gw.adapters.release(name)

        return _Stream(stream(resp, requested, trace), close)

    async def stream(resp: httpx.Response, requested, trace: dict) -> AsyncIterator[str]:
        """The upstream's server-sent events, passed on line by line; each choice's last chunk
        (the one with its finish_reason) gets that choice's routing trace."""
        async for line in resp.aiter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                try:
                    chunk = json.loads(line[5:])
                except ValueError:
                    chunk = None
                if isinstance(chunk, dict):
                    add_trace(chunk, requested, trace, finished_only=True)
                    line = "data: " + json.dumps(chunk)
            yield line + "\n"

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await forward(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await forward(request, "/v1/chat/completions")

    return app


class _Stream(StreamingResponse):
    """A streamed answer that runs `close` once it is over, also when the client left before
    the first byte (the stream's own code then never runs): the upstream answer is closed and
    the adapter slot released either way."""

    def __init__(self, content, close):
        super().__init__(content, media_type="text/event-stream")
        self._close = close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._close()


def add_trace(data: dict, requested: Any, trace: dict, finished_only: bool = False) -> None:
    """Name the route the client asked for as the model, and add `routing` (one entry per
    choice: experts, their versions) in place of the upstream's."""
    if "model" in data and isinstance(requested, str):
        data["upstream_model"], data["model"] = data["model"], requested
    choices = [c for c in data.get("choices") or [] if isinstance(c, dict)]
    if finished_only:
        choices = [c for c in choices if c.get("finish_reason") is not None]
    data.pop("routing", None)
    if choices:
        data["routing"] = [{"index": c.get("index", i), **trace} for i, c in enumerate(choices)]


def cmd_gateway(args) -> None:
    import uvicorn

    from ..library import Library

    app = create_gateway(Library(args.library), args.upstream, args.adapter_dir,
                         upstream_adapter_dir=args.upstream_adapter_dir, max_loras=args.max_loras,
                         api_key=args.api_key, upstream_api_key=args.upstream_api_key)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def add_gateway_command(subparsers) -> None:
    """`modulora gateway`; `--library` may come before or after `gateway`."""
    import argparse

    g = subparsers.add_parser("gateway", help="an OpenAI-compatible front door: modulora's routing, generation "
                                              "by a vLLM-compatible upstream")
    g.add_argument("--upstream", required=True, help="the upstream's URL, e.g. http://127.0.0.1:8001")
    g.add_argument("--library", default=argparse.SUPPRESS,
                   help="library folder (as the top-level --library; default $MODULORA_HOME/library)")
    g.add_argument("--adapter-dir", required=True, metavar="DIR",
                   help="where the gateway writes the LoRA folders the upstream loads (shared with it)")
    g.add_argument("--upstream-adapter-dir", default=None, metavar="DIR",
                   help="the same folder as the upstream sees it (default: --adapter-dir)")
    g.add_argument("--max-loras", type=int, default=8,
                   help="adapters kept loaded on the upstream at most; least recently used unloaded (default 8)")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on completions")
    g.add_argument("--upstream-api-key", default=None, help="the upstream's API key (vLLM's --api-key)")
    g.add_argument("--log-level", default="info", help="uvicorn's own log level")
    g.set_defaults(func=cmd_gateway)
