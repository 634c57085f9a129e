"""Routing the other adapter families: bottleneck adapters (series, parallel) mixed by output per
request, and prefix adapters selected per request, in the same heterogeneous batch as LoRA routes.

    others = load_family(library, ["terse", "polite", "persona"], fingerprint=base.fingerprint)
    generate_routed(base, expert_set, [
        Request("...", {"terse": 0.7, "polite": 0.3}),    # two series adapters, mixed
        Request("...", {"persona": 1.0}),                 # one prefix adapter
        Request("...", {"geo": 1.0}),                     # LoRA, as before
    ], others=others)

Bottleneck output mixture at each of the adapters' sites, weights w_e summing to 1:

    series    y = f(x);  y + sum_e w_e scale_e up_e(relu(down_e(y)))
    parallel  y = mlp(x) + sum_e w_e scale_e up_e(relu(down_e(x)))

It is applied by forward hooks registered for the batch, so the LoRA layer (layer.py) and its hot
path are untouched, and a batch without bottleneck routes pays nothing. Rows are grouped by
expert: each used expert runs once per site, on the rows that chose it.

Prefix: each row gets its own learned keys and values in the KV cache (a `PrefixBlock`, see
`modulora.forward`): right-aligned in a block as wide as the batch's longest prefix, the unused
slots masked out; position ids come from the real tokens, so a row answers as it would alone.

One request's experts are of one family: all LoRA, all series of one placement, or all parallel;
a prefix adapter is used alone (weight 1). Across families there is no single site where their
outputs meet (a LoRA delta sits inside a projection, a series adapter after it, a prefix in the
attention), so "w_e" would mean nothing shared; such routes are refused with a RoutingError
naming the pair rather than given an arbitrary meaning. Parameter averaging ("average") is
LoRA only. Different requests of one batch may use any family, Arrow, or the base alone.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.attach import attached_config
from ..adapters.prefix import kv_shape
from .arrow import Arrow
from .experts import ExpertSet, RoutingError, library_record, normalise_route, read_record

LORA = "LoRA"


@dataclass
class BottleneckExpert:
    """A series or parallel adapter as a routing expert. `down[site]` is (weight [b, h], bias [b])
    and `up[site]` (weight [h, b], bias [h]), where `site` is the full path of the wrapped module
    (`model.layers.3.mlp.down_proj` for series, `model.layers.3.mlp` for parallel)."""

    name: str
    object_id: str | None
    kind: str              # "series" | "parallel"
    placement: str | None  # series: "houlsby" | "pfeiffer"; parallel: None
    scale: float
    down: dict[str, tuple[torch.Tensor, torch.Tensor]]
    up: dict[str, tuple[torch.Tensor, torch.Tensor]]
    card: dict | None = None

    @property
    def family(self) -> str:
        """What experts of one mixture must share."""
        return f"series {self.placement}" if self.kind == "series" else "parallel"


@dataclass
class PrefixExpert:
    """A prefix adapter as a routing expert: `keys`, `values` [num_layers, kv_heads, P, head_dim]."""

    name: str
    object_id: str | None
    keys: torch.Tensor
    values: torch.Tensor
    card: dict | None = None
    family = "prefix"


def family_expert(name: str, cfg, tensors: dict[str, torch.Tensor], card: dict | None = None,
                  object_id: str | None = None, device=None) -> BottleneckExpert | PrefixExpert:
    """An expert from `read_adapter`'s result for a series, parallel or prefix adapter."""
    def on(t):
        return t.to(device=device, dtype=torch.float32)  # as attached adapters: float32 weights

    if cfg.type == "prefix":
        k, v = tensors.get("prefix.keys"), tensors.get("prefix.values")
        if k is None or v is None or k.dim() != 4 or k.shape != v.shape:
            raise RoutingError(f"prefix adapter {name} needs prefix.keys and prefix.values of one shape "
                               "[layers, kv_heads, tokens, head_dim]")
        return PrefixExpert(name, object_id, on(k), on(v), card)
    if cfg.type not in ("series", "parallel"):
        raise RoutingError(f"adapter {name} is a {cfg.type} adapter; LoRA experts are routed through an ExpertSet")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        site, _, part = key.rpartition(".adapter_")
        if part not in ("down.weight", "down.bias", "up.weight", "up.bias"):
            raise RoutingError(f"adapter {name} holds tensor {key!r}, which is not a bottleneck weight")
        parts.setdefault(site, {})[part] = on(t)
    if not parts:
        raise RoutingError(f"adapter {name} holds no bottleneck tensors")
    for site, p in parts.items():
        if len(p) != 4:
            raise RoutingError(f"adapter {name} lacks some of adapter_down/adapter_up weight and bias at {site}")
    return BottleneckExpert(
        name=name, object_id=object_id, kind=cfg.type, placement=cfg.placement if cfg.type == "series" else None,
        scale=float(cfg.scale), card=card,
        down={s: (p["down.weight"], p["down.bias"]) for s, p in parts.items()},
        up={s: (p["up.weight"], p["up.bias"]) for s, p in parts.items()})


