"""Soak test: a real `modulora serve` process under mixed well-formed load, adapter churn and a
stream of hostile requests for `--minutes`; then the verdicts of the reliability goal.

Goal: "A 30-minute soak on SmolLM2 (16 clients with mixed routes, uploads and deletes every few
seconds, a hostile request every second) ends with 0 failed well-formed requests, no 5xx, server
memory flat (RSS every minute; growth under 5% after the first 5 minutes), and the library whole."

What runs, all against one server subprocess (bench/serve.py's `start_server`) on 127.0.0.1:
- `--clients` threads loop well-formed requests: single adapters, fixed mixtures (`a:0.7,b:0.3`,
  `a,b`, `adapter_weights`), `arrow`, `uniform`, `retrieval`, `base`, a series adapter; chat and
  completions, streamed or not, max_tokens 8-16, greedy or sampled. They only name adapters that
  are never deleted, so ANY non-200 (429 included, counted apart too), a timeout or a stream
  without `[DONE]` (or with an error event) is a failure.
- an uploader, every `--upload-every` s: uploads a copy of an adapter as `soak-N` (files or a
  .tar.gz, alternately; every other copy with a changed card, so a new object, the others share
  the original's object), one completion through it, deletes it; expects 201 / 200 / 200.
- a hostile client, every `--hostile-every` s, one request of a class drawn (seeded, each class
  once per shuffled round) from HOSTILE; each expects a 4xx (the q_proj/v_proj-only adapter is
  valid: 201, a mixture through it 200, delete 200); a 5xx, a hang (no answer within
  `--hostile-timeout`) or an accepted bad request is a failure.
- every minute: the server's RSS (VmRSS of it and its children), requests and failures,
  p50 / p95 latency of the well-formed requests, a printed line.
At the end: /metrics' 5xx count, the adapters the API lists, then (server stopped) the library's
integrity check, its files, and no upload staging leftovers (`library_whole` of bench/serve.py).
Writes OUT.json (every minute's sample, totals), OUT.md (tables, verdicts, hardware) and OUT.png
(RSS and requests per minute). Exit status 1 when a verdict fails.

The library: random LoRA experts (one per demo task, card samples so retrieval works) and one
series adapter, made on the chosen base and kept in `$MODULORA_HOME/soak/<base>/` (made once,
reused); the server works on a fresh copy.

    python bench/soak.py                                   # 30 min on SmolLM2 -> bench/results/soak.*
    python bench/soak.py --base tiny --minutes 2 --out /tmp/soak/soak   # a quick check
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random
import shutil
import socket
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from routing import cpu_model  # noqa: E402
from serve import library_whole, pct, proc_status, prompts_for, start_server, stop_server, versions  # noqa: E402

from modulora.library import Library  # noqa: E402
from modulora.report import table  # noqa: E402

TASKS = ("capital", "add", "upper", "acronym")
SERIES = "series-upper"
QV = "qv"  # the q_proj/v_proj-only LoRA, kept beside the library (the hostile client uploads it)
FORGED = "FORGED-LINE"  # what a log-forging name puts after its newline
MAX_BODY_MB, MAX_UPLOAD_MB = 1, 32  # the server's limits in the soak (cheap huge bodies and bombs)


# -- the library -------------------------------------------------------------------------------------

def random_adapter(model, cfg, out: Path, seed: int, card: dict, scale: float) -> Path:
    """Save at `out` an adapter of config `cfg` whose weights are random (B or the up-projection
    too, so experts differ); the model is left as it was. Training is not needed for a soak."""
    import torch

    from modulora.adapters import attach, detach, save_adapter
    from modulora.adapters.attach import adapter_state

    attach(model, cfg, seed=seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for t in adapter_state(model).values():
            t.copy_(torch.randn(t.shape, generator=gen) * scale)
    save_adapter(model, out, card=card)
    detach(model)
    return out


def build_library(base_name: str, root: Path) -> Path:
    """`root/library` with a random LoRA per demo task and one series adapter, and `root/qv` (a
    LoRA of q_proj and v_proj only), made once per base; returns root."""
    if (root / "built.json").is_file():
        return root
    from modulora.adapters import AdapterConfig
    from modulora.base import load_base

    shutil.rmtree(root, ignore_errors=True)
    base = load_base(None if base_name == "smollm2" else base_name)
    fp = base.fingerprint
    scale = 0.5 if base_name == "tiny" else 0.02
    lib = Library(root / "library")
    work = root / "adapters"

    def card(name: str, task: str, kind: str) -> dict:
        return {"name": name, "type": kind, "task": task, "description": f"random {kind} adapter for {task}",
                "samples": prompts_for(name, task)[:32], "base_fingerprint": fp}

    for i, task in enumerate(TASKS):
        out = random_adapter(base.model, AdapterConfig(type="lora", r=8, alpha=16.0), work / task, i,
                             card(task, task, "lora"), scale)
        lib.add(task, out, fp)
    out = random_adapter(base.model, AdapterConfig(type="series", bottleneck=16), work / SERIES, 10,
                         card(SERIES, "upper", "series"), scale)
    lib.add(SERIES, out, fp)
    random_adapter(base.model, AdapterConfig(type="lora", r=8, alpha=16.0, target_modules=("q_proj", "v_proj")),
                   root / QV, 20, card(QV, "capital", "lora"), scale)
    (root / "built.json").write_text(json.dumps({"base": base_name, "fingerprint": fp["id"]}))
    return root


def adapter_files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file()}


def tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def nan_weights(files: dict[str, bytes]) -> dict[str, bytes]:
    """The adapter with one weight NaN (the library must refuse it)."""
    import torch
    from safetensors.torch import load, save

    tensors = load(files["adapter_model.safetensors"])
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone()
    tensors[first].view(-1)[0] = torch.nan
    return {**files, "adapter_model.safetensors": save(tensors, metadata={"format": "pt"})}


def with_config(files: dict[str, bytes], **changes) -> dict[str, bytes]:
    cfg = json.loads(files["adapter_config.json"])
    cfg.update(changes)
    return {**files, "adapter_config.json": json.dumps(cfg).encode()}


def with_card(files: dict[str, bytes], note: str) -> dict[str, bytes]:
    """The same weights with another card: another object in the content-addressed library."""
    card = json.loads(files.get("card.json", b"{}"))
    card["description"] = note
    return {**files, "card.json": json.dumps(card).encode()}


def multipart(files: dict[str, bytes]) -> list:
    return [(n, (n, d)) for n, d in files.items()]


# -- what happened -------------------------------------------------------------------------------

class Record:
    """Every request's outcome, thread-safe: (t since start, who, class, status, latency, ok, detail).
    `who`: "client" (well-formed), "upload" (the uploader's steps) or "hostile"."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.events: list[tuple[float, str, str, object, float, bool, str]] = []
        self.lock = threading.Lock()

    def add(self, who: str, cls: str, status, latency: float, ok: bool, detail: str = "") -> None:
        with self.lock:
            self.events.append((time.monotonic() - self.t0, who, cls, status, latency, ok, detail[:300]))

    def between(self, a: float, b: float) -> list[tuple]:
        with self.lock:
            return [e for e in self.events if a <= e[0] < b]


def is_5xx(status) -> bool:
    return isinstance(status, int) and status >= 500


# -- well-formed clients -------------------------------------------------------------------------

def route_menu(loras: list[str], series: str | None) -> list[tuple[str, str, dict]]:
    """(kind, model, extra body fields) of the well-formed routes, over never-deleted adapters only."""
    a, b, c, d = (loras * 4)[:4]
    menu = [("adapter", n, {}) for n in loras]
    menu += [("mixture", f"{a}:0.7,{b}:0.3", {}), ("mixture", f"{c},{d}", {}),
             ("mixture", a, {"adapter_weights": {b: 0.6, c: 0.4}}),
             ("arrow", "arrow", {}), ("arrow", "arrow", {"route_top_k": 2}), ("uniform", "uniform", {}),
             ("retrieval", "retrieval", {}), ("base", "base", {})]
    if series:
        menu.append(("series", series, {}))
    return menu


def call(c: httpx.Client, path: str, body: dict, stream: bool) -> tuple[int | str, str]:
    """POST a completion; (status, problem or "") where a 200 with a broken answer is a problem."""
    if not stream:
        r = c.post(path, json=body)
        if r.status_code != 200:
            return r.status_code, r.text[:200]
        out = r.json()
        return 200, "" if out.get("choices") else f"no choices: {r.text[:200]}"
    with c.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return r.status_code, r.read().decode("utf-8", "replace")[:200]
        done, problem = False, ""
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
            elif "error" in json.loads(data):
                problem = f"error event: {data[:200]}"
        return 200, problem or ("" if done else "stream ended without [DONE]")


def client_loop(url: str, k: int, menu: list, prompts: dict[str, list[str]], rec: Record, stop: threading.Event,
                seed: int, timeout: float) -> None:
    """One client: well-formed requests of random route, endpoint, streaming and sampling."""
    rng = random.Random(seed * 1000 + k)
    with httpx.Client(base_url=url, timeout=timeout) as c:
        while not stop.is_set():
            kind, model, extra = rng.choice(menu)
            task = model if model in prompts else rng.choice(TASKS)
            text = rng.choice(prompts[task])
            chat, stream = rng.random() < 0.5, rng.random() < 0.33
            body = {"model": model, "max_tokens": rng.randint(8, 16), "stream": stream, **extra}
            body.update({"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text})
            if rng.random() < 0.25:
                body.update(temperature=0.7, top_p=0.9, seed=rng.randrange(1 << 30))
            t = time.monotonic()
            try:
                status, problem = call(c, "/v1/chat/completions" if chat else "/v1/completions", body, stream)
            except httpx.TimeoutException as e:
                status, problem = "timeout", f"{type(e).__name__}: {e}"
            except (httpx.HTTPError, ValueError) as e:
                status, problem = "error", f"{type(e).__name__}: {e}"
            ok = status == 200 and not problem
            rec.add("client", kind, status, time.monotonic() - t, ok,
                    "" if ok else f"{model} {'chat' if chat else 'completions'}{' stream' if stream else ''}: "
                                  f"{status} {problem}")


def warm_up(url: str, menu: list, prompts: dict[str, list[str]], rec: Record, timeout: float) -> float:
    """One request per route, one at a time, before the clock starts: the one-time costs (Arrow's
    prototypes, the retrieval index, first loads) are not the soak's. Failures count (who
    "warmup"). Returns the seconds it took."""
    t0 = time.monotonic()
    with httpx.Client(base_url=url, timeout=timeout) as c:
        for kind, model, extra in dict.fromkeys((k, m, json.dumps(e)) for k, m, e in menu):
            task = model if model in prompts else TASKS[0]
            body = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": prompts[task][0]}],
                    **json.loads(extra)}
            t = time.monotonic()
            try:
                status, problem = call(c, "/v1/chat/completions", body, False)
            except httpx.HTTPError as e:
                status, problem = "timeout" if isinstance(e, httpx.TimeoutException) else "error", str(e)
            ok = status == 200 and not problem
            rec.add("warmup", kind, status, time.monotonic() - t, ok,
                    "" if ok else f"warm-up {model}: {status} {problem}")
            print(f"  warm-up {model} {extra if extra != '{}' else ''}: {status} in {time.monotonic() - t:.1f} s",
                  flush=True)
    return time.monotonic() - t0


# -- the uploader ---------------------------------------------------------------------------------

def uploader_loop(url: str, files: dict[str, bytes], prompt: str, every: float, rec: Record,
                  stop: threading.Event, live: set[str], timeout: float) -> None:
    """Upload `soak-N`, complete through it, delete it; every `every` seconds."""
    n = 0
    with httpx.Client(base_url=url, timeout=timeout) as c:
        while not stop.wait(every if n else 0.5):
            name = f"soak-{n}"
            copy = files if n % 2 == 0 else with_card(files, f"soak copy {n}")
            send = multipart(copy) if n % 4 < 2 else [("archive", (f"{name}.tar.gz", tar_gz(copy)))]
            n += 1
            probe = {"model": name, "max_tokens": 8, "messages": [{"role": "user", "content": prompt}]}
            steps = [("upload", lambda n=name, s=send: c.post("/v1/adapters", data={"name": n}, files=s), 201),
                     ("probe", lambda b=probe: c.post("/v1/chat/completions", json=b), 200),
                     ("delete", lambda n=name: c.delete(f"/v1/adapters/{n}"), 200)]
            for step, fn, want in steps:
                t = time.monotonic()
                try:
                    r = fn()
                    status, text = r.status_code, r.text[:200]
                except httpx.TimeoutException as e:
                    status, text = "timeout", str(e)
                except httpx.HTTPError as e:
                    status, text = "error", f"{type(e).__name__}: {e}"
                rec.add("upload", step, status, time.monotonic() - t, status == want,
                        "" if status == want else f"{name} {step}: {status} {text}")
                if step == "upload" and status == 201:
                    live.add(name)
                if step == "delete" and status == 200:
                    live.discard(name)
                if status != want and step == "upload":
                    break


# -- the hostile client ---------------------------------------------------------------------------

def slow_body(url: str, path: str, content_type: str, wait: float) -> tuple[int | str, str]:
    """Declare a 4 KiB body, send 16 bytes, then nothing: the server's answer within `wait`
    seconds (a status), else "closed" (we hang up, as a slowloris client would after a while)."""
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
                  f"Content-Length: 4096\r\n\r\n{{\"model\": \"base\"".encode())
        try:
            head = s.recv(256)
        except TimeoutError:
            return "closed", f"no answer in {wait:.0f} s; closed"
    if not head:
        return "closed", "the server closed the connection without an answer"
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split()
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else "error"), line


