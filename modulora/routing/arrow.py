"""Arrow routing (Ostapenko et al. 2024, "Towards Modular LLMs by Building and Reusing a Library
of LoRAs"): zero-shot, per token and per layer, from the experts' own weights.

For every adapted module, expert e has a prototype v_e: the top right singular vector of its
update B_e·A_e (a unit vector in the module's input space, defined up to sign). A token x entering
the module scores each expert by |<x, v_e>| (the sign of v_e does not matter), keeps the top k,
and mixes their outputs with softmax(score / temperature) over those k:

    y = W x + sum_{e in top-k(x)} w_e(x) B_e A_e x             (mode "mixture")
    y = W x + (sum w_e(x) B_e) (sum w_e(x) A_e) x               (mode "average")

With `normalize=True` the score uses x / |x| (a cosine); PEFT's Arrow (peft 0.21 `ArrowConfig`)
does not normalise, and so the default matches it. The experts' scalings are part of B_e.

Settings for studying what matters (experiment 2's Arrow ablation): `prototypes="a"` takes
v_e from A_e alone (the input direction the expert reads most, whatever B_e does with it);
`prototypes="spectral"` scores with the whole spectrum instead of its top direction, as SpectR
(Fleshman & Van Durme 2025) does: with B_e A_e = U S V^T, the score is |S V^T x| = |B_e A_e x|,
the size of the expert's own update for this token (its prototype is the [r, in] matrix S V^T);
`modules` (a regular expression) routes per token only in the modules whose names it matches,
mixing every candidate with equal weights in the others (between Arrow and the uniform mixture).

Prototypes are computed once per adapter without forming the [out, in] matrix (QR of B and of
A^T, then the SVD of the small r x r core) and cached in the library as `arrow-v1` derived data.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .experts import ExpertSet, LoraExpert, RoutingError, cache_derived

ARROW_KIND = "arrow-v1"
# prototype kind -> its cache kind in the library: from the product B A, from A alone, or the
# whole spectrum of B A (SpectR)
PROTOTYPES = {"product": ARROW_KIND, "a": "arrow-a-v1", "spectral": "arrow-spectral-v1"}

# Kernel choice for the expert products (see bench/routing_layer_micro.py and `mixed_delta`): one
# masked product over all the candidates ("dense": two efficient GEMMs, no host sync) while they
# are few compared with k, or while the tokens are few (a decode step) and could use them all;
# few tokens among many experts gather each token's own k experts (no host sync either); a prompt
# among many experts reads the counts once per module and takes the "used" experts' masked
# product, or sorts the token-expert pairs by expert (work that grows with k, not with E).
DENSE_MAX_RATIO = 4.0   # dense / "used" while (number of experts) <= DENSE_MAX_RATIO * k ...
DENSE_MAX_TOKENS = 64   # ... or while there are at most this many tokens


@dataclass(frozen=True)
class Arrow:
    """A per-token route: top `top_k` experts by |<x, v_e>|, softmax(score / temperature) over them.
    `experts` limits the candidates to these names (default: every expert of the set);
    `prototypes` and `modules`: see the module docstring."""

    top_k: int = 4
    temperature: float = 1.0
    normalize: bool = False
    experts: tuple[str, ...] | None = None
    prototypes: str = "product"
    modules: str | None = None

    def routes(self, module: str) -> bool:
        """Whether tokens route per token in this module (else: every candidate, equal weights)."""
        return self.modules is None or re.search(self.modules, module) is not None

    def __post_init__(self):
        if self.experts is not None and not isinstance(self.experts, tuple):
            object.__setattr__(self, "experts", tuple(self.experts))

    def check(self) -> None:
        """RoutingError for a setting that cannot work, whatever the experts."""
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise RoutingError(f"Arrow top_k must be a positive integer, got {k!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise RoutingError(f"Arrow temperature must be a finite number > 0, got {t!r}")
        if not isinstance(self.normalize, bool):
            raise RoutingError(f"Arrow normalize must be true or false, got {self.normalize!r}")
        if not isinstance(self.prototypes, str) or self.prototypes not in PROTOTYPES:
            raise RoutingError(f"Arrow prototypes must be one of {', '.join(PROTOTYPES)}; got {self.prototypes!r}")
        if self.modules is not None:
            try:
                re.compile(self.modules)
            except (re.error, TypeError) as e:
                raise RoutingError(f"Arrow modules must be a regular expression; {self.modules!r}: {e}") from None

    def candidates(self, expert_set: ExpertSet) -> list[int]:
        """Indices of the candidate experts; RoutingError for any setting that cannot work."""
        self.check()
        modules = expert_set.modules
        if self.modules is not None and not any(self.routes(m) for m in modules):
            raise RoutingError(f"Arrow modules {self.modules!r} matches none of the experts' modules "
                               f"(e.g. {modules[0] if modules else 'none loaded'})")
        k = self.top_k
        if self.experts is None:
            cand = expert_set.occupied()
            if not cand:
                raise RoutingError("Arrow has no experts to choose from (none is loaded)")
        else:
            if not self.experts:
                raise RoutingError("Arrow experts=() names no experts (use None for all)")
            if len(set(self.experts)) != len(self.experts):
                raise RoutingError(f"Arrow experts names an expert twice: {list(self.experts)}")
            cand = [expert_set.index(n) for n in self.experts]
        if k > len(cand):
            raise RoutingError(f"Arrow top_k={k} is larger than the number of experts to choose from "
                               f"({len(cand)})")
        return cand


SETTINGS = ("temperature", "normalize", "prototypes", "modules")  # what a request may set beside top_k


def arrow_route(top_k: int, settings: dict | None = None) -> Arrow:
    """The Arrow route of a request: its top_k and the `SETTINGS` it names (the rest default);
    RoutingError for a setting Arrow does not have."""
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise RoutingError(f"unknown Arrow setting {unknown[0]!r}; Arrow takes {', '.join(SETTINGS)}")
    spec = Arrow(top_k=top_k, **settings)
    spec.check()
    return spec


# ---------------------------------------------------------------------------------------------
# prototypes


def _svd_of_product(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, V^T) of each B[i] @ A[i] = U S V^T (A: [..., r, in], B: [..., out, r]; float64) without
    forming B @ A: with A^T = Qa Ra and B = Qb Rb (thin QR), B A = Qb (Rb Ra^T) Qa^T, so the SVD
    of the small r x r core gives them."""
    A64, B64 = A.detach().to(torch.float64), B.detach().to(torch.float64)
    Qa, Ra = torch.linalg.qr(A64.transpose(-1, -2))          # [.., in, r'], [.., r', r]
    _, Rb = torch.linalg.qr(B64)                               # [.., r'', r]
    _, S, Vh = torch.linalg.svd(Rb @ Ra.transpose(-1, -2))     # core [.., r'', r']
    return S, Vh @ Qa.transpose(-1, -2)


