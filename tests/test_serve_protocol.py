"""The server's protocol: which request fields are refused or accepted, models, the tokenizer
endpoints and vLLM's adapter loading. Generation itself is not asserted on (only statuses)."""

import os

import pytest
from fastapi.testclient import TestClient

UNSUPPORTED_VALUES = {
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "tool_choice": "required",
    "functions": [{"name": "f", "parameters": {}}],
    "function_call": {"name": "f"},
    "response_format": {"type": "json_object"},
    "logit_bias": {"42": 5},
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"},
    "parallel_tool_calls": "yes",
    "service_tier": "flex",
    "store": True,
    "metadata": {"k": "v"},
    "reasoning_effort": "high",
    "web_search_options": {},
    "min_p": 0.1,
    "repetition_penalty": 1.2,
}
NOOP_VALUES = {
    "tools": [], "tool_choice": "none", "functions": None, "function_call": None,
    "response_format": {"type": "text"}, "logit_bias": {}, "audio": None, "modalities": ["text"],
    "prediction": None, "parallel_tool_calls": True, "service_tier": "auto", "store": False, "metadata": {},
    "reasoning_effort": None, "web_search_options": None, "best_of": 1, "n": 1, "stream": False,
    "presence_penalty": 0, "frequency_penalty": 0, "top_p": 1, "seed": 1, "stop": None, "user": "tester",
    "min_p": 0, "repetition_penalty": 1, "skip_special_tokens": True,
}
CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
COMPLETION = {"model": "base", "prompt": "hi", "max_tokens": 1}


@pytest.fixture(scope="module")
def lib(tmp_path_factory, tiny, random_lora):
    from modulora.library import Library

    tmp = tmp_path_factory.mktemp("protocol")
    library = Library(tmp / "lib")
    library.add("one", random_lora(tiny.model, tmp / "one", 1, tiny.fingerprint), tiny.fingerprint)
    return library


@pytest.fixture(scope="module")
def allowed(tmp_path_factory, tiny, random_lora):
    """An allowed adapter directory holding a good adapter and a broken one, and a good one
    outside it (with a symlink to it inside)."""
    root = tmp_path_factory.mktemp("adapters")
    inside, outside = root / "allowed", root / "outside"
    inside.mkdir()
    outside.mkdir()
    random_lora(tiny.model, inside / "good", 2, tiny.fingerprint)
    random_lora(tiny.model, outside / "elsewhere", 3, tiny.fingerprint)
    (inside / "link").symlink_to(outside / "elsewhere")
    bad = inside / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (bad / "adapter_model.safetensors").write_bytes(b"not safetensors")
    return inside, outside


@pytest.fixture(scope="module")
def client(tiny, lib, allowed):
    from modulora.serve import create_app

    app = create_app(tiny, lib, batch_wait_ms=1, allowed_adapter_dirs=[allowed[0]])
    with TestClient(app) as c:
        yield c