def hostile_cases(url: str, files: dict[str, bytes], qv_files: dict[str, bytes], loras: list[str],
                  max_len: int, live: set[str], slow_wait: float,
                  well_formed_timeout: float) -> dict[str, tuple[Callable, set]]:
    """{class: (call(client, n) -> (status, detail), acceptable statuses)}. Anything else is a
    failure; "4xx" accepts any client error."""
    big = b'{"model": "base", "prompt": "' + b"x" * (MAX_BODY_MB << 20) + b'", "max_tokens": 8}'
    bomb = gzip.compress(b"\0" * (2 * MAX_UPLOAD_MB << 20), 9)  # unpacks to twice the upload limit
    members = gzip.compress(b"", 9) * 50_000  # ~1 MB of empty gzip members
    nan, alpha = nan_weights(files), with_config(files, lora_alpha=-8)
    prompt_text = "hello " * (max_len + 64)
    chat = "/v1/chat/completions"

    def js(c, path, body):
        r = c.post(path, content=body if isinstance(body, bytes) else body.encode(),
                   headers={"content-type": "application/json"})
        return r.status_code, r.text[:200]

    def up(c, name, send):
        r = c.post("/v1/adapters", data={"name": name}, files=send)
        if r.status_code == 201:  # a refused adapter was taken: take it out again, the soak goes on
            c.delete(f"/v1/adapters/{name}")
        return r.status_code, r.text[:200]

    def msg(text="hi"):
        return [{"role": "user", "content": text}]

    def oversized_prompt(c, n):
        if n % 2:
            r = c.post("/v1/completions", json={"model": loras[0], "prompt": [1] * (max_len + 8), "max_tokens": 8})
        else:
            r = c.post(chat, json={"model": loras[0], "messages": msg(prompt_text), "max_tokens": 8})
        return r.status_code, r.text[:200]

    def huge_max_tokens(c, n):
        r = c.post(chat, json={"model": loras[n % len(loras)], "messages": msg(), "max_tokens": 10 ** 9})
        return r.status_code, r.text[:200]

    def huge_body(c, n):
        content = big if n % 2 else iter([big[i:i + 65536] for i in range(0, len(big), 65536)])  # chunked
        try:
            r = c.post("/v1/completions", content=content, headers={"content-type": "application/json"})
        except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError) as e:
            return "reset", f"{type(e).__name__} (the server refused before reading it all)"
        return r.status_code, r.text[:200]

    def gzip_bomb(c, n):
        return up(c, f"bomb-{n}", [("archive", ("bomb.tar.gz", bomb))])

    def gzip_members(c, n):
        return up(c, f"members-{n}", [("archive", ("members.tar.gz", members))])

    def bad_alpha(c, n):
        return up(c, f"alpha-{n}", multipart(alpha))

    def nan_adapter(c, n):
        return up(c, f"nan-{n}", multipart(nan) if n % 2 else [("archive", ("nan.tar.gz", tar_gz(nan)))])

    def qv_only(c, n):
        """Valid: uploaded, then usable in a mixture beside the full LoRAs, then deleted."""
        name, got = f"soak-qv-{n}", []
        r = c.post("/v1/adapters", data={"name": name}, files=multipart(qv_files))
        got.append(r.status_code)
        if r.status_code == 201:
            live.add(name)
            try:  # a well-formed request: the well-formed clients' timeout
                r = c.post(chat, json={"model": f"{loras[0]}:0.5,{name}:0.5", "messages": msg("Peru"),
                                       "max_tokens": 8}, timeout=well_formed_timeout)
                got.append(r.status_code)
            finally:  # deleted even when the completion failed, so the library does not grow
                r = c.delete(f"/v1/adapters/{name}")
                got.append(r.status_code)
                if r.status_code == 200:
                    live.discard(name)
        return "/".join(map(str, got)), r.text[:200]

    def lone_surrogate(c, n):
        body = ('{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 8}'
                if n % 2 else '{"model": "%s", "prompt": "\\udfff", "max_tokens": 8}')
        return js(c, chat if n % 2 else "/v1/completions", body % loras[0])

    def deep_json(c, n):
        depth = 100_000 if n % 2 else 5_000
        return js(c, chat, '{"model": "base", "messages": ' + "[" * depth + "]" * depth + "}")

    def unknown_field(c, n):
        r = c.post(chat, json={"model": loras[0], "messages": msg(), "max_tokens": 8, "frobnicate": {"x": 1}})
        return r.status_code, r.text[:200]

    def denormal_weight(c, n):
        r = c.post(chat, json={"model": f"{loras[0]}:1e-320,{loras[1]}:1", "messages": msg(), "max_tokens": 8})
        return r.status_code, r.text[:200]

    def slow(c, n):
        if n % 2:
            return slow_body(url, "/v1/adapters", "multipart/form-data; boundary=xyz", slow_wait)
        return slow_body(url, chat, "application/json", slow_wait)

    def log_forging(c, n):
        evil = f"soak\n{FORGED} status=200 path=/v1/adapters"
        if n % 3 == 0:
            return up(c, evil, multipart(files))
        r = (c.get if n % 3 == 1 else c.delete)(f"/v1/adapters/soak%0A{FORGED}%20status=200")
        return r.status_code, r.text[:200]

    def route_name(c, n):
        return up(c, ("arrow", "uniform", "retrieval", "base")[n % 4], multipart(files))

    four = {"4xx"}
    return {
        "oversized prompt": (oversized_prompt, four), "max_tokens 1e9": (huge_max_tokens, four),
        "huge body": (huge_body, {413, "reset"}), "gzip bomb": (gzip_bomb, {413}),
        "many empty gzip members": (gzip_members, four), "lora_alpha -8": (bad_alpha, four),
        "NaN weights": (nan_adapter, four), "q_proj/v_proj-only (valid)": (qv_only, {"201/200/200"}),
        "lone surrogate": (lone_surrogate, {400}), "deeply nested JSON": (deep_json, four),
        "unknown field": (unknown_field, {400}), "weight 1e-320": (denormal_weight, {400}),
        "slow body": (slow, four | {"closed"}), "log-forging name": (log_forging, four),
        "route name upload": (route_name, {400}),
    }


