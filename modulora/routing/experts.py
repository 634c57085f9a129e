"""The experts a router chooses among: LoRA adapters read from a library (or from directories),
checked against the base, and stacked per module so that one layer can serve all of them.

    experts = load_experts(library, fingerprint=base.fingerprint)   # all LoRAs, sorted by name
    expert_set = ExpertSet(experts)          # A[module]: [E, R, in], B[module]: [E, out, R]

Ranks are padded to the largest rank R with zeros (which changes no product B·A) and each
expert's scaling (alpha / r) is folded into its B, so the layer never needs per-expert scalars.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters import AdapterError, read_adapter
from ..adapters.peft_format import PEFT_PREFIX


class RoutingError(ValueError):
    """A route, an expert or an expert set cannot be used; the message names the problem."""


@dataclass
class LoraExpert:
    """One LoRA adapter as a routing expert. `A[module]` is [r, in], `B[module]` is [out, r]
    (unscaled, as stored), where `module` is the full module path inside the base model."""

    name: str
    object_id: str | None
    r: int
    scaling: float
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    card: dict | None = None
    # where derived data (Arrow prototypes) is cached; None for experts read from plain directories
    library: object | None = field(default=None, repr=False, compare=False)


def expert_from_parts(name: str, cfg, tensors: dict[str, torch.Tensor], card: dict | None = None,
                      object_id: str | None = None, library=None) -> LoraExpert:
    """An expert from `read_adapter`'s result (config, tensors under their file names, card)."""
    if cfg.type != "lora":
        raise RoutingError(f"adapter {name} is a {cfg.type} adapter; only LoRA adapters can be routing experts")
    A: dict[str, torch.Tensor] = {}
    B: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        body = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        module, _, part = body.rpartition(".lora_")
        if part == "A.weight":
            A[module] = t
        elif part == "B.weight":
            B[module] = t
        else:
            raise RoutingError(f"adapter {name} holds tensor {key!r}, which is not a LoRA A or B weight")
    if set(A) != set(B):
        odd = sorted(set(A) ^ set(B))[0]
        raise RoutingError(f"adapter {name} has only one of lora_A / lora_B for module {odd}")
    if not A:
        raise RoutingError(f"adapter {name} holds no LoRA tensors")
    for m in A:
        if A[m].dim() != 2 or B[m].dim() != 2 or A[m].shape[0] != cfg.r or B[m].shape[1] != cfg.r:
            raise RoutingError(f"adapter {name}: module {m} has lora_A {list(A[m].shape)} and lora_B "
                               f"{list(B[m].shape)}, which do not fit rank {cfg.r}")
    return LoraExpert(name=name, object_id=object_id, r=cfg.r, scaling=float(cfg.scaling), A=A, B=B,
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
    Unknown names, a non-LoRA adapter named explicitly, an empty library -> RoutingError.
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
    experts = []
    for rec in records:
        check_base(rec.name, rec.base_id, rec.card, fingerprint)
        try:
            cfg, tensors, card = read_adapter(rec.path)
        except AdapterError as e:
            raise RoutingError(f"cannot read adapter {rec.ref}: {e}") from None
        experts.append(expert_from_parts(rec.name, cfg, tensors, card if card is not None else rec.card,
                                         object_id=rec.object_id, library=library))
    return experts


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


class ExpertSet:
    """Experts stacked per module: `A[module]` [E, R, in] and `B[module]` [E, out, R] (a view of
    the contiguous `Bt[module]` [E, R, out]), ranks zero-padded to R, scaling folded into B.

    Every expert must adapt the same modules with the same shapes (else RoutingError naming both).
    """

    def __init__(self, experts: list[LoraExpert], dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        experts = list(experts)
        if not experts:
            raise RoutingError("an expert set needs at least one expert (the library holds no LoRA adapters?)")
        names = [e.name for e in experts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise RoutingError(f"expert {dupes[0]} appears more than once in the expert set")
        first = experts[0]
        for e in experts[1:]:
            if set(e.A) != set(first.A):
                only_first = sorted(set(first.A) - set(e.A))
                only_e = sorted(set(e.A) - set(first.A))
                detail = (f"{first.name} adapts {only_first[0]}, which {e.name} does not" if only_first
                          else f"{e.name} adapts {only_e[0]}, which {first.name} does not")
                raise RoutingError(f"experts {first.name} and {e.name} adapt different modules ({detail}); "
                                   "routing needs experts with the same target modules")
            for m in first.A:
                if e.A[m].shape[1] != first.A[m].shape[1] or e.B[m].shape[0] != first.B[m].shape[0]:
                    raise RoutingError(
                        f"experts {first.name} and {e.name} disagree on the shape of {m}: "
                        f"[{first.B[m].shape[0]}, {first.A[m].shape[1]}] vs [{e.B[m].shape[0]}, {e.A[m].shape[1]}]")
        for e in experts:
            if not (math.isfinite(e.scaling)):
                raise RoutingError(f"expert {e.name} has a non-finite scaling {e.scaling}")
        self.experts = experts
        self.names = names
        self._index = {n: i for i, n in enumerate(names)}
        self.ranks = [e.r for e in experts]
        self.rank = R = max(self.ranks)
        self.modules = sorted(first.A)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else first.A[self.modules[0]].device
        self.A: dict[str, torch.Tensor] = {}
        self.Bt: dict[str, torch.Tensor] = {}
        E = len(experts)
        for m in self.modules:
            d_in, d_out = first.A[m].shape[1], first.B[m].shape[0]
            A = torch.zeros(E, R, d_in, dtype=dtype, device=self.device)
            Bt = torch.zeros(E, R, d_out, dtype=dtype, device=self.device)
            for i, e in enumerate(experts):
                A[i, :e.r] = e.A[m].to(A)
                Bt[i, :e.r] = (e.B[m].to(torch.float32) * e.scaling).T.to(Bt)
            self.A[m], self.Bt[m] = A, Bt
        self.B = {m: bt.transpose(1, 2) for m, bt in self.Bt.items()}
        self._cache: dict = {}  # derived per-set data (Arrow prototypes)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"ExpertSet({len(self)} experts, rank {self.rank}, {len(self.modules)} modules)"

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            shown = ", ".join(self.names[:20]) + (", ..." if len(self.names) > 20 else "")
            raise RoutingError(f"unknown expert {name!r} (have: {shown})") from None

    def shape(self, module: str) -> tuple[int, int]:
        """[out, in] of a module."""
        return self.Bt[module].shape[2], self.A[module].shape[2]

    def normalise(self, route: dict[str, float]) -> dict[str, float]:
        """A sequence-level route checked (known names, finite weights > 0) and scaled to sum 1."""
        return normalise_route(route, self.index)