def load_family(library, names: list[str], fingerprint: dict | None = None,
                device=None) -> dict[str, BottleneckExpert | PrefixExpert]:
    """name -> expert for the named series, parallel and prefix adapters (`name` or `name@version`)
    of a library; unknown names, LoRA adapters, adapters for another base -> RoutingError."""
    experts = {}
    for ref in names:
        rec = library_record(library, ref)
        cfg, tensors, card = read_record(rec, fingerprint)
        experts[rec.name] = family_expert(rec.name, cfg, tensors, card, object_id=rec.object_id, device=device)
    return experts


# ---------------------------------------------------------------------------------------------
# one request's route: which family serves it


def split_route(route, mode: str, expert_set: ExpertSet | None, others: dict) -> tuple[object, dict | None]:
    """(the route the LoRA layer gets, the route of another family) for one request: a route
    naming LoRA experts (or Arrow, or None) goes to the LoRA layer unchanged; one naming series,
    parallel or prefix adapters is checked, normalised and kept apart (the LoRA layer gets None)."""
    if route is None or isinstance(route, Arrow):
        if route is not None and expert_set is None:
            raise RoutingError("an Arrow route mixes LoRA experts, and this call has no LoRA expert set")
        return route, None
    if not isinstance(route, dict):
        raise RoutingError(f"a route is a dict of expert weights, an Arrow, or None; got {type(route).__name__}")

    def family(name: str) -> str:
        if expert_set is not None and name in expert_set.names:
            return LORA
        if name in others:
            return others[name].family
        have = ([n for n in expert_set.names if n] if expert_set is not None else []) + sorted(others)
        shown = ", ".join(have[:20]) + (", ..." if len(have) > 20 else "")
        raise RoutingError(f"unknown expert {name!r} (have: {shown})")

    route = normalise_route(route, family)
    names = list(route)
    kinds = [family(n) for n in names]
    for name, kind in zip(names[1:], kinds[1:]):
        if kind != kinds[0]:
            raise RoutingError(f"route mixes {names[0]} ({kinds[0]}) and {name} ({kind}); the experts of one "
                               "request must be of one family: all LoRA, all series of one placement, or all "
                               "parallel (a prefix adapter is used alone)")
    if kinds[0] == LORA:
        return route, None
    if kinds[0] == "prefix" and len(names) > 1:
        raise RoutingError(f"route names prefix adapters {names[0]} and {names[1]}; a request selects one "
                           "prefix adapter (prefixes are not mixed)")
    if mode == "average" and len(names) > 1:
        raise RoutingError(f"parameter averaging ('average') composes LoRA experts only; {names[0]} and "
                           f"{names[1]} ({kinds[0]}) mix by output (mode 'mixture')")
    return None, route


# ---------------------------------------------------------------------------------------------
# one batch


