"""A full disk (ENOSPC, EDQUOT) or a read-only file system (EROFS): the CLI prints one `error:`
line, the server answers 507 to writes and keeps serving reads and completions, /health says
"degraded", and upload staging folders left by a killed server are removed at start-up.

How the disk fails here: these tests run as root in CI (chmod does not stop root) and cannot
mount a small tmpfs, so the errno is INJECTED at the OS boundary: `os.fsync` (which the library
calls on every object file it writes, as a full disk reports a write it could not place)
raises OSError(ENOSPC / EROFS). For the derived-data cache, SQLite's own error is injected at
`Library.put_derived` (sqlite3.OperationalError "database or disk is full", what SQLite raises).
"""

import errno
import os
import sqlite3
import subprocess
import time

import pytest
from fastapi.testclient import TestClient

from modulora.cli import main
from modulora.library import Library


def _failing_fsync(code):
    def fsync(fd):
        raise OSError(code, os.strerror(code))
    return fsync


@pytest.fixture()
def adapters(tmp_path, tiny, random_lora):
    """Two distinct LoRA adapter folders for the tiny base."""
    return [random_lora(tiny.model, tmp_path / f"lora{i}", i, tiny.fingerprint) for i in range(2)]


def _snapshot(root):
    return sorted(str(p.relative_to(root)) for p in (root / "objects").rglob("*")), \
        [(r.name, r.version, r.object_id) for r in Library(root).list()]


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "no space left on device"),
                                        (errno.EROFS, "read-only file system")])
def test_cli_add_on_a_failing_disk_prints_one_error_line(tmp_path, adapters, capsys, monkeypatch, code, words):
    lib = tmp_path / "lib"
    assert main(["--library", str(lib), "library", "add", "first", str(adapters[0]), "--base", "tiny"]) == 0
    before = _snapshot(lib)
    capsys.readouterr()
    monkeypatch.setattr(os, "fsync", _failing_fsync(code))  # injected: the disk fills / turns read-only
    rc = main(["--library", str(lib), "library", "add", "second", str(adapters[1]), "--base", "tiny"])
    err = capsys.readouterr().err
    monkeypatch.undo()
    assert rc != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], err
    assert "Traceback" not in err
    assert _snapshot(lib) == before                       # the library is unchanged
    assert not any((lib / "tmp").iterdir())                # and no half-written object is left


def _upload(tc, name, folder):
    files = [(p.name, (p.name, p.read_bytes())) for p in sorted(folder.iterdir()) if p.is_file()]
    return tc.post("/v1/adapters", data={"name": name}, files=files)


def test_server_answers_507_to_writes_and_keeps_serving(tmp_path, tiny, adapters, monkeypatch):
    from modulora.serve import create_app

    lib = tmp_path / "lib"
    raw = Library(lib)
    raw.add("first", adapters[0], tiny.fingerprint)
    app = create_app(tiny, raw, batch_wait_ms=1, max_upload_bytes=1 << 22)
    with TestClient(app) as tc:
        assert tc.get("/health").json()["status"] == "ok"
        before = _snapshot(lib)

        # a full disk: the upload is refused with 507, nothing changes, nothing is left staged
        monkeypatch.setattr(os, "fsync", _failing_fsync(errno.ENOSPC))
        r = _upload(tc, "second", adapters[1])
        assert r.status_code == 507, r.text
        e = r.json()["error"]
        assert e["code"] == "insufficient_storage" and "no space left on device" in e["message"]
        monkeypatch.undo()
        assert _snapshot(lib) == before
        assert not any((lib / "staging").iterdir())
        h = tc.get("/health")
        assert h.status_code == 200 and h.json()["status"] == "degraded" and h.json()["storage"] == "full"

        # reads and completions still work; a derived-data cache write that fails is skipped
        tried = []

        def full(*args, **kwargs):  # injected: the error SQLite raises on a full disk
            tried.append(args[1])
            raise sqlite3.OperationalError("database or disk is full")
        monkeypatch.setattr(raw, "put_derived", full)
        assert {m["id"] for m in tc.get("/v1/models").json()["data"]} >= {"first", "arrow"}
        assert tc.get("/v1/adapters/first").status_code == 200
        for model in ("first", "arrow"):  # arrow computes prototypes and tries to cache them
            r = tc.post("/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 2})
            assert r.status_code == 200, r.text
        assert tried and tc.get("/health").json()["storage"] == "full"
        monkeypatch.undo()

        # a read-only file system: 507 naming it, /health says so
        monkeypatch.setattr(os, "fsync", _failing_fsync(errno.EROFS))
        r = _upload(tc, "second", adapters[1])
        monkeypatch.undo()
        assert r.status_code == 507 and "read-only file system" in r.json()["error"]["message"]
        assert tc.get("/health").json()["storage"] == "read-only"

        # space again: the next write succeeds and /health is ok again
        assert _upload(tc, "second", adapters[1]).status_code == 201
        h = tc.get("/health").json()
        assert h["status"] == "ok" and h["storage"] == "ok"
        assert tc.delete("/v1/adapters/second").status_code == 200


def test_staging_leftovers_of_a_killed_server_are_removed_at_start(tmp_path, tiny):
    from modulora.serve import create_app
    from modulora.serve.upload import clean_staging, staging_dir

    lib = Library(tmp_path / "lib")
    staging = tmp_path / "lib" / "staging"
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid no longer running: the killed server's
    leftovers = [staging / f"upload-{dead.pid}-abc", staging / f"upload-{os.getpid()}-old"]
    live = staging / f"upload-{os.getpid()}-inflight"   # this process's own, written after it started
    other = staging / "not-ours"
    for d in (*leftovers, live, other):
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text("{}")
    old = time.time() - 10 * 365 * 86400  # written before this process started: its pid was reused
    os.utime(leftovers[1], (old, old))
    assert staging_dir(lib) == str(staging)
    create_app(tiny, lib)
    assert not any(d.exists() for d in leftovers)
    assert live.exists() and other.exists()
    assert clean_staging(str(tmp_path / "missing")) == 0
