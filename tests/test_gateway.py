"""`modulora gateway` in front of a real `modulora serve` (which speaks vLLM's load/unload endpoints)."""

import json
import time

import httpx
import openai
import pytest
import torch

from servers import running

from modulora.gateway.derive import KIND, fill_missing, from_bytes, route_key, to_bytes, upstream_name
from modulora.routing.merge import LoraFactors, merge_concat

PROMPT = "The capital of Peru is"


# -- without servers -------------------------------------------------------------------------------

def test_concatenation_is_the_output_mixture_even_when_modules_differ():
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    a = LoraFactors("a", 2, 0.5, A={"q": rand(2, 6), "v": rand(2, 6)}, B={"q": rand(5, 2), "v": rand(4, 2)})
    b = LoraFactors("b", 3, 2.0, A={"q": rand(3, 6)}, B={"q": rand(5, 3)})  # no "v"
    want = {"q": 0.7 * 0.5 * a.B["q"] @ a.A["q"] + 0.3 * 2.0 * b.B["q"] @ b.A["q"],
            "v": 0.7 * 0.5 * a.B["v"] @ a.A["v"]}
    merged = merge_concat(fill_missing([a, b]), [0.7, 0.3])
    assert merged.r == 5
    back = from_bytes(to_bytes(merged))  # the derived-data round trip
    for m, delta in want.items():
        assert torch.allclose(back.delta(m), delta, atol=1e-5)


def test_upstream_names_are_stable_and_version_sensitive():
    ids = {"a": "oid-a", "b": "oid-b"}
    assert upstream_name({"a": 0.7, "b": 0.3}, ids) == upstream_name({"b": 0.3, "a": 0.7}, ids)
    assert upstream_name({"a": 0.7, "b": 0.3}, ids) != upstream_name({"a": 0.3, "b": 0.7}, ids)
    assert upstream_name({"a": 1.0}, ids) != upstream_name({"a": 1.0}, {"a": "oid-a2"})
    assert upstream_name({"a": 1.0}, ids).startswith("mlr-") and len(upstream_name({"a": 1.0}, ids)) == 20


# -- a real modulora serve upstream and the gateway ------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory, random_library, tiny):
    """The gateway's library (a, b, c) and the upstream's own library holding the same adapters,
    so a route can be answered both straight by the upstream and through the gateway."""
    from modulora.library import Library

    tmp = tmp_path_factory.mktemp("gateway")
    lib = random_library(tmp, ["a", "b", "c"])
    up = Library(tmp / "up")
    for name in ("a", "b", "c"):
        up.add(name, tmp / name, tiny.fingerprint)
    shared = tmp / "shared"
    shared.mkdir()
    return {"tmp": tmp, "lib": lib, "up": up, "shared": shared}


@pytest.fixture(scope="module")
def upstream(setup, tiny):
    from modulora.serve import create_app

    app = create_app(tiny, setup["up"], max_batch=4, batch_wait_ms=1, allowed_adapter_dirs=[setup["shared"]])
    with running(app) as url:
        yield url


@pytest.fixture(scope="module")
def gateway(setup, upstream):
    from modulora.gateway import create_gateway

    app = create_gateway(setup["lib"], upstream, setup["shared"], max_loras=2)
    with running(app) as url:
        yield url, app


def complete(url: str, model: str, **extra) -> dict:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 1, **extra}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def upstream_adapters(upstream: str) -> set[str]:
    return {m["id"] for m in httpx.get(f"{upstream}/v1/models").json()["data"] if m["id"].startswith("mlr-")}


@pytest.mark.slow
def test_fixed_adapter_matches_the_upstream_answering_it_itself(gateway, upstream):
    direct = complete(upstream, "a")
    via = complete(gateway[0], "a")
    assert via["choices"][0]["text"] == direct["choices"][0]["text"]
    assert via["model"] == "a" and via["upstream_model"].startswith("mlr-")
    assert via["routing"] == [{"index": 0, "experts": {"a": 1.0}, "versions": {"a": 1}}]
    assert via["upstream_model"] in upstream_adapters(upstream)


