"""Fuzzing both HTTP APIs (OpenAI-compatible and the adapter library) on the tiny model: no input
gives a 5xx or a hang, every error is OpenAI's JSON error object, and every status an operation
answers is one its OpenAPI schema declares. Then one plain regression test per input the fuzzing
found answered with a 500, and a few declared error statuses reached on purpose.

The fuzz tests are derandomized (same examples every run) and bounded in examples and time."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from servers import running

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

REPLY_S = 20  # no answer within this many seconds is a hang (generation is capped at 8 tokens)
OPERATIONS = [("GET", "/health"), ("GET", "/metrics"), ("POST", "/v1/adapters"), ("GET", "/v1/adapters/{name}"),
              ("DELETE", "/v1/adapters/{name}"), ("GET", "/v1/models"), ("GET", "/v1/models/{model_id}"),
              ("POST", "/tokenize"), ("GET", "/tokenizer_info"), ("POST", "/detokenize"),
              ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter"), ("POST", "/v1/completions"),
              ("POST", "/v1/chat/completions"),
              # the web page's reads (modulora/serve/web.py)
              ("GET", "/v1/adapters"), ("GET", "/v1/clustering"), ("GET", "/v1/results"), ("GET", "/v1/results/{name}"),
              ("GET", "/v1/info")]
# (method, path template) -> statuses answered during this run, for `test_observed_statuses_are_declared`
OBSERVED: dict[tuple[str, str], set[int]] = defaultdict(set)


def fuzz_settings(examples: int):
    """Same examples every run (CI), no per-example deadline (the model is slow on 2 cores)."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))


class Server:
    def __init__(self, app, url: str, allowed: Path):
        self.app, self.url, self.allowed = app, url, allowed

    def declared(self, method: str, template: str) -> set[int]:
        responses = self.app.openapi()["paths"][template][method.lower()]["responses"]
        return {int(s) for s in responses}


@pytest.fixture(scope="module")
def server(tiny, random_library, tmp_path_factory):
    from modulora.serve import create_app

    root = tmp_path_factory.mktemp("fuzz")
    lib = random_library(root, ["alpha", "beta"])
    allowed = root / "allowed"
    allowed.mkdir()
    app = create_app(tiny, lib, batch_wait_ms=1, max_tokens=8, max_prompts=4, max_messages=4,
                     max_body_bytes=1 << 16, request_timeout=10, queue_size=16, allowed_adapter_dirs=[allowed])
    with running(app) as url:
        yield Server(app, url, allowed)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=REPLY_S) as c:
        yield c


def check(server: Server, method: str, template: str, r) -> None:
    """No 500; an error is OpenAI's JSON error object with a message; the status is recorded,
    and a 5xx must be one the operation declares (504: a request's own `timeout` passed)."""
    assert r.status_code != 500, f"{method} {template}: {r.status_code} {r.text[:500]}"
    if r.status_code > 500:
        assert r.status_code in server.declared(method, template), r.text[:500]
    if r.status_code >= 400:
        err = json.loads(r.content)["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) \
            and err["message"], r.text[:500]
    OBSERVED[(method, template)].add(r.status_code)


def test_the_fuzzed_operations_are_the_schemas(server):
    """A new route must join OPERATIONS (and so the fuzzing)."""
    spec = server.app.openapi()["paths"]
    assert sorted((m.upper(), p) for p, ops in spec.items() for m in ops) == sorted(OPERATIONS)


# -- schemathesis: every operation, from the app's own OpenAPI schema ---------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method,template", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_schemathesis(server, method, template):
    """Schema-valid and schema-violating requests (schemathesis' positive and negative modes)."""
    from hypothesis.errors import Unsatisfiable

    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

    op = schemathesis.openapi.from_dict(server.app.openapi())[template][method]
    checks = [not_a_server_error, status_code_conformance, content_type_conformance]
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        @fuzz_settings(25)
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case):
            r = case.call(base_url=server.url, timeout=REPLY_S)
            case.validate_response(r, checks=checks)
            check(server, method, template, r)

        try:
            run()
        except Unsatisfiable:  # nothing to violate: the operation takes no input
            assert mode is GenerationMode.NEGATIVE


# -- bodies built from the real field names, with hostile values ---------------------------------------

MODELS = ["base", "alpha", "beta", "arrow", "retrieval", "learned", "alpha,beta", "alpha:0.5,beta:0.5", "nope",
          " base ", ""]
TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["\ud800", "a\udfffb", "\x00", "<|im_end|>", "alpha:nan",
                                                        "alpha:1e308,beta:1e308", ",", ":", "x" * 300]))
NUMBER = st.one_of(st.integers(-3, 20), st.sampled_from([2 ** 63, -2 ** 63 - 1, 2 ** 64, 10 ** 30]),
                   st.floats(allow_nan=True, allow_infinity=True))
JSON = st.recursive(st.one_of(st.none(), st.booleans(), NUMBER, TEXT),
                    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
                    max_leaves=6)