def acceptable(status, allowed: set) -> bool:
    return status in allowed or ("4xx" in allowed and isinstance(status, int) and 400 <= status < 500)


def hostile_loop(url: str, cases: dict, every: float, rec: Record, stop: threading.Event, seed: int,
                 timeout: float) -> None:
    """One hostile request every `every` s (on a pool, so a slow one does not delay the next);
    classes in a seeded shuffled order, each once per round."""
    rng = random.Random(seed)
    order: list[str] = []
    count: Counter = Counter()
    local = threading.local()

    def run(cls: str, n: int) -> None:
        if not hasattr(local, "c"):
            local.c = httpx.Client(base_url=url, timeout=timeout)
        fn, allowed = cases[cls]
        t = time.monotonic()
        try:
            status, detail = fn(local.c, n)
        except httpx.TimeoutException as e:
            status, detail = "timeout", f"{type(e).__name__}: {e}"
        except (httpx.HTTPError, OSError) as e:
            status, detail = "error", f"{type(e).__name__}: {e}"
        ok = acceptable(status, allowed)
        rec.add("hostile", cls, status, time.monotonic() - t, ok, "" if ok else f"{status} {detail}")

    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="hostile") as pool:
        pending: list = []
        while not stop.wait(every):
            pending = [f for f in pending if not f.done()]
            if len(pending) >= 8:  # every worker stuck: do not pile up more (the hangs count already)
                rec.add("skipped", "hostile", "skipped", 0.0, True)
                continue
            if not order:
                order = list(cases)
                rng.shuffle(order)
            cls = order.pop()
            pending.append(pool.submit(run, cls, count[cls]))
            count[cls] += 1


