"""A learned router (L2R, Araujo et al. 2024): a small classifier over frozen sentence embeddings,
trained on a memory of a few examples per task, predicting which adapter a request belongs to.

    router = train_router(library, embedder)        # memory = each adapter's card samples
    router.save(library)                            # kept in the library (safetensors + JSON)
    router = LearnedRouter.load(library)
    router.route(texts, top_k=1)                    # [{adapter name: weight}, ...]

The network is one hidden layer (hidden=0: linear) over the embedder's unit vectors, trained with
class-balanced cross-entropy; a route is the softmax over the adapters, top-k, renormalised.
Training also fits the abstention threshold on the best adapter's probability (abstain.py): a
second network trained without every fifth memory example scores those as in-domain requests,
and, with their own adapter left out of the softmax, as out-of-domain ones.
Training is deterministic for a seed (own generator for initialisation and shuffling, full
determinism of CPU matmuls assumed).

Continual learning: when adapters are added, train again (`modulora router train`); the new
router covers every adapter in the library. A router trained before an adapter existed keeps
working: it routes among the adapters it knows that are still in the library, cannot pick the
new ones, and says so once (see `unknown_adapters`). If none of its adapters is left it refuses
and asks to retrain.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .abstain import DEFAULT_MAX_IN_DOMAIN, Abstention, fit
from .embed import default_embedder, embedder_for_id
from .retrieval import (ROUTER_OBJECT, RoutingError, adapter_texts, best_allowed, candidate_mask, check_texts,
                        check_top_k, top_k_weights)
FORMAT = "modulora-l2r-v1"
RETRAIN = "retrain it: modulora router train"


def _notice(message: str) -> None:
    print(f"modulora: {message}", file=sys.stderr)


@contextlib.contextmanager
def _one_thread():
    """Train the tiny network on one intra-op thread: its matmuls are too small to gain from
    more, and on a busy machine each parallel op can wait a whole scheduler slice for a thread
    (measured: 180 steps in 20 s on 2 threads beside a training job, 0.2 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _network(dim: int, classes: int, hidden: int) -> nn.Sequential:
    if hidden:
        return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, classes))
    return nn.Sequential(nn.Linear(dim, classes))


def _safetensors_metadata(blob: bytes) -> dict:
    """The `__metadata__` of a safetensors buffer (8-byte little-endian header size, JSON header)."""
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]).get("__metadata__") or {}


