"""From route names to answers: what `modulora generate --route`, the demo and the server share.

A route is given as text, per request:
- `arrow`, `retrieval`, `learned`, `uniform`: a routing policy (`top_k` applies to all but uniform);
- `NAME` or `NAME,NAME,...`: fixed adapters with equal weights; `NAME:0.7,NAME:0.3` for given weights;
  LoRA adapters, or series / parallel adapters of one kind (mixed by output), or one prefix adapter;
- `base`: the base model alone.

The policies route among the library's LoRA adapters only.
"""

from __future__ import annotations

import math
import sys

from .abstain import Decision, check_fallback, decide
from .arrow import Arrow, arrow_route
from .batch import generate_routed
from .requests import Answer, EngineRequest, SamplingParams
from .experts import LoraExpert, RoutingError, load_experts
from .family import load_family

POLICIES = ("arrow", "retrieval", "learned", "uniform")


def parse_fixed(spec: str) -> dict[str, float]:
    """`a,b` -> equal weights; `a:0.7,b:0.3` -> those weights (normalised later by the layer).
    Weights must be finite and > 0, none so small beside the others that it underflows."""
    route: dict[str, float] = {}
    for part in spec.split(","):
        name, _, weight = part.strip().partition(":")
        if not name:
            raise RoutingError(f"bad route {spec!r}: empty adapter name")
        try:
            route[name] = float(weight) if weight else 1.0
        except ValueError:
            raise RoutingError(f"bad weight {weight!r} for adapter {name} in route {spec!r}") from None
    total = sum(route.values())
    if total <= 0 or any(w <= 0 for w in route.values()):
        raise RoutingError(f"route {spec!r}: weights must be positive")
    tiny = 1.1754943508222875e-38  # float32's smallest normal number: the layers weigh in float32 or less
    for name, w in route.items():
        if not (math.isfinite(w) and math.isfinite(total) and w >= sys.float_info.min and w / total >= tiny):
            raise RoutingError(f"bad weight {w!r} for adapter {name} in route {spec!r}: weights (and their sum) must "
                               f"be finite, normal numbers, each at least {tiny:.3g} of their sum")
    return {n: w / total for n, w in route.items()}


