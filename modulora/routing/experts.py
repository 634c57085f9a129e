"""The experts a router chooses among: LoRA adapters read from a library (or from directories),
checked against the base, ready to be copied into the multi-expert layer's slots (slots.py).

    experts = load_experts(library, fingerprint=base.fingerprint)   # all LoRAs, sorted by name
    expert_set = ExpertSet(experts)          # slots: A[module] [E, R, in], Bt[module] [E, R, out]

Each module's scaling (alpha / r, per module with alpha_pattern / rank_pattern, alpha / sqrt(r)
with rsLoRA) is folded into its B when the expert is read, so nothing downstream needs per-expert
scalars; the slots pad every module's rank to the largest rank R with zeros (which changes no B·A).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters import AdapterError, read_adapter
from ..adapters.format import parse_lora_key

log = logging.getLogger(__name__)


class RoutingError(ValueError):
    """A route, an expert or an expert set cannot be used; the message names the problem."""


@dataclass
class LoraExpert:
    """One LoRA adapter as a routing expert. `A[module]` is [r_m, in] and `B[module]` is [out, r_m]
    (float32) for the full module path inside the base model, with the module's scaling already
    folded into B. Ranks may differ per module; `r` is the largest. An expert may adapt any subset
    of modules (some projections, some layers)."""

    name: str
    object_id: str | None
    r: int
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    card: dict | None = None
    # where derived data (Arrow prototypes) is cached; None for experts read from plain directories
    library: object | None = field(default=None, repr=False, compare=False)
    scaling: float = 1.0  # always 1.0: the scaling is part of B
    version: int | None = None  # the library version (None: read from a plain directory)


def expert_from_parts(name: str, cfg, tensors: dict[str, torch.Tensor], card: dict | None = None,
                      object_id: str | None = None, library=None) -> LoraExpert:
    """An expert from `read_adapter`'s result (config, tensors under their file names, card)."""
    if cfg.type != "lora":
        raise RoutingError(f"adapter {name} is a {cfg.type} adapter; only LoRA adapters can be routing experts")
    A: dict[str, torch.Tensor] = {}
    B: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        parsed = parse_lora_key(key)
        if parsed is None:
            raise RoutingError(f"adapter {name} holds tensor {key!r}, which is not a LoRA A or B weight")
        (A if parsed[3] == "A" else B)[parsed[0]] = t.to(torch.float32)
    if set(A) != set(B):
        odd = sorted(set(A) ^ set(B))[0]
        raise RoutingError(f"adapter {name} has only one of lora_A / lora_B for module {odd}")
    if not A:
        raise RoutingError(f"adapter {name} holds no LoRA tensors")
    if cfg.modules is not None and set(cfg.modules) != set(A):
        raise RoutingError(f"adapter {name}: its config describes other modules than its tensors hold")
    for m in A:
        r = cfg.module_rank(m)
        if A[m].dim() != 2 or B[m].dim() != 2 or A[m].shape[0] != r or B[m].shape[1] != r:
            raise RoutingError(f"adapter {name}: module {m} has lora_A {list(A[m].shape)} and lora_B "
                               f"{list(B[m].shape)}, which do not fit rank {r}")
        B[m] = B[m] * cfg.module_scaling(m)
        if not torch.isfinite(B[m]).all():
            raise RoutingError(f"adapter {name}: module {m} has non-finite weights once scaled")
    return LoraExpert(name=name, object_id=object_id, r=max(a.shape[0] for a in A.values()), A=A, B=B,
                      card=card, library=library)


def library_record(library, ref: str):
    """The library's record for `name` or `name@version`; RoutingError if there is none."""
    from ..library import LibraryError

    name, _, version = str(ref).partition("@")
    try:
        return library.get(name, int(version) if version else None)
    except ValueError as e:  # LibraryError, or a version that is not a number
        msg = str(e) if isinstance(e, LibraryError) else f"bad version in {ref!r}"
        raise RoutingError(f"unknown expert {ref!r}: {msg}") from None


def check_base(name: str, base_id: str | None, card: dict | None, fingerprint: dict | None) -> None:
    """RoutingError if the adapter was made for another base than `fingerprint`'s (None: no check)."""
    if fingerprint is None:
        return
    from ..base import BaseModelError, check_fingerprint

    card_fp = (card or {}).get("base_fingerprint")
    if isinstance(card_fp, dict) and card_fp.get("id"):
        try:
            check_fingerprint(card_fp, fingerprint, what=f"adapter {name}")
        except BaseModelError as e:
            raise RoutingError(str(e)) from None
    elif base_id and base_id != fingerprint.get("id"):
        raise RoutingError(f"adapter {name} was made for another base model (base id {base_id}, "
                           f"this base is {fingerprint.get('id')})")