@dataclass
class LearnedRouter:
    names: list[str]                 # the adapters it can pick, index = output class
    object_ids: list[str]            # their versions when it was trained
    embedder: object
    net: nn.Sequential
    info: dict = field(default_factory=dict)  # training settings and statistics
    library: object | None = None    # when set, adapters removed from it are not picked
    _seen: dict | None = field(default=None, repr=False, compare=False)  # library listing last checked
    _told: set = field(default_factory=set, repr=False, compare=False)   # unknown adapters noticed

    @torch.inference_mode()
    def logits(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), len(names)] scores."""
        return self.net(self.embedder.encode(check_texts(texts)))

    def unknown_adapters(self, library=None) -> list[str]:
        """Adapters of the library that this router cannot pick (added or updated after training):
        non-empty means it should be retrained."""
        library = library if library is not None else self.library
        if library is None:
            return []
        types = self.info.get("types")
        return [r.name for r in library.list() if (types is None or r.type in types) and r.name not in self.names]

    def route(self, texts: list[str], top_k: int = 1, names: list[str] | None = None,
              exclude: list[str] | list[list[str]] | None = None) -> list[dict[str, float]]:
        """One {adapter name: weight} per text: the router's softmax over its adapters, top_k,
        renormalised. `names` / `exclude` restrict the candidates as in RetrievalRouter.route."""
        return self.route_scored(texts, top_k, names=names, exclude=exclude)[0]

    def route_scored(self, texts: list[str], top_k: int = 1, names=None, exclude=None
                     ) -> tuple[list[dict[str, float]], list[tuple[str, float]]]:
        """`route`'s routes, and per text its best allowed adapter with its probability (the
        softmax over the allowed adapters)."""
        texts = check_texts(texts)
        top_k = check_top_k(top_k)
        mask = candidate_mask(self.names, len(texts), names, exclude)
        if self.library is not None:
            mask &= self._present()
        if not texts:
            return [], []
        if top_k > len(self.names):
            raise RoutingError(f"top_k={top_k} but the router knows only {len(self.names)} adapter(s)")
        logits = self.logits(texts).float()
        probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=1)
        return top_k_weights(logits, mask, self.names, top_k, "softmax", 1.0), best_allowed(probs, mask, self.names)

    def _present(self) -> torch.Tensor:
        """Which of its adapters the library still holds; says once which new ones it cannot pick."""
        heads = self.library.latest_object_ids()
        present = torch.tensor([n in heads for n in self.names], dtype=torch.bool)
        if not present.any():
            raise RoutingError(f"none of the adapters this router was trained for is in the library; {RETRAIN}")
        if heads != self._seen:  # the library changed: say once which adapters it cannot pick
            self._seen = heads
            new = [n for n in self.unknown_adapters() if n not in self._told]
            if new:
                self._told.update(new)
                shown = ", ".join(new[:5]) + (", ..." if len(new) > 5 else "")
                _notice(f"the learned router does not know {len(new)} adapter(s) of the library ({shown}) "
                        f"and will not pick them; {RETRAIN}")
        return present

    def abstention(self) -> Abstention | None:
        """The threshold fitted when it was trained (None for routers saved before abstention)."""
        a = self.info.get("abstention")
        return Abstention(**a) if a else None

    # -- persistence: one safetensors blob in the library's derived table ------------------------

    def to_bytes(self) -> bytes:
        meta = {"format": FORMAT, "names": self.names, "object_ids": self.object_ids,
                "embedder": self.embedder.id, **self.info}
        tensors = {k: v.detach().contiguous() for k, v in self.net.state_dict().items()}
        return st_save(tensors, metadata={"router": json.dumps(meta)})

    def save(self, library, key: str = "learned") -> None:
        """Store the router in the library (replacing one saved under the same key)."""
        library.put_derived(ROUTER_OBJECT, key, self.to_bytes())

    @classmethod
    def from_bytes(cls, blob: bytes, embedder=None, base=None, library=None) -> "LearnedRouter":
        meta = json.loads(_safetensors_metadata(blob).get("router", "{}"))
        if meta.get("format") != FORMAT:
            raise RoutingError(f"not a saved learned router (format {meta.get('format')!r}, expected {FORMAT})")
        if embedder is None:
            embedder = embedder_for_id(meta["embedder"], base)
        elif embedder.id != meta["embedder"]:
            raise RoutingError(f"this router was trained on {meta['embedder']} embeddings, not {embedder.id}")
        names, object_ids = meta.pop("names"), meta.pop("object_ids")
        for k in ("format", "embedder"):
            meta.pop(k)
        net = _network(meta["dim"], len(names), meta["hidden"])
        net.load_state_dict(st_load(blob))
        net.eval()
        return cls(names=names, object_ids=object_ids, embedder=embedder, net=net, info=meta, library=library)

    @classmethod
    def load(cls, library, embedder=None, base=None, key: str = "learned") -> "LearnedRouter":
        """The router saved in the library. `embedder` defaults to the one it was trained with
        (a base-model embedder needs `base`)."""
        blob = library.get_derived(ROUTER_OBJECT, key)
        if blob is None:
            raise RoutingError(f"the library at {library.root} has no learned router {key!r}; "
                               "train one: modulora router train")
        return cls.from_bytes(blob, embedder=embedder, base=base, library=library)


def build_memory(library, memory_per_task: int = 50, extra_memory: dict[str, list[str]] | None = None,
                 types: tuple[str, ...] | None = ("lora",)) -> tuple[dict[str, list[str]], dict[str, str]]:
    """{adapter name: example inputs} and {adapter name: object id}. Per adapter: its
    `extra_memory` examples first, then its card samples (or description), at most
    memory_per_task in all. Adapters with nothing are skipped with a notice."""
    if isinstance(memory_per_task, bool) or not isinstance(memory_per_task, int) or memory_per_task < 1:
        raise RoutingError(f"memory_per_task must be an integer >= 1, got {memory_per_task!r}")
    records = [r for r in library.list() if types is None or r.type in types]
    extra = dict(extra_memory or {})
    unknown = sorted(set(extra) - {r.name for r in records})
    if unknown:
        raise RoutingError(f"extra_memory names adapters the library has no routable version of: {', '.join(unknown)}")
    memory, ids = {}, {}
    for rec in records:
        own = [t for t in extra.get(rec.name, []) if isinstance(t, str) and t.strip()] + adapter_texts(rec.card)
        if not own:
            _notice(f"adapter {rec.name} has no samples, description or extra memory; the router will not know it")
            continue
        memory[rec.name], ids[rec.name] = own[:memory_per_task], rec.object_id
    if not memory:
        raise RoutingError(f"the library at {library.root} has no adapter with examples to train a router on")
    return memory, ids


def train_router(library, embedder=None, memory_per_task: int = 50, epochs: int = 100, seed: int = 0,
                 extra_memory: dict[str, list[str]] | None = None, hidden: int = 128, lr: float = 3e-3,
                 weight_decay: float = 1e-4, batch_size: int = 64,
                 types: tuple[str, ...] | None = ("lora",),
                 max_in_domain: float = DEFAULT_MAX_IN_DOMAIN) -> LearnedRouter:
    """Train a router over every adapter of the library (latest versions) on a small memory of
    examples per adapter (see build_memory), and fit its abstention threshold. Deterministic for
    a seed. Not saved: call .save()."""
    embedder = embedder if embedder is not None else default_embedder()
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise RoutingError(f"epochs must be an integer >= 1, got {epochs!r}")
    memory, ids = build_memory(library, memory_per_task, extra_memory, types)
    names = sorted(memory)
    texts = [t for n in names for t in memory[n]]
    labels = torch.tensor([c for c, n in enumerate(names) for _ in memory[n]])
    x = embedder.encode(texts).float()
    settings = dict(hidden=hidden, lr=lr, weight_decay=weight_decay, batch_size=batch_size, epochs=epochs, seed=seed)
    net = _fit_network(x, labels, len(names), **settings)
    abstention = _calibrate(x, labels, len(names), max_in_domain, settings)
    with torch.no_grad():
        logits = net(x)
        final_loss = float(nn.functional.cross_entropy(logits, labels, weight=_class_weight(labels, len(names))))
        accuracy = float((logits.argmax(1) == labels).float().mean())
    info = {"dim": int(x.shape[1]), "hidden": hidden, "seed": seed, "epochs": epochs, "lr": lr,
            "weight_decay": weight_decay, "batch_size": batch_size, "memory_per_task": memory_per_task,
            "types": list(types) if types is not None else None,
            "memory": {n: len(memory[n]) for n in names}, "train_loss": round(final_loss, 6),
            "train_accuracy": round(accuracy, 6),
            "abstention": None if abstention is None else dataclasses.asdict(abstention),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return LearnedRouter(names=names, object_ids=[ids[n] for n in names], embedder=embedder, net=net,
                         info=info, library=library)


def _class_weight(labels: torch.Tensor, classes: int) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=classes).float()
    return counts.sum() / (classes * counts.clamp(min=1))  # every task counts the same


def _fit_network(x: torch.Tensor, labels: torch.Tensor, classes: int, hidden: int, lr: float, weight_decay: float,
                 batch_size: int, epochs: int, seed: int) -> nn.Sequential:
    """The classifier trained with class-balanced cross-entropy, deterministic for a seed."""
    gen = torch.Generator().manual_seed(seed)
    net = _network(x.shape[1], classes, hidden)
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, nn.Linear):
                bound = layer.in_features ** -0.5
                layer.weight.uniform_(-bound, bound, generator=gen)
                layer.bias.zero_()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss(weight=_class_weight(labels, classes))
    net.train()
    with torch.enable_grad(), _one_thread():
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), batch_size):
                idx = order[i:i + batch_size]
                loss = loss_fn(net(x[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return net.eval()


def _calibrate(x: torch.Tensor, labels: torch.Tensor, classes: int, max_in_domain: float,
               settings: dict) -> Abstention | None:
    """The abstention threshold from a network trained without every fifth example of each
    adapter (None when no adapter has two examples or the router knows one adapter only)."""
    rank = torch.zeros_like(labels)
    for c in range(classes):
        where = (labels == c).nonzero().squeeze(1)
        rank[where] = torch.arange(len(where))
    held = (rank % 5 == 4) | ((rank == 1) & (torch.bincount(labels, minlength=classes)[labels] < 5))
    if classes < 2 or not held.any():
        return None
    net = _fit_network(x[~held], labels[~held], classes, **settings)
    with torch.no_grad():
        logits = net(x[held])
    own = labels[held][:, None]
    in_domain = torch.softmax(logits, 1).max(1).values
    out_of_domain = torch.softmax(logits.scatter(1, own, float("-inf")), 1).max(1).values
    return fit("learned", "probability", in_domain, out_of_domain, classes, max_in_domain)


__all__ = ["LearnedRouter", "train_router", "build_memory", "ROUTER_OBJECT"]
