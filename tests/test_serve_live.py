"""The server's scheduling against real uvicorn servers on 127.0.0.1 (tiny model, random LoRA
adapters that answer differently): tokens streamed as they are generated, a client that goes
away stops its row, timeouts (504), requests joining a running batch, a bounded expert cache,
and the JSON request log of `modulora serve` run as a process."""

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from servers import free_port, running, wait_healthy

from modulora.base import load_base
from modulora.library import Library

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

NAMES = ("a", "b", "c", "d")
LONG = 1000  # tokens: more than a client waits for (the tiny model makes ~1000 a second; context 1024)


@pytest.fixture(scope="module")
def lib(tmp_path_factory, random_library):
    return random_library(tmp_path_factory.mktemp("live"), NAMES).root


@pytest.fixture(scope="module")
def base():
    return load_base("tiny", dtype="fp32")


def make_app(base, lib, **kw):
    from modulora.serve import create_app

    return create_app(base, Library(lib), **{"batch_wait_ms": 20, **kw})


@pytest.fixture(scope="module")
def url(base, lib):
    with running(make_app(base, lib)) as u:
        yield u


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def complete(url: str, model: str, prompt: str, max_tokens: int, **extra) -> dict:
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens, **extra},
                   timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def sse(lines):
    """The JSON events of a server-sent event stream (stops at [DONE])."""
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            if data == "[DONE]":
                return
            yield json.loads(data)


