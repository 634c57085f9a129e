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
from modulora.library import Library, LibraryError


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


# ---------------------------------------------------------------------------------------------
# Real read-only and full storage. Permissions: `chmod -R a-w` the library (skipped as root, whom
# chmod does not stop). File systems: a small tmpfs mounted in a private mount namespace
# (`unshare -m`, needs root with CAP_SYS_ADMIN; skipped elsewhere), filled up or remounted ro.


def _reads_work(lib, tmp_path, names):
    assert [r.name for r in lib.list()] == names
    for name in names:
        assert lib.get(name).config["r"] == 4 and lib.show(name)["present"]
    out = lib.export(names[0], tmp_path / f"export-{len(list(tmp_path.iterdir()))}")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in lib.get(names[0]).path.iterdir())


@pytest.mark.parametrize("what", ["folder", "catalog"])
def test_read_only_permissions_serve_reads_and_refuse_writes(tmp_path, random_library, what):
    lib = random_library(tmp_path, ["one", "two"])
    root = lib.root
    targets = [root / "catalog.sqlite"] if what == "catalog" else [root, *root.rglob("*")]
    modes = {p: p.stat().st_mode for p in targets}
    try:
        for p in targets:
            p.chmod(modes[p] & ~0o222)
        try:
            (root / "catalog.sqlite").open("ab").close() if what == "catalog" else (root / "probe").touch()
            pytest.skip("running as root: chmod does not stop writes (the tmpfs test covers read-only)")
        except PermissionError:
            pass
        ro = Library(root)
        assert ro.read_only
        _reads_work(ro, tmp_path, ["one", "two"])
        assert ro.get_derived(ro.get("one").object_id, "nothing") is None
        blocked = root / "catalog.sqlite" if what == "catalog" else root
        for call in (lambda: ro.add("three", tmp_path / "one"), lambda: ro.remove("one"),
                     lambda: ro.put_derived(ro.get("one").object_id, "k", b"v"), ro.gc):
            with pytest.raises(LibraryError, match=f"the library at {root} is read-only "
                                                   f"\\(no write permission on {blocked}\\)"):
                call()
        assert [r.name for r in ro.list()] == ["one", "two"]
        rc = main(["--library", str(root), "library", "list"])
        assert rc == 0
    finally:
        for p in reversed(targets):
            p.chmod(modes[p])
    left = {p.name for p in root.iterdir()} - {"catalog.sqlite-wal", "catalog.sqlite-shm"}  # SQLite's own
    assert left == {"catalog.sqlite", "lock", "objects", "tmp"}


_TMPFS_SCRIPT = r"""
import errno, json, os, subprocess, sys
from pathlib import Path
from modulora.cli import storage_problem
from modulora.library import Library, LibraryError

mnt, src, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
lib = Library(mnt / "lib")
for name in ("one", "two"):
    lib.add(name, src / name)
oid = lib.get("one").object_id
report = {}

def run(state):
    got = {}
    try:
        lib = Library(mnt / "lib")
        got["read_only"] = lib.read_only
        got["list"] = [r.name for r in lib.list()]
        got["get"] = lib.get("two").config["r"]
        got["show"] = sorted(lib.show("one")["files"])
        got["derived"] = lib.get_derived(oid, "nothing")
        got["export"] = sorted(p.name for p in lib.export("one", out / state).iterdir())
    except Exception as e:
        got["read_error"] = repr(e)
        return got
    for op, call in (("add", lambda: lib.add("three", src / "three")), ("remove", lambda: lib.remove("two")),
                     ("put_derived", lambda: lib.put_derived(oid, "k", b"v" * 100000))):
        try:
            call()
            got[op] = "done"
        except Exception as e:
            got[op] = [type(e).__name__, str(e), storage_problem(e)]
    got["after"] = [r.name for r in Library(mnt / "lib").list()]
    return got

with open(mnt / "filler", "wb", buffering=0) as f:  # fill the disk
    try:
        while True:
            f.write(b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
report["full"] = run("full")
os.unlink(mnt / "filler")
subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
report["read-only"] = run("read-only")
print(json.dumps(report))
"""


def test_full_and_read_only_tmpfs(tmp_path, tiny, random_lora):
    """On a really full disk reads work and writes fail with ENOSPC naming the library; on a
    really read-only mount reads work and writes fail with one LibraryError (EROFS behind it)."""
    import json
    import shutil
    import sys

    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "tmpfs", str(tmp_path)],
            capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs in a private mount namespace (needs root with CAP_SYS_ADMIN)")
    src = tmp_path / "src"
    for i, name in enumerate(["one", "two", "three"]):
        random_lora(tiny.model, src / name, i, tiny.fingerprint)
    (tmp_path / "mnt").mkdir()
    (tmp_path / "out").mkdir()
    script = tmp_path / "script.py"
    script.write_text(_TMPFS_SCRIPT)
    r = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, str(script),
                        str(tmp_path / "mnt"), str(src), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    lib = str(tmp_path / "mnt" / "lib")
    files = ["adapter_config.json", "adapter_model.safetensors", "card.json"]
    for state, problem in (("full", "full"), ("read-only", "read-only")):
        got = report[state]
        assert "read_error" not in got, got
        assert got["read_only"] == (state == "read-only")
        assert got["list"] == ["one", "two"] and got["get"] == 4 and got["show"] == files
        assert got["derived"] is None and got["export"] == files
        for op in ("add", "remove", "put_derived"):
            kind, message, classified = got[op]
            assert classified[0] == problem, (state, op, got[op])
            if state == "read-only":
                assert kind == "LibraryError" and f"the library at {lib} is read-only" in message
            else:
                assert kind == "OSError" and "No space left on device" in message
        assert got["after"] == ["one", "two"]