# -- the server's memory and the per-minute samples --------------------------------------------------

def rss_tree_kib(pid: int) -> int:
    """VmRSS of `pid` and all its descendants, in KiB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += proc_status(p, "VmRSS")
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(x) for x in task.read_text().split()]
            except OSError:
                pass
    return total


def minute_sample(minute: int, events: list[tuple], rss_kib: int) -> dict:
    """One minute's figures from the events that ended in it."""
    client = [e for e in events if e[1] == "client"]
    lat = [e[4] for e in client if e[5]]
    hostile = [e for e in events if e[1] == "hostile"]
    upload = [e for e in events if e[1] == "upload"]
    return {"minute": minute, "rss_mb": rss_kib / 1024, "requests": len(client),
            "failed": sum(not e[5] for e in client), "429": sum(e[3] == 429 for e in client),
            "5xx": sum(is_5xx(e[3]) for e in events), "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95),
            "uploads": sum(e[2] == "upload" and e[5] for e in upload), "upload_failed": sum(not e[5] for e in upload),
            "hostile": len(hostile), "hostile_failed": sum(not e[5] for e in hostile)}


def minute_line(s: dict) -> str:
    return (f"minute {s['minute']:>3}: RSS {s['rss_mb']:7.1f} MB, {s['requests']} requests ({s['failed']} failed, "
            f"{s['429']} x 429), 5xx {s['5xx']}, p50 {s['p50_s']:.2f} s, p95 {s['p95_s']:.2f} s, uploads "
            f"{s['uploads']} ({s['upload_failed']} failed steps), hostile {s['hostile']} "
            f"({s['hostile_failed']} failed)")


