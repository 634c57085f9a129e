"""The adapter library: validation of untrusted adapter dirs, versions, dedup, crash safety, concurrency."""

from __future__ import annotations

import copy
import json
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modulora import library as library_mod
from modulora.library import Library, LibraryError
from modulora.validate import Limits, ValidationError, validate_adapter_dir, validate_name

ROOT = Path(__file__).resolve().parents[1]
NOISE = {"catalog.sqlite-wal", "catalog.sqlite-shm", "catalog.sqlite-journal"}


@pytest.fixture(scope="module")
def fp():
    from modulora.base import load_base

    return load_base("tiny", dtype="fp32").fingerprint


# ---------------------------------------------------------------------------------------------
# adapter dirs made by hand, following docs/formats.md


def _write(d: Path, config: dict, tensors: dict, card: dict | None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    if card is not None:
        (d / "card.json").write_text(json.dumps(card, indent=2))
    return d


def lora_config(r=4, targets=("q_proj", "v_proj"), **extra) -> dict:
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
           "target_modules": list(targets), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
           "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": "tiny",
           "init_lora_weights": True, "inference_mode": True}
    cfg.update(extra)
    return cfg


def make_lora(d: Path, fp: dict, *, r=4, seed=0, targets=("q_proj", "v_proj"), layers=None,
              dtype=torch.float32, default=False, card=True, config=None, modules=None) -> Path:
    g = torch.Generator().manual_seed(seed)
    modules = modules or fp["modules"]
    tensors = {}
    for i in range(fp["num_layers"] if layers is None else layers):
        for name, (out, inp) in modules.items():
            if name.split(".")[-1] not in targets:
                continue
            pre = f"base_model.model.model.layers.{i}.{name}"
            suf = ".default.weight" if default else ".weight"
            tensors[f"{pre}.lora_A{suf}"] = torch.randn(r, inp, generator=g).to(dtype)
            tensors[f"{pre}.lora_B{suf}"] = torch.randn(out, r, generator=g).to(dtype)
    cardd = {"name": d.name, "type": "lora", "task": "test", "description": "a test adapter",
             "base_fingerprint": fp, "samples": ["hello"]} if card else None
    return _write(d, config or lora_config(r, targets), tensors, cardd)


def make_series(d: Path, fp: dict, placement="houlsby", b=8) -> Path:
    h = fp["hidden_size"]
    sites = ["self_attn.o_proj", "mlp.down_proj"] if placement == "houlsby" else ["mlp.down_proj"]
    tensors = {}
    for i in range(fp["num_layers"]):
        for site in sites:
            p = f"model.layers.{i}.{site}"
            tensors.update({f"{p}.adapter_down.weight": torch.randn(b, h), f"{p}.adapter_down.bias": torch.zeros(b),
                            f"{p}.adapter_up.weight": torch.zeros(h, b), f"{p}.adapter_up.bias": torch.zeros(h)})
    cfg = {"modulora_type": "series", "bottleneck": b, "placement": placement, "scale": 1.0, "dropout": 0.0}
    return _write(d, cfg, tensors, {"type": "series", "base_fingerprint": fp})


def make_parallel(d: Path, fp: dict, b=8) -> Path:
    h = fp["hidden_size"]
    tensors = {}
    for i in range(fp["num_layers"]):
        p = f"model.layers.{i}.mlp"
        tensors.update({f"{p}.adapter_down.weight": torch.randn(b, h), f"{p}.adapter_down.bias": torch.zeros(b),
                        f"{p}.adapter_up.weight": torch.zeros(h, b), f"{p}.adapter_up.bias": torch.zeros(h)})
    cfg = {"modulora_type": "parallel", "bottleneck": b, "scale": 2.0, "dropout": 0.0}
    return _write(d, cfg, tensors, None)


def make_prefix(d: Path, fp: dict, p=5, kv=2, dtype=torch.bfloat16) -> Path:
    hd = fp["modules"]["self_attn.k_proj"][0] // kv
    shape = (fp["num_layers"], kv, p, hd)
    tensors = {"prefix.keys": torch.randn(shape).to(dtype), "prefix.values": torch.randn(shape).to(dtype)}
    cfg = {"modulora_type": "prefix", "num_virtual_tokens": p, "dropout": 0.0}
    return _write(d, cfg, tensors, {"type": "prefix"})


