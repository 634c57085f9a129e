"""The worker that owns the engine: queued prompts join a continuously running batch.

One worker thread; each prompt is one `_Item` in a bounded queue (full -> 429). Between two
decode steps the worker takes what waits, resolves the routes, makes sure the LoRA experts they
need are resident, prefills them in one pass and merges them into the running batch
(`modulora.routing.engine`); every sample leaves the batch the step it ends. LoRA, Arrow,
series, parallel, prefix and base rows share the one running batch.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..routing.api import Router
from ..routing.arrow import Arrow
from ..routing.engine import Engine
from ..routing.experts import RoutingError
from ..routing.requests import Answer, EngineRequest, SamplingParams, TokenEvent
from ..routing.resident import pin_gone
from .errors import APIError
from .metrics import Metrics
from .protocol import SPECIAL_MODELS

_log = logging.getLogger("modulora.serve")


@dataclass(eq=False)  # compared by identity
class _Item:
    """One prompt on its way through the scheduler: its token ids, the text a router reads
    (`query`: the user's own words), the route text, and how to sample."""

    prompt_ids: list[int]
    query: str
    route: str
    route_top_k: int = 1
    fallback: str | None = None  # retrieval / learned: the policy a request no expert fits gets
    arrow: tuple | None = None  # Arrow's settings, ((name, value), ...), for arrow routes and fallbacks
    mode: str = "mixture"
    params: SamplingParams = field(default_factory=SamplingParams)
    content_span: tuple[int, int] | None = None
    timeout: float | None = None  # seconds, for the error message
    deadline: float | None = None  # time.monotonic() past which the item gives up
    on_token: Callable[[TokenEvent], None] | None = None  # called in the worker thread
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    token_routing: bool = False  # report each generated token's experts
    stopped: str | None = None  # set by the handler: "client_disconnect", "timeout" or "abandoned"
    resolved: Any = None  # the route object, set by the worker
    decision: Any = None  # the abstention's Decision, set by the worker with `resolved`
    # name -> (version, object id) of every adapter the library held when the item arrived: the
    # versions it is answered with (set by `submit` unless given)
    pins: dict[str, tuple[int, str]] = field(default_factory=dict)
    requeued: int = 0  # times the library changed under its route between choosing and starting

    def stop_reason(self) -> str | None:
        """Why this item should stop now (None: keep going); read by the worker before each step."""
        if self.stopped:
            return self.stopped
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "timeout"
        return None


def _timeout_error(seconds: float | None) -> APIError:
    limit = f" of {seconds:g} s" if seconds is not None else ""
    return APIError(504, f"the request did not finish within its timeout{limit}; ask for fewer max_tokens "
                         "or a longer timeout", "timeout_error", param="timeout", code="request_timeout")


def _stop_error(item: _Item, reason: str) -> APIError:
    if reason == "timeout":
        return _timeout_error(item.timeout)
    return APIError(499, f"the request was stopped ({reason.replace('_', ' ')})", code=reason)


class Scheduler:
    """One worker thread that owns the model: queued prompts join a continuously running batch."""

    def __init__(self, base, library, max_batch: int = 16, batch_wait_ms: float = 10, queue_size: int = 64,
                 max_resident_experts: int | None = None, prefix_cache: int = 32, join_min: int = 8,
                 join_wait_steps: int = 3, prefill_chunk: int = 512):
        if max_batch < 1 or queue_size < 1:
            raise ValueError("max_batch and queue_size must be at least 1")
        if join_min < 1 or join_wait_steps < 0:
            raise ValueError("join_min must be at least 1 and join_wait_steps at least 0")
        self.base, self.router = base, Router(base, library)
        self.engine = Engine(base, library, max_resident=max_resident_experts, prefix_entries=prefix_cache,
                             prefill_chunk=prefill_chunk)
        self.resident = self.engine.experts
        self.max_batch, self.batch_wait = max_batch, batch_wait_ms / 1000.0
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.deferred: collections.deque[_Item] = collections.deque()  # resolved, waiting for expert room
        self._jobs: dict[int, _Item] = {}  # id(Job) -> its item, while admitted
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.batches = 0  # prefill passes (groups of prompts that joined together)
        self.steps = 0  # decode steps
        self.largest_batch = 0  # most rows in one pass
        self.metrics: Metrics = Metrics()
        # While rows are running, newcomers join in groups: a prefill has a fixed cost (every weight
        # is read once, as in a decode step) shared by the prompts it takes, so a few waiting
        # prompts wait up to `join_wait_steps` decode steps for `join_min` (or the free rows) to
        # gather. With nothing running they start at once (after `batch_wait_ms`).
        self.join_min, self.join_wait_steps = join_min, join_wait_steps
        self._holding_since: int | None = None  # the decode step at which waiting prompts were first held

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="modulora-serve-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        shutting = APIError(503, "the server is shutting down", "server_error")
        for req, _ in self.engine.clear("shutdown"):
            self._fail(self._jobs.pop(id(req), None), shutting)
        self.engine.release()
        while self.deferred:
            self._fail(self.deferred.popleft(), shutting)
        while True:
            try:
                self._fail(self.queue.get_nowait(), shutting)
            except queue.Empty:
                break

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def waiting(self) -> int:
        """Prompts not yet generating: queued, or resolved and waiting for room among the experts."""
        return self.queue.qsize() + len(self.deferred)

    def submit(self, items: list[_Item]) -> None:
        """Queue all items or none of them: 429 when the queue cannot take them all now, 400 when
        it never could (more items than it holds)."""
        if len(items) > self.queue.maxsize:
            raise APIError(400, f"prompt holds {len(items)} prompts; this server queues at most {self.queue.maxsize} "
                                "(--queue-size)", param="prompt")
        if not self.alive:
            raise APIError(503, "the server is not running", "server_error")
        with self.queue.mutex:
            room = self.queue.maxsize - len(self.queue.queue)
        if len(items) > room:
            raise APIError(429, f"the request queue is full ({self.queue.maxsize} waiting); retry shortly",
                           "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        pins = {r.name: (r.version, r.object_id) for r in self.router.library.list()}
        for item in items:
            item.pins = item.pins or pins
            try:
                self.queue.put_nowait(item)
            except queue.Full:  # raced with another handler: fail the rest of this request
                item.future.set_exception(APIError(429, "the request queue is full; retry shortly",
                                                   "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}))

    # -- the worker --------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._hold():
                    self._admit()
                if self.engine.busy:
                    rows = len(self.engine.rows)
                    finished = self.engine.step()
                    self.steps += 1
                    self.largest_batch = max(self.largest_batch, rows)
                    self.metrics.step(rows)
                    self._deliver(finished)
            except Exception as e:  # noqa: BLE001 - the worker must survive any failure of one step
                for req, _ in self.engine.clear("error"):
                    self._fail(self._jobs.pop(id(req), None), e)
                for item in list(self._jobs.values()):
                    self._fail(item, e)
                self._jobs.clear()

    def _hold(self) -> bool:
        """Whether to let waiting prompts gather for one more decode step before they join."""
        if not self.engine.busy:
            self._holding_since = None
            return False
        waiting = self.waiting()
        enough = min(self.join_min, self.max_batch - self.engine.load)
        if waiting == 0 or waiting >= enough:
            self._holding_since = None
            return waiting == 0
        if self._holding_since is None:
            self._holding_since = self.steps
        if self.steps - self._holding_since >= self.join_wait_steps:
            self._holding_since = None
            return False
        return True

    def _take(self, n: int, wait: bool) -> list[_Item]:
        """Up to n queued items; with `wait`, block briefly for the first and then `batch_wait` for more."""
        items: list[_Item] = []
        if n <= 0:
            return items
        if wait:
            try:
                items.append(self.queue.get(timeout=0.1))
            except queue.Empty:
                return items
            deadline = time.monotonic() + self.batch_wait
            while len(items) < n:
                left = deadline - time.monotonic()
                try:
                    items.append(self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait())
                except queue.Empty:
                    break
            return items
        while len(items) < n:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _admit(self) -> None:
        """Let waiting items join the running batch (between two decode steps)."""
        free = self.max_batch - self.engine.load
        if free <= 0:
            return
        idle = not self.engine.busy and not self.deferred
        fresh = [it for it in self._take(max(free - len(self.deferred), 0), wait=idle)
                 if it.future.set_running_or_notify_cancel()]
        if not fresh and not self.deferred:
            return
        reqs: list[EngineRequest] = []
        with self._admitting(fresh + list(self.deferred)):
            fresh = self._live(fresh)
            self._resolve(fresh)
            fresh = [it for it in fresh if not it.future.done()]
            candidates = self._live(list(self.deferred)) + fresh
            self.deferred.clear()
            reqs = self._prepare(candidates, free)
        if reqs:
            self._start(reqs)

    @contextlib.contextmanager
    def _admitting(self, items: list[_Item]):
        """An unexpected error while newcomers are resolved and their adapters loaded (a bug, a
        library changing underneath) fails those newcomers with 500, not the requests running."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - isolate the failure to the requests being admitted
            _log.exception("admitting %d request(s) failed", len(items))
            for it in items:
                self._fail(it, APIError(500, f"the request could not be admitted: {type(e).__name__}: {e}",
                                        "server_error"))
            self.deferred = collections.deque(it for it in self.deferred if not it.future.done())
            self._jobs = {k: it for k, it in self._jobs.items() if not it.future.done()}

    def _live(self, items: list[_Item]) -> list[_Item]:
        """The items still wanted; the others are answered with their stop reason."""
        out = []
        for it in items:
            reason = it.stop_reason()
            if reason:
                self._stopped(it, reason, 0)
            else:
                out.append(it)
        return out

    def _resolve(self, items: list[_Item]) -> None:
        """Set each item's route object; an item whose route fails is answered 400 alone."""
        by_k: dict[tuple, list[_Item]] = {}
        for it in items:
            by_k.setdefault((it.route_top_k, it.fallback, it.arrow), []).append(it)
        for group in by_k.values():
            try:
                self._resolve_group(group)
            except RoutingError:  # find which ones fail, answer the rest
                for it in group:
                    try:
                        self._resolve_group([it])
                    except RoutingError as e:
                        self._fail(it, APIError(400, str(e), param="model"))

    def _resolve_group(self, group: list[_Item]) -> None:
        """Resolve items of one route_top_k, fallback and Arrow settings together."""
        first = group[0]
        routes, decisions = self.router.resolve_traced([it.query for it in group], [it.route for it in group],
                                                       top_k=first.route_top_k, fallback=first.fallback,
                                                       arrow=dict(first.arrow) if first.arrow else None)
        for it, r, d in zip(group, routes, decisions):
            it.resolved, it.decision = r, d

    def _needs(self, it: _Item) -> set[str]:
        """The LoRA experts an item's rows use."""
        if isinstance(it.resolved, Arrow):
            return set(self.router.lora_names())
        types = self.router.adapter_types()
        return {n for n in it.resolved if types.get(n) == "lora"} if isinstance(it.resolved, dict) else set()

    def _family(self, items: list[_Item]) -> list[_Item]:
        """Give the engine the series, parallel and prefix adapters these items name; the items
        whose adapters cannot be read are answered 400 and left out."""
        ok = []
        for it in items:
            names = self.router.family_names(it.resolved if isinstance(it.resolved, dict) else ())
            try:
                if names:
                    self.engine.use_family(self.router.family_experts(names))
                ok.append(it)
            except RoutingError as e:
                self._fail(it, APIError(400, str(e), param="model"))
        return ok

    def _prepare(self, candidates: list[_Item], free: int) -> list[EngineRequest]:
        """The engine requests of the candidates that fit now, their experts resident; the rest
        wait in `deferred`, the ones that cannot run are answered."""
        admit, chosen = self._pick(candidates, free)
        admit = self._load(admit, chosen)
        reqs = []
        for it in self._family(admit):
            req = EngineRequest(it.prompt_ids, it.resolved, mode=it.mode, params=it.params,
                                content_span=it.content_span, on_token=it.on_token, should_stop=it.stop_reason,
                                token_routing=it.token_routing)
            try:
                self.engine.check(req)
            except RoutingError as e:
                if it.requeued < 2 and self._chose_deleted(it, self.router.library.latest_object_ids()):
                    it.requeued += 1  # deleted since its choice: `_pick` resolves it again at the next admission
                    self.deferred.append(it)
                    continue
                self._fail(it, APIError(400, str(e), param="model" if "expert" in str(e) else None))
                continue
            self._jobs[id(req)] = it
            reqs.append(req)
        return reqs

    def _start(self, reqs: list[EngineRequest]) -> None:
        """Prefill the prepared requests into the running batch."""
        try:
            finished = self.engine.add(reqs)
        except RoutingError as e:  # checked one by one above; a batch can still be refused whole
            for req in reqs:
                self._fail(self._jobs.pop(id(req), None), APIError(400, str(e)))
            return
        self.batches += 1
        self.largest_batch = max(self.largest_batch, sum(r.params.n for r in reqs))
        self.metrics.batch(len(reqs), sum(len(r.prompt) for r in reqs))
        self._deliver(finished)

    def _pick(self, candidates: list[_Item], free: int) -> tuple[list[_Item], dict[str, tuple[int, str]]]:
        """(the candidates that fit now, in order; the adapter versions they are pinned to)."""
        pinned = self.engine.pinned()
        chosen: dict[str, tuple[int, str]] = {}
        admit: list[_Item] = []
        blocked = False
        cap = self.resident.capacity
        latest = self.router.library.latest_object_ids()
        for it in candidates:
            if not self._still_resolves(it, latest):
                continue
            need = self._needs(it)
            if cap is not None and len(need) > cap:
                msg = (self.resident.needs_all_message(it.route, len(need))
                       if isinstance(it.resolved, Arrow) or it.route.strip() == "uniform" else
                       f"route {it.route!r} uses {len(need)} LoRA adapters at once, but this server keeps at most "
                       f"{cap} resident (--max-resident-experts)")
                self._fail(it, APIError(400, msg, param="model", code="too_many_experts"))
                continue
            pins = self._pins(it, latest)
            if pins is None:
                continue
            pins = {n: v for n, v in pins.items() if n in need}
            rows = it.params.n
            alone = not admit and not self.engine.busy  # a request wider than the batch runs alone
            clash = any(chosen.get(n, v) != v for n, v in pins.items())  # another version admitted now
            if (rows > free and not alone) or (need and (blocked or clash or not self.resident.fits(need, pinned, pins))):
                blocked = blocked or bool(need)
                self.deferred.append(it)
                continue
            admit.append(it)
            free -= rows
            pinned |= need
            chosen.update(pins)
        return admit, chosen

    def _load(self, admit: list[_Item], chosen: dict[str, tuple[int, str]]) -> list[_Item]:
        """Make the admitted items' LoRA experts resident; the items that can run. An adapter
        deleted meanwhile gets the routes resolved again (twice at most: a `uniform` route then runs over
        what is left); what still fails is answered 400."""
        for attempt in (1, 2, 3):
            needed = set().union(*(self._needs(it) for it in admit))
            if not needed:
                return admit
            try:
                self.engine.ensure_experts(needed, {n: v for n, v in chosen.items() if n in needed})
                return admit
            except RoutingError as e:
                if attempt < 3:
                    latest = self.router.library.latest_object_ids()
                    admit = [it for it in admit if self._still_resolves(it, latest)]
                    continue
                for it in admit:
                    if self._needs(it):
                        self._fail(it, APIError(400, str(e), param="model"))
                return [it for it in admit if not self._needs(it)]
        return admit

    def _still_resolves(self, it: _Item, latest: dict[str, str]) -> bool:
        """Resolve `it`'s route again if an adapter it chose was deleted since (a `uniform` or
        retrieval route then chooses among what is left; a route naming it gets a 400)."""
        if not self._chose_deleted(it, latest):
            return True
        try:
            self._resolve_group([it])
        except RoutingError as e:
            self._fail(it, APIError(400, str(e), param="model"))
            return False
        return True

    @staticmethod
    def _chose_deleted(it: _Item, latest: dict[str, str]) -> bool:
        """Whether `it`'s route holds an adapter the library (`latest`) no longer has: deleted
        between the route's choice and the request's start."""
        return isinstance(it.resolved, dict) and any(n not in latest for n in it.resolved)

    def _pins(self, it: _Item, latest: dict[str, str]) -> dict[str, tuple[int, str]] | None:
        """The versions of the adapters `it` names (a fixed route) that it arrived with, when the
        library still holds them (a LoRA one may be older than the latest: it is loaded as
        pinned; the others must be the latest); else None and the item is answered 409. Routes
        that choose among the library (arrow, uniform, retrieval, learned) choose among it as it
        is when they start: nothing to pin."""
        if not isinstance(it.resolved, dict) or it.route.strip() in SPECIAL_MODELS:
            return {}
        pins = {n: it.pins[n] for n in it.resolved if n in it.pins}
        changed = {n: v for n, v in pins.items() if latest.get(n) != v[1]}
        lora = {n for n in changed if self.router.adapter_types().get(n) == "lora"}
        try:
            self.resident.check_pins({n: changed[n] for n in lora})
            other = sorted(set(changed) - lora)
            if other:
                raise pin_gone(other[0], changed[other[0]][0], "replaced")
        except RoutingError as e:
            self._fail(it, APIError(409, str(e), param="model", code="adapter_changed"))
            return None
        return pins

    def _deliver(self, done: list[tuple[EngineRequest, Answer]]) -> None:
        for req, answer in done:
            it = self._jobs.pop(id(req), None)
            if it is None:
                continue
            reasons = [s.finish_reason for s in answer.samples]
            if all(r in ("stop", "length") for r in reasons):
                self.metrics.finished(answer.completion_tokens)
                answer.versions = self._versions(it, answer)
                answer.abstention = it.decision
                it.future.set_result(answer)
            else:
                reason = next(r for r in reasons if r not in ("stop", "length"))
                self._stopped(it, reason, answer.completion_tokens)

    def _versions(self, it: _Item, answer: Answer) -> dict[str, int]:
        """The library version of each adapter that answered: the pinned one, or (an adapter
        added after the item arrived) the resident one."""
        slots = self.resident.slots
        out = {}
        for n in answer.experts:
            if n in it.pins:
                out[n] = it.pins[n][0]
            elif n in slots.loaded() and slots.experts[slots.index(n)].version is not None:
                out[n] = slots.experts[slots.index(n)].version
        return out

    def _stopped(self, it: _Item, reason: str, tokens: int) -> None:
        self.metrics.stop(reason, tokens)
        self._fail(it, _stop_error(it, reason))

    @staticmethod
    def _fail(it: _Item | None, exc: BaseException) -> None:
        if it is not None and not it.future.done():
            it.future.set_exception(exc)


__all__ = ["Scheduler", "_Item", "_timeout_error", "_stop_error"]