def monitor(pid: int, server, rec: Record, minutes: float, stop: threading.Event, samples: list[dict],
            peak: list[int]) -> None:
    """Every minute a sample and a printed line; the RSS peak every 5 s; stops all at the end (or
    when the server dies)."""
    end, k = minutes * 60, 1
    while True:
        now = time.monotonic() - rec.t0
        boundary = min(k * 60, end)
        stop.wait(max(0.0, min(5.0, boundary - now)))
        peak[0] = max(peak[0], rss_tree_kib(pid))
        if server.poll() is not None:
            print(f"the server exited ({server.returncode})", flush=True)
            stop.set()
            return
        if time.monotonic() - rec.t0 >= boundary:
            samples.append(minute_sample(k, rec.between((k - 1) * 60, boundary), rss_tree_kib(pid)))
            print(minute_line(samples[-1]), flush=True)
            if boundary >= end:
                stop.set()
                return
            k += 1


# -- the report -----------------------------------------------------------------------------------

def rss_growth(samples: list[dict], warmup: int) -> tuple[float | None, int]:
    """(growth of the largest RSS after minute `warmup` over the RSS at it, that minute); None
    when the run is too short to have samples after a warm-up (warm-up: min(5, minutes - 1))."""
    w = min(warmup, len(samples) - 1)
    if w < 1:
        return None, w
    ref = samples[w - 1]["rss_mb"]
    return max(s["rss_mb"] for s in samples[w:]) / ref - 1, w


