"""Merging LoRA experts into one new LoRA adapter (PEFT layout) that the library can store.

Every method works module by module and returns the same thing, a `MergedLora`:

- `merge_concat`: exact. Stacking the experts' A rows and their weighted, scaled B columns gives one
  LoRA of rank sum(r_e) whose update is sum_e w_e s_e B_e A_e, i.e. the output mixture.
- `merge_linear` (task arithmetic): the same summed update, compressed to `rank` by a truncated SVD
  computed from the factors (QR of the stacked B and A^T, then an SVD of the small core matrix), so
  the dense update is never formed. `rank=None` keeps it exact (the concat merge).
- `merge_ties` (Yadav et al. 2023, "TIES-Merging"): per module, trim each expert's dense update to
  its `density` share of largest magnitudes, elect a sign per entry by weighted mass, average the
  entries that agree with it (weighted, disjoint mean), then truncate to `rank` by SVD. Trimming is
  per module (as PEFT and mergekit do), not over the whole task vector.

The merged adapter stores every scale in B and has lora_alpha == r (scaling 1). Its card records
`merged_from` (names and weights) and `merge` (method and settings).

`subtract_general` is GenKnowSub (Bhardwaj et al. 2025): each task expert minus the average of one
or more general-knowledge LoRAs, factor by factor (A_e - mean A_g, s_e B_e - mean s_g B_g), which is
what PEFT's `ArrowConfig(use_gks=True)` does before Arrow routes (the same numbers whenever the
scalings are equal). The "purified" experts go to a library of their own that Arrow routes over.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..adapters import AdapterConfig, AdapterError, read_adapter
from ..adapters.format import ALL_LINEAR, CONFIG_FILE, LIMITS, lora_key
from ..adapters.io import write_adapter_dir
from .experts import RoutingError, expert_from_parts

METHODS = ("concat", "linear", "ties")
MAX_SAMPLES = 32


class MergeError(ValueError):
    """Adapters cannot be merged (incompatible, not LoRA, bad weights or settings)."""


@dataclass
class LoraFactors:
    """One LoRA expert as plain factors: update of `module` is scaling * B[module] @ A[module].

    Module names are paths inside the base model (`model.layers.3.self_attn.q_proj`), the
    convention of `modulora.routing.experts.LoraExpert`, which can be passed in its place. Read
    from a directory, the scaling is folded into B (scaling 1.0) and ranks may differ per module
    (`r` is the largest).
    """

    name: str
    r: int
    scaling: float
    A: dict[str, torch.Tensor]  # [r, in]
    B: dict[str, torch.Tensor]  # [out, r]
    card: dict | None = None
    base_name: str | None = None


@dataclass
class MergedLora:
    """A merged LoRA (scaling 1): update of `module` is B[module] @ A[module]."""

    method: str
    r: int
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    target_modules: tuple[str, ...]
    card: dict = field(default_factory=dict)
    base_name: str | None = None

    def delta(self, module: str) -> torch.Tensor:
        """The dense update [out, in] of one module."""
        return self.B[module] @ self.A[module]


# -- reading experts ------------------------------------------------------------------------------

def load_lora(source, name: str | None = None) -> LoraFactors:
    """A LoRA expert from an adapter directory, a library record (`.path`, `.name`), a
    `(name, path)` pair, or an object that already has `A`, `B`, `r`, `scaling` (LoraExpert)."""
    if isinstance(source, LoraFactors):
        return source
    if hasattr(source, "A") and hasattr(source, "B") and hasattr(source, "scaling"):
        return LoraFactors(name=name or source.name, r=int(source.r), scaling=float(source.scaling),
                           A=dict(source.A), B=dict(source.B), card=getattr(source, "card", None))
    if isinstance(source, tuple):
        name, source = name or source[0], source[1]
    elif hasattr(source, "path") and hasattr(source, "name"):  # a library AdapterRecord
        name, source = name or source.name, source.path
    path = Path(source)
    cfg, tensors, card = read_adapter(path)
    label = name or (card or {}).get("name") or path.name
    if cfg.type != "lora":
        raise MergeError(f"adapter {label} is a {cfg.type} adapter; only LoRA adapters can be merged")
    try:
        e = expert_from_parts(label, cfg, tensors, card)
    except (RoutingError, AdapterError) as err:
        raise MergeError(str(err)) from None
    base_name = None
    try:
        base_name = json.loads((path / CONFIG_FILE).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        pass
    return LoraFactors(name=label, r=e.r, scaling=e.scaling, A=e.A, B=e.B, card=card, base_name=base_name)


def _base_id(e: LoraFactors) -> str | None:
    fp = (e.card or {}).get("base_fingerprint")
    return fp.get("id") if isinstance(fp, dict) else None


def _prepare(experts) -> list[LoraFactors]:
    """Load the experts and refuse incompatible ones, naming the two adapters that differ."""
    experts = [load_lora(e) for e in experts]
    if not experts:
        raise MergeError("no adapters to merge")
    first = experts[0]
    for e in experts[1:]:
        if set(e.A) != set(first.A):
            only = sorted(set(e.A) - set(first.A)) or sorted(set(first.A) - set(e.A))
            raise MergeError(f"adapters {first.name} and {e.name} adapt different modules "
                             f"(e.g. {only[0]} is in one only); they cannot be merged")
        for m in first.A:
            if (e.A[m].shape[1], e.B[m].shape[0]) != (first.A[m].shape[1], first.B[m].shape[0]):
                raise MergeError(f"adapters {first.name} and {e.name} have different shapes at {m} "
                                 f"([{first.B[m].shape[0]}, {first.A[m].shape[1]}] vs "
                                 f"[{e.B[m].shape[0]}, {e.A[m].shape[1]}]); were they made for different bases?")
        a, b = _base_id(first), _base_id(e)
        if a is not None and b is not None and a != b:
            raise MergeError(f"adapters {first.name} and {e.name} were trained on different base models "
                             f"(fingerprints {a} and {b}); they cannot be merged")
    names = [e.name for e in experts]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise MergeError(f"adapter {dup} is listed twice; give each adapter once (use weights to favour one)")
    return experts


def uniform_weights(n: int) -> list[float]:
    return [1.0 / n] * n


def _weights(weights, experts: list[LoraFactors], positive: bool = False) -> list[float]:
    if weights is None:
        return uniform_weights(len(experts))
    weights = list(weights)
    if len(weights) != len(experts):
        raise MergeError(f"got {len(weights)} weights for {len(experts)} adapters; give one weight per adapter")
    for e, w in zip(experts, weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise MergeError(f"the weight of adapter {e.name} must be a finite number, got {w!r}")
        if positive and w <= 0:
            raise MergeError(f"the weight of adapter {e.name} must be positive for this method, got {w}")
    return [float(w) for w in weights]


def _check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= LIMITS.max_rank:
        raise MergeError(f"rank must be an integer from 1 to {LIMITS.max_rank}, got {rank!r}")
    return rank


# -- merging ---------------------------------------------------------------------------------------

def _stacked(experts: list[LoraFactors], weights: list[float], module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """B_cat [out, sum r] (weights and scalings folded in) and A_cat [sum r, in], float64; each
    expert's factors zero-padded to its rank r, so that every module gets the same rank."""
    A = torch.cat([_padded(e.A[module], e.r, 0) for e in experts], 0)
    B = torch.cat([_padded(e.B[module], e.r, 1) * (w * e.scaling) for e, w in zip(experts, weights)], 1)
    return B, A


