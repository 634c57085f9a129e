"""Retrieval routing (LoraRetriever, Zhao et al. 2024): pick the adapters whose example inputs
look like the request.

Each adapter gets one vector: the mean of its card samples' embeddings, renormalised (an adapter
whose card has no samples uses its task description; one with neither is skipped). A request is
embedded with the same embedder and routed to the top-k adapters by cosine similarity, with
uniform weights (LoraRetriever's default) or a softmax over the similarities of those k.

With a calibrated threshold (`calibrate`, see abstain.py) a request whose best similarity is
under it abstains and is answered by a fallback policy instead (Router.resolve).

The vectors are cached in the library (derived kind `retrieval:<embedder id>`, safetensors), so
only adapters that lack one are embedded: a new adapter costs one `encode` call, not a rebuild.
The router keeps them as one [N, d] matrix and, before each routing call, compares the library's
latest object ids with the ones it holds (a cheap query) to pick up additions, new versions and
removals.
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..library import LIBRARY_SCOPE
from .abstain import DEFAULT_MAX_IN_DOMAIN, Abstention, fit
from .embed import default_embedder
from .experts import RoutingError, cache_derived

KIND_PREFIX = "retrieval:"
WEIGHTINGS = ("uniform", "softmax")
ROUTER_OBJECT = f"{LIBRARY_SCOPE}router"  # library-wide router data: thresholds, the learned router


def _notice(message: str) -> None:
    print(f"modulora: {message}", file=sys.stderr)


def adapter_texts(card: dict | None) -> list[str]:
    """What represents an adapter's task: its card samples, else its description, else nothing."""
    card = card or {}
    samples = [s for s in (card.get("samples") or []) if isinstance(s, str) and s.strip()]
    if samples:
        return samples
    description = card.get("description")
    return [description] if isinstance(description, str) and description.strip() else []


def check_texts(texts) -> list[str]:
    texts = None if isinstance(texts, str) else list(texts)
    if texts is None or not all(isinstance(t, str) for t in texts):
        raise RoutingError("route() takes a list of request texts (one string per request)")
    return texts


def check_top_k(top_k) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise RoutingError(f"top_k must be an integer >= 1, got {top_k!r}")
    return top_k


def candidate_mask(all_names: list[str], n_texts: int, names=None, exclude=None) -> torch.Tensor:
    """[n_texts, N] bool: which adapters each request may use. `names` restricts all requests;
    `exclude` is a list of names (for every request) or one list per request."""
    index = {n: i for i, n in enumerate(all_names)}

    def positions(given, what: str) -> list[int]:
        if isinstance(given, str):
            raise RoutingError(f"{what} takes a list of adapter names, not a string")
        unknown = [n for n in given if n not in index]
        if unknown:
            raise RoutingError(f"{what}: no routable adapter named {', '.join(map(repr, unknown))} "
                               f"(have: {', '.join(all_names[:20])}{', ...' if len(all_names) > 20 else ''})")
        return [index[n] for n in given]

    mask = torch.ones(n_texts, len(all_names), dtype=torch.bool)
    if names is not None:
        keep = torch.zeros(len(all_names), dtype=torch.bool)
        keep[positions(names, "names")] = True
        mask &= keep
    if exclude:
        if all(isinstance(e, str) for e in exclude):  # one list for every request
            mask[:, positions(exclude, "exclude")] = False
        else:
            if len(exclude) != n_texts or not all(isinstance(e, (list, tuple)) for e in exclude):
                raise RoutingError(f"exclude is either a list of names or one list of names per request "
                                   f"({n_texts} requests, got {len(exclude)} entries)")
            for row, names_row in enumerate(exclude):
                mask[row, positions(names_row, "exclude")] = False
    return mask


