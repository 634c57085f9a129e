"""Check an adapter directory before anything is stored or loaded.

An adapter may come from anywhere, so nothing in it is trusted: only the three (four) known files,
no pickles, no symlinks, a safetensors header parsed by hand before any library sees the file,
finite weights of bounded magnitude, keys and shapes that fit the documented layout
(docs/formats.md) and the base model's fingerprint, and sizes under fixed limits. This module
writes nothing and does not import torch, so that `modulora library ...` commands start fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .adapters.format import (ALLOWED_FILES, LIMITS, OWN_TYPES, PICKLE_MESSAGE, PICKLE_SUFFIXES, PREFIX_KEYS,
                              FormatError, Limits, bottleneck_sites, expect_shape, lora_modules, lora_spec,
                              own_settings, parse_bottleneck_key, parse_json)
from .adapters.format import CARD_FILE as CARD
from .adapters.format import CONFIG_FILE as CONFIG
from .adapters.format import README_FILE as README
from .adapters.format import WEIGHTS_FILE as WEIGHTS

__all__ = ["ALLOWED_FILES", "CARD", "CONFIG", "Limits", "PICKLE_MESSAGE", "PICKLE_SUFFIXES", "README", "WEIGHTS",
           "RESERVED_NAMES", "Validated", "ValidationError", "validate_adapter_dir", "validate_name"]

# Files up to this size are read once into memory: what is checked is then exactly what is stored.
# Larger ones stay on disk (`files` holds their path) and the library re-hashes them as it copies.
IN_MEMORY_BYTES = 64 << 20

# safetensors dtype -> (item size, uint view, exponent mask, name). Every check reads the values as
# unsigned integers, so it needs no float conversion (and works for bfloat16, which numpy lacks):
# with the sign bit cleared, IEEE bit patterns order like the magnitudes they encode, and a value
# is NaN/Inf iff its magnitude bits are >= the exponent mask (all exponent bits set).
_DTYPES = {
    "F16": (2, "<u2", 0x7C00, "float16"),
    "BF16": (2, "<u2", 0x7F80, "bfloat16"),
    "F32": (4, "<u4", 0x7F800000, "float32"),
}
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,100}")  # so no route syntax either: no , : @ or spaces
# Route words (modulora.routing.api POLICIES and "base"): an adapter of such a name could never be
# chosen by a route, so no one (CLI, server, build, merge) may add one. tests/test_names.py checks
# that this is the server's SPECIAL_MODELS.
RESERVED_NAMES = ("base", "arrow", "retrieval", "learned", "uniform")


class ValidationError(ValueError):
    """An adapter directory (or name) is refused; the message says what is wrong and where."""


@dataclass
class Validated:
    type: str
    config: dict
    card: dict | None
    files: dict  # filename -> bytes (read once) or Path (large files)
    shapes: dict  # tensor key -> list of ints
    num_params: int
    sha256: dict = field(default_factory=dict)  # filename -> hex digest of the checked content
    sizes: dict = field(default_factory=dict)  # filename -> bytes


def validate_name(name: str) -> str:
    """Return `name` if it is a safe adapter name, not a reserved route word, else raise ValidationError."""
    if isinstance(name, str) and name in RESERVED_NAMES:
        raise ValidationError(f"adapter name {name!r} is reserved: it is a route ({', '.join(RESERVED_NAMES)}), "
                              "so no route could reach an adapter of that name; choose another name")
    if (not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name.startswith((".", "-"))
            or ".." in name):
        raise ValidationError(
            f"unsafe adapter name {name!r}: use 1-100 characters from A-Z a-z 0-9 . _ -, "
            "not starting with '.' or '-', without '..' or slashes"
        )
    return name


# ---------------------------------------------------------------------------------------------
# files


def _read_file(path: Path, limit: int, *, keep_path_over: int | None = None):
    """Read a regular file without following symlinks; returns (bytes-or-Path, size, sha256)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise ValidationError(f"cannot read {path.name}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValidationError(f"{path.name} is not a regular file")
        if st.st_size > limit:
            raise ValidationError(f"{path.name} is {st.st_size} bytes, over the limit of {limit} bytes")
        if keep_path_over is not None and st.st_size > keep_path_over:
            return path, st.st_size, None  # hashed after the checks, see validate_adapter_dir
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValidationError(f"{path.name} grew past the limit of {limit} bytes while being read")
    return data, len(data), hashlib.sha256(data).hexdigest()


def _sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_object(data: bytes, filename: str) -> dict:
    def no_dupes(pairs):
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
        return dict(pairs)

    try:
        obj = parse_json(data.decode("utf-8"), filename, object_pairs_hook=no_dupes)
    except UnicodeDecodeError as e:
        raise ValidationError(f"{filename} is not valid JSON: {e}") from None
    except FormatError as e:
        raise ValidationError(str(e)) from None
    if not isinstance(obj, dict):
        raise ValidationError(f"{filename} must hold a JSON object, not {type(obj).__name__}")
    return obj


def _list_dir(path: Path) -> dict[str, Path]:
    if not path.exists():
        raise ValidationError(f"adapter directory not found: {path}")
    if not path.is_dir():
        raise ValidationError(f"not a directory: {path} (an adapter is a directory holding {CONFIG} "
                              f"and {WEIGHTS})")
    entries = sorted(os.scandir(path), key=lambda e: e.name)
    found: dict[str, Path] = {}
    for e in entries:  # pickles first: that message is the most useful one
        if e.name.lower().endswith(PICKLE_SUFFIXES):
            raise ValidationError(f"{e.name}: {PICKLE_MESSAGE}")
    for e in entries:
        if e.is_symlink():
            raise ValidationError(f"{e.name} is a symlink; symlinks are not accepted in an adapter directory")
        if e.name not in ALLOWED_FILES:
            kind = "directory" if e.is_dir(follow_symlinks=False) else "file"
            raise ValidationError(f"unknown {kind} {e.name!r} in {path}; an adapter directory may only "
                                  f"hold {', '.join(ALLOWED_FILES)}")
        if not e.is_file(follow_symlinks=False):
            raise ValidationError(f"{e.name} is not a regular file")
        found[e.name] = Path(e.path)
    for required in (CONFIG, WEIGHTS):
        if required not in found:
            raise ValidationError(f"{path} has no {required}")
    return found


# ---------------------------------------------------------------------------------------------
# safetensors


def _looks_like_pickle(head: bytes) -> bool:
    return head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 1 <= head[1] <= 5)


