"""The OpenAI-compatible server, against a real uvicorn on 127.0.0.1 with the official openai client."""

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from servers import running

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
    from modulora.library import Library
    from modulora.serve import create_app

    app = create_app(tiny, Library(lib), max_batch=16, batch_wait_ms=50, queue_size=64,
                     max_upload_bytes=1 << 20)
    with running(app) as url:
        yield url, app


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


def test_chat_renders_the_whole_conversation_and_completions_are_raw(client, tiny):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi"}, {"role": "user", "content": UPPER}]
    resp = client.chat.completions.create(model="upper", messages=msgs, max_tokens=4)
    assert resp.object == "chat.completion" and resp.choices[0].message.role == "assistant"
    # the same conversation rendered by the tokenizer's template, sent as a raw completion
    text = tiny.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    raw = client.completions.create(model="upper", prompt=text, max_tokens=4)
    assert resp.choices[0].message.content == raw.choices[0].text
    assert resp.usage.prompt_tokens == raw.usage.prompt_tokens == len(tiny.tokenizer(text)["input_ids"])
    assert experts_of(resp) == {"upper": 1.0}
    # earlier turns count: the last user message alone is a different prompt
    alone = client.chat.completions.create(model="upper", messages=msgs[-1:], max_tokens=4)
    assert alone.usage.prompt_tokens < resp.usage.prompt_tokens
    # token ids are a raw prompt too
    ids = tiny.tokenizer(text)["input_ids"]
    by_ids = client.completions.create(model="upper", prompt=ids, max_tokens=4)
    assert by_ids.choices[0].text == raw.choices[0].text


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
    (json.dumps({"model": "upper", "prompt": "x", "n": 17}).encode(), 400),
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


def test_a_batch_wider_than_the_queue_is_400_and_api_key_is_checked(tiny, lib):
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
        # more prompts than the queue can ever hold: 400 naming both (a full queue now is 429: test_serve_bounds)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
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


# --- adapter uploads, deletes and metrics -------------------------------------------------------

UPLOAD_LIMIT = 1 << 20  # the `server` fixture's max_upload_bytes


@pytest.fixture(scope="module")
def upper_files(lib, tmp_path_factory):
    """The files of the 'upper' adapter, exported from the test library: {filename: bytes}."""
    from modulora.library import Library

    out = Library(lib).export("upper", tmp_path_factory.mktemp("export") / "upper")
    return {p.name: p.read_bytes() for p in out.iterdir()}


def _names(lib) -> set:
    from modulora.library import Library

    return {r.name for r in Library(lib).list()}


def _tar_gz(members: dict, folder: str = "") -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{folder}{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _upload(url, name, files, **kw):
    return httpx.post(f"{url}/v1/adapters", data={"name": name},
                      files=[(f, (f, data)) for f, data in files.items()], timeout=60, **kw)


def test_upload_multipart_then_route_to_it_at_once(server, client, lib, upper_files):
    url = server[0]
    r = _upload(url, "upper2", upper_files)
    assert r.status_code == 201, r.text
    rec = r.json()
    assert rec["name"] == "upper2" and rec["version"] == 1 and rec["type"] == "lora" and rec["object_id"]
    try:
        assert "upper2" in {m.id for m in client.models.list()}
        new = client.completions.create(model="upper2", prompt=UPPER, max_tokens=6)
        old = client.completions.create(model="upper", prompt=UPPER, max_tokens=6)
        assert experts_of(new) == {"upper2": 1.0} and new.choices[0].text == old.choices[0].text  # same weights
        ret = client.completions.create(model="retrieval", prompt=UPPER, max_tokens=2, extra_body={"top_k": 4})
        assert "upper2" in experts_of(ret)  # the policies see it too
        shown = httpx.get(f"{url}/v1/adapters/upper2").json()
        assert shown["name"] == "upper2" and shown["object_id"] == rec["object_id"] and "path" not in shown
        assert set(shown["files"]) == set(upper_files)
    finally:
        d = httpx.delete(f"{url}/v1/adapters/upper2")
    assert d.status_code == 200 and d.json()["deleted"] is True and d.json()["versions_removed"] == 1
    assert "upper2" not in _names(lib)
    assert httpx.get(f"{url}/v1/adapters/upper2").status_code == 404
    assert httpx.delete(f"{url}/v1/adapters/upper2").status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="upper2", prompt="x", max_tokens=2)


