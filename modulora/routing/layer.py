"""The multi-expert layer: every adapted nn.Linear of the base, wrapped so that each row of a
batch can follow its own route through a library of LoRA experts, in one forward pass.

    install(model, expert_set)                  # wrap the experts' modules (base names unchanged)
    plan = RoutingPlan(expert_set, [{"a": 1}, Arrow(top_k=4), {"a": .5, "b": .5}, None],
                       modes=["mixture", "mixture", "average", "mixture"])
    with routing(model, plan):
        logits, cache = forward(model, ids, mask)   # or generate_ids(model, ...)
    uninstall(model)

A route per row is a sequence-level weighting (dict name -> weight, normalised to sum 1), an
`Arrow` spec (weights per token, computed inside each layer from its input), or None (the base
alone). Two compositions, named explicitly:

    "mixture"  y = W x + sum_e w_e B_e A_e x            (output mixture; the default)
    "average"  y = W x + (sum_e w_e B_e)(sum_e w_e A_e) x   (parameter averaging)

where B_e includes the expert's scaling. Padding tokens (attention mask 0) get no routing: their
delta is zero. Only selected experts are computed:

- sequence routes, prompt (t > 1): per row, its k experts' A and B are gathered and applied with
  two batched matmuls (the k experts of a row act as one LoRA of rank k*R);
- sequence routes, output mixture, few experts in use (U used experts of rank R, U*R at most
  `DENSE_PROMPT_COLS` for a prompt, `DENSE_STEP_COLS` for a decode step): the used experts' A
  and B are taken as one LoRA of rank U*R and applied to all rows with two plain matmuls, each
  row's weights (0 for the experts it does not use) scaling its columns in between; one
  efficient GEMM per module instead of many thin batched ones, each used expert read once;
- sequence routes, decode step (t = 1), many experts in use: rows are grouped by expert (pairs
  sorted once per plan), so each used expert's weights are read once per step however many rows
  use it;
- parameter averaging: the averaged A and B of each row are formed once per plan and module;
- Arrow: see `arrow.mixed_delta`.

The model's forward pre-hook (set by `install`) hands each forward's attention mask to the plan,
so the existing `modulora.forward.forward` / `modulora.generate.generate_ids` work unchanged with
left padding and the KV cache.

One fixed adapter for every request needs none of this: `modulora.adapters.load_adapter` followed
by `modulora.adapters.merge_lora` folds it into the base weights, at zero inference overhead.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.attach import attached_config
from ..adapters.wrap import Wrapper, replace, wrappers
from . import arrow as arrow_mod
from .arrow import Arrow
from .experts import ExpertSet, RoutingError

MODES = ("mixture", "average")
# the dense mixture (all used experts as one LoRA of rank U*R) is used up to this many columns:
# for a prompt its extra work grows with U*R for every token, so it stays small; for a decode step
# the work is a few rows, and reading the used experts' weights (the same for any method) dominates
DENSE_PROMPT_COLS = 64
DENSE_STEP_COLS = 1024


class MultiLoraLinear(Wrapper):
    """A base Linear plus views of the expert set's stacked A [E, R, in] and Bt [E, R, out] for
    this module; what it adds to the base output is decided by the router's current plan."""

    def __init__(self, base: nn.Linear, name: str, router: "_Router"):
        super().__init__(base)
        self.module_name = name
        self.__dict__["router"] = router  # a plain attribute: the state_dict keeps the base's names

    @property
    def experts_A(self) -> torch.Tensor:
        return self.router.expert_set.A[self.module_name]

    @property
    def experts_Bt(self) -> torch.Tensor:
        return self.router.expert_set.Bt[self.module_name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        plan = self.router.plan
        if plan is None or not plan.active:
            return y
        if torch.is_autocast_enabled(x.device.type):  # the small expert products stay in the set's dtype
            with torch.autocast(x.device.type, enabled=False):
                return plan.apply(self, x, y)
        return plan.apply(self, x, y)

    def extra_repr(self) -> str:
        E, R, d_in = self.experts_A.shape
        return f"in={d_in}, out={self.experts_Bt.shape[2]}, experts={E}, rank={R}"


class _Router:
    """Shared by the layers of one installed model: the expert set and the current plan."""

    def __init__(self, expert_set: ExpertSet):
        self.expert_set = expert_set
        self.plan: RoutingPlan | None = None
        self.hook = None

    def pre_forward(self, module, args, kwargs):
        plan = self.plan
        if plan is None:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            raise RoutingError("routing needs input_ids or inputs_embeds to find the batch shape")
        b, t = ids.shape[:2]
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if mask is not None:
            if mask.dim() != 2:
                raise RoutingError("routing needs a 2-D attention mask [batch, tokens] to tell pads apart")
            mask = mask[:, -t:]
        plan.begin(mask, b, t)
        return None


def _router_of(model: nn.Module) -> "_Router | None":
    """The router of the multi-expert layers installed on `model` (found through the layers
    themselves: nothing is kept on the model), or None."""
    for mod in model.modules():
        if isinstance(mod, MultiLoraLinear):
            return mod.router
    return None


def install(model: nn.Module, expert_set: ExpertSet) -> None:
    """Wrap every module the experts adapt with a MultiLoraLinear, in place (again with the same
    set: only modules new to it). Without a plan (see `routing`) the model computes exactly the
    base model."""
    router = _router_of(model)
    if router is not None and router.expert_set is not expert_set:
        raise RoutingError("routing is already installed on this model; call uninstall(model) first")
    if router is None and (attached_config(model) is not None or wrappers(model)):
        raise RoutingError("an adapter is attached to this model; detach it before installing routing")
    targets = []
    for name in expert_set.modules:
        if router is not None and isinstance(model.get_submodule(name), MultiLoraLinear):
            continue  # installed before: an expert store that grew wraps only its new modules
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise RoutingError(f"the experts adapt {name}, which this model does not have; were they made "
                               "for another base model?") from None
        if not isinstance(mod, nn.Linear):
            raise RoutingError(f"the experts adapt {name}, a {type(mod).__name__}; only nn.Linear can be routed")
        out, d_in = expert_set.shape(name)
        if (mod.out_features, mod.in_features) != (out, d_in):
            raise RoutingError(f"the experts adapt {name} as [{out}, {d_in}] but this model's is "
                               f"[{mod.out_features}, {mod.in_features}]; were they made for another base model?")
        if mod.weight.device != expert_set.device:
            raise RoutingError(f"the expert set is on {expert_set.device} but the model on {mod.weight.device}; "
                               "build the ExpertSet with device=...")
        targets.append((name, mod))
    if not targets:
        return
    if router is None:
        router = _Router(expert_set)
        router.hook = model.register_forward_pre_hook(router.pre_forward, with_kwargs=True)
    for name, mod in targets:
        replace(model, name, MultiLoraLinear(mod, name, router))


def uninstall(model: nn.Module) -> None:
    """Put the original Linears back (the very same modules)."""
    router = _router_of(model)
    if router is None:
        return
    router.hook.remove()
    for name, mod in wrappers(model):
        if isinstance(mod, MultiLoraLinear):
            replace(model, name, mod.unwrap())


def installed(model: nn.Module) -> ExpertSet | None:
    """The expert set installed on the model, or None."""
    router = _router_of(model)
    return None if router is None else router.expert_set


@contextlib.contextmanager
def routing(model: nn.Module, plan: "RoutingPlan"):
    """Make every forward of `model` inside the block follow `plan`."""
    router = _router_of(model)
    if router is None:
        raise RoutingError("routing is not installed on this model; call install(model, expert_set) first")
    if plan.expert_set is not router.expert_set:
        raise RoutingError("the plan was made for another expert set than the one installed on this model")
    previous, router.plan = router.plan, plan
    try:
        yield plan
    finally:
        router.plan = previous
        plan.fwd = None


# ---------------------------------------------------------------------------------------------
# the plan


class _SeqGroup:
    """Rows with sequence-level routes sharing one composition: idx/w [rows, k] (padded, w=0)."""

    def __init__(self, rows: list[int], idx: torch.Tensor, w: torch.Tensor, expert_set: ExpertSet, b: int,
                 device):
        k = int((w > 0).sum(1).max())
        idx, w = idx[:, :k], w[:, :k]
        self.k = k
        self.row_list = rows
        self.rows = None if rows == list(range(b)) else torch.tensor(rows, device=device)
        self.idx = idx.to(device)
        self.w = w.to(device=device, dtype=expert_set.dtype)
        # decode steps: (row, expert) pairs with weight > 0, sorted by expert and padded per expert to
        # the largest group C, so that a step is two [U, C, .] batched matmuls over the U used experts
        pair_rows = torch.tensor(rows).repeat_interleave(k)
        flat_e, flat_w = idx.reshape(-1), w.reshape(-1)
        keep = flat_w > 0
        pair_rows, flat_e, flat_w = pair_rows[keep], flat_e[keep], flat_w[keep]
        order = torch.argsort(flat_e, stable=True)
        used, counts = torch.unique_consecutive(flat_e[order], return_counts=True)
        C = int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        g = torch.repeat_interleave(torch.arange(len(used)), counts)
        slot = g * C + torch.arange(len(order)) - starts[g]
        self.U, self.C = len(used), C
        self.used = None if used.tolist() == list(range(len(expert_set))) else used.to(device)
        self.slot_rows = torch.full((self.U * C,), rows[0], dtype=torch.long)
        self.slot_rows[slot] = pair_rows[order]
        self.slot_w = torch.zeros(self.U * C)
        self.slot_w[slot] = flat_w[order]
        self.slot_rows = self.slot_rows.to(device)
        self.slot_w = self.slot_w.to(device=device, dtype=expert_set.dtype)
        # the dense mixture: columns [u*R, (u+1)*R) belong to the u-th used expert; per row, the
        # weight of each column (the row's weight for that expert, 0 if it does not use it)
        R = expert_set.rank
        self.R = R
        used_list = used.tolist()
        span = (used_list[0], used_list[-1] + 1)
        self.dense_span = span if used_list == list(range(*span)) else None  # a slice of the set: no copy
        self.dense_used = used
        pos = torch.searchsorted(used, flat_e)
        dense_w = torch.zeros(len(rows), self.U, dtype=torch.float64)
        row_of_pair = torch.arange(len(rows)).repeat_interleave(k)[keep]
        dense_w.index_put_((row_of_pair, pos), flat_w.to(torch.float64), accumulate=True)
        self.dense_w = dense_w.repeat_interleave(R, dim=1).to(device=device, dtype=expert_set.dtype)  # [rows, U*R]


class _ArrowGroup:
    """Rows sharing one Arrow spec and composition; `cand` maps candidate positions to the set."""

    def __init__(self, spec: Arrow, rows: list[int], expert_set: ExpertSet, average: bool, device):
        cand = spec.candidates(expert_set)
        self.spec = spec
        self.average = average
        self.row_list = rows
        self.rows = torch.tensor(rows, device=device)
        self.cand = None if cand == list(range(len(expert_set))) else torch.tensor(cand, device=device)


class _Forward:
    """What one forward pass shares across all layers, derived once from its token mask."""

    def __init__(self, b: int, t: int):
        self.b, self.t = b, t
        # id(sequence group) -> weights times validity: [rows, t, k], or [U*C] per slot in a decode step,
        # or [rows*t, U*R] per column of the dense mixture
        self.seq: dict[int, torch.Tensor] = {}
        self.dense = False  # whether the output-mixture group takes the dense path in this forward
        self.tokens: dict[int, torch.Tensor | None] = {}  # id(Arrow group) -> flat indices of its real tokens
        self.token_rows: dict[int, torch.Tensor] = {}     # id(Arrow group) -> the row of each of them
        self.counted: dict[int, torch.Tensor] = {}        # id(Arrow group) -> 1 where a token counts in report()


class RoutingPlan:
    """Per-row routes of one batch, validated and turned into the index tensors the layers use.

    `routes[i]` is a dict name -> weight, an `Arrow`, or None; `modes` one of "mixture" / "average"
    for all rows or per row. With `explain`, `report(i)` also gives the mean routing weight per
    expert of each module over row i's valid tokens (Arrow rows; sequence routes are constant).
    """

    def __init__(self, expert_set: ExpertSet, routes: list, modes: str | list[str] = "mixture",
                 explain: bool = False):
        b = len(routes)
        if b == 0:
            raise RoutingError("a routing plan needs at least one row")
        modes = [modes] * b if isinstance(modes, str) else list(modes)
        if len(modes) != b:
            raise RoutingError(f"{b} routes but {len(modes)} modes")
        for m in modes:
            if m not in MODES:
                raise RoutingError(f"unknown composition mode {m!r}; use 'mixture' (output mixture) or "
                                   "'average' (parameter averaging)")
        self.expert_set, self.explain, self.modes = expert_set, explain, modes
        self.routes: list = []
        for i, route in enumerate(routes):
            if route is None:
                self.routes.append(None)
            elif isinstance(route, Arrow):
                route.candidates(expert_set)  # validates
                self.routes.append(route)
            elif isinstance(route, dict):
                self.routes.append(expert_set.normalise(route))
            else:
                raise RoutingError(f"row {i}: a route is a dict of expert weights, an Arrow, or None; got "
                                   f"{type(route).__name__}")
        self.protos = None
        self.fwd: _Forward | None = None
        self.token_mask: torch.Tensor | None = None  # this forward's real tokens [b, t]
        # report() summarises a row over its own tokens: [lo, hi) of the prompt per row, set by
        # the caller so that chat-template tokens shared by every request do not dominate
        self.content_spans: list[tuple[int, int]] | None = None
        # what report() reads, per row of the plan (however the batch was narrowed since): tokens
        # counted, and for Arrow rows the sum over them of each expert's weight, per module [rows, E]
        self.tokens_seen = torch.zeros(b, dtype=torch.float64)
        self.weight_sums: dict[str, torch.Tensor] = {}
        self._E = len(expert_set)
        self.select(list(range(b)))

    def select(self, rows: list[int]) -> None:
        """From the next forward on, the batch holds only these rows of the plan, in this order (a
        generation drops the rows that finished); reports still count each row's earlier tokens."""
        expert_set, device = self.expert_set, self.expert_set.device
        self.origin = list(rows)
        self._origin_cpu = torch.tensor(self.origin, dtype=torch.long)
        self._origin = self._origin_cpu.to(device)
        self.b = len(rows)
        mix_rows, avg_rows, arrow_rows = [], [], defaultdict(list)
        for p, i in enumerate(rows):
            route, mode = self.routes[i], self.modes[i]
            if isinstance(route, Arrow):
                arrow_rows[(route, mode)].append(p)
            elif isinstance(route, dict):
                (avg_rows if mode == "average" and len(route) > 1 else mix_rows).append(p)
        # per batch position: sequence-level experts and weights [b, k] (k = most experts of any
        # row; padded, and rows without a sequence route, with weight 0)
        k = max([len(self.routes[i]) for i in rows if isinstance(self.routes[i], dict)], default=0)
        self.indices = torch.zeros(self.b, k, dtype=torch.long)
        self.weights = torch.zeros(self.b, k)
        for p, i in enumerate(rows):
            r = self.routes[i]
            if isinstance(r, dict):
                for j, (name, weight) in enumerate(r.items()):
                    self.indices[p, j], self.weights[p, j] = expert_set.index(name), weight

        def seq_group(pos):
            return _SeqGroup(pos, self.indices[pos], self.weights[pos], expert_set, self.b, device) if pos else None

        self.mix, self.avg = seq_group(mix_rows), seq_group(avg_rows)
        self.arrows = [_ArrowGroup(spec, pos, expert_set, mode == "average", device)
                       for (spec, mode), pos in arrow_rows.items()]
        self.active = bool(mix_rows or avg_rows or arrow_rows)
        if self.arrows and self.protos is None:
            self.protos = arrow_mod.prototypes(expert_set)
        self._cache: dict = {}  # per-module tensors of these groups

    # -- per forward ---------------------------------------------------------------------------

    def begin(self, token_mask: torch.Tensor | None, b: int, t: int) -> None:
        """Called (by the model's pre-hook) before each forward: `token_mask` [b, t] marks this
        forward's real tokens (None: all real)."""
        if b != self.b:
            raise RoutingError(f"the routing plan has {self.b} rows but the batch has {b}")
        dev = self.expert_set.device
        valid = (torch.ones(b, t, dtype=torch.bool, device=dev) if token_mask is None
                 else token_mask.to(device=dev, dtype=torch.bool))
        fwd = _Forward(b, t)
        dtype = self.expert_set.dtype
        fwd.dense = False
        for g in (self.mix, self.avg):
            if g is None:
                continue
            if g is self.mix and g.U * g.R <= (DENSE_STEP_COLS if t == 1 else DENSE_PROMPT_COLS):
                fwd.dense = True
                v = valid if g.rows is None else valid.index_select(0, g.rows)
                fwd.seq[id(g)] = (g.dense_w.unsqueeze(1) * v.unsqueeze(2).to(dtype)).reshape(-1, g.U * g.R)
            elif t == 1 and g is self.mix:
                fwd.seq[id(g)] = g.slot_w * valid[g.slot_rows, 0].to(dtype)
            else:
                v = valid if g.rows is None else valid.index_select(0, g.rows)
                fwd.seq[id(g)] = g.w.unsqueeze(1) * v.unsqueeze(2).to(dtype)          # [rows, t, k]
        counted = valid
        if self.content_spans is not None:
            pos = torch.arange(t, device=dev)
            spans = [self.content_spans[i] for i in self.origin]
            lo = torch.tensor([a for a, _ in spans], device=dev).unsqueeze(1)
            hi = torch.tensor([z for _, z in spans], device=dev).unsqueeze(1)
            counted = valid & (pos >= lo) & (pos < hi)
        for g in self.arrows:
            sub = valid.index_select(0, g.rows)                                       # [rows, t]
            flat = (g.rows.unsqueeze(1) * t + torch.arange(t, device=dev)).reshape(-1)
            keep = sub.reshape(-1)
            toks = flat[keep]
            fwd.tokens[id(g)] = None if toks.numel() == b * t else toks
            fwd.token_rows[id(g)] = g.rows.repeat_interleave(t)[keep]
            fwd.counted[id(g)] = counted.index_select(0, g.rows).reshape(-1)[keep]
        self.tokens_seen.index_add_(0, self._origin_cpu, counted.sum(1).to(self.tokens_seen))
        self.token_mask = valid
        self.fwd = fwd

    # -- the layer's work ----------------------------------------------------------------------

    def apply(self, layer: MultiLoraLinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[0], x.shape[1] if x.dim() == 3 else 1
        fwd = self.fwd
        if fwd is None:  # a layer called on its own, outside a model forward: every token is real
            self.begin(None, b, t)
            fwd = self.fwd
        elif (fwd.b, fwd.t) != (b, t):
            raise RoutingError(f"layer input is [{b}, {t}] but this forward's mask is [{fwd.b}, {fwd.t}]")
        xe = x if x.dtype == self.expert_set.dtype else x.to(self.expert_set.dtype)
        xe = xe.reshape(b, t, -1)
        y3 = y.view(b, t, -1)
        A, Bt = layer.experts_A, layer.experts_Bt
        name = layer.module_name
        if self.mix is not None:
            if fwd.dense:
                self._dense(self.mix, name, A, Bt, xe, y3, fwd.seq[id(self.mix)])
            elif t == 1:
                self._grouped(self.mix, name, A, Bt, xe, y3, fwd.seq[id(self.mix)])
            else:
                self._rowwise_mixture(self.mix, A, Bt, xe, y3, fwd.seq[id(self.mix)])
        if self.avg is not None:
            self._rowwise_average(self.avg, name, A, Bt, xe, y3, fwd.seq[id(self.avg)])
        for gi, g in enumerate(self.arrows):
            self._arrow(g, gi, name, A, Bt, xe, y3, fwd)
        return y

    @staticmethod
    def _add_rows(y3, rows, delta):
        delta = delta.to(y3.dtype)
        if rows is None:
            y3.add_(delta)
        else:
            y3.index_add_(0, rows, delta)

    def _rowwise_mixture(self, g: _SeqGroup, A, Bt, x, y3, wt):
        """Each row's k experts as one LoRA of rank k*R: gather, then two batched matmuls."""
        n, k = g.idx.shape
        R = A.shape[1]
        xg = x if g.rows is None else x.index_select(0, g.rows)
        Ag = A[g.idx].view(n, k * R, -1)                                  # [n, kR, in]
        Bg = Bt[g.idx].view(n, k * R, -1)                                 # [n, kR, out]
        z = torch.bmm(xg, Ag.transpose(1, 2))                             # [n, t, kR]
        z.view(n, -1, k, R).mul_(wt.unsqueeze(-1))                        # weights and pad mask
        if g.rows is None and y3.dtype == z.dtype and y3.is_contiguous():
            y3.baddbmm_(z, Bg)
        else:
            self._add_rows(y3, g.rows, torch.bmm(z, Bg))

    def _dense(self, g: _SeqGroup, name, A, Bt, x, y3, wt):
        """The used experts as one LoRA of rank U*R over all the group's tokens: z = x A_u^T, each
        row's columns scaled by its weights (and its pad mask), then y += z B_u."""
        key = ("dense", name)
        flat = self._cache.get(key)
        if flat is None:
            E, R, d_in = A.shape
            if g.dense_span is not None:
                lo, hi = g.dense_span
                Au, Bu = A[lo:hi], Bt[lo:hi]  # views of the stacked set
            else:
                Au, Bu = A.index_select(0, g.dense_used), Bt.index_select(0, g.dense_used)
            flat = self._cache[key] = (Au.reshape(-1, d_in), Bu.reshape(-1, Bt.shape[2]))
        Au, Bu = flat
        xg = x if g.rows is None else x.index_select(0, g.rows)
        n, t = xg.shape[0], xg.shape[1]
        z = F.linear(xg.reshape(n * t, -1), Au)                          # [n*t, U*R]
        z.mul_(wt)                                                        # weights and pad mask
        if g.rows is None and y3.dtype == z.dtype and y3.is_contiguous():
            y3.view(n * t, -1).addmm_(z, Bu)
        else:
            self._add_rows(y3, g.rows, torch.mm(z, Bu).view(n, t, -1))

    def _grouped(self, g: _SeqGroup, name, A, Bt, x, y3, slot_w):
        """Decode step: (row, expert) pairs grouped by expert; each used expert read once."""
        if g.used is not None:
            key = ("used", name)
            if key not in self._cache:
                self._cache[key] = (A.index_select(0, g.used), Bt.index_select(0, g.used))
            A, Bt = self._cache[key]
        b = x.shape[0]
        xs = x.reshape(b, -1).index_select(0, g.slot_rows).view(g.U, g.C, -1)
        z = torch.bmm(xs, A.transpose(1, 2))                              # [U, C, R]
        z.mul_(slot_w.view(g.U, g.C, 1))
        ys = torch.bmm(z, Bt).view(g.U * g.C, -1)                         # [U*C, out]
        y3.view(b, -1).index_add_(0, g.slot_rows, ys.to(y3.dtype))

    def _rowwise_average(self, g: _SeqGroup, name, A, Bt, x, y3, wt):
        """(sum w B)(sum w A) per row; the averaged A and B are formed once per plan and module."""
        key = ("avg", name)
        if key not in self._cache:
            self._cache[key] = (torch.einsum("nk,nkri->nri", g.w, A[g.idx]),
                                torch.einsum("nk,nkro->nro", g.w, Bt[g.idx]))
        Aa, Ba = self._cache[key]
        xg = x if g.rows is None else x.index_select(0, g.rows)
        z = torch.bmm(xg, Aa.transpose(1, 2))                             # [n, t, R]
        z.mul_((wt.sum(-1) > 0).unsqueeze(-1).to(z.dtype))                # pads get nothing
        self._add_rows(y3, g.rows, torch.bmm(z, Ba))

    def _arrow(self, g: _ArrowGroup, gi: int, name, A, Bt, x, y3, fwd: _Forward):
        toks = fwd.tokens[id(g)]
        xf = x.reshape(-1, x.shape[-1])
        if toks is not None:
            if toks.numel() == 0:
                return
            xf = xf.index_select(0, toks)
        protos, allowed = self._arrow_candidates(g, gi, name)
        if protos is None:  # no candidate adapts this module
            return
        idx, w = arrow_mod.route_tokens(xf, protos, g.spec, g.cand, allowed)
        yf = y3.view(-1, y3.shape[-1])
        if toks is None and yf.dtype == xf.dtype:
            arrow_mod.mixed_delta(xf, A, Bt, idx, w, average=g.average, out=yf)
        else:
            delta = arrow_mod.mixed_delta(xf, A, Bt, idx, w, average=g.average).to(y3.dtype)
            if toks is None:
                yf.add_(delta)
            else:
                yf.index_add_(0, toks, delta)
        sums = self.weight_sums.get(name)
        if sums is None:
            sums = self.weight_sums[name] = torch.zeros(len(self.routes), self._E, dtype=torch.float64,
                                                        device=x.device)
        per_token = w.new_zeros(w.shape[0], self._E).scatter_(1, idx, w)
        per_token *= fwd.counted[id(g)].unsqueeze(1).to(per_token.dtype)
        sums.index_add_(0, self._origin[fwd.token_rows[id(g)]], per_token.to(sums.dtype))

    def _arrow_candidates(self, g: _ArrowGroup, gi: int, name: str):
        """(prototypes of the group's candidates at this module, which of them adapt it or None
        for all); (None, None) when none does."""
        key = ("protos", gi, name)
        if key not in self._cache:
            protos = self.protos[name]
            present = getattr(self.expert_set, "present", {}).get(name)
            if g.cand is not None:
                protos = protos.index_select(0, g.cand)
                present = None if present is None else present.index_select(0, g.cand)
            if present is not None and bool(present.all()):
                present = None
            if present is not None and not bool(present.any()):
                protos = None
            self._cache[key] = (protos, present)
        return self._cache[key]

    # -- what happened -------------------------------------------------------------------------

    def report(self, row: int) -> tuple[dict[str, float], dict[str, dict[str, float]] | None]:
        """(mean weight per expert over the row's own tokens (its prompt content, see
        `content_spans`, and what it generated) and all modules, per-module means if
        the plan explains, else None). Experts with weight 0 are left out; largest first."""
        route = self.routes[row]
        names = self.expert_set.names
        modules = self.expert_set.modules
        if route is None:
            return {}, ({m: {} for m in modules} if self.explain else None)
        if isinstance(route, dict):
            ordered = dict(sorted(route.items(), key=lambda kv: -kv[1]))
            return ordered, ({m: dict(ordered) for m in modules} if self.explain else None)
        n = float(self.tokens_seen[row])
        per_module = {}
        total = torch.zeros(self._E, dtype=torch.float64)
        for m in modules:
            s = self.weight_sums.get(m)
            mean = torch.zeros(self._E, dtype=torch.float64) if s is None or n == 0 else s[row].cpu() / n
            total += mean
            per_module[m] = _named(mean, names)
        overall = _named(total / len(modules), names)
        return overall, (per_module if self.explain else None)


def _named(v: torch.Tensor, names: list[str]) -> dict[str, float]:
    pairs = [(names[i], float(v[i])) for i in range(len(names)) if float(v[i]) > 0]
    return dict(sorted(pairs, key=lambda kv: -kv[1]))


__all__ = ["MultiLoraLinear", "RoutingPlan", "install", "uninstall", "installed", "routing", "MODES"]