def assert_error(r, status: int, param: str | None = None, code: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param and param.split(".")[0] in err["message"], err
    if code is not None:
        assert err["code"] == code, err


# -- fields ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("field", sorted(UNSUPPORTED_VALUES))
@pytest.mark.parametrize("endpoint,body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_unsupported_fields_are_400_naming_them(client, endpoint, body, field):
    r = client.post(endpoint, json={**body, field: UNSUPPORTED_VALUES[field]})
    assert_error(r, 400, field, "unsupported_field")


@pytest.mark.parametrize("endpoint,body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_unknown_fields_and_special_cases_are_400(client, endpoint, body):
    assert_error(client.post(endpoint, json={**body, "frobnicate": 1}), 400, "frobnicate", "unknown_field")
    assert_error(client.post(endpoint, json={**body, "suffix": "tail"}), 400, "suffix", "unsupported_field")
    assert_error(client.post(endpoint, json={**body, "best_of": 3}), 400, "best_of", "unsupported_field")
    assert_error(client.post(endpoint, json={**body, "stream_options": {"include_usage": True}}), 400,
                 "stream_options")
    assert_error(client.post(endpoint, json={**body, "temperature": 3}), 400, "temperature")
    assert_error(client.post(endpoint, json={**body, "n": 0}), 400, "n")
    assert_error(client.post(endpoint, json={**body, "stop": ["x"] * 17}), 400, "stop")


@pytest.mark.parametrize("endpoint,body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_null_and_noop_values_are_accepted(client, endpoint, body):
    r = client.post(endpoint, json={**body, **NOOP_VALUES, "suffix": None})
    assert r.status_code == 200, r.text
    nulls = {k: None for k in [*UNSUPPORTED_VALUES, "suffix", "best_of", "logprobs", "temperature", "top_k"]}
    assert client.post(endpoint, json={**body, **nulls}).status_code == 200


def test_what_real_clients_send_is_accepted(client):
    lm_eval = {"model": "base", "prompt": "1 + 1 =", "temperature": 0, "max_tokens": 1, "logprobs": 1,
               "seed": 1234, "echo": True, "stop": ["\n"]}
    assert client.post("/v1/completions", json=lm_eval).status_code == 200
    tokens = {**COMPLETION, "prompt": [[5, 6, 7], [8, 9]]}
    assert client.post("/v1/completions", json=tokens).status_code == 200
    langchain = {**CHAT, "n": 1, "stream": False, "logprobs": False, "temperature": 0.7, "top_k": 5,
                 "max_completion_tokens": 2, "stream_options": None}
    assert client.post("/v1/chat/completions", json=langchain).status_code == 200


def test_completion_prompt_and_chat_message_checks(client):
    assert_error(client.post("/v1/completions", json={**COMPLETION, "prompt": []}), 400, "prompt")
    assert_error(client.post("/v1/completions", json={**COMPLETION, "prompt": [[1], []]}), 400, "prompt")
    assert_error(client.post("/v1/completions", json={**COMPLETION, "logprobs": 21}), 400, "logprobs")
    assert_error(client.post("/v1/chat/completions", json={**CHAT, "top_logprobs": 2}), 400, "top_logprobs")
    cases = [
        ({"role": "tool", "content": "42", "tool_call_id": "a"}, "messages[0].role"),
        ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "messages[0].content[0].type"),
        ({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}, "messages[0].content[0].type"),
        ({"role": "user", "content": [{"type": "text", "text": 5}]}, "messages[0].content[0].text"),
        ({"role": "user"}, "messages[0].content"),
        ({"role": "wizard", "content": "x"}, "messages[0].role"),
    ]
    for message, param in cases:
        assert_error(client.post("/v1/chat/completions", json={**CHAT, "messages": [message]}), 400, param)
    fine = [{"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None, "tool_calls": []},
            {"role": "user", "content": "again"}]
    assert client.post("/v1/chat/completions", json={**CHAT, "messages": fine}).status_code == 200


def test_chat_messages_normalised():
    from modulora.serve.protocol import ChatBody, chat_messages

    body = ChatBody(model="base", messages=[{"role": "developer", "content": "s"},
                                            {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                         {"type": "text", "text": "b"}]},
                                            {"role": "assistant", "content": None}])
    assert chat_messages(body) == [{"role": "system", "content": "s"}, {"role": "user", "content": "a\nb"},
                                   {"role": "assistant", "content": ""}]


def test_sampling_params_of_bodies():
    from modulora.serve.protocol import ChatBody, CompletionBody, chat_params, completion_params

    p = completion_params(CompletionBody(model="x", prompt="a", logprobs=2, echo=True, stop="\n", seed=3, top_k=-1))
    assert (p.max_tokens, p.temperature, p.logprobs, p.prompt_logprobs, p.stop, p.seed, p.top_k) == \
        (16, 0.0, 2, True, ("\n",), 3, 0)
    c = chat_params(ChatBody(model="x", messages=[{"role": "user", "content": "a"}], max_tokens=9,
                             max_completion_tokens=5, logprobs=True, top_logprobs=3, temperature=0.5, top_k=4,
                             n=2, ignore_eos=True, stop_token_ids=[7]))
    assert (c.max_tokens, c.logprobs, c.temperature, c.top_k, c.n, c.ignore_eos, c.stop_token_ids) == \
        (5, 3, 0.5, 4, 2, True, (7,))
    assert chat_params(ChatBody(model="x", messages=[{"role": "user", "content": "a"}])).max_tokens == 128
    assert chat_params(ChatBody(model="x", messages=[{"role": "user", "content": "a"}], logprobs=True)).logprobs == 0


def test_legacy_top_k_on_a_policy_becomes_route_top_k_with_a_warning(client):
    from modulora.serve.protocol import CompletionBody

    old = CompletionBody(model="arrow", prompt="a", top_k=2)
    assert (old.route_top_k, old.top_k, len(old.warnings)) == (2, None, 1)
    sampled = CompletionBody(model="arrow", prompt="a", top_k=2, temperature=0.7)
    assert (sampled.route_top_k, sampled.top_k, sampled.warnings) == (1, 2, [])
    new = CompletionBody(model="arrow", prompt="a", top_k=2, route_top_k=1)
    assert (new.route_top_k, new.top_k, new.warnings) == (1, 2, [])
    assert CompletionBody(model="one", prompt="a", top_k=2).warnings == []
    r = client.post("/v1/completions", json={**COMPLETION, "model": "arrow", "top_k": 1, "timeout": 30})
    assert "route_top_k" in r.headers.get("warning", ""), r.headers
    r = client.post("/v1/completions", json={**COMPLETION, "model": "arrow", "route_top_k": 1, "timeout": 30})
    assert "warning" not in r.headers


# -- models ---------------------------------------------------------------------------------------

def test_models_say_their_base_and_one_can_be_fetched(client, tiny):
    data = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert {"one", "base", "arrow"} <= set(data)
    assert all(m["root"] == tiny.name and m["max_model_len"] == 1024 for m in data.values())
    assert data["base"]["parent"] is None and data["one"]["parent"] == tiny.name
    r = client.get("/v1/models/one")
    assert r.status_code == 200 and r.json() == {**data["one"], "created": r.json()["created"]}
    assert client.get("/v1/models/base").json()["parent"] is None
    assert_error(client.get("/v1/models/nope"), 404, "model", "model_not_found")


# -- tokenizer ------------------------------------------------------------------------------------

def test_tokenize_detokenize_round_trip(client, tiny):
    tok = tiny.tokenizer
    text = "Rewrite the text in capital letters.\n\napple river"
    r = client.post("/tokenize", json={"model": "one", "prompt": text})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["tokens"] == tok.encode(text) and out["count"] == len(out["tokens"]) and out["max_model_len"] == 1024
    plain = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert plain == tok.encode(text, add_special_tokens=False)
    back = client.post("/detokenize", json={"model": "base", "tokens": out["tokens"]}).json()
    assert back == {"prompt": tok.decode(out["tokens"])}
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    chat = client.post("/tokenize", json={"messages": messages}).json()
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tok.encode(rendered, add_special_tokens=False)
    assert client.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"] == rendered
    strs = client.post("/tokenize", json={"prompt": "hi", "return_token_strs": True}).json()
    assert strs["token_strs"] == tok.convert_ids_to_tokens(strs["tokens"])


def test_tokenize_errors(client):
    assert_error(client.post("/tokenize", json={"model": "nope", "prompt": "a"}), 404, "model")
    assert_error(client.post("/tokenize", json={"prompt": "a", "messages": [{"role": "user", "content": "a"}]}), 400)
    assert_error(client.post("/tokenize", json={"prompt": "a", "bogus": 1}), 400, "bogus")
    assert_error(client.post("/tokenize", json={"messages": [{"role": "tool", "content": "a"}]}), 400,
                 "messages[0].role")
    assert_error(client.post("/detokenize", json={"tokens": [10 ** 9]}), 400, "tokens")


# -- vLLM's adapter loading -----------------------------------------------------------------------

def names(client) -> set[str]:
    return {m["id"] for m in client.get("/v1/models").json()["data"]}


def test_load_and_unload_within_the_allowed_dir(client, allowed):
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "good", "lora_path": str(allowed[0] / "good")})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "good" and "good" in names(client)
    assert client.get("/v1/models/good").status_code == 200
    again = client.post("/v1/load_lora_adapter", json={"lora_name": "good", "lora_path": str(allowed[0] / "good")})
    assert_error(again, 400, "lora_name", "adapter_exists")
    assert client.post("/v1/completions", json={**COMPLETION, "model": "good"}).status_code == 200
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "good"})
    assert r.status_code == 200 and r.json()["deleted"] is True and "good" not in names(client)
    assert_error(client.post("/v1/unload_lora_adapter", json={"lora_name": "good"}), 404, "lora_name")