class FamilyPlan:
    """The bottleneck mixtures of one batch: `routes[i]` is row i's series or parallel route
    (normalised, from `split_route`) or None. Apply it with `with plan.applied(model): ...`.
    Prefix adapters are the engine's: their keys and values lead a row's cache (`prefix_block`)."""

    def __init__(self, model: nn.Module, routes: list[dict | None], others: dict):
        self.routes, self.others = routes, others
        param = next(model.parameters())
        groups: dict[str, list[tuple[int, float]]] = {}
        for p, route in enumerate(routes):
            for name, w in (route or {}).items():
                if not isinstance(others[name], PrefixExpert):
                    groups.setdefault(name, []).append((p, w))
        # per expert: its batch positions (None: every one) and each one's weight times the expert's scale
        self.groups = []
        for name, pairs in groups.items():
            e = others[name]
            idx = [p for p, _ in pairs]
            w = torch.tensor([w * e.scale for _, w in pairs], dtype=torch.float32, device=param.device)
            self.groups.append((e, None if idx == list(range(len(routes))) else torch.tensor(idx, device=param.device),
                                w.view(-1, 1, 1)))
        self.sites = {s: e.kind == "parallel" for e, _, _ in self.groups for s in e.down}  # site -> parallel?
        self._check_sites(model)

    def _check_sites(self, model: nn.Module) -> None:
        hidden = model.config.hidden_size
        for e, _, _ in self.groups:
            for site, (w, _) in e.down.items():
                try:
                    model.get_submodule(site)
                except AttributeError:
                    raise RoutingError(f"adapter {e.name} adapts {site}, which this model does not have; was it "
                                       "made for another base model?") from None
                if w.shape[1] != hidden:
                    raise RoutingError(f"adapter {e.name} expects width {w.shape[1]} at {site} but this model's is "
                                       f"{hidden}; was it made for another base model?")

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """Hooks on the bottleneck sites, for the duration of a block. Enter it after the
        multi-expert layers are installed (a hook sits on whatever module is at its site)."""
        if attached_config(model) is not None:
            raise RoutingError("an adapter is attached to this model; detach it before routing")
        handles = [model.get_submodule(site).register_forward_hook(self._hook(site, parallel))
                   for site, parallel in self.sites.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, site: str, parallel: bool):
        """Adds the site's weighted bottleneck outputs to the module's output, row group by row group.
        Every expert reads the same input (the sub-layer output for series, the MLP input for
        parallel), so the deltas are computed from it before any is added."""
        def hook(module, args, out):
            h = args[0] if parallel else out
            y = out
            for e, rows, w in self.groups:
                if site not in e.down:
                    continue
                (wd, bd), (wu, bu) = e.down[site], e.up[site]
                x = h if rows is None else h.index_select(0, rows)
                delta = (F.linear(F.relu(F.linear(x.to(wd.dtype), wd, bd)), wu, bu) * w).to(out.dtype)
                y = y + delta if rows is None else y.index_add(0, rows, delta)
            return y

        return hook


@dataclass
class PrefixBlock:
    """Prefixes of the rows of one batch: `keys`, `values` [L, b, kv, P, hd]; `row_mask` [b, P]
    is 1 where a row has a prefix token and 0 on the padding of rows with a shorter (or none)."""

    keys: torch.Tensor
    values: torch.Tensor
    row_mask: torch.Tensor


def prefix_block(model: nn.Module, prefixes: list[PrefixExpert | None]) -> PrefixBlock | None:
    """Each row's prefix right-aligned in a [L, b, kv, P, hd] block (P: the longest), the rest
    masked; None when no row has one."""
    used = [p for p in prefixes if p is not None]
    if not used:
        return None
    for p in used:
        want = kv_shape(model, p.keys.shape[2])
        if tuple(p.keys.shape) != want:
            raise RoutingError(f"prefix adapter {p.name} has keys {list(p.keys.shape)} but this base expects "
                               f"{list(want)}; was it made for another base model?")
    device = next(model.parameters()).device
    P = max(p.keys.shape[2] for p in used)
    L, kv, _, hd = used[0].keys.shape
    keys = torch.zeros(L, len(prefixes), kv, P, hd, device=device)
    values = torch.zeros_like(keys)
    mask = torch.zeros(len(prefixes), P, dtype=torch.long, device=device)
    for i, p in enumerate(prefixes):
        if p is not None:
            n = p.keys.shape[2]
            keys[:, i, :, P - n:] = p.keys
            values[:, i, :, P - n:] = p.values
            mask[i, P - n:] = 1
    return PrefixBlock(keys, values, mask)


__all__ = ["BottleneckExpert", "PrefixExpert", "FamilyPlan", "PrefixBlock", "prefix_block", "family_expert", "load_family", "split_route"]