@pytest.mark.slow
def test_mixture_is_one_exact_concatenated_lora(gateway, upstream, setup):
    route = "a:0.7,b:0.3"
    direct = complete(upstream, route)  # modulora's own engine mixes the outputs of a and b
    assert direct["routing"][0]["experts"] == pytest.approx({"a": 0.7, "b": 0.3})
    via = complete(gateway[0], route)
    assert via["choices"][0]["text"] == direct["choices"][0]["text"]
    got, want = via["choices"][0]["logprobs"]["token_logprobs"], direct["choices"][0]["logprobs"]["token_logprobs"]
    assert got == pytest.approx(want, abs=1e-4)
    assert via["routing"][0]["experts"] == pytest.approx({"a": 0.7, "b": 0.3})
    alone = complete(upstream, "a")["choices"][0]["logprobs"]["token_logprobs"]
    assert max(abs(x - y) for x, y in zip(alone, want)) > 1e-3  # the mixture is not just a
    # the upstream holds one LoRA of rank 4 + 4 for it, and the library caches its factors
    cfg = json.loads((setup["shared"] / via["upstream_model"] / "adapter_config.json").read_text())
    assert cfg["r"] == 8
    lib = setup["lib"]
    ids = lib.latest_object_ids()
    key = route_key({"a": 0.7, "b": 0.3}, ids)
    import hashlib

    kind = KIND + hashlib.sha256(json.dumps(key).encode()).hexdigest()
    assert lib.get_derived(key[0][0], kind) is not None


