"""The FastAPI app (routes, API key, errors, models, health, metrics, adapters) and `modulora serve`.

The completions and chat handlers' logic is in `serving`, the worker in `scheduler`, the
request bodies in `protocol`; see the package's docstring for the behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import sqlite3
import threading
import re
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import upload
from .errors import APIError, error_responses
from .metrics import Metrics, endpoint_of
from ..routing.api import parse_fixed
from ..routing.experts import RoutingError
from .protocol import (SPECIAL_MODELS, STREAM_OK, UPLOAD_OPENAPI, ChatBody, CompletionBody, DetokenizeBody,
                       LoadLoRABody, TokenizeBody, UnloadLoRABody, _error, chat_messages, chat_params, check_bounds, check_text,
                       completion_params, completion_prompts)
from ..cli import STORAGE_WORDS, storage_problem
from .request_log import log_request
from .scheduler import Scheduler
from .serving import Serving
from .web import add_web


_log = logging.getLogger("modulora.serve")
MIN_FREE_BYTES = 64 << 20  # /health says the storage is full below this much free space


class Storage:
    """What the server knows of its library's storage, for /health: a write that failed with a
    full disk or quota (ENOSPC, EDQUOT) or a read-only file system (EROFS) marks it "full" or
    "read-only" until a later write succeeds; `state()` also looks at the file system itself
    (statvfs: read-only mount, or less than `min_free` bytes free)."""

    def __init__(self, root, min_free: int = MIN_FREE_BYTES):
        self.root, self.min_free = str(root), min_free
        self.problem: str | None = None
        self._lock = threading.Lock()

    def failed(self, problem: str, exc: BaseException, what: str) -> None:
        with self._lock:
            self.problem = problem
        _log.warning("storage %s (%s): %s failed: %s", problem, STORAGE_WORDS[problem], what, exc)

    def succeeded(self) -> None:
        with self._lock:
            self.problem = None

    def state(self) -> dict:
        out = {"storage": self.problem or "ok"}
        try:
            st = os.statvfs(self.root)
        except OSError:
            return out
        free = st.f_bavail * st.f_frsize
        out["storage_free_bytes"] = free
        if st.f_flag & getattr(os, "ST_RDONLY", 1):
            out["storage"] = "read-only"
        elif free < self.min_free and out["storage"] == "ok":
            out["storage"] = "full"
        return out


class GuardedLibrary:
    """The library as the server uses it: a full or read-only disk fails writes (their error
    goes on, the handler answers 507) but never a read or a completion: derived-data cache
    writes (Arrow prototypes, retrieval embeddings) are skipped with a warning, a failed cache
    read is a miss, and the adapter lists fall back to the last ones read. Every outcome is
    reported to `storage`. Other attributes are the library's own."""

    _LISTS = ("list", "latest_object_ids")

    def __init__(self, library, storage: Storage):
        self._library, self._storage = library, storage
        self._last: dict[str, object] = {}

    def __getattr__(self, name):
        return getattr(self._library, name)

    def _problem(self, exc: BaseException, what: str) -> bool:
        problem = storage_problem(exc)
        if problem is None:
            return False
        self._storage.failed(problem[0], exc, what)
        return True

    def add(self, *args, **kwargs):
        return self._write("add", *args, **kwargs)

    def remove(self, *args, **kwargs):
        return self._write("remove", *args, **kwargs)

    def _write(self, op: str, *args, **kwargs):
        try:
            out = getattr(self._library, op)(*args, **kwargs)
        except Exception as e:
            self._problem(e, f"library {op}")
            raise
        self._storage.succeeded()
        return out

    def put_derived(self, object_id: str, kind: str, value) -> None:
        try:
            self._library.put_derived(object_id, kind, value)
        except Exception as e:
            if not self._problem(e, f"caching {kind} for {object_id[:16]} (computed, not cached)"):
                raise

    def get_derived(self, object_id: str, kind: str):
        try:
            return self._library.get_derived(object_id, kind)
        except Exception as e:
            if not self._problem(e, f"reading cached {kind} (recomputed)"):
                raise
            return None

    def list(self):
        return self._read("list")

    def latest_object_ids(self):
        return self._read("latest_object_ids")

    def _read(self, op: str):
        try:
            out = getattr(self._library, op)()
        except Exception as e:
            if op not in self._last or not self._problem(e, f"library {op} (served the last one read)"):
                raise
            return self._last[op]
        self._last[op] = out
        return out


