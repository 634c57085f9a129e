"""A bounded cache of LoRA experts in memory, least recently used evicted: what lets a server
answer from a library larger than it can hold at once.

    resident = ResidentExperts(library, base.fingerprint, capacity=4)
    if resident.fits({"geo", "math"}, pinned=names_in_use):
        expert_set = resident.expert_set({"geo", "math"}, pinned=names_in_use)

`expert_set` reads the experts a batch needs that are not resident (misses), evicts the least
recently used ones that no running request uses (`pinned`) until at most `capacity` remain, and
returns one ExpertSet stacking every resident expert (rebuilt only when that set changed). An
expert whose library version changed (re-uploaded, deleted) is dropped at the next look-up
unless a running request still uses it; a request for the new version then waits for that one.

Routes that choose among the whole library need the whole library resident: Arrow (per token,
from every expert's prototype) and `uniform`. With more LoRA adapters than `capacity` they
cannot run, and callers refuse them (`needs_all_message`); fixed routes (`a`, `a,b`, `a:0.7,b:0.3`)
and the sequence policies (retrieval, learned: their choice is known before generation, so only
the chosen experts are loaded) serve from any library size.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from .experts import ExpertSet, LoraExpert, RoutingError, load_experts


class ResidentExperts:
    """LoRA experts of one library in memory, at most `capacity` of them (None: no bound)."""

    def __init__(self, library, fingerprint: dict | None = None, capacity: int | None = None):
        if capacity is not None and capacity < 1:
            raise ValueError(f"the resident-expert bound must be at least 1, got {capacity}")
        self.library, self.fingerprint, self.capacity = library, fingerprint, capacity
        self._experts: OrderedDict[str, LoraExpert] = OrderedDict()  # least recently used first
        self._set: ExpertSet | None = None
        self._lock = threading.Lock()  # stats are read by /metrics from another thread
        self.hits = self.misses = self.evictions = 0

    def lora_names(self) -> list[str]:
        """The library's LoRA adapters (latest versions), sorted by name."""
        return [r.name for r in self.library.list() if r.type == "lora"]

    def fits(self, needed: set[str], pinned: set[str]) -> bool:
        """Whether `needed` can be resident together with the experts running requests use.

        False too while a pinned expert is an older version of a needed one (the names clash)."""
        if self.capacity is not None and len(needed | pinned) > self.capacity:
            return False
        ids = self.library.latest_object_ids()
        return not any(n in pinned and n in self._experts and self._experts[n].object_id != ids.get(n)
                       for n in needed)

    def expert_set(self, needed: set[str], pinned: set[str] = frozenset()) -> ExpertSet | None:
        """An ExpertSet holding (at least) `needed` and `pinned`; None when both are empty and
        nothing is resident. RoutingError for unknown names or experts that cannot be stacked."""
        ids = self.library.latest_object_ids()
        changed = False
        with self._lock:
            for name in list(self._experts):  # stale copies nobody uses any more
                if name not in pinned and self._experts[name].object_id != ids.get(name):
                    del self._experts[name]
                    changed = True
            missing = []
            for name in sorted(needed):
                if name in self._experts:
                    self.hits += 1
                    self._experts.move_to_end(name)
                else:
                    missing.append(name)
        if missing:
            loaded = load_experts(self.library, missing, fingerprint=self.fingerprint)  # outside the lock: disk
            with self._lock:
                self.misses += len(loaded)
                for e in loaded:
                    self._experts[e.name] = e
            changed = True
        with self._lock:
            keep = needed | pinned
            if self.capacity is not None:
                for name in list(self._experts):
                    if len(self._experts) <= self.capacity:
                        break
                    if name not in keep:
                        del self._experts[name]
                        self.evictions += 1
                        changed = True
            names = sorted(self._experts)
            if not names:
                self._set = None
                return None
            if changed or self._set is None or self._set.names != names:
                self._set = ExpertSet([self._experts[n] for n in names])
            return self._set

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
                    "resident": len(self._experts), "capacity": self.capacity or 0}


__all__ = ["ResidentExperts", "RoutingError"]
