"""Adapter names that routes could not reach are refused, and deeply nested JSON in an adapter is a
clear validation error (never a RecursionError), for the CLI, the library and the server alike."""

import json
import struct

import pytest

from test_library import make_lora, snapshot

from modulora.cli import main
from modulora.library import Library
from modulora.validate import RESERVED_NAMES, ValidationError, validate_name


@pytest.fixture(scope="module")
def fp():
    from modulora.base import load_base

    return load_base("tiny", dtype="fp32").fingerprint


def test_reserved_names_are_the_servers_route_words():
    from modulora.routing.api import POLICIES
    from modulora.serve.protocol import SPECIAL_MODELS

    assert set(RESERVED_NAMES) == set(SPECIAL_MODELS) == {"base", *POLICIES}


@pytest.mark.parametrize("name", [*RESERVED_NAMES, "a,b", "a:0.5", "a@1", "a b", "a/b", ""])
def test_route_words_and_route_syntax_are_refused(name):
    with pytest.raises(ValidationError, match="reserved" if name in RESERVED_NAMES else "unsafe adapter name"):
        validate_name(name)


def test_upload_refuses_reserved_names():
    from modulora.serve.errors import APIError
    from modulora.serve.upload import check_upload_name

    for name in RESERVED_NAMES:
        with pytest.raises(APIError, match="reserved"):
            check_upload_name(f" {name} ")
    assert check_upload_name("arrows") == "arrows"


@pytest.mark.parametrize("name", ["arrow", "base"])
def test_cli_add_of_a_reserved_name_is_one_error_line(tmp_path, fp, capsys, name):
    lib = Library(tmp_path / "lib")
    lib.add("kept", make_lora(tmp_path / "kept", fp), fp)
    before = snapshot(lib)
    code = main(["--library", str(tmp_path / "lib"), "library", "add", name, str(make_lora(tmp_path / "a", fp, seed=1)),
                 "--base", "tiny"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "reserved" in lines[0], err
    assert snapshot(Library(tmp_path / "lib")) == before


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _nest_config(d, depth):
    cfg = json.loads((d / "adapter_config.json").read_text())
    text = json.dumps({**cfg, "notes": "X"}).encode()
    (d / "adapter_config.json").write_bytes(text.replace(b'"X"', _deep(depth)))


def _nest_card(d, depth):
    (d / "card.json").write_bytes(b'{"type": "lora", "notes": ' + _deep(depth) + b"}")


def _nest_header(d, depth):
    p = d / "adapter_model.safetensors"
    blob = p.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    header["__metadata__"] = "X"
    raw = json.dumps(header).encode().replace(b'"X"', _deep(depth))
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n:])


@pytest.mark.parametrize("depth", [100, 100_000])
@pytest.mark.parametrize("nest,filename", [(_nest_config, "adapter_config.json"), (_nest_card, "card.json"),
                                           (_nest_header, "adapter_model.safetensors")])
def test_deeply_nested_json_is_refused_naming_the_file(tmp_path, fp, nest, filename, depth):
    lib = Library(tmp_path / "lib")
    lib.add("kept", make_lora(tmp_path / "kept", fp), fp)
    before = snapshot(lib)
    d = make_lora(tmp_path / "deep", fp, seed=2)
    nest(d, depth)
    with pytest.raises(ValidationError, match=f"{filename}.*nested deeper than 64"):
        lib.add("deep", d, fp)
    assert snapshot(lib) == before


def test_deep_json_from_the_cli_is_one_error_line(tmp_path, fp, capsys):
    d = make_lora(tmp_path / "deep", fp)
    _nest_card(d, 100_000)
    code = main(["--library", str(tmp_path / "lib"), "library", "add", "deep", str(d), "--base", "tiny"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().count("\n") == 0 and err.startswith("error:") and "card.json" in err, err
    assert "Traceback" not in err and "RecursionError" not in err


def test_read_adapter_refuses_deep_json(tmp_path, fp):
    from modulora.adapters import AdapterError
    from modulora.adapters.io import read_adapter

    d = make_lora(tmp_path / "deep", fp)
    _nest_config(d, 100_000)
    with pytest.raises(AdapterError, match="adapter_config.json is nested deeper than 64"):
        read_adapter(d)


def test_shallow_nesting_still_parses():
    from modulora.adapters.format import parse_json

    assert parse_json(_deep(64), "x") == json.loads(_deep(64))
    with pytest.raises(ValueError, match="x is nested deeper than 64"):
        parse_json(_deep(65), "x")