def rss_trend(samples: list[dict], warmup: int = 5) -> float | None:
    """Growth of the mean RSS of the last 5 minutes over the mean of the 5 minutes after the
    warm-up: the trend, which one minute's sample (RSS moves by tens of MB as batches, uploads and
    page cache come and go) cannot decide alone; None for runs shorter than 2 x 5 + warm-up."""
    after = [s["rss_mb"] for s in samples[warmup - 1:]]
    if len(after) < 10:
        return None
    return (sum(after[-5:]) / 5) / (sum(after[:5]) / 5) - 1


def statuses(events: list[tuple]) -> str:
    return ", ".join(f"{s} x{n}" for s, n in sorted(Counter(str(e[3]) for e in events).items()))


def plot(samples: list[dict], path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed in this environment: no plot"
    mins = [s["minute"] for s in samples]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(mins, [s["rss_mb"] for s in samples], "o-", color="tab:blue", label="server RSS (MB)")
    ax.set_ylim(0, 1.15 * max(s["rss_mb"] for s in samples))  # from 0: flat reads as flat
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("minute")
    ax.set_ylabel("server RSS (MB)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.bar(mins, [s["requests"] for s in samples], alpha=0.3, color="tab:orange", label="requests/min")
    ax2.set_ylabel("well-formed requests per minute", color="tab:orange")
    ax.set_zorder(ax2.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.set_title("modulora serve soak: memory and load per minute")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"![RSS and requests per minute]({path.name})"


def hardware() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores (server and clients on the same machine, traffic on 127.0.0.1); " \
           f"{versions()}"


def report(args, samples: list[dict], rec: Record, metrics_5xx: int, whole: bool, notes: list[str],
           startup: float, peak_kib: int, cmd: str, out: Path) -> tuple[str, dict, bool]:
    """The markdown report, the JSON figures and whether every verdict holds."""
    ev = rec.events
    client = [e for e in ev if e[1] == "client"]
    upload = [e for e in ev if e[1] == "upload"]
    hostile = [e for e in ev if e[1] == "hostile"]
    lat = [e[4] for e in client if e[5]]
    warmup = [e for e in ev if e[1] == "warmup"]
    skipped = sum(e[1] == "skipped" for e in ev)
    failed = sum(not e[5] for e in client + upload + warmup)
    seen_5xx = sum(is_5xx(e[3]) for e in ev)
    hostile_bad = sum(not e[5] for e in hostile)
    growth, warm = rss_growth(samples, 5)
    trend = rss_trend(samples)
    verdicts = [
        ("failed well-formed requests (warm-up, clients, uploader) = 0", f"{failed}", failed == 0),
        ("5xx answers = 0 (seen by the clients / counted by /metrics)", f"{seen_5xx} / {metrics_5xx}",
         seen_5xx == 0 and metrics_5xx == 0),
        ("hostile requests with a 5xx, a hang or accepted = 0", f"{hostile_bad}", hostile_bad == 0),
        ("RSS growth < 5% (mean of the last 5 minutes over the mean of minutes 5-9)",
         "n/a (run shorter than 14 minutes)" if trend is None else f"{100 * trend:+.2f}%",
         trend is None or trend < 0.05),
        ("library whole", "yes" if whole else "no", whole),
    ]
    ok = all(v[2] for v in verdicts)
    rows = [[str(s["minute"]), f"{s['rss_mb']:.1f}", str(s["requests"]), str(s["failed"]), str(s["429"]),
             str(s["5xx"]), f"{s['p50_s']:.2f}", f"{s['p95_s']:.2f}", f"{s['uploads']}", str(s["upload_failed"]),
             str(s["hostile"]), str(s["hostile_failed"])] for s in samples]
    by_kind = {}
    for e in client:
        by_kind.setdefault(e[2], []).append(e)
    kind_rows = [[k, str(len(es)), str(sum(not e[5] for e in es)), f"{pct([e[4] for e in es if e[5]], 0.5):.2f}",
                  f"{pct([e[4] for e in es if e[5]], 0.95):.2f}"] for k, es in sorted(by_kind.items())]
    by_cls = {}
    for e in hostile:
        by_cls.setdefault(e[2], []).append(e)
    cls_rows = [[k, str(len(es)), statuses(es), str(sum(not e[5] for e in es)), f"{max(e[4] for e in es):.2f}"]
                for k, es in sorted(by_cls.items())]
    up_rows = [[step, str(sum(e[2] == step for e in upload)),
                statuses([e for e in upload if e[2] == step]), str(sum(e[2] == step and not e[5] for e in upload))]
               for step in ("upload", "probe", "delete")]
    problems = [e[6] for e in ev if not e[5] and e[6]]
    first = list(dict.fromkeys(problems))[:25]
    plot_line = plot(samples, out.with_suffix(".png")) if samples else "no samples: no plot"
    text = (
        f"# Soak: `modulora serve` on {args.base}, {args.minutes:g} minutes\n\n"
        f"Command: `{cmd}`\n\nHardware: {hardware()}. Server up in {startup:.0f} s.\n\n"
        f"Load: {args.clients} clients looping well-formed requests (single adapters, mixtures, arrow, uniform, "
        f"retrieval, base, a series adapter; chat and completions, streamed or not, max_tokens 8-16, greedy or "
        f"sampled); an upload, a completion through it and a delete every {args.upload_every:g} s; a hostile "
        f"request every {args.hostile_every:g} s. Server limits: --max-body-mb {MAX_BODY_MB}, --max-upload-mb "
        f"{MAX_UPLOAD_MB}; the rest default. Client timeouts: {args.timeout:g} s (well-formed), "
        f"{args.hostile_timeout:g} s (hostile). Before the clock: one request per route ({len(warmup)}, "
        f"{sum(e[4] for e in warmup):.0f} s; the one-time costs: Arrow's prototypes, the retrieval index). "
        f"Hostile requests not sent because 8 were still running: {skipped}.\n\n"
        "## Verdicts\n\n" + table(["goal", "measured", "result"],
                                  [[g, m, "met" if v else "**not met**"] for g, m, v in verdicts])
        + ("" if growth is None else
           f"\n\nRSS moves by tens of MB from minute to minute (batches, uploads, the adapters' memory-mapped "
           f"files come and go), so the verdict compares 5-minute means; the largest later minute "
           f"({max(s['rss_mb'] for s in samples[warm:]):.0f} MB) is {100 * growth:+.2f}% over minute {warm}'s one "
           f"sample ({samples[warm - 1]['rss_mb']:.0f} MB).")
        + "\n\n## Per minute\n\n"
        "RSS: VmRSS of the server and its children at the end of the minute; requests, failed, 429, p50/p95: the "
        "well-formed clients' requests that ended in the minute (the last minute: also those in flight at the end, "
        "awaited); 5xx: every request of the minute.\n\n"
        + table(["minute", "RSS MB", "requests", "failed", "429", "5xx", "p50 s", "p95 s", "uploads",
                 "upload steps failed", "hostile", "hostile failed"], rows)
        + f"\n\nPeak RSS (polled every 5 s): {peak_kib / 1024:.1f} MB. All well-formed requests: {len(client)}, "
          f"p50 {pct(lat, 0.5):.2f} s, p95 {pct(lat, 0.95):.2f} s.\n\n{plot_line}\n\n"
        "## Well-formed requests by route\n\n"
        + table(["route", "requests", "failed", "p50 s", "p95 s"], kind_rows)
        + "\n\n## Uploader\n\n" + table(["step", "count", "statuses", "failed"], up_rows)
        + "\n\n## Hostile requests by class\n\n"
        + table(["class", "sent", "statuses", "failed", "slowest s"], cls_rows)
        + "\n\n## Library afterwards\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
        + ("\n## First problems\n\n" + "\n".join(f"- `{p}`" for p in first) + "\n" if first else "")
    )
    figures = {"command": cmd, "hardware": hardware(), "args": vars(args), "startup_s": startup,
               "minutes": samples, "peak_rss_mb": peak_kib / 1024,
               "totals": {"requests": len(client), "failed_well_formed": failed, "5xx_seen": seen_5xx,
                          "5xx_metrics": metrics_5xx, "hostile": len(hostile), "hostile_failed": hostile_bad,
                          "rss_growth": growth, "rss_trend": trend, "rss_warmup_minute": warm, "library_whole": whole,
                          "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95)},
               "routes": {k: {"requests": len(es), "failed": sum(not e[5] for e in es)} for k, es in by_kind.items()},
               "hostile": {k: {"sent": len(es), "statuses": dict(Counter(str(e[3]) for e in es)),
                               "failed": sum(not e[5] for e in es)} for k, es in by_cls.items()},
               "uploader": {r[0]: {"count": int(r[1]), "failed": int(r[3])} for r in up_rows},
               "problems": first, "verdicts": [{"goal": g, "measured": m, "met": v} for g, m, v in verdicts]}
    return text, figures, ok


# -- main -----------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="smollm2", choices=["smollm2", "tiny"])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--upload-every", type=float, default=3.0, help="seconds between uploads")
    ap.add_argument("--hostile-every", type=float, default=1.0, help="seconds between hostile requests")
    ap.add_argument("--timeout", type=float, default=60.0, help="a well-formed request slower than this fails")
    ap.add_argument("--hostile-timeout", type=float, default=30.0, help="a hostile request slower than this hangs")
    ap.add_argument("--slow-body-wait", type=float, default=4.0, help="seconds a slow body waits for an answer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "soak"),
                    help="writes OUT.json, OUT.md and OUT.png")
    args = ap.parse_args()
    cmd = "python bench/soak.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    home = Path(os.environ.get("MODULORA_HOME") or Path.home() / ".modulora")

    built = build_library(args.base, home / "soak" / args.base)
    tmp = Path(tempfile.mkdtemp(prefix="modulora-soak-"))
    lib_path = tmp / "library"
    shutil.copytree(built / "library", lib_path, ignore=shutil.ignore_patterns("lock"))
    lib = Library(lib_path)
    originals = [r.name for r in lib.list()]
    loras = [r.name for r in lib.list() if r.type == "lora"]
    series = next((r.name for r in lib.list() if r.type == "series"), None)
    lib.export(loras[0], tmp / "export")
    files, qv_files = adapter_files(tmp / "export"), adapter_files(built / QV)
    prompts = {t: prompts_for(t, t) for t in TASKS}

    server, url, startup = start_server(lib_path, tmp, tmp / "server.log",
                                        ("--max-body-mb", str(MAX_BODY_MB), "--max-upload-mb", str(MAX_UPLOAD_MB))
                                        + (("--base", "tiny") if args.base == "tiny" else ()))
    rec, stop, live = Record(), threading.Event(), set()
    samples: list[dict] = []
    peak = [0]
    metrics_5xx, api_names, five, warm_s = -1, [], [], 0.0
    try:
        max_len = httpx.get(f"{url}/v1/models/base", timeout=30).json()["max_model_len"]
        cases = hostile_cases(url, files, qv_files, loras, max_len, live, args.slow_body_wait, args.timeout)
        menu = route_menu(loras, series)
        print(f"soak: {args.minutes:g} min, {args.clients} clients, routes {sorted({m[1] for m in menu})}, "
              f"{len(cases)} hostile classes; server log {tmp / 'server.log'}", flush=True)
        warm_s = warm_up(url, menu, prompts, rec, 600.0)
        print(f"warm-up: {warm_s:.0f} s; the soak starts", flush=True)
        rec.t0 = time.monotonic()
        threads = [threading.Thread(target=client_loop, daemon=True,
                                    args=(url, k, menu, prompts, rec, stop, args.seed, args.timeout))
                   for k in range(args.clients)]
        threads += [threading.Thread(target=uploader_loop, daemon=True, args=(
                        url, files, prompts[loras[0]][0] if loras[0] in prompts else "hi", args.upload_every, rec,
                        stop, live, args.timeout)),
                    threading.Thread(target=hostile_loop, daemon=True, args=(
                        url, cases, args.hostile_every, rec, stop, args.seed, args.hostile_timeout))]
        for t in threads:
            t.start()
        monitor(server.pid, server, rec, args.minutes, stop, samples, peak)
        for t in threads:
            t.join(args.timeout + args.hostile_timeout)
        if samples:  # the requests in flight at the end count in the last minute
            last = samples[-1]
            samples[-1] = minute_sample(last["minute"], rec.between((last["minute"] - 1) * 60, float("inf")),
                                        int(last["rss_mb"] * 1024))
        if server.poll() is None:
            text = httpx.get(f"{url}/metrics", timeout=30).text
            five = [line for line in text.splitlines()
                    if line.startswith("modulora_requests_total") and 'status="5' in line]
            metrics_5xx = sum(int(float(line.rsplit(" ", 1)[1])) for line in five)
            api_names = sorted(m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"])
    finally:
        stop.set()
        stop_server(server)
    whole, notes = library_whole(lib_path, sorted(live), originals)
    missing = [n for n in originals if n not in api_names]
    notes.append("GET /v1/models before the stop listed every original adapter" if api_names and not missing
                 else f"GET /v1/models before the stop: missing {missing or 'all (no answer)'}")
    whole = whole and bool(api_names) and not missing
    notes.append("/metrics 5xx counters: " + ("; ".join(f"`{line}`" for line in five) or "none"))
    staging = lib_path / "staging"
    left = sorted(p.name for p in staging.iterdir()) if staging.is_dir() else []
    notes.append(f"upload staging folder {'holds ' + ', '.join(left) if left else 'empty'}")
    whole = whole and not left
    log = (tmp / "server.log").read_text(errors="replace").splitlines()
    forged = [ln for ln in log if ln.startswith(FORGED)]
    notes.append(f"server log: {len(log)} lines, {sum('Traceback' in ln for ln in log)} with a traceback, "
                 f"{len(forged)} forged by a log-forging name")
    if forged:
        rec.add("hostile", "log-forging name", "forged", 0.0, False, f"forged log line: {forged[0][:200]}")

    text, figures, ok = report(args, samples, rec, metrics_5xx, whole, notes, startup, peak[0], cmd, out)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(figures, indent=1, default=str))
    print(text)
    print(f"wrote {out.with_suffix('.md')}, .json, .png; server log kept in {tmp / 'server.log'}")
    shutil.rmtree(lib_path, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
