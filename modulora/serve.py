"""An OpenAI-compatible HTTP server over one base and one adapter library (first increment).

    modulora serve --library PATH --host 127.0.0.1 --port 8000 [--api-key KEY] [--base B]

Endpoints: `GET /health`, `GET /metrics`, `GET /v1/models`, `POST /v1/completions`,
`POST /v1/chat/completions`, `POST /v1/adapters`, `GET /v1/adapters/{name}`, `DELETE /v1/adapters/{name}`.

API key (`--api-key`): GET endpoints are open (models, adapter info, health, metrics); every other
method under /v1/ needs `Authorization: Bearer KEY`: adapter uploads and deletes, and completions
(they spend the server's compute).

Adapter uploads (`POST /v1/adapters`, multipart/form-data, parsed here without python-multipart):
a `name` field plus the files `adapter_config.json`, `adapter_model.safetensors` and optionally
`card.json` / `README.md`, OR one `.tar.gz`/`.tgz`/`.zip` file holding them at top level or in one
folder. The body is capped at `max_upload_bytes` (Content-Length checked first, bytes counted as
read) -> 413; it is held in memory. Archives are untrusted: the gzip stream is decompressed under
the same cap before tarfile reads it, zip sizes are summed first and counted again as read; members
that are links, devices, absolute, hold `..`, nest deeper than one folder, or number more than
MAX_ARCHIVE_MEMBERS are refused (400 `unsafe_archive`); only the allowed file names are written,
by this code, into a fresh temp dir (never `extractall`); other names -> 422. Then
`Library.add(name, tmpdir, base.fingerprint)`: 201 with the record; a refused adapter -> 422
`invalid_adapter` with the library unchanged; a bad or reserved name (a policy or `base`) -> 400.
The new adapter is routable on the next request (the router keys its caches by object ids).
`DELETE /v1/adapters/{name}` removes all versions; unknown names -> 404.

`GET /metrics` is Prometheus text: requests by method, endpoint and status, a latency histogram,
tokens, batches, a batch-size histogram, the queue depth and adapter uploads / deletes.

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
import hmac
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
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
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
        self.batches = 0  # batched generations run
        self.largest_batch = 0
        self.metrics: Metrics | None = None  # set by create_app

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
            if self.metrics is not None:
                self.metrics.batch(len(requests), sum(results[i].prompt_tokens for i in ok),
                                   sum(results[i].completion_tokens for i in ok))
        return results


# ---------------------------------------------------------------------------------------------
# metrics (Prometheus text format, no dependency)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/adapters")


def _endpoint_of(path: str) -> str:
    """A bounded label for a request path (never the raw path: its values are unbounded)."""
    if path.startswith("/v1/adapters/"):
        return "/v1/adapters/{name}"
    return path if path in _ENDPOINTS else "other"


class _Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = tuple(buckets), [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        lab = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{lab} {self.sum:.6g}", f"{name}_count{lab} {self.count}"]


class Metrics:
    """Counters, gauges and histograms of one server, rendered in Prometheus' text format."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.prompt_tokens = self.completion_tokens = self.batches = 0
        self.batch_size = _Histogram(_BATCH_BUCKETS)
        self.uploads: dict[str, int] = {"created": 0, "rejected": 0}
        self.deletes = 0

    def request(self, method: str, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (method, endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.latency.setdefault(endpoint, _Histogram(_LATENCY_BUCKETS)).observe(seconds)

    def batch(self, size: int, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            self.batches += 1
            self.batch_size.observe(size)
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens

    def upload(self, created: bool) -> None:
        with self._lock:
            self.uploads["created" if created else "rejected"] += 1

    def delete(self) -> None:
        with self._lock:
            self.deletes += 1

    def render(self, queue_depth: int) -> str:
        with self._lock:
            L = ["# HELP modulora_requests_total HTTP requests answered, by method, endpoint and status.",
                 "# TYPE modulora_requests_total counter"]
            L += [f'modulora_requests_total{{method="{m}",endpoint="{e}",status="{s}"}} {n}'
                  for (m, e, s), n in sorted(self.requests.items())]
            L += ["# HELP modulora_request_duration_seconds Time to the start of the response, by endpoint.",
                  "# TYPE modulora_request_duration_seconds histogram"]
            for e, h in sorted(self.latency.items()):
                L += h.lines("modulora_request_duration_seconds", f'endpoint="{e}"')
            L += ["# HELP modulora_generated_tokens_total Completion tokens generated.",
                  "# TYPE modulora_generated_tokens_total counter",
                  f"modulora_generated_tokens_total {self.completion_tokens}",
                  "# HELP modulora_prompt_tokens_total Prompt tokens processed.",
                  "# TYPE modulora_prompt_tokens_total counter",
                  f"modulora_prompt_tokens_total {self.prompt_tokens}",
                  "# HELP modulora_batches_total Batched generations run.",
                  "# TYPE modulora_batches_total counter",
                  f"modulora_batches_total {self.batches}",
                  "# HELP modulora_batch_size Prompts answered per batched generation.",
                  "# TYPE modulora_batch_size histogram"]
            L += self.batch_size.lines("modulora_batch_size")
            L += ["# HELP modulora_queue_depth Prompts waiting for the worker.",
                  "# TYPE modulora_queue_depth gauge",
                  f"modulora_queue_depth {queue_depth}",
                  "# HELP modulora_adapter_uploads_total Adapter uploads, by result.",
                  "# TYPE modulora_adapter_uploads_total counter"]
            L += [f'modulora_adapter_uploads_total{{result="{r}"}} {n}' for r, n in sorted(self.uploads.items())]
            L += ["# HELP modulora_adapter_deletes_total Adapters deleted (all versions of a name).",
                  "# TYPE modulora_adapter_deletes_total counter",
                  f"modulora_adapter_deletes_total {self.deletes}"]
        return "\n".join(L) + "\n"


# ---------------------------------------------------------------------------------------------
# adapter uploads: multipart parsing and untrusted archives

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip")
MAX_ARCHIVE_MEMBERS = 8  # the adapter files, plus one folder


def _parse_multipart(body: bytes, content_type: str) -> tuple[dict[str, str], list[tuple[str, bytes]]]:
    """(form fields, [(filename, content)]) of a multipart/form-data body; exact for binary parts."""
    from email.message import Message

    ct = Message()
    ct["content-type"] = content_type
    if ct.get_content_type() != "multipart/form-data" or not ct.get_param("boundary"):
        raise APIError(400, "send the adapter as multipart/form-data (a 'name' field and the adapter files, "
                            "or one .tar.gz/.tgz/.zip archive)", code="bad_upload")
    delim = b"--" + str(ct.get_param("boundary")).encode("latin-1")
    if body.startswith(delim):
        rest = body[len(delim):]
    else:
        at = body.find(b"\r\n" + delim)
        if at < 0:
            raise APIError(400, "malformed multipart body: no boundary", code="bad_upload")
        rest = body[at + 2 + len(delim):]
    fields: dict[str, str] = {}
    files: list[tuple[str, bytes]] = []
    closed = False
    for chunk in rest.split(b"\r\n" + delim):
        if chunk.startswith(b"--"):
            closed = True
            break
        if not chunk.startswith(b"\r\n"):
            raise APIError(400, "malformed multipart body", code="bad_upload")
        head, sep, content = chunk[2:].partition(b"\r\n\r\n")
        if not sep:
            raise APIError(400, "malformed multipart part: no blank line after its headers", code="bad_upload")
        headers = Message()
        for line in head.decode("latin-1").split("\r\n"):
            key, colon, value = line.partition(":")
            if colon:
                headers[key.strip()] = value.strip()
        if headers.get("content-disposition") is None:
            raise APIError(400, "multipart part without Content-Disposition", code="bad_upload")
        field_name = headers.get_param("name", header="content-disposition")
        filename = headers.get_filename()
        if filename is None:
            if field_name is None:
                raise APIError(400, "multipart field without a name", code="bad_upload")
            fields[str(field_name)] = content.decode("utf-8", "replace")
        else:
            files.append((str(filename), content))
    if not closed:
        raise APIError(400, "malformed multipart body: no closing boundary", code="bad_upload")
    return fields, files


def _refuse_unsafe(what: str) -> APIError:
    return APIError(400, f"archive refused: {what}", param="file", code="unsafe_archive")


def _member_target(name: str) -> tuple[str, str] | None:
    """(folder, filename) of an archive member path, refusing unsafe paths; None for a folder entry."""
    if not name or "\\" in name or "\x00" in name:
        raise _refuse_unsafe(f"member name {name!r}")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise _refuse_unsafe(f"absolute path {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise _refuse_unsafe(f"path {name!r} leaves the archive")
    if not parts:
        return None
    if len(parts) > 2:
        raise _refuse_unsafe(f"{name!r} is nested too deep (the files go at top level or in one folder)")
    return ("" if len(parts) == 1 else parts[0]), parts[-1]


def _check_file_name(fname: str, where: str) -> None:
    from .validate import ALLOWED_FILES, PICKLE_MESSAGE, PICKLE_SUFFIXES

    if fname.lower().endswith(PICKLE_SUFFIXES):
        raise APIError(422, f"{fname}: {PICKLE_MESSAGE}", param="file", code="invalid_adapter")
    if fname not in ALLOWED_FILES:
        raise APIError(422, f"unexpected file {fname!r} in {where}; an adapter holds only "
                            f"{', '.join(ALLOWED_FILES)}", param="file", code="invalid_adapter")


def _too_big(limit: int, what: str = "the upload") -> APIError:
    return APIError(413, f"{what} is over the limit of {limit} bytes", code="payload_too_large")


def _gunzip(data: bytes, limit: int) -> bytes:
    """Decompress gzip data, stopping as soon as the output passes `limit` bytes (gzip bombs)."""
    import zlib

    out, total = [], 0
    while data:
        d = zlib.decompressobj(wbits=31)
        buf = data
        while buf:
            try:
                piece = d.decompress(buf, 1 << 20)
            except zlib.error as e:
                raise APIError(400, f"the archive is not valid gzip: {e}", param="file", code="bad_archive") from None
            total += len(piece)
            if total > limit:
                raise _too_big(limit, "the unpacked archive")
            out.append(piece)
            buf = d.unconsumed_tail
            if d.eof:
                break
        if not d.eof:
            raise APIError(400, "the archive is truncated", param="file", code="bad_archive")
        data = d.unused_data.lstrip(b"\x00")  # concatenated gzip members; padding after the last
    return b"".join(out)


def _archive_files(filename: str, data: bytes, limit: int) -> dict[str, bytes]:
    """The adapter files of an untrusted archive, checked member by member; nothing is written."""
    import io
    import stat
    import tarfile
    import zipfile

    entries: list[tuple[str, Any]] = []  # (member name, reader) of regular files
    if filename.lower().endswith(".zip"):
        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
            infos = zf.infolist()
        except (zipfile.BadZipFile, ValueError, EOFError) as e:
            raise APIError(400, f"the archive is not a valid zip: {e}", param="file", code="bad_archive") from None
        if len(infos) > MAX_ARCHIVE_MEMBERS:
            raise _refuse_unsafe(f"{len(infos)} members (at most {MAX_ARCHIVE_MEMBERS})")
        if sum(i.file_size for i in infos) > limit:
            raise _too_big(limit, "the unpacked archive")
        for info in infos:
            mode = info.external_attr >> 16
            if info.flag_bits & 0x1:
                raise _refuse_unsafe(f"{info.filename!r} is encrypted")
            if info.is_dir():
                _member_target(info.filename)
                continue
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # 0: made without Unix modes
                raise _refuse_unsafe(f"{info.filename!r} is not a regular file (link or device)")
            entries.append((info.filename, lambda info=info: zf.open(info)))
    else:
        raw = _gunzip(data, limit)  # bounded before tarfile sees a byte
        try:
            tf = tarfile.open(fileobj=io.BytesIO(raw), mode="r:")
            members = []
            for m in tf:
                members.append(m)
                if len(members) > MAX_ARCHIVE_MEMBERS:
                    raise _refuse_unsafe(f"more than {MAX_ARCHIVE_MEMBERS} members")
        except tarfile.TarError as e:
            raise APIError(400, f"the archive is not a valid tar: {e}", param="file", code="bad_archive") from None
        if sum(m.size for m in members if m.isreg()) > limit:
            raise _too_big(limit, "the unpacked archive")
        for m in members:
            if m.isdir():
                _member_target(m.name)
                continue
            if m.issym() or m.islnk():
                raise _refuse_unsafe(f"{m.name!r} is a link")
            if not m.isreg():
                raise _refuse_unsafe(f"{m.name!r} is not a regular file (device, fifo...)")
            entries.append((m.name, lambda m=m: tf.extractfile(m)))
    folders, out = set(), {}
    for name, _ in entries:  # every path is checked before any content is read
        target = _member_target(name)
        if target is None:
            raise _refuse_unsafe(f"member name {name!r}")
        folders.add(target[0])
    if len(folders) > 1:
        raise _refuse_unsafe("the files must be at top level or in ONE folder")
    total = 0
    for name, reader in entries:
        fname = _member_target(name)[1]
        _check_file_name(fname, "the archive")
        if fname in out:
            raise _refuse_unsafe(f"{fname} appears twice")
        chunks = []
        try:
            with reader() as f:
                while piece := f.read(1 << 20):
                    total += len(piece)
                    if total > limit:
                        raise _too_big(limit, "the unpacked archive")
                    chunks.append(piece)
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, NotImplementedError, RuntimeError) as e:
            raise APIError(400, f"cannot read {name!r} from the archive: {e}", param="file",
                           code="bad_archive") from None
        out[fname] = b"".join(chunks)
    return out


def _write_upload(files: dict[str, bytes]) -> str:
    """A fresh temp dir holding exactly `files` (plain names, checked by the caller)."""
    import os
    import tempfile

    tmp = tempfile.mkdtemp(prefix="modulora-upload-")
    for fname, content in files.items():
        fd = os.open(os.path.join(tmp, fname),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
    return tmp


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
               queue_size: int = 64, max_upload_bytes: int = 256 << 20) -> FastAPI:
    """The FastAPI app; its worker thread starts and stops with the app's lifespan.

    `max_upload_bytes` bounds an adapter upload's request body and, separately, the unpacked
    size of an uploaded archive."""
    scheduler = Scheduler(base, library, max_batch=max_batch, batch_wait_ms=batch_wait_ms, queue_size=queue_size)
    metrics = Metrics()
    scheduler.metrics = metrics

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
        # GET (and HEAD) are open; every other method under /v1/ needs the key when one is set:
        # adapter uploads and deletes, and completions (they spend the server's compute).
        if (api_key is not None and request.url.path.startswith("/v1/")
                and request.method not in ("GET", "HEAD", "OPTIONS")):
            if not hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                       f"Bearer {api_key}".encode()):
                return _error(401, "missing or wrong API key (Authorization: Bearer KEY)",
                              code="invalid_api_key")
        return await call_next(request)

    @app.middleware("http")  # added last, so it runs first and also counts 401s
    async def _count(request: HTTPRequest, call_next):
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            metrics.request(request.method, _endpoint_of(request.url.path), status, time.perf_counter() - start)

    async def adapter_names() -> set[str]:
        return {r.name for r in await asyncio.to_thread(library.list)}

    @app.get("/health")
    async def health():
        alive = scheduler._thread is not None and scheduler._thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "stopped", "queued": scheduler.queue.qsize()},
                            status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics_text():
        return PlainTextResponse(metrics.render(scheduler.queue.qsize()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def read_body(request: HTTPRequest) -> bytes:
        length = request.headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise APIError(400, "bad Content-Length") from None
            if declared > max_upload_bytes:
                raise _too_big(max_upload_bytes)
        chunks, total = [], 0
        async for piece in request.stream():  # counted as read: chunked bodies declare no length
            total += len(piece)
            if total > max_upload_bytes:
                raise _too_big(max_upload_bytes)
            chunks.append(piece)
        return b"".join(chunks)

    def upload_files(fields: dict[str, str], files: list[tuple[str, bytes]]) -> dict[str, bytes]:
        if len(files) == 1 and files[0][0].lower().endswith(ARCHIVE_SUFFIXES):
            return _archive_files(files[0][0], files[0][1], max_upload_bytes)
        out: dict[str, bytes] = {}
        for fname, content in files:
            if fname.lower().endswith(ARCHIVE_SUFFIXES):
                raise APIError(400, "send one archive alone, or the adapter files without an archive",
                               param="file", code="bad_upload")
            if "/" in fname or "\\" in fname or fname in ("", ".", ".."):
                raise APIError(400, f"bad file name {fname!r}: send plain file names", param="file",
                               code="bad_upload")
            _check_file_name(fname, "the upload")
            if fname in out:
                raise APIError(400, f"{fname} was sent twice", param="file", code="bad_upload")
            out[fname] = content
        if not out:
            raise APIError(400, "no files: send adapter_config.json and adapter_model.safetensors "
                                "(card.json optional), or one .tar.gz/.tgz/.zip archive", param="file",
                           code="bad_upload")
        return out

    def add_upload(name: str, files: dict[str, bytes]):
        import shutil

        tmp = _write_upload(files)
        try:
            return library.add(name, tmp, base.fingerprint)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @app.post("/v1/adapters", status_code=201)
    async def upload_adapter(request: HTTPRequest):
        from .base import BaseModelError
        from .library import LibraryError
        from .validate import ValidationError, validate_name

        created = False
        try:
            body = await read_body(request)
            fields, files = _parse_multipart(body, request.headers.get("content-type", ""))
            del body
            name = fields.get("name", "").strip()
            if not name:
                raise APIError(400, "the form field 'name' is missing", param="name", code="bad_upload")
            try:
                validate_name(name)
            except ValidationError as e:
                raise APIError(400, str(e), param="name", code="invalid_name") from None
            if name in SPECIAL_MODELS:
                raise APIError(400, f"{name!r} is reserved for a routing policy; choose another name",
                               param="name", code="invalid_name")
            adapter_files = await asyncio.to_thread(upload_files, fields, files)
            del files
            try:
                rec = await asyncio.to_thread(add_upload, name, adapter_files)
            except (ValidationError, BaseModelError) as e:
                raise APIError(422, str(e), param="file", code="invalid_adapter") from None
            except LibraryError as e:
                raise APIError(409, str(e), code="library_busy") from None
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
                     batch_wait_ms=args.batch_wait_ms, queue_size=args.queue_size,
                     max_upload_bytes=int(args.max_upload_mb * (1 << 20)))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def add_serve_command(subparsers) -> None:
    """`modulora serve`; `--library` may come before or after `serve`."""
    import argparse

    s = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server over the library")
    s.add_argument("--library", default=argparse.SUPPRESS,
                   help="library folder (as the top-level --library; default $MODULORA_HOME/library)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/ endpoints other than GET")
    s.add_argument("--base", default=None, help="base model (default: the bundled SmolLM2)")
    s.add_argument("--max-batch", type=int, default=16, help="requests answered together at most")
    s.add_argument("--batch-wait-ms", type=float, default=10, help="wait this long for more requests to batch")
    s.add_argument("--queue-size", type=int, default=64, help="waiting requests at most (more -> 429)")
    s.add_argument("--max-upload-mb", type=float, default=256,
                   help="largest adapter upload, and largest unpacked archive, in MiB (more -> 413)")
    s.add_argument("--log-level", default="info")
    s.set_defaults(func=cmd_serve)


__all__ = ["create_app", "add_serve_command", "Scheduler", "Metrics"]