_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class _Gate:
    """Plain ASGI middleware (it never buffers a stream): the API key on writes, the request
    metrics, an `x-request-id` header, a `Warning` header per note a handler left in
    `request.state.warnings`, and one log line per request, written when the response has ended
    (a handler adds its fields to `request.state.log`)."""

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
                notes = [(b"warning", f'299 modulora "{w}"'.encode("latin-1", "replace"))
                         for w in state.get("warnings", ())]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode()),
                                                  *notes]}
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
            if state.get("warnings"):
                fields["warnings"] = state["warnings"]
            fields["latency_s"] = round(time.perf_counter() - start, 4)
            log_request(fields)


class _BodyLimit:
    """Plain ASGI middleware: the JSON endpoints' request bodies are refused with 413 past
    `limit` bytes, by their Content-Length before reading, else as counted while reading (a
    chunked body declares none), and with 408 (the connection closed) unless the whole body
    arrives within `timeout` seconds (None: no limit), so a client that declares a large body
    and stalls holds nothing; the body read is then handed to the app. Adapter uploads
    (`POST /v1/adapters`) have their own limits (`upload.read_body`) and pass untouched."""

    def __init__(self, app, limit: int, timeout: float | None = None):
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS")
                or scope["path"] == "/v1/adapters"):
            await self.app(scope, receive, send)
            return
        too_big = _error(413, f"the request body is larger than this server's limit of {self.limit} bytes "
                              "(--max-body-mb)", code="request_too_large")
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await _error(400, "bad Content-Length")(scope, receive, send)
                return
            if int(length) > self.limit:
                await too_big(scope, receive, send)
                return
        chunks, total, more = [], 0, True
        try:
            async with asyncio.timeout(self.timeout):
                while more and total <= self.limit:
                    message = await receive()
                    if message["type"] != "http.request":  # the client left: the app sees that after the body
                        break
                    chunks.append(message.get("body", b""))
                    total += len(chunks[-1])
                    more = message.get("more_body", False)
        except TimeoutError:
            late = upload.body_timed_out(self.timeout)
            await _error(late.status, late.message, code=late.code, headers=late.headers)(scope, receive, send)
            return
        if total > self.limit:
            await too_big(scope, receive, send)
            return
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": more}]
        if more:
            pending.append(message)
        del chunks

        async def replay():
            return pending.pop(0) if pending else await receive()

        await self.app(scope, replay, send)