def test_load_outside_the_allowed_dir_is_refused(client, allowed):
    inside, outside = allowed
    before = names(client)
    for path in (outside / "elsewhere", inside / "link", inside / ".." / "outside" / "elsewhere", "/"):
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "sneaky", "lora_path": str(path)})
        assert_error(r, 403, "lora_path", "path_not_allowed")
    assert_error(client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(inside / "none")}),
                 400, "lora_path")
    assert names(client) == before


def test_a_bad_adapter_is_refused_and_the_library_unchanged(client, allowed, lib):
    before = [(r.name, r.version) for r in lib.list()]
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(allowed[0] / "bad")})
    assert_error(r, 422, "lora_path", "invalid_adapter")
    for name in ("arrow", "../x", ""):
        r = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(allowed[0] / "good")})
        assert_error(r, 400, "lora_name")
    assert_error(client.post("/v1/load_lora_adapter", json={"lora_name": "x"}), 400, "lora_path")
    assert [(r.name, r.version) for r in lib.list()] == before


def test_loading_is_off_without_allowed_dirs_and_needs_the_key(tiny, lib, allowed):
    from modulora.serve import create_app

    body = {"lora_name": "good", "lora_path": str(allowed[0] / "good")}
    with TestClient(create_app(tiny, lib, batch_wait_ms=1)) as c:
        assert_error(c.post("/v1/load_lora_adapter", json=body), 403, "lora_path", "adapter_loading_disabled")
    keyed = create_app(tiny, lib, batch_wait_ms=1, api_key="k", allowed_adapter_dirs=[allowed[0]])
    with TestClient(keyed) as c:
        assert_error(c.post("/v1/load_lora_adapter", json=body), 401)
        assert_error(c.post("/v1/unload_lora_adapter", json={"lora_name": "one"}), 401)
    with pytest.raises(ValueError):
        create_app(tiny, lib, allowed_adapter_dirs=[os.path.join(str(allowed[0]), "missing")])


def test_cli_flag_is_repeatable():
    import argparse

    from modulora.serve import add_serve_command

    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    args = parser.parse_args(["serve", "--allowed-adapter-dir", "/a", "--allowed-adapter-dir", "/b"])
    assert args.allowed_adapter_dirs == ["/a", "/b"]
    assert parser.parse_args(["serve"]).allowed_adapter_dirs == []