def _parse_safetensors_header(head: bytes, file_size: int, limit: int) -> tuple[dict, int]:
    """Check the header by hand; return ({key: (dtype, shape, begin, end)}, data start)."""

    def corrupt(why: str):
        if _looks_like_pickle(head):
            return ValidationError(f"{WEIGHTS}: {PICKLE_MESSAGE} (the file is a pickle/zip archive)")
        return ValidationError(f"corrupt safetensors file: {WEIGHTS}: {why}")

    if file_size < 8 or len(head) < 8:
        raise corrupt(f"only {file_size} bytes")
    (n,) = struct.unpack("<Q", head[:8])
    if n < 2 or n > min(limit, file_size - 8):
        raise corrupt(f"header length {n} does not fit a file of {file_size} bytes")
    if len(head) < 8 + n:
        raise corrupt("truncated header")
    raw = head[8:8 + n]
    if raw[:1] != b"{":
        raise corrupt("header is not a JSON object")
    try:
        header = _json_object(raw.rstrip(b" "), "header")
    except ValidationError as e:
        raise corrupt(str(e)) from None
    data_len = file_size - 8 - n
    tensors: dict = {}
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise corrupt("__metadata__ must map strings to strings")
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise corrupt(f"bad header entry for tensor {key!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise corrupt(f"bad shape {shape!r} for tensor {key!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_len):
            raise corrupt(f"tensor {key!r} has data offsets {offsets!r} outside the data ({data_len} bytes)")
        if dtype not in _DTYPES:
            raise ValidationError(f"{WEIGHTS}: tensor {key!r} has dtype {dtype}; only float16, bfloat16 "
                                  "and float32 are accepted")
        if math.prod(shape) * _DTYPES[dtype][0] != offsets[1] - offsets[0]:
            raise corrupt(f"tensor {key!r} of shape {shape} holds {offsets[1] - offsets[0]} bytes")
        tensors[key] = (dtype, shape, offsets[0], offsets[1])
    pos = 0
    for key, (_, _, begin, end) in sorted(tensors.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != pos:
            raise corrupt(f"tensor {key!r} overlaps another or leaves a gap (starts at {begin}, expected {pos})")
        pos = end
    if pos != data_len:
        raise corrupt(f"{data_len - pos} bytes after the last tensor (truncated or padded file)")
    return tensors, 8 + n


def _magnitude_bits(limit: float, dtype: str) -> int:
    """The bit pattern (sign cleared) of the largest `dtype` value <= `limit`: a value is over the
    limit iff its magnitude bits are greater, so the scan compares integers only."""
    if dtype == "BF16":  # bfloat16 is the upper half of a float32: truncating rounds toward zero
        return _magnitude_bits(limit, "F32") >> 16
    ftype, utype = np.dtype(_DTYPES[dtype][3]), np.dtype(_DTYPES[dtype][1])
    limit = max(float(limit), 0.0)
    with np.errstate(over="ignore"):
        x = np.array(limit, dtype=ftype)
    if float(x) > limit:  # rounded up (or to inf): step down to the largest value below the limit
        x = np.nextafter(x, ftype.type(0))
    return int(x.view(utype))


def _from_bits(bits: int, dtype: str) -> float:
    """The float whose magnitude bits are `bits` (for messages)."""
    if dtype == "BF16":
        return float(np.array(bits << 16, dtype="<u4").view(np.float32))
    return float(np.array(bits, dtype=_DTYPES[dtype][1]).view(_DTYPES[dtype][3]))


def _check_values(buf, tensors: dict, start: int, max_abs: float) -> None:
    """Refuse NaN/Inf and any value whose magnitude is over `max_abs`, in one pass over the data:
    per chunk, the largest magnitude bit pattern (see _DTYPES) answers both questions."""
    chunk = 1 << 22
    for key, (dtype, shape, begin, end) in tensors.items():
        size, view, exp_mask, _ = _DTYPES[dtype]
        sign = 1 << (8 * size - 1)
        limit = _magnitude_bits(max_abs, dtype)
        count = (end - begin) // size
        top = 0
        for i in range(0, count, chunk):
            n = min(chunk, count - i)
            a = np.frombuffer(buf, dtype=view, count=n, offset=start + begin + i * size)
            top = max(top, int(np.bitwise_and(a, sign - 1).max()))
            if top >= exp_mask:
                raise ValidationError(f"{WEIGHTS}: tensor {key!r} holds NaN or Inf values")
        if top > limit:
            raise ValidationError(f"{WEIGHTS}: tensor {key!r} holds values up to |{_from_bits(top, dtype):.4g}|, "
                                  f"over the limit of {max_abs:g} for weights (max_weight_abs); trained "
                                  "weights are far smaller, and values this large overflow float16 "
                                  "products and norms")


def _check_safetensors(source, size: int, limits: Limits) -> dict:
    """Check a safetensors file (bytes or Path); return {key: (dtype, shape, begin, end)}."""
    if isinstance(source, (bytes, bytearray)):
        tensors, start = _parse_safetensors_header(bytes(source[:8 + limits.max_json_bytes]), size,
                                                   limits.max_json_bytes)
        _check_values(source, tensors, start, limits.max_weight_abs)
        try:  # the safetensors library must read it the same way
            import safetensors

            names = {name for name, _ in safetensors.deserialize(bytes(source))}
        except Exception as e:  # noqa: BLE001 - any failure in there means a bad file
            raise ValidationError(f"corrupt safetensors file: {WEIGHTS}: {e}") from None
    else:
        with open(source, "rb") as f:
            head = f.read(8 + limits.max_json_bytes)
        tensors, start = _parse_safetensors_header(head, size, limits.max_json_bytes)
        if tensors:
            mm = np.memmap(source, dtype=np.uint8, mode="r", shape=(size,))
            try:
                _check_values(mm, tensors, start, limits.max_weight_abs)
            finally:
                del mm
        try:
            from safetensors import safe_open

            with safe_open(str(source), framework="numpy") as f:
                names = set(f.keys())
        except Exception as e:  # noqa: BLE001
            raise ValidationError(f"corrupt safetensors file: {WEIGHTS}: {e}") from None
    if names != set(tensors):
        raise ValidationError(f"corrupt safetensors file: {WEIGHTS}: the safetensors library reads other keys")
    return tensors


# ---------------------------------------------------------------------------------------------
# configs and layouts


@contextlib.contextmanager
def _in(filename: str):
    """Report a format rule broken in `filename` as a ValidationError naming that file."""
    try:
        yield
    except FormatError as e:
        raise ValidationError(f"{filename}: {e}") from None


def _config_type(config: dict, limits: Limits) -> str:
    peft_type, mtype = config.get("peft_type"), config.get("modulora_type")
    if peft_type is not None and mtype is not None:
        raise ValidationError(f"{CONFIG} sets both peft_type and modulora_type; use one")
    if peft_type is None and mtype is None:
        raise ValidationError(f"{CONFIG} has neither peft_type \"LORA\" nor modulora_type "
                              f"({', '.join(OWN_TYPES)})")
    with _in(CONFIG):
        if peft_type is not None:
            lora_spec(config, limits)
            return "lora"
        own_settings(mtype, config, limits)
    return mtype


def _check_bottleneck(kind: str, shapes: dict, config: dict, fp: dict | None) -> None:
    b = config["bottleneck"]
    placement = config.get("placement", "pfeiffer")
    allowed = bottleneck_sites(kind, placement)
    sites: dict[tuple[int, str], dict[str, str]] = {}
    for key in shapes:
        parsed = parse_bottleneck_key(key)
        if parsed is None:
            raise ValidationError(f"{WEIGHTS}: unexpected tensor key {key!r} for a {kind} adapter; keys look "
                                  f"like model.layers.0.{allowed[-1]}.adapter_down.weight")
        layer, site, part = parsed
        _check_layer(key, layer, fp)
        if site not in allowed:
            where = f"a {placement} adapter" if kind == "series" else "a parallel adapter"
            raise ValidationError(f"{WEIGHTS}: tensor {key!r} is at {site}, but {where} sits only at "
                                  f"{', '.join(allowed)}")
        sites.setdefault((layer, site), {})[part] = key
    if not sites:
        raise ValidationError(f"{WEIGHTS} holds no adapter tensors")
    seen_h: dict[str, int] = {}
    for (layer, site), parts in sorted(sites.items()):
        for part in ("down.weight", "up.weight"):
            if part not in parts:
                raise ValidationError(f"{WEIGHTS}: layer {layer} {site} has no adapter_{part}")
        if kind == "series":
            h_in = h_out = _hidden(fp, site, 0)  # after the sub-layer: its output size
        else:
            h_in, h_out = _hidden(fp, "mlp.up_proj", 1), _hidden(fp, "mlp.down_proj", 0)
        dw, uw = parts["down.weight"], parts["up.weight"]
        if h_in is None:  # no base to compare with: at least keep every site consistent
            h_in = seen_h.setdefault("in", shapes[dw][1] if len(shapes[dw]) == 2 else -1)
            h_out = seen_h.setdefault("out", shapes[uw][0] if len(shapes[uw]) == 2 else -1)
        with _in(WEIGHTS):
            expect_shape(dw, shapes[dw], [b, h_in], f"adapter_down is [bottleneck, hidden] with bottleneck={b}")
            expect_shape(uw, shapes[uw], [h_out, b], f"adapter_up is [hidden, bottleneck] with bottleneck={b}")
            if "down.bias" in parts:
                expect_shape(parts["down.bias"], shapes[parts["down.bias"]], [b], "adapter_down bias is [bottleneck]")
            if "up.bias" in parts:
                expect_shape(parts["up.bias"], shapes[parts["up.bias"]], [h_out], "adapter_up bias is [hidden]")


def _check_layer(key: str, layer: int, fp: dict | None) -> None:
    if fp is not None and "num_layers" in fp and layer >= fp["num_layers"]:
        raise ValidationError(f"{WEIGHTS}: tensor {key!r} is for layer {layer}, but the base model has "
                              f"{fp['num_layers']} layers")


def _hidden(fp: dict | None, module: str | None, index: int) -> int | None:
    if fp is None:
        return None
    if module and module in fp.get("modules", {}):
        return fp["modules"][module][index]
    return fp.get("hidden_size")


def _check_prefix(shapes: dict, config: dict, fp: dict | None) -> None:
    p = config["num_virtual_tokens"]
    if set(shapes) != set(PREFIX_KEYS):
        raise ValidationError(f"{WEIGHTS}: a prefix adapter holds exactly the tensors {' and '.join(PREFIX_KEYS)}, "
                              f"found {sorted(shapes)}")
    layers = fp.get("num_layers") if fp else None
    meaning = f"[num_layers, num_kv_heads, num_virtual_tokens={p}, head_dim]"
    for key, proj in zip(PREFIX_KEYS, ("self_attn.k_proj", "self_attn.v_proj")):
        shape = shapes[key]
        with _in(WEIGHTS):
            expect_shape(key, shape, [layers, None, p, None], meaning)
        width = _hidden(fp, proj, 0) if fp and proj in fp.get("modules", {}) else None
        if width is not None and shape[1] * shape[3] != width:
            raise ValidationError(f"{WEIGHTS}: tensor {key!r} has shape {shape}: num_kv_heads*head_dim = "
                                  f"{shape[1] * shape[3]}, but the base model's {proj} has {width} outputs")
    if shapes[PREFIX_KEYS[0]] != shapes[PREFIX_KEYS[1]]:
        raise ValidationError(f"{WEIGHTS}: {PREFIX_KEYS[0]} {shapes[PREFIX_KEYS[0]]} and {PREFIX_KEYS[1]} "
                              f"{shapes[PREFIX_KEYS[1]]} differ in shape")


# ---------------------------------------------------------------------------------------------


def validate_adapter_dir(path, fingerprint: dict | None = None, limits: Limits = LIMITS) -> Validated:
    """Check an adapter directory; return what was read. Writes nothing.

    Shapes are compared with `fingerprint` (the base the adapter is meant for); without one, with the
    card's `base_fingerprint` if it has one; without either, only for internal consistency.
    """
    path = Path(path)
    found = _list_dir(path)
    files, sizes, digests = {}, {}, {}
    for name, p in found.items():
        big = name == WEIGHTS
        limit = limits.max_file_bytes if big else limits.max_card_bytes if name == CARD else limits.max_json_bytes
        content, size, digest = _read_file(p, limit, keep_path_over=IN_MEMORY_BYTES if big else None)
        files[name], sizes[name] = content, size
        if digest is not None:
            digests[name] = digest

    config = _json_object(files[CONFIG], CONFIG)
    adapter_type = _config_type(config, limits)
    card = None
    if CARD in files:
        card = _json_object(files[CARD], CARD)
        if card.get("type") is not None and card["type"] != adapter_type:
            raise ValidationError(f"{CARD} says type {card['type']!r} but {CONFIG} describes a "
                                  f"{adapter_type} adapter")
        card_fp = card.get("base_fingerprint")
        if card_fp is not None and not (isinstance(card_fp, dict) and isinstance(card_fp.get("id"), str)):
            raise ValidationError(f"{CARD}: base_fingerprint must be an object with an id")
        if card_fp is not None and fingerprint is not None and card_fp["id"] != fingerprint.get("id"):
            from .base import BaseModelError, check_fingerprint

            try:
                check_fingerprint(card_fp, fingerprint)
            except BaseModelError as e:
                raise ValidationError(str(e)) from None
    if README in files:
        try:
            files[README].decode("utf-8")
        except UnicodeDecodeError:
            raise ValidationError(f"{README} is not UTF-8 text") from None

    tensors = _check_safetensors(files[WEIGHTS], sizes[WEIGHTS], limits)
    if not tensors:
        raise ValidationError(f"{WEIGHTS} holds no tensors")
    shapes = {k: list(v[1]) for k, v in tensors.items()}
    fp = fingerprint if fingerprint is not None else (card or {}).get("base_fingerprint")
    if fp is not None and not isinstance(fp, dict):
        raise ValidationError("the base fingerprint must be a dict (see modulora.base.fingerprint)")
    if adapter_type == "lora":
        with _in(WEIGHTS):
            lora_modules(lora_spec(config, limits), shapes, fp, limits)
    elif adapter_type == "prefix":
        _check_prefix(shapes, config, fp)
    else:
        _check_bottleneck(adapter_type, shapes, config, fp)

    if WEIGHTS not in digests:  # a large file kept on disk: hash what was just checked
        digests[WEIGHTS] = _sha256_path(files[WEIGHTS])
    return Validated(type=adapter_type, config=config, card=card, files=files, shapes=shapes,
                     num_params=sum(math.prod(s) for s in shapes.values()), sha256=digests, sizes=sizes)