class Router:
    """Resolves text routes against one library and one base; keeps what is costly to build
    (the expert set, the retrieval index, the learned router) between calls."""

    def __init__(self, base, library):
        self.base, self.library = base, library
        self._experts: list[LoraExpert] | None = None
        self._experts_key: dict | None = None
        self._types: dict[str, str] = {}
        self._types_key: dict | None = None
        self._family: dict[str, object] = {}  # object id -> series / parallel / prefix expert
        self._retrieval = None
        self._learned = None
        self._engine = None

    def experts(self) -> list[LoraExpert]:
        """Every LoRA adapter of the library; read again only when the library changed."""
        key = self.library.latest_object_ids()
        if self._experts is None or key != self._experts_key:
            self._experts = load_experts(self.library, fingerprint=self.base.fingerprint)
            self._experts_key = key
        return self._experts

    def engine(self):
        """This router's engine (kept between calls: experts stay in their slots)."""
        if self._engine is None:
            from .engine import Engine

            self._engine = Engine(self.base)
        return self._engine

    def family_for(self, resolved: list) -> tuple[dict, bool]:
        """(the series / parallel / prefix experts these routes name, whether any route uses LoRA)."""
        types = self.adapter_types()
        named = {n for r in resolved if isinstance(r, dict) for n in r}
        others = self.family_experts(self.family_names(named))
        return others, any(isinstance(r, Arrow) for r in resolved) or any(types.get(n) == "lora" for n in named)

    def family_names(self, names) -> list[str]:
        """The series, parallel and prefix adapters among `names`, sorted (a LoRA adapter deleted
        since its weights were loaded is not one of them)."""
        types = self.adapter_types()
        return sorted(n for n in names if types.get(n) not in (None, "lora"))

    def lora_names(self) -> list[str]:
        """The library's LoRA adapters (latest versions) in the expert set's order, without loading
        them (a server with a bounded expert cache never holds them all); RoutingError if none."""
        names = [n for n, t in self.adapter_types().items() if t == "lora"]
        if not names:
            what = "is empty" if not self.adapter_types() else "holds no LoRA adapters"
            raise RoutingError(f"the library at {self.library.root} {what}; add LoRA adapters before routing")
        return names

    def adapter_types(self) -> dict[str, str]:
        """name -> type ("lora", "series", ...) of the library's latest adapters; re-read on change."""
        key = self.library.latest_object_ids()
        if key != self._types_key:
            self._types = {r.name: r.type for r in self.library.list()}
            self._types_key = key
        return self._types

    def family_experts(self, names) -> dict:
        """name -> expert for series, parallel and prefix adapters, kept by object id between calls."""
        ids = self.library.latest_object_ids()
        missing = [n for n in names if ids.get(n) not in self._family]
        for name, e in load_family(self.library, missing, self.base.fingerprint,
                                   device=next(self.base.model.parameters()).device).items():
            self._family[e.object_id] = e
        live = set(ids.values())
        self._family = {oid: e for oid, e in self._family.items() if oid in live}
        return {n: self._family[ids[n]] for n in names}

    def resolve(self, prompts: list[str], routes: list[str], top_k: int = 1,
                exclude: list[list[str]] | None = None, fallback: str | None = None,
                arrow: dict | None = None) -> list[dict[str, float] | Arrow | None]:
        """One route object per prompt (see the module docstring), checked before any compute;
        `arrow`: Arrow's other settings (`arrow.SETTINGS`) for its routes and fallbacks."""
        return self.resolve_traced(prompts, routes, top_k, exclude, fallback, arrow)[0]

    def resolve_traced(self, prompts: list[str], routes: list[str], top_k: int = 1,
                       exclude: list[list[str]] | None = None, fallback: str | None = None,
                       arrow: dict | None = None) -> tuple[list, list[Decision | None]]:
        """`resolve`'s routes, and per prompt the abstention's Decision (retrieval and learned
        routes when `fallback` names a policy for requests no expert fits; else None)."""
        check_fallback(fallback)
        decisions: list[Decision | None] = [None] * len(prompts)
        if len(routes) != len(prompts):
            raise RoutingError(f"{len(prompts)} prompts but {len(routes)} routes")
        types = self.adapter_types()
        out: list = [None] * len(prompts)
        by_policy: dict[str, list[int]] = {}
        for i, spec in enumerate(routes):
            spec = (spec or "base").strip()
            if spec == "base":
                continue
            if spec in POLICIES:
                by_policy.setdefault(spec, []).append(i)
                continue
            route = parse_fixed(spec)
            unknown = [n for n in route if n not in types]
            if unknown:
                have = ", ".join(types) or "no adapters (it is empty)"
                raise RoutingError(f"unknown adapter {unknown[0]!r}; the library has: {have}")
            out[i] = route
        if not by_policy:
            return out, decisions
        names = self.lora_names()
        if any(p != "uniform" for p in by_policy) and not 1 <= top_k <= len(names):
            raise RoutingError(f"top_k={top_k} but the library has {len(names)} LoRA adapter(s)")
        arrow_spec = arrow_route(top_k, arrow) if "arrow" in by_policy or fallback == "arrow" else None
        for i in by_policy.get("uniform", []):
            out[i] = {n: 1.0 / len(names) for n in names}
        for i in by_policy.get("arrow", []):
            out[i] = arrow_spec
        for policy in ("retrieval", "learned"):
            idx = by_policy.get(policy, [])
            if idx:
                texts = [prompts[i] for i in idx]
                ex = [exclude[i] for i in idx] if exclude else None
                router = self._sequence_router(policy)
                chosen, best = router.route_scored(texts, top_k=top_k, exclude=ex)
                said = decide(policy, router.abstention(), best, fallback) if fallback else [None] * len(idx)
                for i, route, d in zip(idx, chosen, said):
                    out[i], decisions[i] = route, d
                    if d is not None and d.abstained:
                        out[i] = self._fallback_route(d.fallback, names, arrow_spec)
        return out, decisions

    @staticmethod
    def _fallback_route(fallback: str, names: list[str], arrow: Arrow):
        """The route of a request that abstained: the base, the uniform mixture, or Arrow."""
        if fallback == "base":
            return None
        if fallback == "uniform":
            return {n: 1.0 / len(names) for n in names}
        return arrow

    def _sequence_router(self, policy: str):
        if policy == "retrieval":
            if self._retrieval is None:
                from .retrieval import RetrievalRouter

                self._retrieval = RetrievalRouter(self.library)
            return self._retrieval
        if self._learned is None:
            from .learned import LearnedRouter

            self._learned = LearnedRouter.load(self.library, base=self.base)
        return self._learned

    def answer(self, prompts: list[str], routes: list[str], top_k: int = 1, mode: str = "mixture",
               max_new_tokens: int = 64, explain: bool = False, batch_size: int = 16,
               exclude: list[list[str]] | None = None, sampling: SamplingParams | None = None,
               fallback: str | None = None, arrow: dict | None = None) -> list[Answer]:
        """Answers for mixed requests, each with its own route, in shared batched passes; greedy
        unless `sampling` (whose max_tokens then counts) says otherwise. With `fallback`, retrieval
        and learned routes abstain under their threshold (Answer.abstention says what happened);
        `arrow` sets Arrow's other settings (`arrow.SETTINGS`)."""
        resolved, decisions = self.resolve_traced(prompts, routes, top_k, exclude, fallback, arrow)
        params = sampling if sampling is not None else SamplingParams(max_tokens=max_new_tokens)
        requests = [EngineRequest(p, r, mode=mode, params=params) for p, r in zip(prompts, resolved)]
        others, uses_lora = self.family_for(resolved)
        eng = self.engine()
        try:
            answers = generate_routed(self.base, self.experts() if uses_lora else None, requests,
                                      batch_size=batch_size, explain=explain, others=others, engine=eng)
            for a, d in zip(answers, decisions):
                a.abstention = d
            return answers
        finally:
            eng.release()  # leave the model as found: the next user may attach an adapter to it