MESSAGES = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["user", "assistant", "system", "developer", "tool", ""]),
    "content": st.one_of(TEXT, st.none(), st.lists(st.dictionaries(st.sampled_from(["type", "text"]), JSON,
                                                                   max_size=2), max_size=2))}), max_size=3)
VALUE = st.one_of(JSON, st.sampled_from(MODELS), MESSAGES, st.lists(st.integers(-2, 2 ** 64), max_size=3),
                  st.dictionaries(st.sampled_from(["alpha", "beta", "nope", ""]), NUMBER, max_size=2))
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "seed", "stop", "n", "presence_penalty", "frequency_penalty", "stream", "stream_options", "user", "best_of",
          "route_top_k", "mode", "adapter_weights", "timeout", "ignore_eos", "stop_token_ids", "logprobs",
          "top_logprobs", "echo", "tools", "response_format", "logit_bias", "suffix", "min_p", "tokens", "lora_name",
          "lora_path", "lora_int_id", "add_special_tokens", "add_generation_prompt", "return_token_strs"]


def valid_bodies(allowed: Path) -> dict[str, dict]:
    """A body each JSON endpoint accepts; the fuzzing changes a few of its fields."""
    return {"/v1/completions": {"model": "base", "prompt": "hi", "max_tokens": 2},
            "/v1/chat/completions": {"model": "base", "messages": [{"role": "user", "content": "hi"}],
                                     "max_tokens": 2},
            "/tokenize": {"prompt": "hi"}, "/detokenize": {"tokens": [1, 2]},
            "/v1/load_lora_adapter": {"lora_name": "fz", "lora_path": str(allowed)},
            "/v1/unload_lora_adapter": {"lora_name": "nope"}}


@pytest.mark.slow
def test_json_bodies_with_hostile_values(server, http):
    """Valid bodies with up to three fields set to anything JSON holds (lone surrogates, NaN,
    ints past 64 bits, nesting) or dropped; sent as raw JSON text (NaN, surrogate escapes)."""
    bodies = valid_bodies(server.allowed)

    @fuzz_settings(300)
    @given(path=st.sampled_from(sorted(bodies)), changes=st.dictionaries(st.sampled_from(FIELDS), VALUE, max_size=3),
           drop=st.lists(st.sampled_from(FIELDS), max_size=1))
    def run(path, changes, drop):
        body = {k: v for k, v in {**bodies[path], **changes}.items() if k not in drop}
        r = http.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
        check(server, "POST", path, r)
        if r.headers["content-type"].startswith("text/event-stream"):  # a stream may end in an error event
            assert '"server_error"' not in r.text, r.text[-500:]

    run()


@pytest.mark.slow
def test_raw_requests(server, http):
    """Any method, path, query, content type and body bytes: never a 5xx, errors in JSON."""
    paths = ["/health", "/metrics", "/v1/models", "/v1/models/x", "/v1/adapters", "/v1/adapters/alpha", "/tokenize",
             "/detokenize", "/tokenizer_info", "/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
             "/v1/unload_lora_adapter", "/openapi.json", "/v1", "/v2/x", "/v1/models/a/b/..", "/%ff", "/v1/adapters/%00"]
    segment = st.text(st.characters(codec="utf-8"), max_size=8)
    quoted = segment.map(lambda t: quote(t, safe=""))

    @fuzz_settings(120)
    @given(method=st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"]),
           path=st.one_of(st.sampled_from(paths), st.builds(lambda p, s: p + "/" + s, st.sampled_from(paths), quoted)),
           query=st.dictionaries(segment, segment, max_size=2),
           ctype=st.sampled_from(["application/json", "text/plain", "multipart/form-data; boundary=b",
                                  "application/x-www-form-urlencoded", "", "application/json; charset=latin-1"]),
           body=st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"null", b"[]", b"{}", b"1", b'{"model":',
                                                                   b"[" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000,
                                                                   b'"\\ud800"', b"\xff\xfe"])),
           request_id=st.text(st.characters(codec="utf-8", exclude_categories=["Cc"]), max_size=80)
           .map(lambda t: t.strip().encode()))
    def run(method, path, query, ctype, body, request_id):
        headers = {"content-type": ctype, "x-request-id": request_id}
        r = http.request(method, path, params=query, content=body if method not in ("GET", "HEAD") else None,
                         headers=headers)
        assert r.status_code < 500, f"{method} {path}: {r.status_code} {r.text[:500]}"
        if r.status_code >= 400 and method != "HEAD":
            assert json.loads(r.content)["error"]["message"]

    run()


def multipart(fields: list[tuple[str, str | None, bytes]], boundary: str = "fz") -> tuple[bytes, dict]:
    out = b""
    for name, filename, data in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), {"content-type": f"multipart/form-data; boundary={boundary}"}