def create_app(base, library, api_key: str | None = None, max_batch: int = 16, batch_wait_ms: float = 10,
               queue_size: int = 64, max_upload_bytes: int = 256 << 20, max_resident_experts: int | None = None,
               request_timeout: float | None = 300.0, prefix_cache: int = 32,
               allowed_adapter_dirs: Iterable[str | os.PathLike] | None = None, max_tokens: int = 4096,
               max_prompts: int = 64, max_messages: int = 512, max_body_bytes: int = 8 << 20,
               body_timeout: float | None = 30.0, prefill_chunk: int = 512,
               results_dir: str | os.PathLike | None = None) -> FastAPI:
    """The FastAPI app; its worker thread starts and stops with the app's lifespan.

    `max_upload_bytes` bounds an adapter upload's request body and, separately, the unpacked
    size of an uploaded archive; `max_resident_experts` the LoRA experts in memory (None: no
    bound); `request_timeout` a request's seconds (None: no limit; a request may ask for less);
    `prefix_cache` the routes whose chat-template KV is kept (0: none); `allowed_adapter_dirs`
    the directories `POST /v1/load_lora_adapter` may load from (None or empty: that endpoint is off);
    `max_tokens` the tokens a request may ask to generate, `max_prompts` the prompts of a
    completions request, `max_messages` the messages of a chat, `max_body_bytes` the body of a
    JSON request (more -> 400, 400, 400, 413); `body_timeout` the seconds a request body (JSON or
    upload) may take to arrive whole (more -> 408, the connection closed; None: no limit);
    `prefill_chunk` the prompt tokens fed between two decode steps (a longer prompt is prefilled
    over several steps, so it delays the running requests by at most one chunk's time each step).
    `results_dir`: a folder of `results.json` files the web page at `/` shows (None: none).

    Uploads are parsed, unpacked and added in a pool of UPLOAD_WORKERS threads of their own, so
    however many arrive they never take the default pool's threads, which completions and the
    other handlers use (library listings, the tokenizer)."""
    if min(max_tokens, max_prompts, max_messages, max_body_bytes) < 1:
        raise ValueError("max_tokens, max_prompts, max_messages and max_body_bytes must be at least 1")
    if request_timeout is not None and request_timeout <= 0:
        raise ValueError("request_timeout must be > 0 (None: no limit)")
    if body_timeout is not None and body_timeout <= 0:
        raise ValueError("body_timeout must be > 0 (None: no limit)")
    allowed_dirs = [Path(os.path.realpath(d)) for d in allowed_adapter_dirs or ()]
    for d in allowed_dirs:
        if not d.is_dir():
            raise ValueError(f"allowed adapter directory {str(d)!r} is not a directory")
    storage = Storage(library.root)
    library = GuardedLibrary(library, storage)
    for op in GuardedLibrary._LISTS:  # read once: what reads fall back to if the disk fails later
        try:
            getattr(library, op)()
        except Exception as e:
            if storage_problem(e) is None:
                raise
    staging = upload.staging_dir(library)
    try:
        removed = upload.clean_staging(staging)  # uploads a killed server left behind
    except OSError as e:  # a read-only library: nothing can be removed (nor staged)
        removed = 0
        _log.warning("cannot clean the upload staging folder %s: %s", staging, e)
    if removed:
        _log.info("removed %d upload staging folder(s) left by a stopped server in %s", removed, staging)
    scheduler = Scheduler(base, library, max_batch=max_batch, batch_wait_ms=batch_wait_ms, queue_size=queue_size,
                          max_resident_experts=max_resident_experts, prefix_cache=prefix_cache,
                          prefill_chunk=prefill_chunk)
    metrics = scheduler.metrics
    tok = base.tokenizer
    max_len, vocab_size = max_model_len(base), len(tok)

    uploads = upload_pool()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        nonlocal uploads
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()
            uploads.shutdown(wait=False, cancel_futures=True)
            uploads = upload_pool()  # threads start when used: a fresh pool, should the app start again

    app = FastAPI(title="modulora", lifespan=lifespan)
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    app.state.storage = storage
    app.add_middleware(_BodyLimit, limit=max_body_bytes, timeout=body_timeout)
    app.add_middleware(_Gate, api_key=api_key, metrics=metrics)  # added last: the outer one

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        log = getattr(request.state, "log", None)
        if log is not None and "error" not in log:  # the request log says why, not only the status
            log["error"] = exc.message[:300]
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

    @app.exception_handler(OSError)
    @app.exception_handler(sqlite3.Error)
    async def _storage_error(request, exc: Exception):
        """A full disk or quota, or a read-only file system -> 507 naming it; other errors -> 500."""
        problem = storage_problem(exc)
        if problem is None:
            raise exc
        storage.failed(problem[0], exc, f"{request.method} {request.url.path}")
        return _error(507, f"the server's adapter library cannot be written ({STORAGE_WORDS[problem[0]]}); "
                           "nothing was changed, reads and completions still work", "server_error",
                      code="insufficient_storage")

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):
        return _error(500, f"{type(exc).__name__}: {exc}", "server_error")

    async def adapter_names() -> set[str]:
        return {r.name for r in await asyncio.to_thread(library.list)}

    @app.get("/health", responses={503: {"description": "The worker is not running (body: status \"stopped\")"}})
    async def health():
        """200 "ok"; 200 "degraded" when the library's storage is full or read-only (uploads and
        deletes answer 507, reads and completions work); 503 "stopped" when the worker is not."""
        alive = scheduler.alive
        disk = await asyncio.to_thread(storage.state)
        status = "stopped" if not alive else "ok" if disk["storage"] == "ok" else "degraded"
        return JSONResponse({"status": status, **disk, "queued": scheduler.waiting(),
                             "running": len(scheduler.engine.rows)}, status_code=200 if alive else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_text():
        eng = scheduler.engine
        return PlainTextResponse(metrics.render(scheduler.waiting(), len(eng.rows), scheduler.resident.stats(),
                                                (eng.prefix_hits, eng.prefix_misses)),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/adapters", status_code=201, responses=error_responses(400, 401, 408, 409, 413, 422, 507),
              openapi_extra=UPLOAD_OPENAPI)
    async def upload_adapter(request: HTTPRequest):
        created = False
        loop = asyncio.get_running_loop()
        try:
            body = await upload.read_body(request, max_upload_bytes, body_timeout)
            fields, files = await loop.run_in_executor(uploads, upload.parse_multipart, body,
                                                       request.headers.get("content-type", ""))
            del body
            name = upload.check_upload_name(fields.get("name", ""), SPECIAL_MODELS)
            request.state.log["adapter"] = name
            adapter_files = await loop.run_in_executor(uploads, upload.adapter_files, files, max_upload_bytes)
            del files
            rec = await loop.run_in_executor(uploads, upload.add_to_library, library, name, adapter_files,
                                             base.fingerprint, staging)
            created = True
        finally:
            metrics.upload(created)
        return JSONResponse({"object": "adapter", "id": rec.name, "name": rec.name, "version": rec.version,
                             "type": rec.type, "object_id": rec.object_id, "created": rec.created,
                             "num_params": rec.num_params}, status_code=201)

    async def on_adapter(call, name: str):
        """Run a library call for one named adapter off the event loop; unknown names -> 404."""
        from ..library import LibraryError

        try:
            return await asyncio.to_thread(call, name)
        except LibraryError as e:
            raise upload.refusal(e, APIError(404, str(e), param="name", code="adapter_not_found")) from None

    @app.get("/v1/adapters/{name}", responses=error_responses(404))
    async def show_adapter(name: str):
        info = await on_adapter(library.show, name)
        info.pop("path", None)  # the server's file system is not the client's business
        return info

    @app.delete("/v1/adapters/{name}", responses=error_responses(400, 401, 404, 408, 413, 507))
    async def delete_adapter(name: str):
        n = await on_adapter(library.remove, name)
        metrics.delete()
        return {"object": "adapter.deleted", "id": name, "name": name, "deleted": True, "versions_removed": n}

    def model_card(name: str, created: int) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "modulora", "root": base.name,
                "parent": None if name == "base" else base.name, "max_model_len": max_len}

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        names = sorted(await adapter_names()) + list(SPECIAL_MODELS)
        return {"object": "list", "data": [model_card(n, created) for n in names]}

    @app.get("/v1/models/{model_id:path}", responses=error_responses(404))
    async def model(model_id: str):
        if model_id not in SPECIAL_MODELS and model_id not in await adapter_names():
            raise APIError(404, f"the model {model_id!r} does not exist; GET /v1/models lists them", param="model",
                           code="model_not_found")
        return model_card(model_id, int(time.time()))

    async def check_model(spec: str | None) -> None:
        """404 unless `spec` (when given) names a model or a fixed route of known adapters."""
        if spec is None or spec.strip() in SPECIAL_MODELS:
            return
        names = await adapter_names()
        try:
            unknown = [n for n in parse_fixed(spec) if n not in names]
        except RoutingError:
            unknown = [spec]
        if unknown:
            raise APIError(404, f"the model {unknown[0]!r} does not exist; GET /v1/models lists them", param="model",
                           code="model_not_found")

    # -- the tokenizer (vLLM's /tokenize and /detokenize): every model shares the base's ----------

    @app.post("/tokenize", responses=error_responses(400, 404, 408, 413))
    async def tokenize(body: TokenizeBody):
        await check_model(body.model)
        if body.messages is not None:
            if len(body.messages) > max_messages:
                raise APIError(400, f"messages holds {len(body.messages)} messages; this server takes at most "
                                    f"{max_messages} per request", param="messages")
            messages = chat_messages(body)
            text = await asyncio.to_thread(tok.apply_chat_template, messages, tokenize=False,
                                           add_generation_prompt=body.add_generation_prompt)
            special = bool(body.add_special_tokens)
        else:
            text, special = check_text(body.prompt, "prompt"), body.add_special_tokens is not False
        ids = await asyncio.to_thread(tok.encode, text, add_special_tokens=special)
        out = {"count": len(ids), "max_model_len": max_len, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = tok.convert_ids_to_tokens(ids)
        return out

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        """The tokenizer's settings as vLLM gives them (lm-eval discovers the tokenizer here)."""
        def special(name):
            value = getattr(tok, name, None)
            return value if isinstance(value, str) else None

        return {"tokenizer_class": type(tok).__name__, "eos_token": special("eos_token"),
                "bos_token": special("bos_token"), "pad_token": special("pad_token"),
                "unk_token": special("unk_token"), "chat_template": getattr(tok, "chat_template", None),
                "model_max_length": max_len, "vocab_size": vocab_size}

    @app.post("/detokenize", responses=error_responses(400, 404, 408, 413))
    async def detokenize(body: DetokenizeBody):
        await check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"tokens holds {bad[0]}, outside the vocabulary [0, {vocab_size})", param="tokens")
        return {"prompt": await asyncio.to_thread(tok.decode, body.tokens)}

    # -- vLLM's adapter loading from the server's own disk -----------------------------------------

    @app.post("/v1/load_lora_adapter", responses=error_responses(400, 401, 403, 408, 409, 413, 422, 507))
    async def load_lora_adapter(request: HTTPRequest, body: LoadLoRABody):
        if not allowed_dirs:
            raise APIError(403, "loading adapters from server paths (lora_path) is off; the operator enables it with "
                                "--allowed-adapter-dir DIR (uploads: POST /v1/adapters)", param="lora_path",
                           code="adapter_loading_disabled")
        try:
            name = upload.check_upload_name(body.lora_name, SPECIAL_MODELS)
        except APIError as e:
            msg = "lora_name is missing" if not body.lora_name.strip() else f"lora_name: {e.message}"
            raise APIError(e.status, msg, param="lora_name", code=e.code) from None
        request.state.log["adapter"] = name
        path = adapter_dir(body.lora_path, allowed_dirs)
        if name in await adapter_names():  # as vLLM: a loaded name is unloaded first, not overwritten
            raise APIError(400, f"lora_name {name!r} is already loaded; unload it first", param="lora_name",
                           code="adapter_exists")
        created = False
        try:
            rec = await asyncio.to_thread(add_dir, library, name, path, base.fingerprint)
            created = True
        finally:
            metrics.upload(created)
        return {"object": "adapter", "id": rec.name, "name": rec.name, "version": rec.version, "type": rec.type,
                "object_id": rec.object_id, "created": rec.created, "num_params": rec.num_params,
                "message": f"Success: LoRA adapter {name!r} added successfully."}

    @app.post("/v1/unload_lora_adapter", responses=error_responses(400, 401, 404, 408, 413, 507))
    async def unload_lora_adapter(request: HTTPRequest, body: UnloadLoRABody):
        request.state.log["adapter"] = body.lora_name
        try:
            n = await on_adapter(library.remove, body.lora_name)
        except APIError as e:
            raise APIError(404, f"lora_name: {e.message}", param="lora_name", code=e.code) from None
        metrics.delete()
        return {"object": "adapter.deleted", "id": body.lora_name, "name": body.lora_name, "deleted": True,
                "versions_removed": n, "message": f"Success: LoRA adapter {body.lora_name!r} removed successfully."}

    # -- completions -------------------------------------------------------------------------------
    serving = Serving(scheduler, tok, adapter_names, request_timeout)
    app.state.serving = serving

    def note(request: HTTPRequest, body) -> None:
        """Log the client's `user` and hand the body's warnings to the Warning header."""
        if body.user is not None:
            request.state.log["user"] = body.user
        if body.warnings:
            request.state.warnings = list(body.warnings)

    @app.post("/v1/completions", responses={**STREAM_OK, **error_responses(400, 401, 404, 408, 409, 413, 429, 503, 504)})
    async def completions(request: HTTPRequest, body: CompletionBody):
        note(request, body)
        check_bounds(body, max_tokens, max_prompts)
        completion_prompts(body), completion_params(body)  # checked here whatever the handler reads
        return await serving.completions(request, body)

    @app.post("/v1/chat/completions",
              responses={**STREAM_OK, **error_responses(400, 401, 404, 408, 409, 413, 429, 503, 504)})
    async def chat_completions(request: HTTPRequest, body: ChatBody):
        note(request, body)
        check_bounds(body, max_tokens, max_messages)
        chat_messages(body), chat_params(body)
        return await serving.chat(request, body)

    add_web(app, library, results_dir, base_name=base.name, api_key_required=api_key is not None)
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema without the 422 "Validation Error" it adds to every route with a body
    or a path parameter: this server answers those 400 (the routes that do send 422 declare it)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                ref = (op.get("responses", {}).get("422", {}).get("content", {}).get("application/json", {})
                       .get("schema", {}).get("$ref", ""))
                if ref.endswith("/HTTPValidationError"):
                    del op["responses"]["422"]
        for unused in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(unused, None)
        app.openapi_schema = schema
    return app.openapi_schema


