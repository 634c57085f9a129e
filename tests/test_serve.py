"""The OpenAI-compatible server, against a real uvicorn on 127.0.0.1 with the official openai client."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from modulora.cli import main
from modulora.tasks import make_task, write_jsonl

ADAPTERS = ("upper", "add", "capital")
UPPER = "Rewrite the text in capital letters.\n\napple river"


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    for name in ADAPTERS:
        data = write_jsonl(make_task(name, n=40), tmp / f"{name}.jsonl")
        assert main(["--library", str(tmp / "lib"), "train", "--base", "tiny", "--data", str(data), "--steps", "2",
                     "--out", str(tmp / name), "--add", name, "--dtype", "fp32", "--rank", "4"]) == 0
    return tmp / "lib"


@pytest.fixture(scope="module")
def server(lib, tiny):
    import uvicorn

    from modulora.library import Library
    from modulora.serve import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(tiny, Library(lib), max_batch=16, batch_wait_ms=50, queue_size=64)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    else:
        pytest.fail("server did not start")
    yield url, app
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="x", max_retries=0, timeout=60)


def experts_of(resp) -> dict:
    return resp.model_extra["routing"][0]["experts"]


def test_models_lists_adapters_and_policies(client):
    ids = {m.id for m in client.models.list()}
    assert set(ADAPTERS) | {"base", "arrow", "retrieval", "learned", "uniform"} <= ids


@pytest.mark.parametrize("model,extra,expect", [
    ("upper", {}, {"upper"}),
    ("retrieval", {"top_k": 1}, None),
    ("uniform", {}, set(ADAPTERS)),
    ("arrow", {"top_k": 2}, None),
    ("upper:3,add:1", {}, {"upper", "add"}),
    ("base", {"adapter_weights": {"upper": 0.7, "capital": 0.3}}, {"upper", "capital"}),
])
def test_completion_routes_and_reports_usage(client, model, extra, expect):
    resp = client.completions.create(model=model, prompt=UPPER, max_tokens=4, extra_body=extra)
    assert resp.object == "text_completion" and len(resp.choices) == 1
    assert isinstance(resp.choices[0].text, str) and resp.choices[0].finish_reason in ("stop", "length")
    u = resp.usage
    assert u.prompt_tokens > 0 and u.completion_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    experts = experts_of(resp)
    assert abs(sum(experts.values()) - 1) < 1e-4, experts
    if expect is not None:
        assert set(experts) == expect
    if model == "upper:3,add:1":
        assert experts["upper"] == pytest.approx(0.75)


def test_completion_with_prompt_list(client):
    resp = client.completions.create(model="add", prompt=["1 + 2", UPPER], max_tokens=3)
    assert [c.index for c in resp.choices] == [0, 1] and len(resp.model_extra["routing"]) == 2


def test_chat_completion_uses_last_user_message(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi"}, {"role": "user", "content": UPPER}]
    resp = client.chat.completions.create(model="upper", messages=msgs, max_tokens=4)
    assert resp.object == "chat.completion" and resp.choices[0].message.role == "assistant"
    alone = client.completions.create(model="upper", prompt=UPPER, max_tokens=4)
    assert resp.choices[0].message.content == alone.choices[0].text
    assert resp.usage.prompt_tokens == alone.usage.prompt_tokens > 0
    assert experts_of(resp) == {"upper": 1.0}


def test_concurrent_mixed_routes_match_serving_alone(client, server):
    jobs = [("upper", UPPER), ("add", "12 + 30"), ("capital", "Peru"), ("retrieval", "Japan"),
            ("uniform", "apple river stone"), ("arrow", "41 + 55"), ("base", "hello there"), ("add:1,upper:2", "x y")]
    alone = [client.completions.create(model=m, prompt=p, max_tokens=6).choices[0].text for m, p in jobs]
    app = server[1]
    batches_before = app.state.scheduler.batches
    barrier = threading.Barrier(len(jobs))

    def call(job):
        barrier.wait()
        return client.completions.create(model=job[0], prompt=job[1], max_tokens=6).choices[0].text

    with ThreadPoolExecutor(len(jobs)) as ex:
        together = list(ex.map(call, jobs))
    assert together == alone
    assert app.state.scheduler.batches - batches_before < len(jobs)  # some were answered in one batch
    assert app.state.scheduler.largest_batch > 1


def test_unknown_model_is_404_in_openai_shape(client, server):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nosuch", prompt="x", max_tokens=2)
    r = httpx.post(f"{server[0]}/v1/chat/completions",
                   json={"model": "upper:1,nosuch:1", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body,status", [
    (b"{not json", 400),
    (json.dumps({"model": "upper"}).encode(), 400),                                   # no prompt
    (json.dumps({"model": "upper", "prompt": "x", "max_tokens": -1}).encode(), 400),
    (json.dumps({"model": "upper:-1", "prompt": "x"}).encode(), 400),
    (json.dumps({"model": "arrow", "prompt": "x", "top_k": 9}).encode(), 400),        # more than the library has
    (json.dumps({"model": "learned", "prompt": "x"}).encode(), 400),                  # no router trained yet
    (json.dumps({"model": "upper", "prompt": "x", "n": 2}).encode(), 400),
])
def test_bad_input_is_400_in_openai_shape(server, body, status):
    r = httpx.post(f"{server[0]}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_streaming_joins_to_the_full_text(client):
    full = client.completions.create(model="capital", prompt="Peru", max_tokens=8).choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(model="capital", prompt="Peru", max_tokens=8,
                                                                   stream=True)]
    assert "".join(pieces) == full
    chat_full = client.chat.completions.create(model="capital", messages=[{"role": "user", "content": "Peru"}],
                                               max_tokens=8).choices[0].message.content
    chunks = list(client.chat.completions.create(model="capital", messages=[{"role": "user", "content": "Peru"}],
                                                 max_tokens=8, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat_full
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_full_queue_is_429_and_api_key_is_checked(tiny, lib):
    from fastapi.testclient import TestClient

    from modulora.library import Library
    from modulora.serve import create_app

    app = create_app(tiny, Library(lib), api_key="secret", queue_size=1)
    with TestClient(app) as tc:
        assert tc.post("/v1/completions", json={"model": "upper", "prompt": "x"}).status_code == 401
        ok = tc.post("/v1/completions", json={"model": "upper", "prompt": "x", "max_tokens": 1},
                     headers={"Authorization": "Bearer secret"})
        assert ok.status_code == 200, ok.text
        r = tc.post("/v1/completions", json={"model": "upper", "prompt": ["a", "b"], "max_tokens": 1},
                    headers={"Authorization": "Bearer secret"})
        assert r.status_code == 429 and r.headers["retry-after"] and r.json()["error"]["code"] == "queue_full"
        assert tc.get("/health").status_code == 200


def test_serve_command_parses_library_before_or_after(tmp_path):
    import argparse

    from modulora.serve import add_serve_command, cmd_serve

    p = argparse.ArgumentParser()
    p.add_argument("--library", default=None)
    add_serve_command(p.add_subparsers(dest="command"))
    a = p.parse_args(["serve", "--library", "L", "--port", "9", "--api-key", "k", "--base", "tiny"])
    assert (a.library, a.port, a.api_key, a.base, a.host, a.func) == ("L", 9, "k", "tiny", "127.0.0.1", cmd_serve)
    assert p.parse_args(["--library", "M", "serve"]).library == "M"


def test_a_bad_route_fails_alone_in_its_batch(client, server):
    alone = client.completions.create(model="upper", prompt=UPPER, max_tokens=4).choices[0].text
    barrier = threading.Barrier(4)

    def call(model):
        barrier.wait()
        try:
            return client.completions.create(model=model, prompt=UPPER, max_tokens=4).choices[0].text
        except openai.BadRequestError as e:
            return e

    with ThreadPoolExecutor(4) as ex:
        out = list(ex.map(call, ["upper", "learned", "upper", "learned"]))
    assert out[0] == out[2] == alone
    assert all(isinstance(e, openai.BadRequestError) and "router train" in str(e) for e in out[1::2])
