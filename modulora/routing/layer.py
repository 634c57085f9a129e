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
  two batched matmuls (the k experts of a row act as one LoRA of rank k*R; one expert per row,
  the rows' experts in slot order: no gather, the experts' tensors are used as they are);
- sequence routes, output mixture, few experts in use (U used experts of rank R, U*R at most
  `DENSE_PROMPT_COLS` for a prompt, `DENSE_STEP_COLS` for a decode step): the used experts' A
  and B are taken as one LoRA of rank U*R and applied to all rows with two plain matmuls, each
  row's weights (0 for the experts it does not use) scaling its columns in between; one
  efficient GEMM per module instead of many thin batched ones, each used expert read once;
- sequence routes, decode step (t = 1), more experts in use: rows are grouped by expert (pairs
  sorted once per plan), so each used expert's weights are read once per step however many rows
  use it, and each row is multiplied by its own experts only (every row its own expert, rows in
  slot order: two batched matrix-vector products straight into the output);
- parameter averaging: the averaged A and B of each row are formed once per plan and module;
- Arrow: see `arrow.mixed_delta`.

Every index tensor is built once per plan, from the routes on the host, and copied to the device
once; a forward derives its weights from its mask on the device, so a decode step never waits on
a value read back from the device (a prompt with Arrow rows reads its mask once, to skip pads).

The model's forward pre-hook (set by `install`) hands each forward's attention mask to the plan,
so the existing `modulora.forward.forward` / `modulora.generate.generate_ids` work unchanged with
left padding and the KV cache.

One fixed adapter for every request needs none of this: `modulora.adapters.load_adapter` followed
by `modulora.adapters.merge_lora` folds it into the base weights, at zero inference overhead.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass

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
# its work grows with U*R for every token (each row is multiplied by every used expert), while the
# per-row and grouped kernels multiply each row by its own experts only; on a 2-core AMD EPYC the
# grouped decode step overtakes the dense one from 4 experts of rank 8 in use (16 rows: 9.6 ms
# against 8.9 ms over SmolLM2's 210 modules; 16 experts: 30 ms against 18 ms). Rows that each use
# every used expert (`_SeqGroup.full`) take it however many columns: no waste, and no gathers (48
# experts, 16 rows, one thread, one layer: 111 against 218 ms a prompt, 2.8 against 6.2 ms a step)
DENSE_PROMPT_COLS = 64
DENSE_STEP_COLS = 32
# ... and while each row multiplies at most this many times the experts it uses (U <= 2 k): a
# server's prompts of 5 adapters, one a row, took the LoRA part from 94 to 50 ms per forward
DENSE_MAX_EXTRA = 2


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


def _subset(items: list[int], n: int, device):
    """How to take these rows of a stacked [n, ...] tensor: None (all of them, in order), a slice
    (a run of consecutive rows: a view, no copy) or an index tensor (index_select: a copy)."""
    if items == list(range(n)):
        return None
    if items == list(range(items[0], items[0] + len(items))):
        return slice(items[0], items[0] + len(items))
    return torch.tensor(items, device=device)


def _take(t: torch.Tensor, sub) -> torch.Tensor:
    """Rows `sub` (see `_subset`) of a stacked tensor."""
    if sub is None:
        return t
    return t[sub] if isinstance(sub, slice) else t.index_select(0, sub)