def _padded(t: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """`t` (float64) with zero rows (dim 0) or columns (dim 1) added up to `r`."""
    missing = r - t.shape[dim]
    return torch.nn.functional.pad(t.double(), (0, 0, 0, missing) if dim == 0 else (0, missing))


def merge_concat(experts, weights=None) -> MergedLora:
    """Exact merge: rank sum(r_e), update sum_e w_e * scaling_e * B_e A_e (the output mixture)."""
    experts = _prepare(experts)
    w = _weights(weights, experts)
    r = sum(e.r for e in experts)
    if r > LIMITS.max_rank:
        raise MergeError(f"the concatenated rank {r} is over the limit of {LIMITS.max_rank}; "
                         "use merge_linear with a rank instead")
    A, B = {}, {}
    for m in experts[0].A:
        Bm, Am = _stacked(experts, w, m)
        A[m], B[m] = Am.float().contiguous(), Bm.float().contiguous()
    return _result("concat", experts, w, A, B, {})


def lowrank_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, S, Vh) of B @ A from its factors, without forming B @ A.

    B = Qb Rb and A^T = Qa Ra (reduced QR), so B A = Qb (Rb Ra^T) Qa^T; the core is at most
    r x r, and its SVD U' S V'^T gives U = Qb U', Vh = V'^T Qa^T.
    """
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    return Qb @ U, S, Vh @ Qa.T


def _factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors (B [out, rank], A [rank, in]) splitting sqrt(S) between them; zero-padded
    when the update has fewer singular values."""
    k = min(rank, S.shape[0])
    root = S[:k].clamp_min(0).sqrt()
    B = torch.zeros(U.shape[0], rank, dtype=torch.float64)
    A = torch.zeros(rank, Vh.shape[1], dtype=torch.float64)
    B[:, :k] = U[:, :k] * root
    A[:k] = root[:, None] * Vh[:k]
    return B.float().contiguous(), A.float().contiguous()