def _signed_unit(v: torch.Tensor) -> torch.Tensor:
    """Unit vectors whose largest-magnitude entry is positive (singular vectors' sign is arbitrary)."""
    lead = torch.gather(v, -1, v.abs().argmax(-1, keepdim=True))
    v = torch.where(lead < 0, -v, v)
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-30)


@torch.no_grad()
def top_right_singular_vectors(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Top right singular vector of each B[i] @ A[i] -> [..., in], unit norm, sign fixed."""
    return _signed_unit(_svd_of_product(A, B)[1][..., 0, :])


@torch.no_grad()
def top_right_singular_vectors_of_a(A: torch.Tensor) -> torch.Tensor:
    """Top right singular vector of each A[i] ([..., r, in] -> [..., in]), sign fixed."""
    return _signed_unit(torch.linalg.svd(A.detach().to(torch.float64), full_matrices=False)[2][..., 0, :])


@torch.no_grad()
def spectra(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """S V^T of each B[i] @ A[i] = U S V^T ([..., r, in]): |S V^T x| = |B A x| for any x."""
    S, Vt = _svd_of_product(A, B)
    return S.unsqueeze(-1) * Vt


def compute_prototypes(expert: LoraExpert, kind: str = "product") -> dict[str, torch.Tensor]:
    """module -> prototype [in] ([r, in] for "spectral"; float32) for one expert; modules of equal
    shapes in one batch."""
    groups: dict[tuple, list[str]] = {}
    for m in sorted(expert.A):
        groups.setdefault((tuple(expert.A[m].shape), tuple(expert.B[m].shape)), []).append(m)
    out = {}
    for mods in groups.values():
        A = torch.stack([expert.A[m] for m in mods])
        B = torch.stack([expert.B[m] for m in mods])
        v = (top_right_singular_vectors_of_a(A) if kind == "a" else spectra(A, B) if kind == "spectral"
             else top_right_singular_vectors(A, B))
        for m, row in zip(mods, v):
            out[m] = row.to(torch.float32).contiguous()
    return out


def _cached(expert: LoraExpert, kind: str) -> dict[str, torch.Tensor] | None:
    lib = expert.library
    if lib is None or not expert.object_id:
        return None
    blob = lib.get_derived(expert.object_id, PROTOTYPES[kind])
    if blob is None:
        return None
    try:
        protos = st_load(blob)
    except Exception:  # unreadable cache entry: recompute and overwrite
        return None
    def shape(m):
        return tuple(expert.A[m].shape) if kind == "spectral" else (expert.A[m].shape[1],)

    ok = set(protos) == set(expert.A) and all(
        protos[m].shape == shape(m) and bool(torch.isfinite(protos[m]).all()) for m in expert.A)
    return protos if ok else None


def expert_prototypes(expert: LoraExpert, kind: str = "product") -> dict[str, torch.Tensor]:
    """An expert's prototypes of `kind`: from its library's cache, else computed (and cached there)."""
    protos = _cached(expert, kind)
    if protos is None:
        protos = compute_prototypes(expert, kind)
        if expert.library is not None and expert.object_id:
            cache_derived(expert.library, expert.object_id, PROTOTYPES[kind], st_save(protos))
    return protos


def prototypes(expert_set: ExpertSet, kind: str = "product") -> dict[str, torch.Tensor]:
    """module -> [slots, in] prototypes of an expert set (each adapter's computed once per
    library, and once per slot it is loaded into)."""
    return expert_set.prototypes(kind)


# ---------------------------------------------------------------------------------------------
# per-token routing and the expert products


def route_tokens(x: torch.Tensor, protos: torch.Tensor, spec: Arrow,
                 cand: torch.Tensor | None = None,
                 allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert indices [N, k] (into the set; `protos` [candidates, in] (or [candidates, r, in]:
    spectral) holds the candidates, `cand` maps them to the set) and weights [N, k] (softmax over
    the top k, summing to 1) for tokens x [N, in]. `allowed` [candidates] (bool) leaves out
    experts that do not adapt this module: they get weight 0 (the caller makes sure at least one
    is allowed)."""
    if protos.dim() == 3:
        scores = (x @ protos.reshape(-1, protos.shape[2]).T).view(x.shape[0], protos.shape[0], -1).norm(dim=-1)
    else:
        scores = x @ protos.T
    if spec.normalize:
        scores = scores / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    scores = scores.abs_()
    if allowed is not None:
        scores.masked_fill_(~allowed, float("-inf"))
    vals, idx = torch.topk(scores, min(spec.top_k, protos.shape[0]), dim=-1)
    w = torch.softmax(vals if spec.temperature == 1 else vals / spec.temperature, dim=-1)
    if cand is not None:
        idx = cand[idx]
    return idx, w


def uniform_tokens(n: int, allowed: torch.Tensor | None, C: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`route_tokens`' result where a module does not route: every candidate (of the C; those
    `allowed` where given) with equal weights, for each of n tokens."""
    keep = torch.ones(C, device=device) if allowed is None else allowed.to(torch.float32)
    w = (keep / keep.sum()).expand(n, C)
    return torch.arange(C, device=device).expand(n, C), w


def coefficients(idx: torch.Tensor, w: torch.Tensor, E: int) -> torch.Tensor:
    """Each token's weight for every expert [N, E] (0 for the experts it did not select)."""
    return w.new_zeros(idx.shape[0], E).scatter_(1, idx, w)


def mixed_delta(x: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                average: bool = False, out: torch.Tensor | None = None,
                coeff: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k w[n,k] B_idx A_idx x[n] (or the averaged form) for tokens x [N, in]; A [E, R, in],
    Bt [E, R, out]. With `out` [N, out] (same dtype), the result is added to it in place and
    `out` returned; `coeff` is `coefficients(idx, w, E)` where the caller has it already.

    Few experts (E <= DENSE_MAX_RATIO * k), or few tokens that together could select them all:
    every expert's product, unselected ones weighted 0 (no host sync: a GPU decode step never
    waits for the host). Few tokens among many experts: each token's own experts gathered (no
    sync either). Only a prompt among many experts reads the selection counts back, once per
    module, to compute just the experts that some token selected."""
    E = A.shape[0]
    n, k = idx.shape
    if E <= DENSE_MAX_RATIO * k or (n <= DENSE_MAX_TOKENS and n * k >= E):
        return dense_delta(x, A, Bt, coefficients(idx, w, E) if coeff is None else coeff, average, out)
    if n <= DENSE_MAX_TOKENS:
        return _pair_delta(x, A, Bt, idx, w, average, out)
    counts = torch.bincount(idx.reshape(-1), minlength=E)
    used = counts.nonzero().squeeze(1)
    if used.numel() <= DENSE_MAX_RATIO * k:
        return _used_delta(x, A, Bt, idx, w, used, average, out)
    return _sorted_delta(x, A, Bt, idx, w, counts.tolist(), average, out)


def dense_delta(x, A, Bt, coeff, average=False, out=None):
    """Every expert's product for every token, scaled by coeff [N, E]: two GEMMs of rank E*R."""
    E, R, d_in = A.shape
    z = torch.nn.functional.linear(x, A.reshape(E * R, d_in)).view(-1, E, R)   # [N, E, R]
    if average:
        zbar = torch.einsum("ne,ner->nr", coeff, z)                       # (sum w A) x
        z = coeff.unsqueeze(-1) * zbar.unsqueeze(1)                       # feeds sum w B
    else:
        z.mul_(coeff.unsqueeze(-1))
    z, Bt = z.view(-1, E * R), Bt.reshape(E * R, -1)
    return z @ Bt if out is None else out.addmm_(z, Bt)