class _SeqGroup:
    """Rows with sequence-level routes sharing one composition, and the index tensors of every
    kernel, built once per plan from the routes in plain Python (no tensor is read back):

    - idx / w [rows, k] (padded with weight 0) for prompts; `row_span` when every row has one
      expert and the rows' experts are consecutive slots (the experts' tensors are then a view);
    - decode steps: the (row, expert) pairs grouped by expert, U used experts with C slots each
      (padded with weight 0); `slot_rows` is None where slot i is row i (every row its own
      expert, rows in slot order: no gather and no scatter);
    - the dense mixture: per row, the weight of each of the U*R columns [rows, U*R]; the one
      kernel without waste however many experts when every row uses all of them (`full`: a
      uniform mixture over a library).
    """

    def __init__(self, rows: list[int], pairs: list[list[tuple[int, float]]], expert_set: ExpertSet, b: int,
                 device):
        dtype = expert_set.dtype
        self.row_list = rows
        self.rows = None if rows == list(range(b)) else torch.tensor(rows, device=device)
        self.k = k = max(len(p) for p in pairs)
        self.idx = torch.tensor([[e for e, _ in p] + [0] * (k - len(p)) for p in pairs], device=device)
        self.w = torch.tensor([[v for _, v in p] + [0.0] * (k - len(p)) for p in pairs], dtype=dtype, device=device)
        first = [p[0][0] for p in pairs]
        self.row_span = (slice(first[0], first[0] + len(first))
                         if k == 1 and first == list(range(first[0], first[0] + len(first))) else None)
        by_expert: dict[int, list[tuple[int, float]]] = defaultdict(list)
        for r, p in zip(rows, pairs):
            for e, v in p:
                by_expert[e].append((r, v))
        used = sorted(by_expert)
        self.U, self.C, self.R = len(used), max(len(v) for v in by_expert.values()), expert_set.rank
        self.full = all(len(p) == self.U for p in pairs)  # every row uses every used expert
        self.used = _subset(used, len(expert_set), device)
        slot_rows, slot_w = [], []
        for e in used:
            pad = self.C - len(by_expert[e])
            slot_rows += [r for r, _ in by_expert[e]] + [rows[0]] * pad
            slot_w += [v for _, v in by_expert[e]] + [0.0] * pad
        self.slot_rows = None if slot_rows == list(range(b)) else torch.tensor(slot_rows, device=device)
        self.slot_w = torch.tensor(slot_w, dtype=dtype, device=device)
        column = {e: u for u, e in enumerate(used)}
        dense = torch.zeros(len(rows), self.U, dtype=torch.float64)
        for i, p in enumerate(pairs):
            for e, v in p:
                dense[i, column[e]] += v
        self.dense_w = dense.repeat_interleave(self.R, dim=1).to(device=device, dtype=dtype)  # [rows, U*R]


class _ArrowGroup:
    """Rows sharing one Arrow spec and composition; `cand` takes the candidates' rows of the set's
    stacked tensors (`_subset`: None for all, a slice for a run of slots)."""

    def __init__(self, spec: Arrow, rows: list[int], expert_set: ExpertSet, average: bool, b: int, device):
        self.spec = spec
        self.average = average
        self.row_list = rows
        self.all_rows = rows == list(range(b))
        self.rows = torch.tensor(rows, device=device)
        self.cand_list = spec.candidates(expert_set)
        self.cand = _subset(self.cand_list, len(expert_set), device)


@dataclass
class _ArrowTokens:
    """An Arrow group's tokens in one forward: `toks` the flat positions computed (None: all of
    the batch, in order), `scale` [n] their validity when pads are computed too (decode steps,
    None: all real), `origin` [n] each one's row of the plan, `counted` [n] 1 where it counts in
    report() (None: wherever `scale` is not 0)."""

    toks: torch.Tensor | None
    scale: torch.Tensor | None
    origin: torch.Tensor
    counted: torch.Tensor | None