@pytest.mark.slow
def test_a_second_gateway_reuses_the_cached_concatenation(gateway, upstream, setup, monkeypatch):
    from modulora.gateway import create_gateway, derive

    route = "a:0.7,b:0.3"
    first = complete(gateway[0], route)

    def refuse(*a, **k):
        raise AssertionError("the concatenated LoRA was built again")

    monkeypatch.setattr(derive, "merge_concat", refuse)
    other_dir = setup["tmp"] / "shared" / "second"  # a fresh folder: only the library's cache can help
    app = create_gateway(setup["lib"], upstream, other_dir, max_loras=2)
    with running(app) as url:
        r = httpx.post(f"{url}/v1/completions", json={"model": route, "prompt": PROMPT, "max_tokens": 6,
                                                     "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == first["choices"][0]["text"]
    assert (other_dir / first["upstream_model"] / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_streaming_passes_through_with_the_trace(gateway):
    client = openai.OpenAI(base_url=f"{gateway[0]}/v1", api_key="x", max_retries=0, timeout=60)
    chat = [{"role": "user", "content": "Peru"}]
    whole = client.chat.completions.create(model="b", messages=chat, max_tokens=6, temperature=0)
    chunks = list(client.chat.completions.create(model="b", messages=chat, max_tokens=6, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len(chunks) > 2  # passed on as they came, not as one answer
    last = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    assert last.model_extra["routing"] == [{"index": 0, "experts": {"b": 1.0}, "versions": {"b": 1}}]
    assert all("routing" not in c.model_extra for c in chunks if c is not last)
    assert whole.model_extra["routing"][0]["experts"] == {"b": 1.0}
    # a stream the client closes early gives its adapter slot back
    body = {"model": "b", "messages": chat, "max_tokens": 50, "stream": True}
    with httpx.stream("POST", f"{gateway[0]}/v1/chat/completions", json=body, timeout=60) as r:
        next(r.iter_lines())
    in_use = gateway[1].state.gateway.adapters.in_use
    end = time.monotonic() + 10
    while in_use and time.monotonic() < end:
        time.sleep(0.05)
    assert not in_use


@pytest.mark.slow
def test_least_recently_used_adapter_is_unloaded_past_max_loras(gateway, upstream):
    url, app = gateway
    b = complete(url, "b")["upstream_model"]
    c = complete(url, "c")["upstream_model"]
    assert upstream_adapters(upstream) == {b, c}  # --max-loras 2
    complete(url, "b")  # b is now the more recently used
    mix = complete(url, "a:0.5,c:0.5")["upstream_model"]
    assert upstream_adapters(upstream) == {b, mix}  # c was unloaded
    assert list(app.state.gateway.adapters.loaded) == [b, mix]
    assert not app.state.gateway.adapters.in_use and app.state.gateway.adapters.unloads >= 2


@pytest.mark.slow
def test_refusals_are_clear(gateway, upstream, setup):
    url = gateway[0]
    r = httpx.post(f"{url}/v1/completions", json={"model": "arrow", "prompt": PROMPT})
    assert r.status_code == 400 and "use `modulora serve`" in r.json()["error"]["message"]
    assert "per-token Arrow" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", json={"model": "retrieval", "fallback": "arrow", "prompt": PROMPT,
                                                  "arrow": {"prototypes": "spectral"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "arrow" and "modulora serve" in r.text
    r = httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": PROMPT})
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", json={"model": "a:0.5,b:0.5", "mode": "average", "prompt": PROMPT})
    assert r.status_code == 400 and "modulora serve" in r.json()["error"]["message"]
    # the upstream refuses the load (a folder it may not read): 502 with the upstream's reason
    from modulora.gateway import create_gateway

    app = create_gateway(setup["lib"], upstream, setup["tmp"] / "elsewhere", max_loras=8)
    with running(app) as other:
        r = httpx.post(f"{other}/v1/completions", json={"model": "c", "prompt": PROMPT, "max_tokens": 2}, timeout=60)
    assert r.status_code == 502, r.text
    msg = r.json()["error"]["message"]
    assert "refused to load" in msg and "HTTP 403" in msg and "--allowed-adapter-dir" in msg


@pytest.mark.slow
def test_base_and_uniform_routes(gateway, upstream):
    direct = complete(upstream, "base")
    via = complete(gateway[0], "base")
    assert via["choices"][0]["text"] == direct["choices"][0]["text"] and via["routing"][0]["experts"] == {}
    uni = complete(gateway[0], "uniform")
    assert uni["routing"][0]["experts"] == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    # (the upstream's own `uniform` would include the adapters the gateway loaded on it)
    assert uni["choices"][0]["text"] == complete(upstream, "a,b,c")["choices"][0]["text"]
    ids = {m["id"] for m in httpx.get(f"{gateway[0]}/v1/models").json()["data"]}
    assert {"a", "b", "c", "retrieval", "uniform", "base"} <= ids and "arrow" not in ids


@pytest.mark.slow
def test_retrieval_routes_in_the_gateway_without_a_base(setup, upstream):
    """Retrieval embeds with MiniLM in the gateway; the adapter it picks is served upstream."""
    import shutil

    from modulora.gateway import create_gateway
    from modulora.library import Library

    tmp = setup["tmp"]
    lib = Library(tmp / "lib2")
    for name, src, samples in (("capital", "a", ["The capital of France is", "The capital of Chile is"]),
                               ("sums", "b", ["12 + 30 =", "41 + 55 ="])):
        shutil.copytree(tmp / src, tmp / name)
        card = json.loads((tmp / name / "card.json").read_text())
        (tmp / name / "card.json").write_text(json.dumps({**card, "name": name, "samples": samples}))
        lib.add(name, tmp / name, card["base_fingerprint"])
    with running(create_gateway(lib, upstream, setup["shared"], max_loras=8)) as url:
        via = complete(url, "retrieval")
    assert via["routing"][0]["experts"] == {"capital": 1.0}
    assert via["choices"][0]["text"] == complete(upstream, "a")["choices"][0]["text"]  # capital is a's weights