def _pair_delta(x, A, Bt, idx, w, average, out=None):
    """Each token's k experts gathered ([N, k*R, .]: copies of the selected experts only), then
    two batched matrix-vector products."""
    n, k = idx.shape
    R = A.shape[1]
    z = torch.bmm(A[idx].view(n, k * R, -1), x.unsqueeze(2)).view(n, k, R)
    if average:
        z = w.unsqueeze(-1) * (z * w.unsqueeze(-1)).sum(1, keepdim=True)
    else:
        z = z * w.unsqueeze(-1)
    delta = torch.bmm(z.view(n, 1, k * R), Bt[idx].view(n, k * R, -1)).squeeze(1)
    return delta if out is None else out.add_(delta)


def _used_delta(x, A, Bt, idx, w, used, average, out=None):
    """One product over the used experts (`dense_delta` on them); each token's unselected experts
    get weight 0."""
    E, U = A.shape[0], used.numel()
    if U < E:
        A, Bt = A.index_select(0, used), Bt.index_select(0, used)
        lut = torch.full((E,), -1, dtype=torch.long, device=idx.device)
        lut[used] = torch.arange(U, device=idx.device)
        idx = lut[idx]
    return dense_delta(x, A, Bt, coefficients(idx, w.to(x.dtype), U), average, out)


