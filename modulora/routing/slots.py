"""LoRA experts in preallocated slots: loading copies one expert into a free slot, evicting frees
it; nothing else moves (vLLM's `set_lora` / `reset_lora` work this way).

    slots = ExpertSlots(capacity=8)
    slots.load(expert)              # -> its slot index; A[m][slot, :r] = A, Bt[m][slot, :r] = B^T
    slots.evict("geo")
    slots.A[module]                 # [capacity, R, in]; slot rows of free slots and of experts
    slots.Bt[module]                # [capacity, R, out]  that do not adapt `module` are zero

Experts may adapt different modules and have different ranks: a module's tensors are allocated
when the first expert adapting it arrives, ranks are zero-padded to the largest (R grows, by
one reallocation, when a larger rank arrives), and an expert contributes exactly nothing where it
has no weights. `present[module]` [capacity] marks the slots whose expert adapts the module, so
Arrow does not pick an expert at a module it does not touch. With `capacity=None` the slots grow
by doubling when full (amortised: a load never re-copies the set every time).

The slots quack like the old stacked `ExpertSet`: `names` (None for a free slot), `index`,
`normalise`, `rank`, `modules`, `shape`, `dtype`, `device`, `len()` (the capacity), so the
multi-expert layer (layer.py) and Arrow (arrow.py) work on them unchanged.
"""

from __future__ import annotations

import torch

from .experts import LoraExpert, RoutingError, normalise_route