def top_k_weights(scores: torch.Tensor, mask: torch.Tensor, names: list[str], top_k: int,
                  weighting: str = "uniform", temperature: float = 1.0) -> list[dict[str, float]]:
    """Per row, the top-k allowed entries of scores [B, N] as {name: weight}, best first, weights
    summing to 1 (uniform, or softmax(score / temperature) over the k). Entries whose softmax
    weight underflows to 0 are dropped, so every weight is > 0."""
    if weighting not in WEIGHTINGS:
        raise RoutingError(f"unknown weighting {weighting!r}; use one of {', '.join(WEIGHTINGS)}")
    if weighting == "softmax" and not (isinstance(temperature, (int, float)) and temperature > 0):
        raise RoutingError(f"temperature must be a positive number, got {temperature!r}")
    allowed = mask.sum(1)
    fewest = int(allowed.min()) if len(allowed) else top_k
    if fewest < top_k:
        row = int(allowed.argmin())
        raise RoutingError(f"top_k={top_k} but request {row} has only {fewest} candidate adapter(s)"
                           + (" after exclusions" if fewest < len(names) else ""))
    masked = scores.double().masked_fill(~mask, float("-inf"))
    values, idx = masked.topk(top_k, dim=1)
    if weighting == "uniform":
        weights = torch.full_like(values, 1.0 / top_k)
    else:
        weights = torch.softmax(values / temperature, dim=1)
    routes = []
    for w_row, i_row in zip(weights.tolist(), idx.tolist()):
        kept = [(names[i], w) for i, w in zip(i_row, w_row) if w > 0]
        total = sum(w for _, w in kept)
        routes.append({n: w / total for n, w in kept})
    return routes


def _encode_vector(v: torch.Tensor, embedder_id: str, count: int) -> bytes:
    return st_save({"embedding": v.contiguous()}, metadata={"embedder": embedder_id, "texts": str(count)})