def until(cond, seconds: float = 20.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    return cond()


def test_tokens_are_streamed_while_the_row_generates(url):
    full = complete(url, "a", "hello there", 300)
    assert full["usage"]["completion_tokens"] == 300 and full["choices"][0]["finish_reason"] == "length"
    pieces = []
    with httpx.stream("POST", f"{url}/v1/completions", timeout=120,
                      json={"model": "a", "prompt": "hello there", "max_tokens": 300, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        running_at_first, last = _collect(sse(r.iter_lines()), pieces, lambda: metric(url, "modulora_running_rows"))
    assert running_at_first >= 1  # the first text arrived while the row was still generating
    assert "".join(pieces) == full["choices"][0]["text"]
    assert len(pieces) > 20  # many chunks (a chunk per token, some held back while a character is split)
    assert last["choices"][0]["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 300
    assert last["routing"] == [{"index": 0, "experts": {"a": 1.0}, "versions": {"a": 1}}]


def _collect(events, pieces, probe):
    """(probe() at the first text chunk, the last event); the texts go to pieces."""
    probed, last = None, None
    for ev in events:
        text = ev["choices"][0].get("text")
        if text:
            pieces.append(text)
            if probed is None:
                probed = probe()
        last = ev
    return probed, last


def test_chat_stream_with_the_openai_client_equals_the_plain_answer(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    msgs = [{"role": "user", "content": "Peru"}]
    plain = client.chat.completions.create(model="b", messages=msgs, max_tokens=60)
    chunks = list(client.chat.completions.create(model="b", messages=msgs, max_tokens=60, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_a_client_that_goes_away_stops_its_row(url):
    before_n = metric(url, 'modulora_requests_stopped_total{reason="client_disconnect"}')
    before_t = metric(url, "modulora_stopped_tokens_total")
    with httpx.stream("POST", f"{url}/v1/completions", timeout=120,
                      json={"model": "c", "prompt": "hello", "max_tokens": LONG, "stream": True}) as r:
        got = 0
        for ev in sse(r.iter_lines()):
            got += bool(ev["choices"][0]["text"])
            if got == 2:
                break  # leaving the block closes the connection
    assert until(lambda: metric(url, 'modulora_requests_stopped_total{reason="client_disconnect"}') == before_n + 1)
    stopped = metric(url, "modulora_stopped_tokens_total") - before_t
    assert 2 <= stopped < LONG  # dropped long before max_tokens
    assert until(lambda: metric(url, "modulora_running_rows") == 0)
    # a plain (non-streamed) request whose client gives up is noticed too
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{url}/v1/completions", json={"model": "d", "prompt": "hello", "max_tokens": LONG}, timeout=0.5)
    assert until(lambda: metric(url, 'modulora_requests_stopped_total{reason="client_disconnect"}') == before_n + 2)
    assert metric(url, "modulora_stopped_tokens_total") - before_t < 2 * LONG
    assert until(lambda: metric(url, "modulora_running_rows") == 0)


def test_a_request_past_its_timeout_is_504(url):
    before = metric(url, 'modulora_requests_stopped_total{reason="timeout"}')
    t = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", timeout=60,
                   json={"model": "a", "prompt": "hello", "max_tokens": LONG, "timeout": 0.3})
    assert r.status_code == 504 and time.monotonic() - t < 10
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "request_timeout"
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                      json={"model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": LONG,
                            "stream": True, "timeout": 0.3}) as s:
        assert s.status_code == 200  # the stream had started: it ends with an error event
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == "request_timeout"
    assert until(lambda: metric(url, 'modulora_requests_stopped_total{reason="timeout"}') >= before + 2)
    with pytest.raises(openai.APIStatusError) as e:  # what the official client makes of it
        openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).completions.create(
            model="a", prompt="hello", max_tokens=LONG, extra_body={"timeout": 0.2})
    assert e.value.status_code == 504
    bad = httpx.post(f"{url}/v1/completions", json={"model": "a", "prompt": "x", "timeout": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "timeout"


def test_the_server_default_timeout(base, lib):
    with running(make_app(base, lib, request_timeout=0.3)) as u:
        r = httpx.post(f"{u}/v1/completions", json={"model": "a", "prompt": "hello", "max_tokens": LONG}, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout", r.text
        assert complete(u, "a", "hello", 3)["usage"]["completion_tokens"] == 3  # short ones are served


def test_requests_join_the_running_batch(url):
    short = [("b", "Peru"), ("c", "12 + 30"), ("base", "x y"), ("d", "apple river")]
    alone = [complete(url, m, p, 6)["choices"][0]["text"] for m, p in short]
    steps_before, batches_before = metric(url, "modulora_decode_steps_total"), metric(url, "modulora_batches_total")
    with httpx.stream("POST", f"{url}/v1/completions", timeout=120,
                      json={"model": "a", "prompt": "hello", "max_tokens": LONG, "stream": True}) as r:
        lines = r.iter_lines()
        next(ev for ev in sse(lines) if ev["choices"][0]["text"])  # the long row is generating
        with ThreadPoolExecutor(len(short)) as ex:
            together = list(ex.map(lambda job: complete(url, job[0], job[1], 6)["choices"][0]["text"], short))
        running = metric(url, "modulora_running_rows")
    assert together == alone  # each equals its solo answer
    assert running >= 1  # the long row was still going when the short ones had all been answered
    assert metric(url, "modulora_batches_total") - batches_before >= 2  # the long one, then joins
    assert metric(url, "modulora_decode_steps_total") > steps_before
    assert until(lambda: metric(url, "modulora_running_rows") == 0)


def test_a_bounded_expert_cache_serves_every_adapter(url, base, lib):
    jobs = [(n, p) for p in ("hello there", "Peru") for n in NAMES] + [("a,b", "x y"), ("c:0.3,d:0.7", "x y")]
    expect = [complete(url, m, p, 8)["choices"][0]["text"] for m, p in jobs]
    assert len(set(expect[:4])) == 4  # the adapters answer differently: a mix-up would show
    with running(make_app(base, lib, max_resident_experts=2)) as u:
        got = [complete(u, m, p, 8)["choices"][0]["text"] for m, p in jobs]
        with ThreadPoolExecutor(len(jobs)) as ex:
            together = list(ex.map(lambda job: complete(u, job[0], job[1], 8)["choices"][0]["text"], jobs))
        assert got == expect and together == expect
        assert metric(u, "modulora_adapter_cache_evictions_total") >= 4
        assert metric(u, "modulora_adapter_cache_misses_total") >= 6
        # a cycle over 4 adapters with room for 2 may never hit: the same adapter twice in a row must
        assert complete(u, "d", "Peru", 8)["choices"][0]["text"] == expect[7]
        hits = metric(u, "modulora_adapter_cache_hits_total")
        assert complete(u, "d", "Peru", 8)["choices"][0]["text"] == expect[7]
        assert metric(u, "modulora_adapter_cache_hits_total") >= hits + 1
        assert metric(u, "modulora_adapter_cache_resident") <= 2 and metric(u, "modulora_adapter_cache_capacity") == 2
        for model in ("arrow", "uniform", "a,b,c"):  # would need more experts at once than the bound
            r = httpx.post(f"{u}/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2}, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_experts", r.text
            assert "--max-resident-experts" in r.json()["error"]["message"]


def test_json_request_log_of_the_serve_command(lib, tmp_path):
    port = free_port()
    u = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "modulora.cli", "--library", str(lib), "serve", "--base", "tiny",
                             "--port", str(port), "--log-format", "json", "--max-resident-experts", "2",
                             "--request-timeout", "60", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_healthy(u, proc)
        ok = httpx.post(f"{u}/v1/completions", json={"model": "b", "prompt": "Peru", "max_tokens": 5}, timeout=60)
        missing = httpx.post(f"{u}/v1/completions", json={"model": "nosuch", "prompt": "Peru"}, timeout=60)
        with httpx.stream("POST", f"{u}/v1/chat/completions", timeout=60, json={
                "model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}) as s:
            list(s.iter_lines())
        assert ok.status_code == 200 and missing.status_code == 404
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    records = []
    for line in err.splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if isinstance(rec, dict) and rec.get("event") == "request":
                records.append(rec)
    by_id = {r["request_id"]: r for r in records}
    rec = by_id[ok.headers["x-request-id"]]
    body = ok.json()
    assert ok.json()["id"] == f"cmpl-{rec['request_id']}"
    assert rec["status"] == 200 and rec["path"] == "/v1/completions" and rec["route"] == "b"
    assert rec["experts"] == {"b": 1.0} and rec["prompt_tokens"] == body["usage"]["prompt_tokens"]
    assert rec["completion_tokens"] == body["usage"]["completion_tokens"] and rec["latency_s"] > 0
    assert by_id[missing.headers["x-request-id"]]["status"] == 404
    streamed = [r for r in records if r["path"] == "/v1/chat/completions"]
    assert len(streamed) == 1 and streamed[0]["stream"] is True and streamed[0]["completion_tokens"] <= 4
    assert streamed[0]["experts"] == {"a": 1.0} and streamed[0]["status"] == 200
    assert not any("Traceback" in line for line in err.splitlines())


def test_text_request_log(url, base, lib):
    import io

    from modulora.serve.request_log import LOGGER, configure

    buf = io.StringIO()
    logger = configure("text", stream=buf)
    try:
        r = httpx.post(f"{url}/v1/completions", json={"model": "c", "prompt": "Peru", "max_tokens": 3},
                       headers={"x-request-id": "trace-42"}, timeout=60)
        assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
        line = until(lambda: next((ln for ln in buf.getvalue().splitlines() if "trace-42" in ln), None), 5)
    finally:
        for h in list(logger.handlers):
            logger.removeHandler(h)
    assert line and " request " in line and "status=200" in line and "route=c" in line
    assert 'experts={"c":1.0}' in line and re.search(r"latency_s=[0-9.]+", line)
    assert LOGGER == "modulora.requests"
    with pytest.raises(ValueError):
        configure("xml")


def test_serve_flags_parse_and_bad_values_are_refused(capsys):
    import argparse

    from modulora.serve import add_serve_command, cmd_serve

    p = argparse.ArgumentParser()
    p.add_argument("--library", default=None)
    add_serve_command(p.add_subparsers(dest="command"))
    a = p.parse_args(["serve", "--max-resident-experts", "3", "--request-timeout", "2.5", "--log-format", "json",
                      "--prefix-cache", "0"])
    assert (a.max_resident_experts, a.request_timeout, a.log_format, a.prefix_cache, a.func) == (3, 2.5, "json", 0,
                                                                                                   cmd_serve)
    d = p.parse_args(["serve"])
    assert (d.max_resident_experts, d.request_timeout, d.log_format) == (0, 300, "text")
    for bad in (["--max-resident-experts", "-1"], ["--request-timeout", "soon"], ["--log-format", "xml"],
                ["--max-batch", "0"]):
        with pytest.raises(SystemExit):
            p.parse_args(["serve", *bad])
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err