class ExpertSlots:
    """A fixed number of expert slots per adapted module (see the module docstring)."""

    def __init__(self, capacity: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", rank: int = 8):
        if capacity is not None and capacity < 1:
            raise RoutingError(f"an expert store needs at least one slot, got {capacity}")
        self.bound = capacity  # None: grows on demand
        self.capacity = capacity or 4
        self.dtype, self.device = dtype, torch.device(device)
        self.rank = rank
        self.names: list[str | None] = [None] * self.capacity
        self.experts: list[LoraExpert | None] = [None] * self.capacity
        self._index: dict[str, int] = {}
        self.A: dict[str, torch.Tensor] = {}
        self.Bt: dict[str, torch.Tensor] = {}
        self.present: dict[str, torch.Tensor] = {}
        # (prototype kind, module) -> [capacity, in], filled per slot on demand; (kind, slot) done
        self._protos: dict[tuple[str, str], torch.Tensor] = {}
        self._proto_done: set[tuple[str, int]] = set()
        self.version = 0  # bumped on every change: plans and caches built on the old contents are stale
        self._copies: dict[tuple[str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}  # stacks()

    # -- the old ExpertSet's surface -----------------------------------------------------------

    def __len__(self) -> int:
        return self.capacity

    def __repr__(self) -> str:
        return f"ExpertSlots({len(self._index)}/{self.capacity} used, rank {self.rank}, {len(self.A)} modules)"

    @property
    def modules(self) -> list[str]:
        return sorted(self.A)

    def occupied(self) -> list[int]:
        return sorted(self._index.values())

    def loaded(self) -> list[str]:
        return sorted(self._index)

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            have = self.loaded()
            shown = ", ".join(have[:20]) + (", ..." if len(have) > 20 else "")
            raise RoutingError(f"unknown expert {name!r} (have: {shown or 'none loaded'})") from None

    def shape(self, module: str) -> tuple[int, int]:
        """[out, in] of a module."""
        return self.Bt[module].shape[2], self.A[module].shape[2]

    def normalise(self, route: dict[str, float]) -> dict[str, float]:
        return normalise_route(route, self.index)

    # -- loading and evicting ------------------------------------------------------------------

    def load(self, expert: LoraExpert) -> int:
        """Copy `expert` into a free slot (replacing a loaded expert of the same name); its slot."""
        if expert.name in self._index:
            self.evict(expert.name)
        r = max(a.shape[0] for a in expert.A.values())
        if r > self.rank:
            self._grow(self.capacity, r)
        free = [i for i, n in enumerate(self.names) if n is None]
        if not free:
            if self.bound is not None:
                raise RoutingError(f"all {self.capacity} expert slots are in use; evict one first")
            self._grow(self.capacity * 2, self.rank)
            free = [i for i, n in enumerate(self.names) if n is None]
        slot = free[0]
        for m, a in expert.A.items():
            if m not in self.A:
                self._add_module(m, a.shape[1], expert.B[m].shape[0])
            out, d_in = self.shape(m)
            if (expert.B[m].shape[0], a.shape[1]) != (out, d_in):
                raise RoutingError(f"expert {expert.name} adapts {m} as [{expert.B[m].shape[0]}, {a.shape[1]}] but "
                                   f"the loaded experts have [{out}, {d_in}]; was it made for another base model?")
        for m in self.A:
            self.A[m][slot].zero_()
            self.Bt[m][slot].zero_()
            self.present[m][slot] = m in expert.A
        for m, a in expert.A.items():
            self.A[m][slot, :a.shape[0]] = a.to(self.A[m])
            scaled = expert.B[m].to(torch.float32) * float(getattr(expert, "scaling", 1.0))
            self.Bt[m][slot, :a.shape[0]] = scaled.T.to(self.Bt[m])
        self._copy_slot(slot)
        self.names[slot], self.experts[slot] = expert.name, expert
        self._index[expert.name] = slot
        self._proto_done = {d for d in self._proto_done if d[1] != slot}
        self.version += 1
        return slot

    def evict(self, name: str) -> None:
        """Free `name`'s slot (its rows are zeroed, so a stale index can only add nothing)."""
        slot = self._index.pop(name, None)
        if slot is None:
            return
        for m in self.A:
            self.A[m][slot].zero_()
            self.Bt[m][slot].zero_()
            self.present[m][slot] = False
        self._copy_slot(slot)
        self.names[slot], self.experts[slot] = None, None
        self._proto_done = {d for d in self._proto_done if d[1] != slot}
        self.version += 1

    def _add_module(self, m: str, d_in: int, d_out: int) -> None:
        kw = dict(dtype=self.dtype, device=self.device)
        self.A[m] = torch.zeros(self.capacity, self.rank, d_in, **kw)
        self.Bt[m] = torch.zeros(self.capacity, self.rank, d_out, **kw)
        self.present[m] = torch.zeros(self.capacity, dtype=torch.bool, device=self.device)
        self._protos = {k: v for k, v in self._protos.items() if k[1] != m}
        self._proto_done.clear()

    def _grow(self, capacity: int, rank: int) -> None:
        """Reallocate every module's slots to `capacity` x `rank` (rare: a larger rank, or an
        unbounded store that is full), keeping what is loaded where it is."""
        def widen(t: torch.Tensor) -> torch.Tensor:
            new = t.new_zeros((capacity, rank) + tuple(t.shape[2:]))
            new[:t.shape[0], :t.shape[1]] = t
            return new

        for m in self.A:
            self.A[m], self.Bt[m] = widen(self.A[m]), widen(self.Bt[m])
            p = self.present[m].new_zeros(capacity)
            p[:self.capacity] = self.present[m]
            self.present[m] = p
        extra = capacity - self.capacity
        self.names += [None] * extra
        self.experts += [None] * extra
        self.capacity, self.rank = capacity, rank
        self._copies.clear()
        self._protos.clear()
        self._proto_done.clear()
        self.version += 1

    def stacks(self, module: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The module's A and Bt stacks in `dtype`: a prompt whose activations are bf16 (a bf16 base)
        multiplies its experts in bf16, 3-4x faster than casting to fp32 and back on a CPU with AMX.
        Copies are made once per module and dtype; a load or an evict rewrites its slot in them."""
        if dtype == self.dtype:
            return self.A[module], self.Bt[module]
        key = (module, dtype)
        if key not in self._copies:
            with torch.inference_mode(False):  # made in a forward, updated by later loads outside one
                self._copies[key] = (self.A[module].to(dtype), self.Bt[module].to(dtype))
        return self._copies[key]

    def _copy_slot(self, slot: int) -> None:
        """Bring one slot of the existing stacks() copies up to date (a server loads and evicts
        experts while it runs: copying one slot, not every slot again)."""
        for (m, _), (A, Bt) in self._copies.items():
            A[slot] = self.A[m][slot]
            Bt[slot] = self.Bt[m][slot]

    # -- Arrow ---------------------------------------------------------------------------------

    def prototypes(self, kind: str = "product") -> dict[str, torch.Tensor]:
        """module -> [capacity, in] Arrow prototypes of `kind` (see `arrow.PROTOTYPES`; "spectral":
        [capacity, rank, in]; zero for free slots, absent modules and the rank's padding); each
        loaded expert's are computed (or read from its library's cache) once."""
        from .arrow import expert_prototypes

        out = {}
        for m in self.A:
            if (kind, m) not in self._protos:
                shape = self.A[m].shape if kind == "spectral" else (self.capacity, self.A[m].shape[2])
                self._protos[(kind, m)] = torch.zeros(shape, dtype=self.dtype, device=self.device)
            out[m] = self._protos[(kind, m)]
        for slot in self.occupied():
            if (kind, slot) in self._proto_done:
                continue
            protos = expert_prototypes(self.experts[slot], kind)
            for m in self.A:
                out[m][slot] = 0
                if m in protos:
                    out[m][slot][:len(protos[m])] = protos[m].to(out[m])
            self._proto_done.add((kind, slot))
        return out


class ExpertSet(ExpertSlots):
    """A given list of experts in exactly as many slots, in that order (a one-off batch, tests,
    benchmarks). RoutingError for an empty list or a name given twice."""

    def __init__(self, experts: list[LoraExpert], dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        experts = list(experts)
        if not experts:
            raise RoutingError("an expert set needs at least one expert (the library holds no LoRA adapters?)")
        names = [e.name for e in experts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise RoutingError(f"expert {dupes[0]} appears more than once in the expert set")
        if device is None:
            device = next(iter(experts[0].A.values())).device
        super().__init__(len(experts), dtype=dtype, device=device, rank=max(e.r for e in experts))
        for e in experts:
            self.load(e)


__all__ = ["ExpertSlots", "ExpertSet"]
