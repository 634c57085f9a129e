"""The server's bounds on a request before any model work (max_tokens, prompts, messages, body
size) and input that used to end in a 500 (lone surrogates, weights that underflow)."""

import argparse
import json

import httpx
import pytest
from fastapi.testclient import TestClient
from servers import running

CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
COMPLETION = {"model": "base", "prompt": "hi", "max_tokens": 1}
LIMITS = {"max_tokens": 8, "max_prompts": 4, "max_messages": 3, "max_body_bytes": 4096}


def make_app(tiny, tmp_path_factory):
    from modulora.library import Library
    from modulora.serve import create_app

    library = Library(tmp_path_factory.mktemp("bounds") / "lib")
    return create_app(tiny, library, batch_wait_ms=1, queue_size=3, **LIMITS)


@pytest.fixture(scope="module")
def client(tiny, tmp_path_factory):
    with TestClient(make_app(tiny, tmp_path_factory)) as c:
        yield c


def assert_error(r, status: int, param: str | None, *words: str):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param, err
    for w in words:
        assert w in err["message"], err


def post_raw(client, path: str, text: str):
    """`text` as the JSON body, unchanged (json= would refuse a lone surrogate)."""
    return client.post(path, content=text.encode(), headers={"content-type": "application/json"})


# -- max_tokens ----------------------------------------------------------------------------------------

def test_max_tokens_past_the_server_limit_is_400_naming_both(client):
    assert_error(client.post("/v1/completions", json={**COMPLETION, "max_tokens": 9}), 400, "max_tokens", "9", "8")
    assert_error(client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 100}), 400, "max_tokens",
                 "100", "8")
    assert_error(client.post("/v1/chat/completions", json={**CHAT, "max_completion_tokens": 50}), 400,
                 "max_completion_tokens", "50", "8")
    assert client.post("/v1/completions", json={**COMPLETION, "max_tokens": 8}).status_code == 200


def test_a_default_max_tokens_is_held_to_the_limit(client):
    body = {k: v for k, v in CHAT.items() if k != "max_tokens"}
    r = client.post("/v1/chat/completions", json={**body, "ignore_eos": True})  # default 128 > 8
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8


# -- prompts and messages --------------------------------------------------------------------------------

def test_too_many_prompts_or_messages_are_400_naming_both(client):
    assert_error(client.post("/v1/completions", json={**COMPLETION, "prompt": ["a"] * 5}), 400, "prompt", "5", "4")
    assert_error(client.post("/v1/completions", json={**COMPLETION, "prompt": [[1, 2]] * 6}), 400, "prompt",
                 "6", "4")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}] * 2
    assert_error(client.post("/v1/chat/completions", json={**CHAT, "messages": messages}), 400, "messages",
                 "4", "3")
    assert_error(client.post("/tokenize", json={"messages": messages}), 400, "messages", "4", "3")
    assert client.post("/v1/chat/completions", json={**CHAT, "messages": messages[:3]}).status_code == 200


def test_more_prompts_than_the_queue_holds_is_400_not_429(client):
    r = client.post("/v1/completions", json={**COMPLETION, "prompt": ["a", "b", "c", "d"]})  # 4 > queue_size 3
    assert_error(r, 400, "prompt", "4", "3")
    assert client.post("/v1/completions", json={**COMPLETION, "prompt": ["a", "b", "c"]}).status_code == 200


# -- body size ---------------------------------------------------------------------------------------------

def test_a_body_past_the_limit_is_413_by_its_content_length(client):
    r = client.post("/v1/completions", json={**COMPLETION, "prompt": "x" * 5000})
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "4096" in err["message"]
    assert client.post("/tokenize", json={"prompt": "x" * 5000}).status_code == 413