UPLOAD_WORKERS = 2  # uploads unpacked and added at once; more wait for a thread of this pool


def upload_pool() -> ThreadPoolExecutor:
    """The uploads' own threads (parse, unpack, add), apart from the default pool."""
    return ThreadPoolExecutor(UPLOAD_WORKERS, thread_name_prefix="modulora-upload")


def max_model_len(base) -> int | None:
    """The longest sequence the base takes: its position limit, or the tokenizer's if smaller
    (tokenizers without one say 1e30)."""
    limits = [getattr(base.model.config, "max_position_embeddings", None),
              getattr(base.tokenizer, "model_max_length", None)]
    limits = [int(n) for n in limits if isinstance(n, int) and 0 < n < 1 << 32]
    return min(limits) if limits else None


def adapter_dir(text: str, allowed: list[Path]) -> Path:
    """The adapter directory `text` names, symlinks and `..` resolved first; 403 unless it lies
    inside one of the `allowed` (resolved) directories, 400 when it is not a directory."""
    if not text or "\0" in text:
        raise APIError(400, "lora_path is empty or malformed", param="lora_path")
    try:
        path = Path(os.path.realpath(text))
        if not any(path == d or path.is_relative_to(d) for d in allowed):
            raise APIError(403, "lora_path is outside the directories this server loads adapters from "
                                "(--allowed-adapter-dir)", param="lora_path", code="path_not_allowed")
        if not path.is_dir():
            raise APIError(400, "lora_path is not a directory", param="lora_path", code="invalid_adapter")
    except (OSError, ValueError) as e:  # unreadable folders, names too long, lone surrogates
        raise APIError(400, f"lora_path cannot be read: {e}", param="lora_path", code="invalid_adapter") from None
    return path