class RetrievalRouter:
    """LoraRetriever over a library: `route(texts, top_k=1)` -> one {adapter name: weight} per text."""

    def __init__(self, library, embedder=None, types: tuple[str, ...] | None = ("lora",)):
        """`types`: the adapter types routed to (the multi-expert layer composes LoRA); None = all."""
        self.library = library
        self.embedder = embedder if embedder is not None else default_embedder()
        self.types = tuple(types) if types is not None else None
        self.kind = f"{KIND_PREFIX}{self.embedder.id}"
        self.names: list[str] = []            # routable adapters, sorted by name
        self.object_ids: list[str] = []
        self.matrix = torch.empty(0, 0)       # [N, d], row i = adapter names[i]
        self._heads: dict[str, str] | None = None  # the library listing the index was built from
        self._vectors: dict[str, torch.Tensor] = {}  # object id -> vector (memo across refreshes)
        self._ignored: set[str] = set()       # object ids of other types or with nothing to embed
        self.refresh()

    def refresh(self) -> bool:
        """Bring the index up to date with the library; True if it changed. Called by route().

        Costs one cheap catalog query when nothing changed; otherwise reads the listing, loads the
        cached vectors of adapters it has not seen and embeds the cards of those without one.
        """
        heads = self.library.latest_object_ids()
        if heads == self._heads:
            return False
        live = set(heads.values())
        new = live - self._vectors.keys() - self._ignored
        if new:
            records = [r for r in self.library.list() if r.object_id in new]
            to_embed = []
            for rec in records:
                if self.types is not None and rec.type not in self.types:
                    self._ignored.add(rec.object_id)
                    continue
                blob = self.library.get_derived(rec.object_id, self.kind)
                if blob is not None:  # cached by an earlier router
                    self._vectors[rec.object_id] = st_load(blob)["embedding"].float()
                else:
                    to_embed.append(rec)
            if to_embed:
                self._embed_adapters(to_embed)
        self._vectors = {oid: v for oid, v in self._vectors.items() if oid in live}
        pairs = [(name, oid) for name, oid in heads.items() if oid in self._vectors]
        self.names = [n for n, _ in pairs]
        self.object_ids = [o for _, o in pairs]
        dim = getattr(self.embedder, "dim", 0)
        self.matrix = torch.stack([self._vectors[o] for o in self.object_ids]) if pairs else torch.empty(0, dim)
        self._heads = heads
        return True

    def _embed_adapters(self, records) -> None:
        """Embed the cards of adapters without a cached vector (one encode call for all) and
        cache the vectors in the library."""
        from ..library import LibraryError

        texts, spans = [], {}
        for rec in records:
            try:
                own = adapter_texts(rec.card)
            except LibraryError:  # removed since it was listed: the next refresh drops it
                continue
            if not own:
                _notice(f"adapter {rec.name} has no samples or description on its card; retrieval skips it")
                self._ignored.add(rec.object_id)
                continue
            spans[rec.object_id] = (len(texts), len(texts) + len(own))
            texts.extend(own)
        if not texts:
            return
        emb = self.embedder.encode(texts)
        for oid, (a, b) in spans.items():
            v = torch.nn.functional.normalize(emb[a:b].mean(0), dim=0)
            self._vectors[oid] = v
            cache_derived(self.library, oid, self.kind, _encode_vector(v, self.embedder.id, b - a))

    def scores(self, texts: list[str]) -> torch.Tensor:
        """Cosine similarity [len(texts), N] between the requests and the adapters (index order)."""
        return self.embedder.encode(texts) @ self.matrix.T

    def route(self, texts: list[str], top_k: int = 1, weighting: str = "uniform", temperature: float = 0.1,
              exclude: list[str] | list[list[str]] | None = None, names: list[str] | None = None
              ) -> list[dict[str, float]]:
        """One {adapter name: weight} per text: the top_k adapters by cosine similarity, weights
        summing to 1. `names` limits the candidates; `exclude` removes adapters, for every request
        (a list of names) or per request (one list per text), e.g. a request's own expert in
        out-of-domain evaluation. `temperature` only matters for weighting="softmax"."""
        return self.route_scored(texts, top_k, weighting, temperature, exclude, names)[0]

    def route_scored(self, texts: list[str], top_k: int = 1, weighting: str = "uniform", temperature: float = 0.1,
                     exclude=None, names=None) -> tuple[list[dict[str, float]], list[tuple[str, float]]]:
        """`route`'s routes, and per text its best allowed adapter with its similarity."""
        texts = check_texts(texts)
        top_k = check_top_k(top_k)
        self.refresh()
        if not self.names:
            raise RoutingError(f"the library at {self.library.root} has no adapter to route to"
                               + (f" (none of its {len(self._heads)} adapters is of type "
                                  f"{'/'.join(self.types or ('any',))} with card samples or a description)"
                                  if self._heads else ""))
        mask = candidate_mask(self.names, len(texts), names, exclude)
        if not texts:
            return [], []
        if top_k > len(self.names):
            raise RoutingError(f"top_k={top_k} but the library has only {len(self.names)} routable adapter(s)")
        scores = self.scores(texts)
        return (top_k_weights(scores, mask, self.names, top_k, weighting, temperature),
                best_allowed(scores, mask, self.names))

    # -- abstention ----------------------------------------------------------------------------

    def abstention(self) -> Abstention | None:
        """The threshold fitted for this library and embedder, if any."""
        blob = self.library.get_derived(ROUTER_OBJECT, f"abstain:{self.kind}")
        return Abstention.from_json(blob) if blob is not None else None

    def calibrate(self, max_in_domain: float = DEFAULT_MAX_IN_DOMAIN) -> Abstention:
        """Fit the threshold on the adapters' card samples (see abstain.py) and store it."""
        a = fit("retrieval", "cosine", *self.calibration_scores(), len(self.names), max_in_domain)
        self.library.put_derived(ROUTER_OBJECT, f"abstain:{self.kind}", a.to_json().encode())
        return a

    def calibration_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Best similarity of every card sample of adapters with two or more samples, as an
        in-domain request (its own adapter's vector made without it) and as an out-of-domain one
        (its own adapter left out)."""
        self.refresh()
        cards = {r.name: r.card for r in self.library.list() if r.name in set(self.names)}
        texts, owner = [], []
        for i, name in enumerate(self.names):
            own = [t for t in ((cards.get(name) or {}).get("samples") or []) if isinstance(t, str) and t.strip()]
            if len(own) >= 2:
                texts += own
                owner += [i] * len(own)
        if not texts:
            return torch.empty(0), torch.empty(0)
        emb, owner = self.embedder.encode(texts).float(), torch.tensor(owner)
        sums = torch.zeros(len(self.names), emb.shape[1]).index_add_(0, owner, emb)
        loo = torch.nn.functional.normalize(sums[owner] - emb, dim=1)
        own_score = (emb * loo).sum(1)
        others = (emb @ self.matrix.T).scatter_(1, owner[:, None], float("-inf")).max(1).values
        return torch.maximum(own_score, others), others


def best_allowed(scores: torch.Tensor, mask: torch.Tensor, names: list[str]) -> list[tuple[str, float]]:
    """Per row of scores [B, N], the allowed entry with the highest score and that score."""
    vals, idx = scores.double().masked_fill(~mask, float("-inf")).max(1)
    return [(names[i], v) for i, v in zip(idx.tolist(), vals.tolist())]


__all__ = ["RetrievalRouter", "RoutingError", "adapter_texts", "best_allowed", "candidate_mask", "top_k_weights",
           "KIND_PREFIX"]