def merge_linear(experts, weights=None, rank: int | None = None) -> MergedLora:
    """Task arithmetic: sum_e w_e * scaling_e * B_e A_e per module; with `rank`, its best rank-`rank`
    approximation (truncated SVD from the factors); with rank=None, exact (same as concat)."""
    if rank is None:
        merged = merge_concat(experts, weights)
        merged.method = merged.card["merge"]["method"] = "linear"
        return merged
    rank = _check_rank(rank)
    experts = _prepare(experts)
    w = _weights(weights, experts)
    A, B = {}, {}
    for m in experts[0].A:
        B[m], A[m] = _factors(*lowrank_svd(*_stacked(experts, w, m)), rank)
    return _result("linear", experts, w, A, B, {"rank": rank})


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` share of entries with the largest magnitudes (at least one), zero the rest."""
    n = delta.numel()
    k = max(1, int(round(density * n)))
    if k >= n:
        return delta.clone()
    keep = torch.topk(delta.abs().reshape(-1), k).indices
    out = torch.zeros(n, dtype=delta.dtype)
    out[keep] = delta.reshape(-1)[keep]
    return out.reshape(delta.shape)


def ties_combine(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES on dense updates: trim, elect a sign per entry (sign of the weighted sum of the trimmed
    updates), then the weighted mean over the experts whose trimmed entry has that sign."""
    stack = torch.stack([trim(d, density) for d in deltas])
    w = torch.tensor(weights, dtype=stack.dtype).reshape(-1, *([1] * (stack.dim() - 1)))
    sign = torch.sign((w * stack).sum(0))
    agree = (torch.sign(stack) == sign) & (stack != 0)
    mass = (w * agree).sum(0)
    total = (w * stack * agree).sum(0)
    return torch.where(mass > 0, total / mass.clamp_min(torch.finfo(stack.dtype).tiny), torch.zeros_like(total))


def merge_ties(experts, weights=None, density: float = 0.2, rank: int = 8) -> MergedLora:
    """TIES merge, module by module on dense updates (fine at these sizes), truncated to `rank`."""
    rank = _check_rank(rank)
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise MergeError(f"density must be in (0, 1], got {density!r}")
    experts = _prepare(experts)
    w = _weights(weights, experts, positive=True)
    A, B = {}, {}
    for m in experts[0].A:
        deltas = [e.scaling * (e.B[m].double() @ e.A[m].double()) for e in experts]
        merged = ties_combine(deltas, w, float(density))
        del deltas
        B[m], A[m] = _factors(*torch.linalg.svd(merged, full_matrices=False), rank)
    return _result("ties", experts, w, A, B, {"rank": rank, "density": float(density)})


def merge(method: str, experts, weights=None, *, rank: int | None = None, density: float = 0.2) -> MergedLora:
    """Dispatch by name: concat, linear (rank optional) or ties (rank defaults to 8)."""
    if method == "concat":
        if rank is not None:
            raise MergeError("concat merges exactly (rank = the sum of the ranks); use linear to set a rank")
        return merge_concat(experts, weights)
    if method == "linear":
        return merge_linear(experts, weights, rank)
    if method == "ties":
        return merge_ties(experts, weights, density, 8 if rank is None else rank)
    raise MergeError(f"unknown merge method {method!r}; use one of {', '.join(METHODS)}")


def subtract_general(experts, general) -> list[MergedLora]:
    """GenKnowSub: every expert minus the average general LoRA, A and (scaled) B separately. Each
    expert must adapt the same modules at the same ranks as the general ones (as in PEFT)."""
    general = _prepare(general)
    names = {g.name for g in general}
    out = []
    for e in (load_lora(x) for x in experts):
        if e.name in names:
            continue  # the general knowledge itself is not a task expert
        _prepare([general[0], e])
        A, B = {}, {}
        for m in e.A:
            if e.A[m].shape != general[0].A[m].shape:
                raise MergeError(f"adapter {e.name} has rank {e.A[m].shape[0]} at {m} and the general adapter "
                                 f"{general[0].name} rank {general[0].A[m].shape[0]}; GenKnowSub needs equal ranks")
            A[m] = (e.A[m].double() - torch.stack([g.A[m].double() for g in general]).mean(0)).float()
            gB = torch.stack([g.B[m].double() * g.scaling for g in general]).mean(0)
            B[m] = (e.B[m].double() * e.scaling - gB).float()
        merged = _result("gks", [e], [1.0], A, B, {"general": [g.name for g in general]})
        merged.card.update(name=e.name, task=(e.card or {}).get("task", ""),
                           description=f"GenKnowSub: {e.name} minus the general knowledge of "
                                       f"{', '.join(g.name for g in general)}")
        out.append(merged)
    if not out:
        raise MergeError("no task experts left once the general adapters are set aside")
    return out


def _short(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def _result(method: str, experts: list[LoraFactors], weights: list[float], A: dict, B: dict,
            params: dict) -> MergedLora:
    r = next(iter(A.values())).shape[0]
    order = {n: i for i, n in enumerate(ALL_LINEAR)}
    targets = tuple(sorted({_short(m) for m in A}, key=lambda n: (order.get(n, len(order)), n)))
    fp = next(((e.card or {}).get("base_fingerprint") for e in experts
               if isinstance((e.card or {}).get("base_fingerprint"), dict)), None)
    names = [e.name for e in experts]
    card = {
        "name": None, "type": "lora", "task": "",
        "description": f"{method} merge of {', '.join(names)}",
        "base_fingerprint": fp,
        "merged_from": [{"name": n, "weight": w} for n, w in zip(names, weights)],
        "merge": {"method": method, **params, "r": r},
        "samples": _samples(experts),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "modulora_version": __version__,
    }
    base_name = next((e.base_name for e in experts if e.base_name), None)
    return MergedLora(method=method, r=r, A=A, B=B, target_modules=targets, card=card, base_name=base_name)


def _samples(experts: list[LoraFactors]) -> list[str]:
    """Up to MAX_SAMPLES example inputs, taken in turn from each expert's card."""
    lists = [list((e.card or {}).get("samples") or []) for e in experts]
    out: list[str] = []
    for i in range(max((len(x) for x in lists), default=0)):
        out += [x[i] for x in lists if i < len(x)]
    return out[:MAX_SAMPLES]


# -- writing ---------------------------------------------------------------------------------------

def save_merged(merged: MergedLora, out_dir: str | os.PathLike, card: dict | None = None) -> Path:
    """Write the merged adapter as a PEFT LoRA directory with its card (merged.card updated by
    `card`); written to a temp dir and renamed into place. An existing directory is replaced."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MergeError(f"cannot save the merged adapter: {out} exists and is not a directory")
    full_card = {**merged.card, **(card or {})}
    if full_card.get("name") is None:
        full_card["name"] = out.name
    cfg = AdapterConfig(type="lora", r=merged.r, alpha=float(merged.r), dropout=0.0,
                        target_modules=merged.target_modules)
    cfg.validate()
    tensors = {}
    for m in merged.A:
        tensors[lora_key(m, "A")] = merged.A[m].detach().float().cpu().contiguous()
        tensors[lora_key(m, "B")] = merged.B[m].detach().float().cpu().contiguous()
    return write_adapter_dir(out, cfg, tensors, full_card, merged.base_name)


# -- command line ----------------------------------------------------------------------------------

def _floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MergeError(f"{what} must be a comma list of numbers, got {text!r}") from None


def cmd_merge(args) -> None:
    from ..library import Library
    from ..validate import validate_name

    validate_name(args.name)
    names = [n.strip() for n in args.adapters.split(",") if n.strip()]
    if len(names) < 2:
        raise MergeError("give at least two adapters to merge: --adapters a,b[,c...]")
    lib = Library(args.library)
    experts = [load_lora(rec.path, name=rec.ref) for rec in (lib.get(*_ref(ref)) for ref in names)]
    merged = merge(args.method, experts, _floats(args.weights, "--weights"), rank=args.rank, density=args.density)
    with tempfile.TemporaryDirectory(prefix="modulora-merge-") as tmp:
        path = save_merged(merged, Path(tmp) / args.name, card={"name": args.name})
        record = lib.add(args.name, path)
    print(f"merged {', '.join(e.name for e in experts)} ({merged.method}, rank {merged.r}) "
          f"into {record.name} v{record.version}")


def cmd_gks(args) -> None:
    from ..library import Library

    src = Library(args.library)
    if src.root.resolve() == Path(args.out_library).resolve():
        raise MergeError("--out-library must be another library: Arrow would route over both the experts and "
                         "their purified copies")
    general = [src.get(*_ref(r)) for r in _names(args.general, "--general")]
    chosen = ([src.get(*_ref(r)) for r in _names(args.adapters, "--adapters")] if args.adapters
              else [r for r in src.list() if r.type == "lora"])
    purified = subtract_general(chosen, general)  # every adapter checked before anything is written
    dst = Library(args.out_library)
    with tempfile.TemporaryDirectory(prefix="modulora-gks-") as tmp:
        for merged in purified:
            rec = dst.add(merged.card["name"], save_merged(merged, Path(tmp) / merged.card["name"]))
            print(f"{rec.name} v{rec.version}: {merged.card['description']}")
    print(f"{len(purified)} purified experts in {dst.root}; route over them with --library {dst.root}")


def _names(text: str, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise MergeError(f"{what} names no adapters")
    return names


def _ref(ref: str) -> tuple[str, int | None]:
    name, _, version = ref.partition("@")
    return name, int(version) if version.isdigit() else None


def add_merge_command(subparsers) -> None:
    """Register `modulora merge` (uses the global --library option)."""
    p = subparsers.add_parser("merge", help="merge LoRA adapters of the library into one new adapter")
    p.add_argument("--method", default="linear", choices=METHODS,
                   help="concat: exact (rank = sum of ranks); linear: task arithmetic, optionally "
                        "truncated to --rank; ties: trim, elect sign, disjoint mean, then --rank")
    p.add_argument("--adapters", required=True, help="comma list of library names (NAME or NAME@VERSION)")
    p.add_argument("--weights", default=None, help="comma list, one per adapter (default: 1/number of adapters)")
    p.add_argument("--rank", type=int, default=None, help="rank of the result (linear: default exact; ties: default 8)")
    p.add_argument("--density", type=float, default=0.2, help="ties: share of each update's entries kept")
    p.add_argument("--name", required=True, help="library name of the merged adapter")
    p.set_defaults(func=cmd_merge)
    g = subparsers.add_parser("gks", help="GenKnowSub: copy the library's LoRA experts, each minus a general-"
                                          "knowledge LoRA, into another library for Arrow to route over")
    g.add_argument("--general", required=True, help="comma list of general-knowledge LoRAs (their average is "
                                                     "subtracted)")
    g.add_argument("--adapters", default=None, help="comma list of experts (default: every other LoRA)")
    g.add_argument("--out-library", required=True, help="the library the purified experts are added to")
    g.set_defaults(func=cmd_gks)


__all__ = ["LoraFactors", "MergedLora", "MergeError", "METHODS", "load_lora", "merge", "merge_concat",
           "merge_linear", "merge_ties", "save_merged", "subtract_general", "lowrank_svd", "ties_combine", "trim",
           "uniform_weights", "add_merge_command"]