def add_dir(library, name: str, path: Path, fingerprint: dict):
    """Add the adapter directory `path` as `name`, checked as an upload is (the library's add);
    refused adapters -> 422 (the library is unchanged), a busy library -> 409."""
    from ..base import BaseModelError
    from ..library import LibraryError
    from ..validate import ValidationError

    try:
        return library.add(name, path, fingerprint)
    except (ValidationError, BaseModelError) as e:
        raise APIError(422, f"the adapter at lora_path is refused: {e}", param="lora_path",
                       code="invalid_adapter") from None
    except LibraryError as e:
        raise upload.refusal(e, APIError(409, str(e), code="library_busy")) from None


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


def cmd_serve(args) -> None:
    import uvicorn

    from ..base import load_base
    from ..library import Library
    from .request_log import configure

    configure(args.log_format)
    keep_freed_memory()
    base = load_base(args.base, device=args.device, dtype=args.dtype, serving=True)
    app = create_app(base, Library(args.library), api_key=args.api_key, max_batch=args.max_batch,
                     batch_wait_ms=args.batch_wait_ms, queue_size=args.queue_size,
                     max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
                     max_resident_experts=args.max_resident_experts or None,
                     request_timeout=args.request_timeout or None, prefix_cache=args.prefix_cache,
                     allowed_adapter_dirs=args.allowed_adapter_dirs, max_tokens=args.max_tokens,
                     max_prompts=args.max_prompts, max_messages=args.max_messages,
                     max_body_bytes=max(1, int(args.max_body_mb * (1 << 20))),
                     body_timeout=args.body_timeout or None, prefill_chunk=args.prefill_chunk,
                     results_dir=args.results)
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
    from ..cli import add_compute_args

    add_compute_args(s)
    s.add_argument("--max-batch", type=at_least(1), default=16, help="prompts generating together at most")
    s.add_argument("--batch-wait-ms", type=at_least(0, float), default=10,
                   help="when idle, wait this long for more requests to start together")
    s.add_argument("--queue-size", type=at_least(1), default=64, help="waiting requests at most (more -> 429)")
    s.add_argument("--max-upload-mb", type=at_least(0, float), default=256,
                   help="largest adapter upload, and largest unpacked archive, in MiB (more -> 413)")
    s.add_argument("--max-tokens", type=at_least(1), default=4096,
                   help="tokens a request may ask to generate at most (max_tokens, max_completion_tokens; "
                        "more -> 400)")
    s.add_argument("--max-prompts", type=at_least(1), default=64,
                   help="prompts per completions request at most (more -> 400)")
    s.add_argument("--max-messages", type=at_least(1), default=512,
                   help="messages per chat request at most (more -> 400)")
    s.add_argument("--max-body-mb", type=at_least(0, float), default=8,
                   help="largest JSON request body in MiB (more -> 413; uploads: --max-upload-mb)")
    s.add_argument("--body-timeout", type=at_least(0, float), default=30, metavar="SECONDS",
                   help="seconds a request body (JSON or upload) may take to arrive whole, else 408 and "
                        "the connection is closed (0: no limit; raise it for large uploads over slow links)")
    s.add_argument("--max-resident-experts", type=at_least(0), default=0,
                   help="LoRA experts kept in memory at most, least recently used evicted (0: no bound)")
    s.add_argument("--request-timeout", type=at_least(0, float), default=300,
                   help="seconds a request may take, queueing included, before it is stopped with 504 "
                        "(0: no limit; a request's own 'timeout' field may ask for less)")
    s.add_argument("--prefix-cache", type=at_least(0), default=32,
                   help="routes whose chat-template keys/values are kept for reuse (0: none)")
    s.add_argument("--prefill-chunk", type=at_least(1), default=512, metavar="TOKENS",
                   help="prompt tokens fed between two decode steps: a longer prompt is prefilled a chunk "
                        "per step, so it delays the running requests by one chunk's time at most")
    s.add_argument("--allowed-adapter-dir", dest="allowed_adapter_dirs", action="append", default=[],
                   metavar="DIR", help="POST /v1/load_lora_adapter may load adapters from inside DIR "
                                       "(repeatable; none: that endpoint is off)")
    s.add_argument("--results", default=None, metavar="DIR",
                   help="a folder of evaluation results (results.json of modulora eval / experiments) "
                        "that the web page at / shows")
    s.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="one line per request on stderr: key=value text, or JSON")
    s.add_argument("--log-level", default="info", help="uvicorn's own log level")
    s.set_defaults(func=cmd_serve)


__all__ = ["create_app", "add_serve_command", "cmd_serve", "keep_freed_memory"]