"""The LoRA experts in memory: a bounded set of slots, least recently used evicted, that lets a
server answer from a library larger than it can hold at once.

    resident = ResidentExperts(library, base.fingerprint, capacity=4)
    if resident.fits({"geo", "math"}, pinned=names_in_use):
        resident.ensure({"geo", "math"}, pinned=names_in_use)
    resident.slots            # the ExpertSlots the multi-expert layers read

`ensure` reads the experts that are not resident (misses) and copies each into a free slot
(`slots.ExpertSlots.load`), evicting the least recently used ones that no running request uses
(`pinned`) to make room; nothing else is copied. An expert whose library version changed
(re-uploaded, deleted) is dropped at the next look-up unless a running request still uses it; a
request for the new version then waits for that one. A request may want given versions (`pins`:
name -> (version, object id), what the library held when the request arrived): those are loaded
instead of the latest, and if the library no longer holds one the request is refused.

Routes that choose among the whole library need the whole library resident: Arrow (per token,
from every expert's prototype) and `uniform`. With more LoRA adapters than `capacity` they
cannot run, and callers refuse them (`needs_all_message`); fixed routes (`a`, `a,b`, `a:0.7,b:0.3`)
and the sequence policies (retrieval, learned: their choice is known before generation, so only
the chosen experts are loaded) serve from any library size.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from .experts import LoraExpert, RoutingError, load_experts
from .slots import ExpertSlots


class ResidentExperts:
    """LoRA experts of one library in slots, at most `capacity` of them (None: no bound)."""

    def __init__(self, library=None, fingerprint: dict | None = None, capacity: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if capacity is not None and capacity < 1:
            raise ValueError(f"the resident-expert bound must be at least 1, got {capacity}")
        self.library, self.fingerprint, self.capacity = library, fingerprint, capacity
        self.slots = ExpertSlots(capacity, dtype=dtype, device=device)
        self._lru: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()  # stats are read by /metrics from another thread
        self.hits = self.misses = self.evictions = 0

    def lora_names(self) -> list[str]:
        """The library's LoRA adapters (latest versions), sorted by name."""
        return [r.name for r in self.library.list() if r.type == "lora"]

    def _object_id(self, name: str) -> str | None:
        e = self.slots.experts[self.slots.index(name)]
        return e.object_id

    def _wanted(self, pins: dict[str, tuple[int, str]] | None) -> dict[str, str | None]:
        """name -> the object id a request wants: its pinned one, else the library's latest."""
        ids = dict(self.library.latest_object_ids())
        ids.update({n: oid for n, (_, oid) in (pins or {}).items()})
        return ids

    def fits(self, needed: set[str], pinned: set[str], pins: dict[str, tuple[int, str]] | None = None) -> bool:
        """Whether `needed` can be resident together with the experts running requests use.

        False too while a pinned expert is another version of a needed one (the names clash)."""
        if self.capacity is not None and len(needed | pinned) > self.capacity:
            return False
        want = self._wanted(pins)
        return not any(n in pinned and n in self._lru and self._object_id(n) != want.get(n) for n in needed)

    def ensure(self, needed: set[str], pinned: set[str] = frozenset(),
               pins: dict[str, tuple[int, str]] | None = None) -> None:
        """Make `needed` resident (from the library; the versions in `pins` where given) beside
        `pinned`. RoutingError for unknown names, unreadable adapters, a pinned version the
        library no longer holds, or more than fit."""
        want = self._wanted({n: v for n, v in (pins or {}).items() if n in needed})
        for name in list(self._lru):  # stale copies nobody uses any more
            if name not in pinned and self._object_id(name) != want.get(name):
                self._evict(name, counted=False)
        missing = []
        with self._lock:
            for name in sorted(needed):
                if name in self._lru:
                    self.hits += 1
                    self._lru.move_to_end(name)
                else:
                    missing.append(name)
        if missing:
            pins = {n: pins[n] for n in missing if n in (pins or {})}
            self.check_pins(pins)
            refs = [f"{n}@{pins[n][0]}" if n in pins else n for n in missing]
            loaded = load_experts(self.library, refs, fingerprint=self.fingerprint)  # disk: outside the lock
            self.put(loaded, keep=set(needed) | set(pinned))
            with self._lock:
                self.misses += len(loaded)

    def check_pins(self, pins: dict[str, tuple[int, str]]) -> None:
        """RoutingError if the library no longer holds a pinned version (deleted, or the name
        removed and added again)."""
        from ..library import LibraryError

        for name, (version, oid) in pins.items():
            try:
                same = self.library.get(name, version).object_id == oid
            except LibraryError:
                same = False
            if not same:
                raise pin_gone(name, version, "deleted or replaced")

    def put(self, experts: list[LoraExpert], keep: set[str] = frozenset()) -> None:
        """Copy `experts` into slots (an expert object already in its slot stays), evicting least
        recently used ones not in `keep` for room."""
        keep = set(keep) | {e.name for e in experts}
        for e in experts:
            if e.name in self._lru and self.slots.experts[self.slots.index(e.name)] is e:
                with self._lock:  # already in its slot: nothing to copy
                    self._lru.move_to_end(e.name)
                continue
            if self.capacity is not None and e.name not in self._lru and len(self._lru) >= self.capacity:
                victim = next((n for n in self._lru if n not in keep), None)
                if victim is None:
                    raise RoutingError(f"{len(keep)} experts are needed at once but at most {self.capacity} "
                                       "can be resident (--max-resident-experts)")
                self._evict(victim)
            self.slots.load(e)
            with self._lock:
                self._lru[e.name] = None
                self._lru.move_to_end(e.name)

    def _evict(self, name: str, counted: bool = True) -> None:
        self.slots.evict(name)
        with self._lock:
            self._lru.pop(name, None)
            if counted:
                self.evictions += 1

    def needs_all_message(self, route: str, count: int) -> str | None:
        """Why a route that needs every LoRA adapter (`count` of them) cannot run; None if it can."""
        if self.capacity is None or count <= self.capacity:
            return None
        return (f"route {route!r} chooses among all {count} LoRA adapters of the library, but this server keeps "
                f"at most {self.capacity} resident (--max-resident-experts); name the adapters instead, or use "
                "retrieval or learned, which load only the ones they pick")

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "resident": len(self._lru), "capacity": self.capacity or 0}


def pin_gone(name: str, version: int, what: str) -> RoutingError:
    """The error of a request whose adapter version was `what` ("replaced", ...) while it waited."""
    return RoutingError(f"adapter {name} (version {version}, the one this request arrived with) was {what} while "
                        "it waited; send the request again to use what the library holds now")


__all__ = ["ResidentExperts", "RoutingError", "pin_gone"]