class _Forward:
    """What one forward pass shares across all layers, derived once from its token mask."""

    def __init__(self, b: int, t: int):
        self.b, self.t = b, t
        # id(sequence group) -> weights times validity: [rows, t, k], or [U*C] per slot in a decode step,
        # or [rows*t, U*R] per column of the dense mixture
        self.seq: dict[int, torch.Tensor] = {}
        self.dense = False  # whether the output-mixture group takes the dense path in this forward
        self.arrow: dict[int, _ArrowTokens] = {}  # id(Arrow group) -> its tokens


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
        self.protos: dict[str, dict[str, torch.Tensor]] = {}  # prototype kind -> module -> [slots, in]
        self.fwd: _Forward | None = None
        self.token_mask: torch.Tensor | None = None  # this forward's real tokens [b, t]
        # report() summarises a row over its own tokens: [lo, hi) of the prompt per row, set by
        # the caller so that chat-template tokens shared by every request do not dominate
        self.content_spans: list[tuple[int, int]] | None = None
        # what report() reads, per row of the plan (however the batch was narrowed since): tokens
        # counted, and for Arrow rows the sum over them of each expert's weight, per module [rows, E]
        self.tokens_seen = torch.zeros(b, dtype=torch.float64, device=expert_set.device)
        self._sums: dict[str, torch.Tensor] = {}
        self._steps: dict[tuple[int, str], torch.Tensor] = {}  # decode steps: per group and module
        self._E = len(expert_set)
        self.arrows: list[_ArrowGroup] = []
        self.select(list(range(b)))

    @property
    def weight_sums(self) -> dict[str, torch.Tensor]:
        """module -> [rows of the plan, experts] (float64): each Arrow row's summed weight per expert."""
        self._fold()
        return self._sums

    @weight_sums.setter
    def weight_sums(self, value: dict[str, torch.Tensor]) -> None:
        self._steps = {}
        self._sums = value

    def select(self, rows: list[int]) -> None:
        """From the next forward on, the batch holds only these rows of the plan, in this order (a
        generation drops the rows that finished); reports still count each row's earlier tokens."""
        expert_set, device = self.expert_set, self.expert_set.device
        self._fold()  # the decode steps' sums are kept per group: move them before the groups change
        self.origin = list(rows)
        self._origin = torch.tensor(self.origin, dtype=torch.long, device=device)
        self.b = len(rows)
        mix_rows, avg_rows, arrow_rows = [], [], defaultdict(list)
        for p, i in enumerate(rows):
            route, mode = self.routes[i], self.modes[i]
            if isinstance(route, Arrow):
                arrow_rows[(route, mode)].append(p)
            elif isinstance(route, dict):
                (avg_rows if mode == "average" and len(route) > 1 else mix_rows).append(p)
        def seq_group(pos):
            if not pos:
                return None
            pairs = [[(expert_set.index(n), w) for n, w in self.routes[rows[p]].items()] for p in pos]
            return _SeqGroup(pos, pairs, expert_set, self.b, device)

        self.mix, self.avg = seq_group(mix_rows), seq_group(avg_rows)
        self.arrows = [_ArrowGroup(spec, pos, expert_set, mode == "average", self.b, device)
                       for (spec, mode), pos in arrow_rows.items()]
        self.active = bool(mix_rows or avg_rows or arrow_rows)
        for g in self.arrows:
            if g.spec.prototypes not in self.protos:
                self.protos[g.spec.prototypes] = arrow_mod.prototypes(expert_set, g.spec.prototypes)
        self._cache: dict = {}  # per-module tensors of these groups

    # -- per forward ---------------------------------------------------------------------------

    def begin(self, token_mask: torch.Tensor | None, b: int, t: int) -> None:
        """Called (by the model's pre-hook) before each forward: `token_mask` [b, t] marks this
        forward's real tokens (None: all real). Builds this forward's weights on the device; a
        decode step reads nothing back to the host."""
        if b != self.b:
            raise RoutingError(f"the routing plan has {self.b} rows but the batch has {b}")
        dev = self.expert_set.device
        valid = (torch.ones(b, t, dtype=torch.bool, device=dev) if token_mask is None
                 else token_mask.to(device=dev, dtype=torch.bool))
        fwd = _Forward(b, t)
        mix = self.mix
        if mix is not None:
            cols = DENSE_STEP_COLS if t == 1 else DENSE_PROMPT_COLS
            fwd.dense = (mix.U * mix.R <= cols or mix.full) and mix.U <= DENSE_MAX_EXTRA * mix.k
        for g in (self.mix, self.avg):
            if g is not None:
                fwd.seq[id(g)] = self._seq_weights(g, valid, t, fwd.dense and g is self.mix)
        counted = valid
        if self.content_spans is not None:
            pos = torch.arange(t, device=dev)
            spans = [self.content_spans[i] for i in self.origin]
            lo = torch.tensor([a for a, _ in spans], device=dev).unsqueeze(1)
            hi = torch.tensor([z for _, z in spans], device=dev).unsqueeze(1)
            counted = valid & (pos >= lo) & (pos < hi)
        for g in self.arrows:
            fwd.arrow[id(g)] = self._arrow_tokens(g, valid, counted)
        self.tokens_seen.index_add_(0, self._origin, counted.sum(1).to(self.tokens_seen.dtype))
        self.token_mask = valid
        self.fwd = fwd

    def _seq_weights(self, g: _SeqGroup, valid: torch.Tensor, t: int, dense: bool) -> torch.Tensor:
        """A sequence group's weights times validity for this forward, in its kernel's layout."""
        dtype = self.expert_set.dtype
        if t == 1 and g is self.mix and not dense:  # per decode slot [U, C, 1]
            v = valid[:, 0] if g.slot_rows is None else valid[:, 0].index_select(0, g.slot_rows)
            return (g.slot_w * v.to(dtype)).view(g.U, g.C, 1)
        v = (valid if g.rows is None else valid.index_select(0, g.rows)).to(dtype)
        if dense:                                                         # per column [rows*t, U*R]
            return (g.dense_w.unsqueeze(1) * v.unsqueeze(2)).reshape(-1, g.U * g.R)
        return g.w.unsqueeze(1) * v.unsqueeze(2)                          # [rows, t, k]

    def _arrow_tokens(self, g: _ArrowGroup, valid: torch.Tensor, counted: torch.Tensor) -> _ArrowTokens:
        """An Arrow group's tokens in this forward. A decode step computes every row's token and
        weights pads 0 (no host sync); a prompt computes only its real tokens (picking them reads
        the mask back once per forward, and saves the work on padding)."""
        b, t = valid.shape
        dtype = self.expert_set.dtype
        rows = None if g.all_rows else g.rows
        if t == 1:
            v, c = valid[:, 0], counted[:, 0]
            if rows is not None:
                v, c = v.index_select(0, rows), c.index_select(0, rows)
            origin = self._origin if rows is None else self._origin.index_select(0, rows)
            return _ArrowTokens(rows, v.to(dtype), origin, None if counted is valid else c.to(dtype))
        keep = valid.index_select(0, g.rows).reshape(-1)
        flat = (g.rows.unsqueeze(1) * t + torch.arange(t, device=valid.device)).reshape(-1)
        toks = flat[keep]
        origin = self._origin[g.rows.repeat_interleave(t)[keep]]
        c = None if counted is valid else counted.index_select(0, g.rows).reshape(-1)[keep].to(dtype)
        return _ArrowTokens(None if toks.numel() == b * t else toks, None, origin, c)

    # -- the layer's work ----------------------------------------------------------------------

    def apply(self, layer: MultiLoraLinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[0], x.shape[1] if x.dim() == 3 else 1
        fwd = self.fwd
        if fwd is None:  # a layer called on its own, outside a model forward: every token is real
            self.begin(None, b, t)
            fwd = self.fwd
        elif (fwd.b, fwd.t) != (b, t):
            raise RoutingError(f"layer input is [{b}, {t}] but this forward's mask is [{fwd.b}, {fwd.t}]")
        name = layer.module_name
        dtype = self._product_dtype(x, t)
        xe = (x if x.dtype == dtype else x.to(dtype)).reshape(b, t, -1)
        y3 = y.view(b, t, -1)
        A, Bt = self.expert_set.stacks(name, dtype)
        g = self.mix
        if g is not None:
            if fwd.dense:
                self._dense(g, name, A, Bt, xe, y3, fwd.seq[id(g)])
            elif t == 1:
                self._grouped(g, name, A, Bt, xe, y3, fwd.seq[id(g)])
            else:
                self._rowwise_mixture(g, A, Bt, xe, y3, fwd.seq[id(g)])
        if self.avg is not None:
            self._rowwise_average(self.avg, name, A, Bt, xe, y3, fwd.seq[id(self.avg)])
        for gi, ga in enumerate(self.arrows):
            self._arrow(ga, gi, name, A, Bt, xe, y3, fwd.arrow[id(ga)])
        return y

    def _product_dtype(self, x: torch.Tensor, t: int) -> torch.dtype:
        """The experts multiply in the set's dtype, except in a prompt whose activations are half
        precision (a bf16 base): there in the activations' dtype, with no cast of the activations
        and the deltas added in place (3-4x faster on a CPU with AMX). A decode step of a few rows
        is faster in fp32."""
        half = x.dtype in (torch.bfloat16, torch.float16) and x.dtype != self.expert_set.dtype
        return x.dtype if half and t > 1 else self.expert_set.dtype

    @staticmethod
    def _add_rows(y3, rows, delta):
        delta = delta.to(y3.dtype)
        if rows is None:
            y3.add_(delta)
        else:
            y3.index_add_(0, rows, delta)

    @staticmethod
    def _in_place(y3, rows, z) -> bool:
        """Whether a product can accumulate straight into the base output."""
        return rows is None and y3.dtype == z.dtype and y3.is_contiguous()

    def _used(self, g: _SeqGroup, name: str, A, Bt):
        """The group's used experts' A and B (views of the set, or copies made once per plan)."""
        key = ("used", name, A.dtype)
        if key not in self._cache:
            self._cache[key] = (_take(A, g.used), _take(Bt, g.used))
        return self._cache[key]

    def _rowwise_mixture(self, g: _SeqGroup, A, Bt, x, y3, wt):
        """Each row's k experts as one LoRA of rank k*R: gather, then two batched matmuls."""
        n, k = g.idx.shape
        R = A.shape[1]
        xg = x if g.rows is None else x.index_select(0, g.rows)
        if g.row_span is not None:                                        # one expert a row, in slot order
            Ag, Bg = A[g.row_span], Bt[g.row_span]
        else:
            Ag, Bg = A[g.idx].view(n, k * R, -1), Bt[g.idx].view(n, k * R, -1)  # [n, kR, in], [n, kR, out]
        z = torch.bmm(xg, Ag.transpose(1, 2))                             # [n, t, kR]
        z.view(n, -1, k, R).mul_(wt.unsqueeze(-1))                        # weights and pad mask
        if self._in_place(y3, g.rows, z):
            y3.baddbmm_(z, Bg)
        else:
            self._add_rows(y3, g.rows, torch.bmm(z, Bg))

    def _dense(self, g: _SeqGroup, name, A, Bt, x, y3, wt):
        """The used experts as one LoRA of rank U*R over all the group's tokens: z = x A_u^T, each
        row's columns scaled by its weights (and its pad mask), then y += z B_u."""
        Au, Bu = self._used(g, name, A, Bt)
        Au, Bu = Au.reshape(-1, Au.shape[2]), Bu.reshape(-1, Bu.shape[2])
        xg = x if g.rows is None else x.index_select(0, g.rows)
        n, t = xg.shape[0], xg.shape[1]
        z = F.linear(xg.reshape(n * t, -1), Au)                          # [n*t, U*R]
        z.mul_(wt)                                                        # weights and pad mask
        if self._in_place(y3, g.rows, z):
            y3.view(n * t, -1).addmm_(z, Bu)
        else:
            self._add_rows(y3, g.rows, torch.mm(z, Bu).view(n, t, -1))

    def _grouped(self, g: _SeqGroup, name, A, Bt, x, y3, slot_w):
        """Decode step: (row, expert) pairs grouped by expert, [U, C] slots; each used expert's
        weights read once, each row multiplied only by its own experts."""
        key = ("step", name)
        if key not in self._cache:
            A, Bt = self._used(g, name, A, Bt)
            self._cache[key] = (A.transpose(1, 2), Bt)                    # [U, in, R], [U, R, out]
        At, Bt = self._cache[key]
        b = x.shape[0]
        if g.slot_rows is None:                                           # slot i is row i
            z = torch.bmm(x.reshape(g.U, g.C, -1), At)                    # [U, C, R]
            z.mul_(slot_w)
            if self._in_place(y3, None, z):
                y3.view(g.U, g.C, -1).baddbmm_(z, Bt)
            else:
                self._add_rows(y3, None, torch.bmm(z, Bt).view_as(y3))
            return
        xs = x.reshape(b, -1).index_select(0, g.slot_rows)
        z = torch.bmm(xs.view(g.U, g.C, -1), At)
        z.mul_(slot_w)
        ys = torch.bmm(z, Bt).view(g.U * g.C, -1)                         # [U*C, out]
        self._add_rows(y3.view(b, -1), g.slot_rows, ys)

    def _rowwise_average(self, g: _SeqGroup, name, A, Bt, x, y3, wt):
        """(sum w B)(sum w A) per row; the averaged A and B are formed once per plan and module."""
        key = ("avg", name, A.dtype)
        if key not in self._cache:
            w = g.w.to(A.dtype)
            self._cache[key] = (torch.einsum("nk,nkri->nri", w, A[g.idx]), torch.einsum("nk,nkro->nro", w, Bt[g.idx]))
        Aa, Ba = self._cache[key]
        xg = x if g.rows is None else x.index_select(0, g.rows)
        z = torch.bmm(xg, Aa.transpose(1, 2))                             # [n, t, R]
        z.mul_((wt.sum(-1) > 0).unsqueeze(-1).to(z.dtype))                # pads get nothing
        self._add_rows(y3, g.rows, torch.bmm(z, Ba))

    def _arrow(self, g: _ArrowGroup, gi: int, name, A, Bt, x, y3, tok: _ArrowTokens):
        """Per token: the top-k candidates by |<x, v_e>|, then their products (arrow.mixed_delta)."""
        cands = self._arrow_candidates(g, gi, name, A, Bt)
        if cands is None:  # no candidate adapts this module
            return
        protos, allowed, Ac, Btc, routed = cands
        xf = x.reshape(-1, x.shape[-1])
        if tok.toks is not None:
            if tok.toks.numel() == 0:
                return
            xf = xf.index_select(0, tok.toks)
        if routed:
            xr = xf if xf.dtype == protos.dtype else xf.to(protos.dtype)  # routing in the prototypes' dtype
            idx, w = arrow_mod.route_tokens(xr, protos, g.spec, allowed=allowed)   # candidate positions
        else:
            idx, w = arrow_mod.uniform_tokens(xf.shape[0], allowed, protos.shape[0], xf.device)
        if tok.scale is not None:
            w = w * tok.scale.unsqueeze(1)                                # pads get nothing
        coeff = arrow_mod.coefficients(idx, w, protos.shape[0])           # [n, candidates]
        wp, cp = (w, coeff) if w.dtype == xf.dtype else (w.to(xf.dtype), coeff.to(xf.dtype))  # the products'
        yf = y3.view(-1, y3.shape[-1])
        if tok.toks is None and yf.dtype == xf.dtype:
            arrow_mod.mixed_delta(xf, Ac, Btc, idx, wp, average=g.average, out=yf, coeff=cp)
        else:
            delta = arrow_mod.mixed_delta(xf, Ac, Btc, idx, wp, average=g.average, coeff=cp)
            self._add_rows(yf, tok.toks, delta)
        self._count(g, gi, name, coeff, tok)

    def _count(self, g: _ArrowGroup, gi: int, name: str, coeff: torch.Tensor, tok: _ArrowTokens) -> None:
        """Add each token's weight per candidate to its row's sums for this module (on the device):
        a decode step (one token per row of the group, in order) adds straight into the group's
        own sums; a prompt adds into the plan's per row."""
        if tok.counted is not None:
            coeff = coeff * tok.counted.unsqueeze(1)
        if tok.scale is not None:  # a decode step
            steps = self._steps.get((gi, name))
            if steps is None:
                self._steps[(gi, name)] = coeff.to(torch.float64)
            else:
                steps.add_(coeff)
            return
        self._add_sums(g, name, tok.origin, coeff)

    def _add_sums(self, g: _ArrowGroup, name: str, origin: torch.Tensor, coeff: torch.Tensor) -> None:
        """sums[name][origin[i], candidates] += coeff[i]."""
        sums = self._sums.get(name)
        if sums is None:
            sums = self._sums[name] = torch.zeros(len(self.routes), self._E, dtype=torch.float64,
                                                  device=coeff.device)
        if isinstance(g.cand, torch.Tensor):
            coeff = coeff.new_zeros(coeff.shape[0], self._E).index_copy_(1, g.cand, coeff)
        target = sums if not isinstance(g.cand, slice) else sums[:, g.cand]
        target.index_add_(0, origin, coeff.to(sums.dtype))

    def _fold(self) -> None:
        """Move the decode steps' sums of the current groups into the plan's."""
        for (gi, name), steps in self._steps.items():
            g = self.arrows[gi]
            self._add_sums(g, name, self._origin if g.all_rows else self._origin.index_select(0, g.rows), steps)
        self._steps = {}

    def _arrow_candidates(self, g: _ArrowGroup, gi: int, name: str, A, Bt):
        """(prototypes of the group's candidates at this module, which of them adapt it (None: all),
        their A and Bt, whether tokens route here), once per plan and module; None when none adapts
        it. Decided on the host from the experts themselves, so nothing is read back from the device."""
        key = ("arrow", gi, name, A.dtype)
        if key not in self._cache:
            experts = getattr(self.expert_set, "experts", None)
            present = [experts is None or (experts[s] is not None and name in experts[s].A) for s in g.cand_list]
            allowed = None if all(present) else torch.tensor(present, device=A.device)
            got = (_take(self.protos[g.spec.prototypes][name], g.cand), allowed, _take(A, g.cand), _take(Bt, g.cand),
                   g.spec.routes(name))
            self._cache[key] = got if any(present) else None
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
        sums = self.weight_sums
        for m in modules:
            s = sums.get(m)
            mean = torch.zeros(self._E, dtype=torch.float64) if s is None or n == 0 else s[row].cpu() / n
            total += mean
            per_module[m] = _named(mean, names)
        overall = _named(total / len(modules), names)
        return overall, (per_module if self.explain else None)


def _named(v: torch.Tensor, names: list[str]) -> dict[str, float]:
    pairs = [(names[i], float(v[i])) for i in range(len(names)) if float(v[i]) > 0]
    return dict(sorted(pairs, key=lambda kv: -kv[1]))


__all__ = ["MultiLoraLinear", "RoutingPlan", "install", "uninstall", "installed", "routing", "MODES"]