@pytest.mark.slow
def test_uploads(server, http):
    """Multipart uploads: random names, file names and contents (JSON-ish configs, safetensors
    headers of any length, gzip and zip magic), and byte-level damage to the framing."""
    file_names = st.sampled_from(["adapter_config.json", "adapter_model.safetensors", "card.json", "README.md",
                                  "a.tar.gz", "a.tgz", "a.zip", "../x", "", "\xff", "x"])
    content = st.one_of(st.binary(max_size=40), st.sampled_from([b"{}", b"[]", b'{"peft_type": "LORA", "r": 4}',
                                                                  b"\x1f\x8b\x08\x00" + b"\x00" * 20, b"PK\x03\x04",
                                                                  (10 ** 18).to_bytes(8, "little") + b"{}"]))
    parts = st.lists(st.tuples(st.sampled_from(["name", "file", "files", "x"]), st.none() | file_names, content),
                     max_size=4)

    @fuzz_settings(80)
    @given(parts=parts, cut=st.none() | st.integers(0, 200))
    def run(parts, cut):
        body, headers = multipart(parts)
        r = http.post("/v1/adapters", content=body if cut is None else body[:cut], headers=headers)
        check(server, "POST", "/v1/adapters", r)

    run()


def test_observed_statuses_are_declared(server):
    """Every status the fuzzing saw on an operation is in its OpenAPI `responses`."""
    for (method, template), seen in sorted(OBSERVED.items()):
        assert seen <= server.declared(method, template), (method, template, seen)


# -- what the fuzzing found (each was a 500) -----------------------------------------------------------

def assert_error(r, status: int, param: str | None, *words: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    for w in words:
        assert w in err["message"], err


def post_json_text(http, path: str, text: str):
    """`text` as the body, unchanged: json= refuses lone surrogates, which JSON can escape."""
    return http.post(path, content=text.encode(), headers={"content-type": "application/json"})


def test_tokenize_an_empty_conversation_is_400(http):
    assert_error(http.post("/tokenize", json={"messages": []}), 400, "messages", "messages is empty")


def test_prompt_token_ids_past_64_bits_are_400(http):
    for prompt in ([2 ** 64], [[1], [2 ** 70]], [2 ** 63]):
        r = http.post("/v1/completions", json={"model": "base", "prompt": prompt, "max_tokens": 1})
        assert_error(r, 400, "prompt", "token id", "vocabulary")


def test_unload_a_lone_surrogate_name_is_400(http):
    r = post_json_text(http, "/v1/unload_lora_adapter", '{"lora_name": "\\ud800"}')
    assert_error(r, 400, "lora_name", "lone surrogate")


def test_load_a_path_the_file_system_cannot_take_is_400(server, http):
    r = post_json_text(http, "/v1/load_lora_adapter", '{"lora_name": "x", "lora_path": "%s/\\ud800"}' % server.allowed)
    assert_error(r, 400, "lora_path", "lone surrogate")
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": f"{server.allowed}/{'a' * 300}"})
    assert_error(r, 400, "lora_path", "too long")


# -- declared error statuses, reached on purpose ---------------------------------------------------------

def test_declared_statuses_are_reachable(server, http, tiny, tmp_path):
    """A few representative declared error statuses, each answered by the operation declaring it."""
    from modulora.library import Library
    from modulora.serve import create_app

    def reach(method: str, template: str, status: int, r) -> None:
        assert r.status_code == status, r.text
        assert status in server.declared(method, template)
        check(server, method, template, r)

    chat = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    reach("POST", "/v1/chat/completions", 400, http.post("/v1/chat/completions", json={**chat, "n": 0}))
    reach("POST", "/v1/chat/completions", 404, http.post("/v1/chat/completions", json={**chat, "model": "nope"}))
    reach("POST", "/v1/completions", 413,
          http.post("/v1/completions", json={"model": "base", "prompt": "x" * (1 << 17)}))
    reach("POST", "/v1/completions", 504, http.post("/v1/completions", json={"model": "base", "prompt": "hi",
                                                                              "timeout": 1e-9}))
    reach("GET", "/v1/adapters/{name}", 404, http.get("/v1/adapters/nope"))
    reach("GET", "/v1/models/{model_id}", 404, http.get("/v1/models/nope"))
    reach("POST", "/v1/load_lora_adapter", 403,
          http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/"}))
    reach("POST", "/v1/load_lora_adapter", 422,
          http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(server.allowed)}))
    body, headers = multipart([("name", None, b"x"), ("file", "adapter_config.json", b"[]"),
                               ("file", "adapter_model.safetensors", b"")])
    reach("POST", "/v1/adapters", 422, http.post("/v1/adapters", content=body, headers=headers))
    keyed = create_app(tiny, Library(tmp_path / "lib"), api_key="k", batch_wait_ms=1)
    with TestClient(keyed) as c:
        reach("DELETE", "/v1/adapters/{name}", 401, c.delete("/v1/adapters/alpha"))
        reach("POST", "/v1/completions", 401, c.post("/v1/completions", json={"model": "base", "prompt": "hi"}))