def top_expert(answer: Answer) -> str | None:
    """The expert with the largest weight in an answer (None for the base alone)."""
    return max(answer.experts, key=answer.experts.get) if answer.experts else None


def explain_lines(answer: Answer, per_layer: bool = False) -> list[str]:
    """Human-readable routing of one answer: the abstention's decision, experts by weight, and
    (Arrow) per layer."""
    said = [answer.abstention.line()] if answer.abstention is not None else []
    if not answer.experts:
        return said + ["  base model only"]
    lines = said + ["  " + ", ".join(f"{n} {w:.2f}" for n, w in sorted(answer.experts.items(), key=lambda kv: -kv[1]))]
    if per_layer and answer.per_layer:
        layers: dict[str, dict[str, float]] = {}
        modules: dict[str, int] = {}
        for module, weights in answer.per_layer.items():
            layer = module.split(".layers.")[1].split(".")[0] if ".layers." in module else module
            modules[layer] = modules.get(layer, 0) + 1
            for name, w in weights.items():
                layers.setdefault(layer, {})[name] = layers.get(layer, {}).get(name, 0.0) + w
        for layer in sorted(layers, key=lambda s: int(s) if s.isdigit() else 0):
            mean = {n: w / modules[layer] for n, w in layers[layer].items()}
            top = sorted(mean.items(), key=lambda kv: -kv[1])[:4]
            lines.append(f"    layer {layer:>2}: " + ", ".join(f"{n} {w:.2f}" for n, w in top))
    return lines
