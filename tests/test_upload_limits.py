"""Uploads and request bodies bounded in time: archives and multipart bodies handled in linear
time with their counts capped, a body that does not arrive in time is 408 with the connection
closed, and uploads run in a pool of their own so they never hold up completions. The live
tests run a real uvicorn on 127.0.0.1 (body_timeout=1)."""

import gzip
import io
import json
import socket
import struct
import tarfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from servers import running

from modulora.serve import upload
from modulora.serve.errors import APIError

BODY_TIMEOUT = 1.0
UPLOAD_LIMIT = 16 << 20


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory, random_lora) -> dict:
    """The files of a PEFT LoRA of the tiny model: {filename: bytes}."""
    from modulora.base import load_base

    maker = load_base("tiny", dtype="fp32")  # a model of its own: the served one is never touched
    out = random_lora(maker.model, tmp_path_factory.mktemp("upload") / "lora", 0, maker.fingerprint)
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    from modulora.library import Library
    from modulora.serve import create_app

    app = create_app(tiny, Library(tmp_path_factory.mktemp("limits") / "lib"), batch_wait_ms=1,
                     max_upload_bytes=UPLOAD_LIMIT, body_timeout=BODY_TIMEOUT)
    with running(app) as url:
        yield url


def tar_gz(files: dict, folder: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(folder + name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zip_of(files: dict, folder: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(folder + name, data)
    return buf.getvalue()


def post_upload(url: str, name: str, files: dict, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{url}/v1/adapters", data={"name": name},
                      files=[(f, (f, data)) for f, data in files.items()], timeout=timeout)


def multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"b") -> bytes:
    """A multipart body of (headers, content) parts."""
    out = b"".join(b"--" + boundary + b"\r\n" + head + b"\r\n\r\n" + content + b"\r\n" for head, content in parts)
    return out + b"--" + boundary + b"--\r\n"


def raises(status: int, code: str, call, *args) -> APIError:
    with pytest.raises(APIError) as e:
        call(*args)
    assert (e.value.status, e.value.code) == (status, code), e.value.message
    return e.value


def empty_gzip_members(size: int) -> bytes:
    one = gzip.compress(b"", mtime=0)
    return one * (size // len(one))


# -- gzip ----------------------------------------------------------------------------------------------------

def test_gunzip_keeps_its_behaviour():
    data = bytes(range(256)) * 5000
    assert upload.gunzip_bounded(gzip.compress(data), len(data)) == data
    members = gzip.compress(data[:1000]) + bytes(7) + gzip.compress(data[1000:]) + bytes(3000)  # padding
    assert upload.gunzip_bounded(members, len(data)) == data
    assert upload.gunzip_bounded(gzip.compress(bytes(3 << 20)), 3 << 20) == bytes(3 << 20)  # several output steps
    raises(413, "payload_too_large", upload.gunzip_bounded, gzip.compress(bytes(4 << 20)), 1 << 20)
    raises(400, "bad_archive", upload.gunzip_bounded, gzip.compress(data)[:-40], len(data))
    raises(400, "bad_archive", upload.gunzip_bounded, b"not gzip", 100)


def test_many_gzip_members_are_refused_at_once():
    limit = upload.MAX_GZIP_MEMBERS
    assert upload.gunzip_bounded(gzip.compress(b"x") * limit, 1 << 20) == b"x" * limit
    start = time.perf_counter()
    e = raises(400, "unsafe_archive", upload.gunzip_bounded, empty_gzip_members(16 << 20), 1 << 30)
    assert time.perf_counter() - start < 1 and str(limit) in e.message  # was minutes, quadratic


# -- tar and zip ---------------------------------------------------------------------------------------------

def _header(name: str, type: bytes, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size = type, size
    return info.tobuf(tarfile.USTAR_FORMAT)


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def test_tar_extension_headers_are_bounded():
    pax = _header("././@PaxHeader", tarfile.XHDTYPE, 12) + _padded(b"12 path=abc\n")
    end = _header("adapter_config.json", tarfile.REGTYPE, 2) + _padded(b"{}") + bytes(1024)
    chain = gzip.compress(pax * 3000 + end)  # tarfile reads such a chain recursively: RecursionError
    e = raises(400, "unsafe_archive", upload.archive_files, "a.tar.gz", chain, 64 << 20)
    assert str(upload.MAX_TAR_HEADERS) in e.message
    digits = b"1" * (1 << 20)  # the stdlib's pax parser is quadratic in this
    big = gzip.compress(_header("././@PaxHeader", tarfile.XHDTYPE, len(digits)) + _padded(digits) + end)
    start = time.perf_counter()
    raises(400, "unsafe_archive", upload.archive_files, "a.tar.gz", big, 64 << 20)
    assert time.perf_counter() - start < 1


def test_pax_and_gnu_tars_still_read():
    files = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"x" * 1000}
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz", format=fmt) as tf:
            for name, data in files.items():
                info = tarfile.TarInfo("a-rather-long-folder-name-" * 5 + "/" + name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        assert upload.archive_files("a.tar.gz", buf.getvalue(), 1 << 20) == files


def test_a_zip_central_directory_is_checked_before_zipfile_reads_it():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(20_000):
            zf.writestr(f"{i:x}", b"")
    start = time.perf_counter()
    e = raises(400, "unsafe_archive", upload.archive_files, "a.zip", buf.getvalue(), 64 << 20)
    assert time.perf_counter() - start < 0.5 and "20000 members" in e.message
    files = {"adapter_config.json": b"{}"}
    assert upload.archive_files("a.zip", zip_of(files, "ad/"), 1 << 20) == files
    # a zip64 record (zipfile trusts it over the plain one) claiming a huge directory
    import unittest.mock

    with unittest.mock.patch.object(zipfile, "ZIP_FILECOUNT_LIMIT", 0):
        data = zip_of(files)
    assert upload.archive_files("a.zip", data, 1 << 20) == files
    at = data.rfind(b"PK\x06\x06")
    lie = data[:at + 40] + struct.pack("<Q", 1 << 30) + data[at + 48:]
    assert "central directory" in raises(400, "unsafe_archive", upload.archive_files, "a.zip", lie, 1 << 20).message


# -- multipart -----------------------------------------------------------------------------------------------

CT = "multipart/form-data; boundary=b"


def test_multipart_parts_are_counted_and_their_headers_bounded():
    field = b'Content-Disposition: form-data; name="f%d"'
    ok = multipart([(field % i, b"v") for i in range(upload.MAX_PARTS)])
    assert len(upload.parse_multipart(ok, CT)[0]) == upload.MAX_PARTS
    many = b"--b" + b"\r\nContent-Disposition: form-data; name=a\r\n\r\n\r\n--b" * 400_000 + b"--"
    start = time.perf_counter()
    e = raises(400, "bad_upload", upload.parse_multipart, many, CT)
    assert time.perf_counter() - start < 0.5 and str(upload.MAX_PARTS) in e.message
    long_head = multipart([(b"Content-Disposition: form-data; name=x" + b'; a="b"' * 100_000, b"")])
    assert "headers" in raises(400, "bad_upload", upload.parse_multipart, long_head, CT).message
    raises(400, "bad_upload", upload.parse_multipart, ok, CT + "; a=b" * 10_000)


def test_multipart_parses_as_before():
    body = multipart([(b'Content-Disposition: form-data; name="name"', b"x"),
                      (b'Content-Disposition: form-data; name="file"; filename="a.tar.gz"\r\n'
                       + b"Content-Type: application/octet-stream", b"\r\n--\r\n\x00binary--b")])
    expect = ({"name": "x"}, [("a.tar.gz", b"\r\n--\r\n\x00binary--b")])
    assert upload.parse_multipart(body, CT) == expect
    assert upload.parse_multipart(b"preamble\r\n" + body + b"epilogue", CT) == expect
    for bad in (body[:-6], b"no boundary", b"--b\r\nContent-Disposition: form-data; name=x\r\nx\r\n--b--",
                b"--b\r\nX-Other: 1\r\n\r\nx\r\n--b--", b"--bjunk\r\n--b--"):
        raises(400, "bad_upload", upload.parse_multipart, bad, CT)


# -- settings ------------------------------------------------------------------------------------------------

def test_body_timeout_option_reaches_the_app(tiny, tmp_path, monkeypatch):
    import argparse

    import uvicorn

    import modulora.base
    import modulora.serve.request_log
    from modulora.serve import add_serve_command
    from modulora.serve import app as app_module

    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    assert parser.parse_args(["serve"]).body_timeout == 30
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--body-timeout", "-1"])
    seen = []
    monkeypatch.setattr(modulora.base, "load_base", lambda name, **kw: tiny)
    monkeypatch.setattr(modulora.serve.request_log, "configure", lambda fmt: None)
    monkeypatch.setattr(app_module, "keep_freed_memory", lambda: True)
    monkeypatch.setattr(app_module, "create_app", lambda *a, **kw: seen.append(kw["body_timeout"]))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: None)
    for given, expect in (("2.5", 2.5), ("0", None)):
        args = parser.parse_args(["serve", "--library", str(tmp_path / "lib"), "--body-timeout", given])
        args.func(args)
        assert seen.pop() == expect


def test_create_app_refuses_a_body_timeout_of_zero(tiny, tmp_path):
    from modulora.library import Library
    from modulora.serve import create_app

    with pytest.raises(ValueError):
        create_app(tiny, Library(tmp_path / "lib"), body_timeout=0)


# -- a live server -------------------------------------------------------------------------------------------

def stalled_request(url: str, path: str, content_type: str) -> tuple[float, int, dict]:
    """Declare a 1,000,000-byte body, send 10 bytes and stall; (seconds until the server closed
    the connection, status, JSON body). A server that never closes fails the socket's timeout."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=BODY_TIMEOUT + 10) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
                  "Content-Length: 1000000\r\n\r\n".encode() + b"0123456789")
        start, answer = time.monotonic(), b""
        while piece := s.recv(65536):
            answer += piece
        elapsed = time.monotonic() - start
    head, _, body = answer.partition(b"\r\n\r\n")
    return elapsed, int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize("path,content_type", [("/v1/completions", "application/json"),
                                               ("/v1/adapters", CT)])
def test_a_stalled_body_is_408_and_the_connection_closed(server, path, content_type):
    elapsed, status, body = stalled_request(server, path, content_type)
    assert status == 408 and body["error"]["code"] == "body_timeout", body
    assert set(body["error"]) == {"message", "type", "param", "code"} and "--body-timeout" in body["error"]["message"]
    assert BODY_TIMEOUT - 0.1 < elapsed < BODY_TIMEOUT + 3


def test_many_gzip_members_upload_is_400_within_seconds(server):
    start = time.monotonic()
    r = post_upload(server, "x", {"a.tar.gz": empty_gzip_members(4 << 20)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsafe_archive", r.text
    assert str(upload.MAX_GZIP_MEMBERS) in r.json()["error"]["message"]
    assert time.monotonic() - start < 3  # was 14 s on the event loop's pool


def test_too_many_parts_upload_is_400(server):
    parts = [(b'Content-Disposition: form-data; name="name"', b"x")]
    parts += [(b'Content-Disposition: form-data; name="f"; filename="card.json"', b"{}")] * upload.MAX_PARTS
    r = httpx.post(f"{server}/v1/adapters", content=multipart(parts), headers={"content-type": CT})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_upload", r.text
    assert f"more than {upload.MAX_PARTS} parts" in r.json()["error"]["message"]


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_good_uploads_still_work(server, adapter_files, kind):
    data = tar_gz(adapter_files) if kind == "tar.gz" else zip_of(adapter_files, "lora/")
    r = post_upload(server, "good", {f"a.{kind}": data})
    assert r.status_code == 201, r.text
    try:
        assert httpx.get(f"{server}/v1/adapters/good").json()["name"] == "good"
        c = httpx.post(f"{server}/v1/completions", json={"model": "good", "prompt": "hi", "max_tokens": 2}, timeout=30)
        assert c.status_code == 200, c.text
    finally:
        assert httpx.delete(f"{server}/v1/adapters/good").status_code == 200


@pytest.mark.slow
def test_uploads_in_their_own_pool_never_hold_up_completions(server, adapter_files, monkeypatch):
    """Six uploads held inside their unpacking (as slow archives were): only UPLOAD_WORKERS run,
    in the upload pool; completions, /v1/models (library listings on the default pool) and
    /health answer meanwhile. Before, six such uploads filled the default pool and a 2-token
    completion took 87 s."""
    from modulora.serve.app import UPLOAD_WORKERS

    real, release, lock = upload.adapter_files, threading.Event(), threading.Lock()
    inside, most, threads = 0, 0, set()

    def held(files, limit):
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
            threads.add(threading.current_thread().name)
        try:
            release.wait(30)
            return real(files, limit)
        finally:
            with lock:
                inside -= 1

    monkeypatch.setattr(upload, "adapter_files", held)
    names = [f"slow{i}" for i in range(6)]
    data = tar_gz(adapter_files)
    with ThreadPoolExecutor(len(names)) as ex:
        try:
            uploads = [ex.submit(post_upload, server, n, {"a.tar.gz": data}, 60) for n in names]
            end = time.monotonic() + 10
            while inside < UPLOAD_WORKERS and time.monotonic() < end:
                time.sleep(0.02)
            time.sleep(0.3)  # the others reach the pool's queue
            start = time.monotonic()
            c = httpx.post(f"{server}/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2},
                           timeout=10)
            models = httpx.get(f"{server}/v1/models", timeout=10)
            health = httpx.get(f"{server}/health", timeout=10)
            elapsed = time.monotonic() - start
        finally:
            release.set()
        results = [u.result() for u in uploads]
    try:
        assert c.status_code == 200 and c.json()["usage"]["completion_tokens"] >= 1, c.text
        assert models.status_code == 200 and health.json()["status"] == "ok"
        assert elapsed < 10
        assert most == UPLOAD_WORKERS and all(t.startswith("modulora-upload") for t in threads), (most, threads)
        assert [r.status_code for r in results] == [201] * len(names), [r.text for r in results]
    finally:
        for n in names:
            httpx.delete(f"{server}/v1/adapters/{n}")
