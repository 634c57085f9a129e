"""One resolved route -> one LoRA folder that a vLLM-compatible upstream can load.

A single adapter is exported from the library as it is. A mixture sum_i w_i s_i B_i A_i x (the
output mixture modulora's engine computes) is one LoRA with A = concat(A_i) and
B = concat(w_i s_i B_i): exact, of rank sum(r_i) (`modulora.routing.merge.merge_concat`). Experts
that adapt different modules get zero blocks where one lacks a module. The concatenated factors
are cached in the library as derived data, so any gateway over the same library reuses them.

The upstream name is a stable short hash of the route's object ids and weights: the same route
always gets the same name, a new version of an adapter a new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..adapters.format import CONFIG_FILE
from ..routing.merge import LoraFactors, MergedLora, load_lora, merge_concat, save_merged

PREFIX = "mlr-"  # upstream names of adapters this gateway made
KIND = "gateway-concat:"  # derived-data kind of a concatenated LoRA (+ the route's key)

_log = logging.getLogger("modulora.gateway")


def route_key(route: dict[str, float], object_ids: dict[str, str]) -> list[tuple[str, str]]:
    """The route as (object id, weight) pairs in a fixed order: what identifies its LoRA."""
    return sorted((object_ids[name], repr(float(w))) for name, w in route.items())


def upstream_name(route: dict[str, float], object_ids: dict[str, str]) -> str:
    """A stable short name for the route's LoRA on the upstream (`mlr-` + 16 hex digits)."""
    key = route_key(route, object_ids)
    if len(key) == 1:  # one adapter: weights are normalised, so only its object id counts
        key = [(key[0][0], "1.0")]
    return PREFIX + hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def is_ready(folder: Path) -> bool:
    """Whether an adapter folder was written whole (folders are renamed into place)."""
    return (folder / CONFIG_FILE).is_file()


def build_folder(library, route: dict[str, float], records: dict, adapter_dir: Path) -> tuple[str, Path]:
    """(upstream name, folder) of the route's LoRA, written under `adapter_dir` unless already
    there. `records`: name -> the library record the route resolved against."""
    object_ids = {n: records[n].object_id for n in route}
    name = upstream_name(route, object_ids)
    folder = adapter_dir / name
    if is_ready(folder):
        return name, folder
    if len(route) == 1:
        (only,) = route
        library.export(only, folder, version=records[only].version)
        return name, folder
    save_merged(concatenated(library, route, records), folder, card={"name": name})
    return name, folder


def concatenated(library, route: dict[str, float], records: dict) -> MergedLora:
    """The route's concatenated LoRA: from the library's derived data, else built and cached."""
    order = sorted(route, key=lambda n: records[n].object_id)
    key = route_key(route, {n: records[n].object_id for n in route})
    owner = key[0][0]  # stored under the first expert's object: dropped when that one is removed
    kind = KIND + hashlib.sha256(json.dumps(key).encode()).hexdigest()
    blob = library.get_derived(owner, kind)
    if blob is not None:
        return from_bytes(blob)
    experts = fill_missing([load_lora(records[n].path, name=records[n].ref) for n in order])
    merged = merge_concat(experts, [route[n] for n in order])
    try:
        library.put_derived(owner, kind, to_bytes(merged))
    except (OSError, ValueError, sqlite3.Error) as e:  # a read-only or full library: serve anyway, uncached
        _log.warning("cannot cache the concatenated LoRA of %s in the library: %s", ", ".join(order), e)
    return merged


def fill_missing(experts: list[LoraFactors]) -> list[LoraFactors]:
    """Give every expert every module any of them adapts, with zero factors where it has none
    (a zero block adds nothing to the mixture, so the concatenation stays exact)."""
    shapes: dict[str, tuple[int, int, torch.dtype]] = {}
    for e in experts:
        for m in e.A:
            shapes.setdefault(m, (e.A[m].shape[1], e.B[m].shape[0], e.A[m].dtype))
    for e in experts:
        for m, (n_in, n_out, dtype) in shapes.items():
            if m not in e.A:
                e.A[m] = torch.zeros(e.r, n_in, dtype=dtype)
                e.B[m] = torch.zeros(n_out, e.r, dtype=dtype)
    return experts


def to_bytes(merged: MergedLora) -> bytes:
    """A concatenated LoRA as safetensors bytes (derived data is never pickled)."""
    tensors = {}
    for m in merged.A:
        tensors[f"A:{m}"] = merged.A[m].contiguous()
        tensors[f"B:{m}"] = merged.B[m].contiguous()
    meta = {"r": merged.r, "target_modules": list(merged.target_modules), "card": merged.card,
            "base_name": merged.base_name}
    return st_save(tensors, metadata={"merged": json.dumps(meta, default=str)})


def from_bytes(blob: bytes) -> MergedLora:
    tensors = st_load(blob)
    meta = json.loads(_metadata(blob)["merged"])
    A = {k[2:]: v for k, v in tensors.items() if k.startswith("A:")}
    B = {k[2:]: v for k, v in tensors.items() if k.startswith("B:")}
    return MergedLora(method="concat", r=int(meta["r"]), A=A, B=B, target_modules=tuple(meta["target_modules"]),
                      card=meta["card"], base_name=meta["base_name"])


def _metadata(blob: bytes) -> dict:
    """The `__metadata__` of safetensors bytes (an 8-byte little-endian size, then a JSON header)."""
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]).get("__metadata__") or {}