def test_a_chunked_body_past_the_limit_is_413_as_counted(client):
    def chunks():
        yield b'{"model": "base", "max_tokens": 1, "prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert "4096" in r.json()["error"]["message"]

    def small():
        yield b'{"model": "base", "max_tokens": 1, '
        yield b'"prompt": "hi"}'

    r = client.post("/v1/completions", content=small(), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


def test_body_limit_on_a_real_server(tiny, tmp_path_factory):
    with running(make_app(tiny, tmp_path_factory)) as url:
        big = [{"role": "user", "content": "y" * 9000}]
        r = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "messages": big})
        assert r.status_code == 413 and "4096" in r.json()["error"]["message"], r.text
        r = httpx.post(f"{url}/v1/chat/completions", content=iter([json.dumps(CHAT).encode()]),
                       headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text


# -- input that used to be a 500 ----------------------------------------------------------------------------

def test_a_lone_surrogate_is_400(client):
    r = post_raw(client, "/v1/completions", '{"model": "base", "max_tokens": 1, "prompt": "a\\ud800b"}')
    assert_error(r, 400, "prompt", "surrogate", "D800")
    r = post_raw(client, "/v1/completions", '{"model": "base", "max_tokens": 1, "prompt": ["ok", "\\udfff"]}')
    assert_error(r, 400, "prompt", "surrogate")
    r = post_raw(client, "/v1/chat/completions",
                 '{"model": "base", "max_tokens": 1, "messages": [{"role": "user", "content": "\\ud800"}]}')
    assert_error(r, 400, "messages[0].content", "surrogate")
    r = post_raw(client, "/v1/chat/completions", '{"model": "base", "max_tokens": 1, "messages": '
                 '[{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}')
    assert_error(r, 400, "messages[0].content", "surrogate")
    assert_error(post_raw(client, "/tokenize", '{"prompt": "\\ud800"}'), 400, "prompt", "surrogate")
    r = post_raw(client, "/v1/completions", '{"model": "base", "max_tokens": 1, "prompt": "\\ud83d\\ude00"}')
    assert r.status_code == 200, r.text  # a surrogate pair is a valid character


@pytest.mark.parametrize("weight", ["1e-320", "1e-40", "nan", "inf"])
def test_a_weight_that_underflows_or_is_not_finite_is_400(client, weight):
    r = client.post("/v1/completions", json={**COMPLETION, "model": f"a:{weight},b:1"})
    assert_error(r, 400, "model", weight)


def test_adapter_weights_that_underflow_are_400(client):
    r = client.post("/v1/completions", json={**COMPLETION, "adapter_weights": {"a": 1e-320, "b": 1.0}})
    assert_error(r, 400, "adapter_weights", "1e-320")


def test_parse_fixed_weights():
    from modulora.routing.api import parse_fixed
    from modulora.routing.experts import RoutingError

    assert parse_fixed("a:1e-300,b:1e-300") == {"a": 0.5, "b": 0.5}
    for spec in ("a:1e-320,b:1", "a:1e-320,b:1e-320", "a:1e308,b:1e308", "a:nan", "a:-inf"):
        with pytest.raises(RoutingError):
            parse_fixed(spec)


# -- settings ------------------------------------------------------------------------------------------------

def test_serve_options_and_their_defaults():
    from modulora.serve import add_serve_command

    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    args = parser.parse_args(["serve"])
    assert (args.max_tokens, args.max_prompts, args.max_messages, args.max_body_mb) == (4096, 64, 512, 8)
    args = parser.parse_args(["serve", "--max-tokens", "10", "--max-prompts", "2", "--max-messages", "5",
                              "--max-body-mb", "0.5"])
    assert (args.max_tokens, args.max_prompts, args.max_messages, args.max_body_mb) == (10, 2, 5, 0.5)
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--max-tokens", "0"])


def test_create_app_refuses_bounds_below_one(tiny, tmp_path):
    from modulora.library import Library
    from modulora.serve import create_app

    with pytest.raises(ValueError):
        create_app(tiny, Library(tmp_path / "lib"), max_tokens=0)


def test_the_queue_is_429_when_full_now_and_400_when_it_never_could_hold(tiny, tmp_path):
    import threading

    from modulora.library import Library
    from modulora.serve import APIError, Scheduler, _Item

    sched = Scheduler(tiny, Library(tmp_path / "lib"), queue_size=2)
    sched._thread = threading.current_thread()  # "alive", but nothing takes from the queue
    sched.submit([_Item([1], "x", "base")])
    with pytest.raises(APIError) as e:
        sched.submit([_Item([1], "x", "base") for _ in range(2)])  # fits the queue, not now
    assert e.value.status == 429 and e.value.code == "queue_full"
    with pytest.raises(APIError) as e:
        sched.submit([_Item([1], "x", "base") for _ in range(3)])  # never fits
    assert e.value.status == 400 and e.value.param == "prompt" and "3" in e.value.message and "2" in e.value.message
    assert sched.queue.qsize() == 1


# -- the context, checked before queueing ----------------------------------------------------------

def test_a_prompt_past_the_context_is_refused_before_it_is_queued(tiny, tmp_path):
    """A prompt that cannot fit is a 400 naming the numbers, without waiting for the worker; a
    huge one is refused before it is even tokenized (a lower bound on its tokens suffices)."""
    from modulora.library import Library
    from modulora.serve import create_app

    with TestClient(create_app(tiny, Library(tmp_path / "lib"))) as client:
        check_context(client, tiny)


def check_context(client, tiny):
    import time

    context = tiny.model.config.max_position_embeddings
    words = " ".join(["river"] * context)
    r = client.post("/v1/completions", json={**COMPLETION, "prompt": words, "max_tokens": 2})
    assert_error(r, 400, "prompt", f"context of {context} tokens", "max_tokens is 2")
    assert "at least" not in r.json()["error"]["message"]  # tokenized: the exact count
    huge = "x" * (3 << 20)
    start = time.perf_counter()
    for body, path in (({**COMPLETION, "prompt": huge}, "/v1/completions"),
                       ({**CHAT, "messages": [{"role": "user", "content": huge}]}, "/v1/chat/completions")):
        r = client.post(path, json=body)
        assert_error(r, 400, "prompt", "at least", f"context of {context} tokens")
        assert "at least" in r.json()["error"]["message"]
    assert time.perf_counter() - start < 2.0  # tokenizing 3 MB twice would take far longer
    assert client.post("/v1/completions", json=COMPLETION).status_code == 200