@pytest.mark.parametrize("kind", ["tar.gz", "tgz-in-folder", "zip"])
def test_upload_archive(server, lib, upper_files, kind):
    import io
    import zipfile

    if kind == "zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for n, data in upper_files.items():
                zf.writestr(f"adapter/{n}", data)
        fname, data = "a.zip", buf.getvalue()
    elif kind == "tar.gz":
        fname, data = "a.tar.gz", _tar_gz(upper_files)
    else:
        fname, data = "a.tgz", _tar_gz(upper_files, folder="upper/")
    r = _upload(server[0], "packed", {fname: data})
    assert r.status_code == 201, r.text
    try:
        assert r.json()["object_id"] == httpx.get(f"{server[0]}/v1/adapters/upper").json()["object_id"]
    finally:
        assert httpx.delete(f"{server[0]}/v1/adapters/packed").status_code == 200


def _tar_gz_with(extra) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        extra(tf)
    return buf.getvalue()


def _add(name, data=b"x", **attrs):
    import io
    import tarfile

    def f(tf):
        info = tarfile.TarInfo(name)
        info.size = len(data) if attrs.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else 0
        for k, v in attrs.items():
            setattr(info, k, v)
        tf.addfile(info, io.BytesIO(data) if info.size else None)
    return f


@pytest.mark.parametrize("member", [
    dict(name="../adapter_config.json"),
    dict(name="/tmp/adapter_config.json"),
    dict(name="a/b/adapter_config.json"),
    dict(name="adapter_config.json", type=b"2", linkname="/etc/passwd"),    # symlink
    dict(name="card.json", type=b"1", linkname="adapter_config.json"),       # hardlink
    dict(name="card.json", type=b"3"),                                       # character device
])
def test_unsafe_archive_is_refused_and_nothing_added(server, lib, upper_files, member):
    before = _names(lib)
    name = member.pop("name")

    def build(tf):
        for n, data in upper_files.items():
            _add(n, data)(tf)
        _add(name, **member)(tf)

    r = _upload(server[0], "evil", {"evil.tar.gz": _tar_gz_with(build)})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "unsafe_archive" and _names(lib) == before


def test_archive_with_too_many_members_or_a_bomb_is_refused(server, lib, upper_files):
    before = _names(lib)
    many = _tar_gz_with(lambda tf: [_add(f"f{i}.txt")(tf) for i in range(20)])
    r = _upload(server[0], "evil", {"many.tar.gz": many})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsafe_archive"
    import io
    import stat
    import zipfile

    for path in ("../adapter_config.json", "adapter_config.json"):  # a `..` member; a symlink
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for n, data in upper_files.items():
                if n != "adapter_config.json":
                    zf.writestr(n, data)
            info = zipfile.ZipInfo(path)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16 if ".." not in path else 0
            zf.writestr(info, "/etc/passwd" if ".." not in path else upper_files["adapter_config.json"])
        r = _upload(server[0], "evil", {"evil.zip": buf.getvalue()})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsafe_archive", r.text
    bomb = _tar_gz({**upper_files, "adapter_model.safetensors": bytes(4 * UPLOAD_LIMIT)})
    assert len(bomb) < UPLOAD_LIMIT
    r = _upload(server[0], "evil", {"bomb.tar.gz": bomb})
    assert r.status_code == 413, r.text
    assert _names(lib) == before