def _sorted_delta(x, A, Bt, idx, w, counts, average, out=None):
    """Token-expert pairs sorted by expert; a loop over the experts actually selected."""
    n, k = idx.shape
    order = torch.argsort(idx.reshape(-1), stable=True)
    tok = order // k
    ws = w.reshape(-1)[order].unsqueeze(1)
    if out is None:
        out = x.new_zeros(n, Bt.shape[2])
    segs = []
    start = 0
    for e, c in enumerate(counts):
        if c:
            segs.append((e, tok[start:start + c], ws[start:start + c]))
            start += c
    if average:
        zbar = x.new_zeros(n, A.shape[1])
        for e, t, we in segs:
            zbar.index_add_(0, t, (x.index_select(0, t) @ A[e].T).mul_(we))
        for e, t, we in segs:
            out.index_add_(0, t, zbar.index_select(0, t).mul_(we) @ Bt[e])
    else:
        for e, t, we in segs:
            out.index_add_(0, t, (x.index_select(0, t) @ A[e].T).mul_(we) @ Bt[e])
    return out


__all__ = ["Arrow", "SETTINGS", "arrow_route", "ARROW_KIND", "PROTOTYPES", "prototypes", "uniform_tokens", "expert_prototypes", "compute_prototypes",
           "top_right_singular_vectors", "route_tokens", "coefficients", "mixed_delta", "dense_delta"]