def snapshot(lib: Library) -> tuple:
    """Catalog contents and the set of paths under the library (SQLite's side files aside)."""
    rows = []
    for rec in lib.list():
        rows += [(r.name, r.version, r.object_id, r.created) for r in lib.versions(rec.name)]
    files = sorted(str(p.relative_to(lib.root)) for p in lib.root.rglob("*") if p.name not in NOISE)
    return rows, files


def read_files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


# ---------------------------------------------------------------------------------------------


def test_round_trip_versions_dedup_export(tmp_path, fp):
    lib = Library(tmp_path / "lib")
    src1 = make_lora(tmp_path / "a1", fp, seed=1)
    src2 = make_lora(tmp_path / "a2", fp, seed=2)

    r1 = lib.add("alpha", src1, fp)
    assert (r1.name, r1.version, r1.type, r1.base_id) == ("alpha", 1, "lora", fp["id"])
    assert r1.num_params == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)
    assert read_files(r1.path) == read_files(src1)
    assert lib.get("alpha") == r1

    r2 = lib.add("alpha", src2, fp)
    assert r2.version == 2 and r2.object_id != r1.object_id
    assert lib.get("alpha").version == 2
    old = lib.get("alpha", 1)
    assert old.object_id == r1.object_id and read_files(old.path) == read_files(src1)
    assert [r.version for r in lib.versions("alpha")] == [1, 2]

    # identical content under another name is stored once
    objects_before = set(os.listdir(lib.root / "objects"))
    r3 = lib.add("beta", src1, fp)
    assert r3.object_id == r1.object_id and r3.version == 1
    assert set(os.listdir(lib.root / "objects")) == objects_before
    assert [(r.name, r.version) for r in lib.list()] == [("alpha", 2), ("beta", 1)]

    info = lib.show("alpha", 1)
    json.dumps(info)
    assert info["ref"] == "alpha@1" and info["versions"] == [1, 2] and info["card"]["task"] == "test"
    assert set(info["files"]) == {"adapter_config.json", "adapter_model.safetensors", "card.json"}
    assert info["files"]["adapter_model.safetensors"]["size"] == (src1 / "adapter_model.safetensors").stat().st_size

    # export: the same bytes, in a directory PEFT loads on the base
    out = lib.export("alpha", tmp_path / "export", version=1)
    assert read_files(out) == read_files(src1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(LibraryError, match="not an empty directory"):
        lib.export("alpha", tmp_path / "busy")
    from peft import PeftModel

    from modulora.base import load_base

    model = PeftModel.from_pretrained(load_base("tiny", dtype="fp32").model, str(out))
    a = dict(model.named_parameters())["base_model.model.model.layers.1.self_attn.v_proj.lora_A.default.weight"]
    from safetensors.torch import load_file

    assert torch.equal(a, load_file(str(src1 / "adapter_model.safetensors"))[
        "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"])

    # derived data lives and dies with the object
    lib.put_derived(r2.object_id, "embedding", b"\x01\x02")
    assert lib.get_derived(r2.object_id, "embedding") == b"\x01\x02"
    assert lib.get_derived(r2.object_id, "other") is None
    with pytest.raises(LibraryError, match="no adapter"):
        lib.put_derived("0" * 64, "embedding", b"x")

    with pytest.raises(LibraryError, match=r"no adapter named gamma \(have: alpha, beta\)"):
        lib.get("gamma")
    with pytest.raises(LibraryError, match=r"has no version 7 \(have: 1, 2\)"):
        lib.get("alpha", 7)

    # remove one version: its object is still used by beta, so it stays
    assert lib.remove("alpha", version=1) == 1
    assert r1.path.is_dir()
    assert lib.remove("alpha") == 1
    assert not r2.path.exists() and lib.get_derived(r2.object_id, "embedding") is None
    assert [r.name for r in lib.list()] == ["beta"]
    # numbers are never reused: the next alpha is version 3
    assert lib.add("alpha", src2, fp).version == 3
    assert lib.remove("beta") == 1 and r1.path.is_dir() is False
    with pytest.raises(LibraryError, match="no adapter named beta"):
        lib.remove("beta")
    assert lib.integrity_check() == "ok"


def test_all_types_and_key_variants_validate(tmp_path, fp):
    cases = {
        "series-houlsby": make_series(tmp_path / "s1", fp, "houlsby"),
        "series-pfeiffer": make_series(tmp_path / "s2", fp, "pfeiffer"),
        "parallel": make_parallel(tmp_path / "p", fp),
        "prefix": make_prefix(tmp_path / "x", fp),
        "lora-default-fp16": make_lora(tmp_path / "l", fp, default=True, dtype=torch.float16),
        "lora-bf16-all": make_lora(tmp_path / "l2", fp, dtype=torch.bfloat16, targets=(
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    }
    for name, d in cases.items():
        v = validate_adapter_dir(d, fp)
        assert v.type == name.split("-")[0]
        assert v.num_params > 0 and set(v.sha256) == set(v.files)
        assert validate_adapter_dir(d, None).type == v.type  # without a base: consistency only
    lib = Library(tmp_path / "lib")
    for name, d in cases.items():
        assert lib.add(name, d, fp).version == 1
    assert len(lib.list()) == len(cases)
    for n in ("a", "A.b-c_9", "x" * 100):
        assert validate_name(n) == n


# ---------------------------------------------------------------------------------------------
# bad inputs: each refused with a message naming the problem, the library untouched


def _bad(kind: str, d: Path, fp: dict):
    """Build a bad adapter dir; return (name, dir, fingerprint, expected message parts)."""
    if kind == "truncated":
        make_lora(d, fp)
        f = d / "adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[:-10])
        return d, ["corrupt safetensors file", "adapter_model.safetensors"]
    if kind == "garbage":
        make_lora(d, fp)
        (d / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
        return d, ["corrupt safetensors file"]
    if kind == "other-base-shapes":  # a LoRA made on a base with hidden size 128
        other = {k: [o * 2 if o == 64 else o, i * 2 if i == 64 else i] for k, (o, i) in fp["modules"].items()}
        make_lora(d, fp, modules=other, card=False)
        return d, ["lora_A", "has shape [4, 128], expected [4, 64]"]
    if kind == "other-base-card":
        make_lora(d, fp)
        card = json.loads((d / "card.json").read_text())
        card["base_fingerprint"] = dict(copy.deepcopy(fp), weights="0123456789abcdef", id="fedcba9876543210")
        (d / "card.json").write_text(json.dumps(card))
        return d, ["adapter was made for another base model", "weights"]
    if kind == "rank-mismatch":
        make_lora(d, fp, r=4, config=lora_config(r=8))
        return d, ["lora_A", "expected [8, 64]"]
    if kind == "layer-out-of-range":
        make_lora(d, fp, layers=3)
        return d, ["layer 2", "2 layers"]
    if kind == "unknown-module":
        make_lora(d, fp, card=False, modules={"self_attn.qq_proj": [64, 64]}, targets=("qq_proj",),
                  config=lora_config(targets=("qq_proj",)))
        return d, ["self_attn.qq_proj", "does not have"]
    if kind == "pickle-as-safetensors":
        make_lora(d, fp)
        torch.save({"w": torch.zeros(3)}, d / "adapter_model.safetensors")
        return d, ["pickle-based weights are not accepted; use safetensors"]
    if kind == "raw-pickle-as-safetensors":
        make_lora(d, fp)
        (d / "adapter_model.safetensors").write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
        return d, ["pickle-based weights are not accepted; use safetensors"]
    if kind == "bin-file":
        make_lora(d, fp)
        with open(d / "adapter_model.bin", "wb") as f:
            pickle.dump({"w": 1}, f)
        return d, ["adapter_model.bin", "pickle-based weights are not accepted; use safetensors"]
    if kind == "nan":
        make_lora(d, fp)
        from safetensors.torch import load_file
        t = load_file(str(d / "adapter_model.safetensors"))
        key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
        t[key][3, 1] = float("nan")
        save_file(t, str(d / "adapter_model.safetensors"))
        return d, ["NaN or Inf", key]
    if kind == "inf-bf16":
        make_prefix(d, fp)
        t = {"prefix.keys": torch.zeros(2, 2, 5, 16, dtype=torch.bfloat16),
             "prefix.values": torch.full((2, 2, 5, 16), float("inf"), dtype=torch.bfloat16)}
        save_file(t, str(d / "adapter_model.safetensors"))
        return d, ["NaN or Inf", "prefix.values"]
    if kind == "int-dtype":
        make_prefix(d, fp)
        save_file({"prefix.keys": torch.zeros(2, 2, 5, 16, dtype=torch.int64),
                   "prefix.values": torch.zeros(2, 2, 5, 16)}, str(d / "adapter_model.safetensors"))
        return d, ["prefix.keys", "dtype I64"]
    if kind == "prefix-wrong-width":
        make_prefix(d, fp, kv=4)
        t = {k: torch.zeros(2, 4, 5, 16) for k in ("prefix.keys", "prefix.values")}
        save_file(t, str(d / "adapter_model.safetensors"))
        return d, ["num_kv_heads*head_dim = 64", "self_attn.k_proj has 32"]
    if kind == "series-wrong-bottleneck":
        make_series(d, fp, b=8)
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg["bottleneck"] = 16
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        return d, ["adapter_down", "expected [16, 64]"]
    if kind == "unknown-file":
        make_lora(d, fp)
        (d / "notes.txt").write_text("hi")
        return d, ["unknown file 'notes.txt'"]
    if kind == "subdir":
        make_lora(d, fp)
        (d / "extra").mkdir()
        return d, ["unknown directory 'extra'"]
    if kind == "symlink":
        make_lora(d, fp)
        os.symlink("/etc/passwd", d / "README.md")
        return d, ["README.md is a symlink"]
    if kind == "missing-dir":
        return d / "nope", ["adapter directory not found", "nope"]
    if kind == "not-a-dir":
        d.parent.mkdir(parents=True, exist_ok=True)
        d.write_text("x")
        return d, ["not a directory"]
    if kind == "no-weights":
        make_lora(d, fp)
        (d / "adapter_model.safetensors").unlink()
        return d, ["has no adapter_model.safetensors"]
    if kind == "bad-json":
        make_lora(d, fp)
        (d / "adapter_config.json").write_text("{\"peft_type\": ")
        return d, ["adapter_config.json is not valid JSON"]
    if kind == "dora":
        make_lora(d, fp, config=lora_config(use_dora=True))
        return d, ["DoRA"]
    if kind == "rank-pattern":
        make_lora(d, fp, config=lora_config(rank_pattern={"q_proj": 8}))
        return d, ["rank_pattern"]
    if kind == "bias":
        make_lora(d, fp, config=lora_config(bias="all"))
        return d, ["bias='all'"]
    if kind == "fan-in-fan-out":
        make_lora(d, fp, config=lora_config(fan_in_fan_out=True))
        return d, ["fan_in_fan_out"]
    if kind == "rank-limit":
        make_lora(d, fp, r=300, targets=("q_proj",), layers=1)
        return d, ["r=300 is over the limit of 256"]
    if kind == "unknown-type":
        make_lora(d, fp, config={"peft_type": "IA3"})
        return d, ["unsupported PEFT type 'IA3'"]
    raise AssertionError(kind)


BAD_KINDS = ["truncated", "garbage", "other-base-shapes", "other-base-card", "rank-mismatch",
             "layer-out-of-range", "unknown-module", "pickle-as-safetensors", "raw-pickle-as-safetensors",
             "bin-file", "nan", "inf-bf16", "int-dtype", "prefix-wrong-width", "series-wrong-bottleneck",
             "unknown-file", "subdir", "symlink", "missing-dir", "not-a-dir", "no-weights", "bad-json", "dora",
             "rank-pattern", "bias", "fan-in-fan-out", "rank-limit", "unknown-type"]


@pytest.fixture
def populated(tmp_path, fp):
    lib = Library(tmp_path / "lib")
    lib.add("good", make_lora(tmp_path / "good", fp, seed=3), fp)
    lib.add("good", make_lora(tmp_path / "good2", fp, seed=4), fp)
    return lib


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_adapter_refused_library_unchanged(populated, tmp_path, fp, kind):
    lib = populated
    d, parts = _bad(kind, tmp_path / f"bad-{kind}", fp)
    before = snapshot(lib)
    for name in ("good", "newname"):
        with pytest.raises(ValidationError) as e:
            lib.add(name, d, fp)
        for part in parts:
            assert part in str(e.value), (part, str(e.value))
    assert snapshot(lib) == before
    assert lib.gc() == 0 and snapshot(lib) == before


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "a..b", "x" * 101, "a b", "-rf", "a\\b"])
def test_unsafe_names(populated, tmp_path, fp, name):
    before = snapshot(populated)
    with pytest.raises(ValidationError, match="unsafe adapter name"):
        populated.add(name, make_lora(tmp_path / "ok", fp), fp)
    assert snapshot(populated) == before


def test_limits_are_configurable(tmp_path, fp):
    d = make_prefix(tmp_path / "p", fp, p=20)
    with pytest.raises(ValidationError, match="over the limit of 10"):
        validate_adapter_dir(d, fp, Limits(max_virtual_tokens=10))
    with pytest.raises(ValidationError, match="over the limit of 100 bytes"):
        validate_adapter_dir(d, fp, Limits(max_file_bytes=100))


def test_large_file_path_mode(tmp_path, fp, monkeypatch):
    """Files over IN_MEMORY_BYTES are checked on disk and re-hashed while copied."""
    from modulora import validate

    monkeypatch.setattr(validate, "IN_MEMORY_BYTES", 0)
    lib = Library(tmp_path / "lib")
    src = make_lora(tmp_path / "a", fp)
    v = validate_adapter_dir(src, fp)
    assert isinstance(v.files["adapter_model.safetensors"], Path)
    assert read_files(lib.add("a", src, fp).path) == read_files(src)
    d, parts = _bad("nan", tmp_path / "nan", fp)
    with pytest.raises(ValidationError, match="NaN or Inf"):
        lib.add("b", d, fp)
    d, parts = _bad("truncated", tmp_path / "trunc", fp)
    with pytest.raises(ValidationError, match="corrupt safetensors file"):
        lib.add("b", d, fp)

    # the file changes between its check and its copy: refused, nothing stored
    real = library_mod.validate_adapter_dir
    src2 = make_lora(tmp_path / "c", fp, seed=5)

    def validate_then_tamper(*a, **k):
        out = real(*a, **k)
        make_lora(src2, fp, seed=6)
        return out

    monkeypatch.setattr(library_mod, "validate_adapter_dir", validate_then_tamper)
    before = snapshot(lib)
    with pytest.raises(LibraryError, match="changed while it was being added"):
        lib.add("c", src2, fp)
    assert snapshot(lib) == before



@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("on_disk", [False, True])
def test_weight_magnitude_limit(tmp_path, fp, monkeypatch, dtype, on_disk):
    """A value over Limits.max_weight_abs (255) is refused naming the tensor, its largest |value|
    and the limit, in every accepted dtype, in memory or checked on disk; one at the limit passes."""
    from modulora import validate

    if on_disk:
        monkeypatch.setattr(validate, "IN_MEMORY_BYTES", 0)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    huge = 6e4 if dtype == torch.float16 else 1e6  # 1e6 is inf in float16 (max 65504)

    def with_value(d: Path, value: float) -> Path:
        make_lora(d, fp, dtype=dtype)
        from safetensors.torch import load_file
        t = load_file(str(d / "adapter_model.safetensors"))
        t[key][3, 1] = value
        save_file(t, str(d / "adapter_model.safetensors"))
        return d

    lib = Library(tmp_path / "lib")
    for i, value in enumerate([huge, -huge, 256.0]):
        with pytest.raises(ValidationError) as e:
            lib.add("big", with_value(tmp_path / f"big{i}", value), fp)
        shown = f"{float(torch.tensor(abs(value), dtype=dtype)):.4g}"
        for part in (key, f"values up to |{shown}|", "over the limit of 255"):
            assert part in str(e.value), (part, str(e.value))
    assert lib.list() == []
    for i, value in enumerate([255.0, -255.0]):
        assert lib.add("edge", with_value(tmp_path / f"edge{i}", value), fp).version == i + 1
    with pytest.raises(ValidationError, match="over the limit of 100 for weights"):
        validate_adapter_dir(with_value(tmp_path / "custom", 101.0), fp, Limits(max_weight_abs=100))
    validate_adapter_dir(with_value(tmp_path / "custom2", 1e4 if dtype != torch.float16 else 6e4), fp,
                         Limits(max_weight_abs=float("inf")))


# ---------------------------------------------------------------------------------------------
# crash safety


@pytest.mark.parametrize("hook", ["_before_rename_hook", "_before_commit"])
def test_failure_mid_add_leaves_catalog_unchanged(populated, tmp_path, fp, monkeypatch, hook):
    lib = populated
    src = make_lora(tmp_path / "new", fp, seed=9)
    before = snapshot(lib)

    def boom(*a):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(library_mod, hook, boom)
    for name in ("good", "fresh"):
        with pytest.raises(RuntimeError, match="injected"):
            lib.add(name, src, fp)
    assert snapshot(lib)[0] == before[0]
    lib.gc()
    assert snapshot(lib) == before
    monkeypatch.undo()
    assert lib.add("good", src, fp).version == 3  # and the library still works


def test_sigkill_mid_add_leaves_catalog_unchanged(populated, tmp_path, fp):
    lib = populated
    src = make_lora(tmp_path / "new", fp, seed=11)
    before = snapshot(lib)
    flag = tmp_path / "paused"
    code = textwrap.dedent(f"""
        import json, sys
        from modulora.library import Library
        Library({str(lib.root)!r}).add("good", {str(src)!r}, json.loads(sys.stdin.read()))
    """)
    env = dict(os.environ, **{library_mod.PAUSE_ENV: str(flag)})
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, cwd=ROOT)
    child.stdin.write(json.dumps(fp).encode())
    child.stdin.close()
    deadline = time.monotonic() + 30
    while not flag.exists():
        assert child.poll() is None, "the child exited before pausing"
        assert time.monotonic() < deadline, "the child never reached the commit"
        time.sleep(0.05)
    assert "good 3" in flag.read_text()
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(10) == -signal.SIGKILL

    lib2 = Library(lib.root, auto_gc=False)
    rows, files = snapshot(lib2)
    assert rows == before[0]
    assert len(files) > len(before[1])  # the written object is left behind, unreferenced
    assert lib2.integrity_check() == "ok"
    assert lib2.gc() >= 1
    assert snapshot(lib2) == before
    assert lib2.add("good", src, fp).version == 3


# ---------------------------------------------------------------------------------------------
# concurrency


def test_concurrent_adds(tmp_path, fp):
    procs, per_proc = 4, 4
    root = tmp_path / "lib"  # created by the children, all at once
    shared = make_lora(tmp_path / "shared", fp, seed=100, targets=("q_proj",), r=2)
    jobs = []
    for k in range(procs):
        mine = []
        for i in range(per_proc):
            own = make_lora(tmp_path / f"p{k}-{i}", fp, seed=1000 + 10 * k + i, targets=("q_proj",), r=2)
            mine += [(f"p{k}-{i}", str(own)), ("shared", str(shared)), ("mixed", str(own))]
        jobs.append(mine)
    code = textwrap.dedent("""
        import json, sys
        from modulora.library import Library
        args = json.loads(sys.stdin.read())
        lib = Library(args["root"])
        for name, d in args["jobs"]:
            lib.add(name, d, args["fp"])
    """)
    children = []
    for k in range(procs):
        c = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, cwd=ROOT)
        c.stdin.write(json.dumps({"root": str(root), "jobs": jobs[k], "fp": fp}).encode())
        c.stdin.close()
        children.append(c)
    assert [c.wait(120) for c in children] == [0] * procs
    lib = Library(root)

    names = [r.name for r in lib.list()]
    assert names == sorted(["mixed", "shared"] + [f"p{k}-{i}" for k in range(procs) for i in range(per_proc)])
    n = procs * per_proc
    for name in ("shared", "mixed"):
        assert [r.version for r in lib.versions(name)] == list(range(1, n + 1))
    assert len({r.object_id for r in lib.versions("shared")}) == 1
    objects = os.listdir(lib.root / "objects")
    assert len(objects) == n + 1  # every own adapter once (p*/mixed share), shared once
    assert os.listdir(lib.root / "tmp") == []
    with sqlite3.connect(lib.root / "catalog.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT COUNT(*) FROM adapters").fetchone()[0] == 3 * n