def cache_derived(library, object_id: str, kind: str, blob: bytes) -> None:
    """Store derived data (Arrow prototypes, retrieval vectors) in the library's cache; a cache
    that cannot be written (disk full, read-only storage, the adapter removed meanwhile) costs a
    recomputation next time, never the request."""
    import sqlite3

    try:
        library.put_derived(object_id, kind, blob)
    except ValueError:  # the adapter was removed while we computed it: nothing to cache
        pass
    except (OSError, sqlite3.Error) as e:
        logging.getLogger("modulora").warning("could not cache %s for %s: %s", kind, object_id, e)


def normalise_route(route: dict[str, float], check_name) -> dict[str, float]:
    """A sequence-level route checked (`check_name(name)` raises for unknown names; finite weights
    > 0) and scaled to sum 1. Shared by the LoRA expert set and the other adapter families."""
    if not isinstance(route, dict):
        raise RoutingError(f"a sequence-level route is a dict of expert name -> weight, got "
                           f"{type(route).__name__}")
    if not route:
        raise RoutingError("a route names no experts (use None for the base model alone)")
    for name, w in route.items():
        check_name(name)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise RoutingError(f"route weight for {name} must be a finite number > 0, got {w!r}")
    total = float(sum(route.values()))
    return {n: float(w) / total for n, w in route.items()}


def load_experts(library, names: list[str] | None = None, fingerprint: dict | None = None) -> list[LoraExpert]:
    """LoRA experts from a library: the latest version of every LoRA adapter, sorted by name, or
    the named ones (`name` or `name@version`) in the order given.

    With `fingerprint` (see `modulora.base.fingerprint`), adapters made for another base are refused.
    Unknown names, a non-LoRA adapter named explicitly, an empty library -> RoutingError. With
    `names=None` an adapter that cannot be read or used is left out with a warning, so that one bad
    adapter never breaks the routes to the others; a named one raises RoutingError.
    """
    if names is None:
        records = [r for r in library.list() if r.type == "lora"]
        if not records:
            what = "is empty" if not library.list() else "holds no LoRA adapters"
            raise RoutingError(f"the library at {library.root} {what}; add LoRA adapters before routing")
    else:
        names = list(names)
        if not names:
            raise RoutingError("no expert names given (pass None for every LoRA adapter in the library)")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise RoutingError(f"expert {dupes[0]} is named more than once")
        records = []
        for ref in names:
            rec = library_record(library, ref)
            if rec.type != "lora":
                raise RoutingError(f"adapter {ref} is a {rec.type} adapter; only LoRA adapters can be routing "
                                   "experts")
            records.append(rec)
    experts, skipped = [], []
    for rec in records:
        try:
            experts.append(_library_expert(library, rec, fingerprint))
        except RoutingError as e:
            if names is not None:
                raise
            log.warning("leaving adapter %s out of the routing experts: %s", rec.ref, e)
            skipped.append(str(e))
    if not experts:
        raise RoutingError(f"none of the {len(records)} LoRA adapter(s) in the library at {library.root} can be "
                           f"used for routing; the first: {skipped[0]}")
    return experts


def read_record(rec, fingerprint: dict | None) -> tuple:
    """(config, tensors, card) of a library record, checked against the base; RoutingError when
    it cannot be read, also when it was removed from the library since it was listed."""
    from ..library import LibraryError

    try:
        card = rec.card
        check_base(rec.name, rec.base_id, card, fingerprint)
        cfg, tensors, own = read_adapter(rec.path)
    except (AdapterError, LibraryError) as e:
        raise RoutingError(f"cannot read adapter {rec.ref}: {e}") from None
    return cfg, tensors, own if own is not None else card


def _library_expert(library, rec, fingerprint: dict | None) -> LoraExpert:
    cfg, tensors, card = read_record(rec, fingerprint)
    e = expert_from_parts(rec.name, cfg, tensors, card, object_id=rec.object_id, library=library)
    e.version = rec.version
    return e


def load_experts_from_dirs(paths, names: list[str] | None = None,
                           fingerprint: dict | None = None) -> list[LoraExpert]:
    """Experts read straight from adapter directories (tests, benchmarks); named after the
    directories unless `names` is given. They have no object id, so nothing is cached."""
    paths = [Path(p) for p in paths]
    names = [p.name for p in paths] if names is None else list(names)
    if len(names) != len(paths):
        raise RoutingError(f"{len(paths)} adapter directories but {len(names)} names")
    if len(set(names)) != len(names):
        raise RoutingError("expert names must be distinct: " + ", ".join(names))
    experts = []
    for name, p in zip(names, paths):
        try:
            cfg, tensors, card = read_adapter(p)
        except AdapterError as e:
            raise RoutingError(f"cannot read adapter {name} at {os.fspath(p)}: {e}") from None
        check_base(name, None, card, fingerprint)
        experts.append(expert_from_parts(name, cfg, tensors, card))
    return experts


from .slots import ExpertSet  # noqa: E402,F401  (re-exported: a fixed set of experts in slots; slots.py imports this module)