def test_oversized_upload_is_413(server, lib, upper_files):
    before = _names(lib)
    big = {**upper_files, "card.json": b" " * (UPLOAD_LIMIT + 10)}
    r = _upload(server[0], "big", big)  # declared by Content-Length
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    def chunks():  # chunked: no Content-Length, counted as read
        yield b"--b\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nbig\r\n"
        for _ in range(UPLOAD_LIMIT // 65536 + 2):
            yield b"x" * 65536
    r = httpx.post(f"{server[0]}/v1/adapters", content=chunks(), timeout=60,
                   headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    assert _names(lib) == before


def test_invalid_adapter_is_422_and_library_unchanged(server, lib, upper_files):
    import struct

    before = {n: httpx.get(f"{server[0]}/v1/adapters/{n}").json()["versions"] for n in _names(lib)}
    # NaN weights: flip the first float of the first tensor of the safetensors file to NaN
    st = bytearray(upper_files["adapter_model.safetensors"])
    header_len = struct.unpack("<Q", st[:8])[0]
    hdr = json.loads(st[8:8 + header_len])
    first = next(v for k, v in hdr.items() if k != "__metadata__")
    assert first["dtype"] == "F32"
    at = 8 + header_len + first["data_offsets"][0]
    st[at:at + 4] = struct.pack("<f", float("nan"))
    cases = [
        ("upper", {**upper_files, "adapter_model.safetensors": bytes(st)}),              # NaN, onto a known name
        ("fresh", {"adapter_config.json": upper_files["adapter_config.json"], "adapter_model.bin": b"\x80\x04junk"}),
        ("fresh", {"adapter_config.json": b"{not json", "adapter_model.safetensors": bytes(st)}),
        ("fresh", {"adapter_config.json": upper_files["adapter_config.json"]}),           # no weights
        ("fresh", {"a.tar.gz": _tar_gz({"adapter_model.pt": b"\x80\x04junk", **upper_files})}),
    ]
    for name, files in cases:
        r = _upload(server[0], name, files)
        assert r.status_code == 422, (name, list(files), r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == "invalid_adapter"
    assert "pickle" in _upload(server[0], "fresh", cases[1][1]).json()["error"]["message"]
    after = {n: httpx.get(f"{server[0]}/v1/adapters/{n}").json()["versions"] for n in _names(lib)}
    assert after == before


@pytest.mark.parametrize("name", ["../x", ".hidden", "a/b", "retrieval", "base", ""])
def test_bad_adapter_name_is_400(server, lib, upper_files, name):
    before = _names(lib)
    r = _upload(server[0], name, upper_files)
    assert r.status_code == 400 and r.json()["error"]["param"] == "name", r.text
    assert _names(lib) == before


def test_writes_need_the_key_reads_do_not(tiny, lib, upper_files):
    from fastapi.testclient import TestClient

    from modulora.library import Library
    from modulora.serve import create_app

    app = create_app(tiny, Library(lib), api_key="secret")
    files = [(f, (f, d)) for f, d in upper_files.items()]
    key = {"Authorization": "Bearer secret"}
    with TestClient(app) as tc:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            assert tc.post("/v1/adapters", data={"name": "keyed"}, files=files, headers=headers).status_code == 401
            assert tc.delete("/v1/adapters/upper", headers=headers).status_code == 401
        assert "keyed" not in _names(lib) and "upper" in _names(lib)
        assert tc.get("/v1/adapters/upper").status_code == 200  # reads are open
        assert tc.get("/v1/models").status_code == 200
        assert tc.get("/metrics").status_code == 200
        r = tc.post("/v1/adapters", data={"name": "keyed"}, files=files, headers=key)
        assert r.status_code == 201, r.text
        assert tc.delete("/v1/adapters/keyed", headers=key).status_code == 200
        assert "keyed" not in _names(lib)


def test_metrics_in_prometheus_text(server, client):
    client.completions.create(model="add", prompt="1 + 2", max_tokens=3)
    httpx.get(f"{server[0]}/v1/adapters/nosuch")
    r = httpx.get(f"{server[0]}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, v = line.rpartition(" ")
            values[key] = float(v)
    assert values['modulora_requests_total{method="POST",endpoint="/v1/completions",status="200"}'] >= 1
    assert values['modulora_requests_total{method="GET",endpoint="/v1/adapters/{name}",status="404"}'] >= 1
    assert values["modulora_generated_tokens_total"] > 0 and values["modulora_batches_total"] >= 1
    assert values["modulora_batch_size_count"] == values["modulora_batches_total"]
    assert values['modulora_batch_size_bucket{le="+Inf"}'] == values["modulora_batches_total"]
    assert "modulora_queue_depth" in values
    assert values['modulora_adapter_uploads_total{result="created"}'] >= 1
    assert values['modulora_adapter_uploads_total{result="rejected"}'] >= 1
    assert values["modulora_adapter_deletes_total"] >= 1
    assert values['modulora_request_duration_seconds_count{endpoint="/v1/completions"}'] >= 1
    for line in text.splitlines():  # every sample line is NAME{labels} VALUE
        sample = r'[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? [0-9.e+-]+'
        assert line.startswith("#") or re.fullmatch(sample, line), line


def test_malformed_uploads_are_400(server, lib, upper_files):
    before = _names(lib)
    url = f"{server[0]}/v1/adapters"
    assert httpx.post(url, json={"name": "x"}).status_code == 400                       # not multipart
    assert _upload(server[0], "x", {"a.tar.gz": _tar_gz(upper_files)[:-40]}).status_code == 400  # truncated
    assert _upload(server[0], "x", {"a.zip": b"PK\x03\x04 not a zip"}).status_code == 400
    assert _upload(server[0], "x", {}).status_code == 400                                 # no files
    r = httpx.post(url, content=b"--b\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nx",
                   headers={"content-type": "multipart/form-data; boundary=b"})         # no closing boundary
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert _names(lib) == before


def test_token_routing_colours_every_generated_token(client, tiny):
    """`token_routing: true`: every generated token comes with the experts that made it, streamed
    and not; Arrow's per layer (one dict per transformer layer, each summing to 1), a fixed
    mixture's the route's own weights; the pieces join to the text."""
    layers = tiny.model.config.num_hidden_layers
    extra = {"token_routing": True, "route_top_k": 2, "ignore_eos": True}
    full = client.completions.create(model="arrow", prompt=UPPER, max_tokens=6, extra_body=extra)
    steps = full.choices[0].model_extra["token_routing"]
    assert len(steps) == full.usage.completion_tokens == 6
    for step in steps[1:]:  # the first token has the prompt's mean weights, no per-layer view
        assert len(step["layers"]) == layers
        assert all(abs(sum(layer.values()) - 1) < 1e-5 for layer in step["layers"])
        assert set(step["experts"]) <= set(ADAPTERS) and abs(sum(step["experts"].values()) - 1) < 1e-5
    stream = client.chat.completions.create(model="upper:0.7,add:0.3", max_tokens=5, stream=True,
                                            messages=[{"role": "user", "content": "apple river"}], extra_body=extra)
    pieces, text = [], ""
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            pieces += (c.model_extra or {}).get("token_routing") or []
    assert len(pieces) == 5 and "".join(p["token"] for p in pieces) == text
    assert all(p["experts"] == {"upper": 0.7, "add": 0.3} and p["layers"] is None for p in pieces)
    plain = client.completions.create(model="upper", prompt=UPPER, max_tokens=3)
    assert "token_routing" not in plain.choices[0].model_extra


def test_arrow_settings_are_honoured_or_refused(server, client):
    """`arrow` (extension field) reaches Arrow: routing only in the MLPs leaves the attention
    modules (4 of each layer's 7) at equal weights, so every expert keeps at least 4/7 of 1/3."""
    body = {"route_top_k": 1, "arrow": {"modules": "mlp", "prototypes": "a", "temperature": 0.5}}
    resp = client.completions.create(model="arrow", prompt=UPPER, max_tokens=3, extra_body=body)
    experts = experts_of(resp)
    assert set(experts) == set(ADAPTERS) and min(experts.values()) >= 4 / 7 / 3 - 1e-6, experts
    for model, arrow, needle in (("upper", {"normalize": True}, "apply to model 'arrow'"),
                                 ("arrow", {"modules": "mlp("}, "regular expression"),
                                 ("arrow", {"modules": "attention"}, "matches none"),
                                 ("arrow", {"temp": 1.0}, "temp"),
                                 ("arrow", {"temperature": 0}, "temperature")):
        r = httpx.post(f"{server[0]}/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1,
                                                             "arrow": arrow})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
