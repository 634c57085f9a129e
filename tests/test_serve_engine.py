"""What the server's worker is built on, on the tiny model with random LoRA adapters: the token
hooks of generate_routed, continuous batching (rows joining and leaving between decode steps)
against generate_routed, and the bounded LRU of resident experts."""

import pytest
import torch

from modulora.adapters import AdapterConfig, attach, detach, save_adapter
from modulora.adapters.wrap import wrappers
from modulora.base import load_base
from modulora.library import Library
from modulora.routing.arrow import Arrow
from modulora.routing.batch import Request, generate_routed
from modulora.routing.continuous import ContinuousBatch, Job
from modulora.routing.experts import ExpertSet, RoutingError, load_experts
from modulora.routing.resident import ResidentExperts

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

NAMES = ("a", "b", "c", "d")


def random_lora(model, out, seed: int, fingerprint: dict):
    """A LoRA whose B is random and large enough that each adapter answers differently."""
    attach(model, AdapterConfig(type="lora", r=4, alpha=8.0), seed=seed)
    gen = torch.Generator().manual_seed(500 + seed)
    with torch.no_grad():
        for _, mod in wrappers(model):
            mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=gen) * 0.5)
    save_adapter(model, out, card={"name": out.name, "type": "lora", "base_fingerprint": fingerprint})
    detach(model)
    return out


@pytest.fixture(scope="module")
def base():
    return load_base("tiny")  # a model of this module's own: routing gets installed on it


@pytest.fixture(scope="module")
def lib(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    maker = load_base("tiny")
    lib = Library(root / "lib")
    for i, name in enumerate(NAMES):
        lib.add(name, random_lora(maker.model, root / name, i, maker.fingerprint), base.fingerprint)
    return lib


@pytest.fixture(scope="module")
def experts(base, lib):
    return ExpertSet(load_experts(lib, fingerprint=base.fingerprint))


JOBS = [  # prompt, route, mode, max_new_tokens
    ("hello there", {"a": 1.0}, "mixture", 12),
    ("Peru", {"b": 1.0}, "mixture", 20),
    ("12 + 30", Arrow(top_k=2), "mixture", 9),
    ("x y", None, "mixture", 15),
    ("apple river stone", {"a": 0.5, "c": 0.5}, "average", 7),
    ("tiny", {"d": 1.0}, "mixture", 30),
    ("q", {"a": 0.3, "b": 0.7}, "mixture", 1),
    ("nothing", {"c": 1.0}, "mixture", 0),
    ("Peru", {"b": 1.0}, "mixture", 5),  # the same route as row 1: its template KV is reused
]


def solo(base, experts, prompt, route, mode, max_new):
    return generate_routed(base, experts, [Request(prompt, route, mode=mode, max_new_tokens=max_new)])[0]


def test_generate_routed_hooks_stream_every_token_and_stop_a_row(base, experts):
    reqs = [Request(p, r, mode=m, max_new_tokens=n) for p, r, m, n in JOBS[:6]]
    plain = generate_routed(base, experts, reqs)
    seen: dict[int, list[int]] = {}
    hooked = generate_routed(base, experts, reqs, on_token=lambda i, t: seen.setdefault(i, []).append(t),
                             should_stop=lambda i: i == 1 and len(seen.get(1, [])) >= 3)
    for i, (a, b) in enumerate(zip(plain, hooked)):
        if i == 1:
            assert b.finish_reason == "stopped" and b.token_ids == a.token_ids[:3] and seen[1] == b.token_ids
        else:
            assert b.token_ids == a.token_ids == seen.get(i, []) and b.text == a.text
            assert b.finish_reason == a.finish_reason == ("length" if len(a.token_ids) == reqs[i].max_new_tokens
                                                           else "stop")
    assert plain[1].finish_reason == "length" and len(plain[1].token_ids) == 20


def test_rows_joining_and_leaving_get_their_solo_answers(base, experts):
    alone = [solo(base, experts, *j) for j in JOBS]
    eng = ContinuousBatch(base)
    eng.set_experts(experts)
    streamed: dict[int, list[int]] = {}
    jobs = [Job(p, r, mode=m, max_new_tokens=n, on_token=lambda t, i=i: streamed.setdefault(i, []).append(t))
            for i, (p, r, m, n) in enumerate(JOBS)]
    done = eng.add(jobs[:2])
    widths = []
    for j in jobs[2:]:  # one newcomer between every two decode steps
        done += eng.step()
        done += eng.add([j])
        widths.append((eng.mask.shape[1], max(len(r._ids) + len(r.tokens) for r in eng.rows)))
    while eng.rows:
        done += eng.step()
    assert sorted(map(id, done)) == sorted(map(id, jobs)) and eng.cache is None
    for i, (j, a) in enumerate(zip(jobs, alone)):
        assert j.tokens == a.token_ids, i
        assert j.finish_reason == a.finish_reason, i
        assert streamed.get(i, []) == j.tokens
        if not isinstance(j.route, Arrow):
            assert j.experts == a.experts
    arrow = jobs[2].experts  # mean weights over its own tokens; the last token is not fed back here
    assert set(arrow) == set(NAMES) and abs(sum(arrow.values()) - 1) < 1e-6
    assert max(abs(arrow[n] - alone[2].experts[n]) for n in NAMES) < 0.05
    # the cache never holds more columns than its longest row needs, plus the pending token
    assert all(w <= need + 1 for w, need in widths), widths
    assert eng.prefix_hits >= 1 and eng.prefix_misses >= 1


def test_a_row_asked_to_stop_leaves_and_the_others_go_on(base, experts):
    alone = [solo(base, experts, *j) for j in JOBS[:3]]
    eng = ContinuousBatch(base)
    eng.set_experts(experts)
    jobs = [Job(p, r, mode=m, max_new_tokens=n) for p, r, m, n in JOBS[:3]]
    jobs[1].should_stop = lambda: "timeout" if len(jobs[1].tokens) >= 4 else None
    done = eng.add(jobs)
    while eng.rows:
        done += eng.step()
    assert jobs[1].finish_reason == "timeout" and jobs[1].tokens == alone[1].token_ids[:4]
    assert jobs[0].tokens == alone[0].token_ids and jobs[2].tokens == alone[2].token_ids


def test_the_engine_refuses_bad_jobs(base, experts):
    eng = ContinuousBatch(base)
    with pytest.raises(RoutingError, match="no expert set"):
        eng.add([Job("x", {"a": 1.0})])
    eng.set_experts(experts)
    for job, msg in [(Job("x", {"zz": 1.0}), "unknown expert"), (Job("x", {"a": 1.0}, mode="blend"), "unknown mode"),
                     (Job("x", None, max_new_tokens=-1), "max_new_tokens"), (Job("x", Arrow(top_k=9)), "top_k")]:
        with pytest.raises(RoutingError, match=msg):
            eng.add([job])
    assert eng.rows == []
    eng.release()


def test_resident_experts_evict_the_least_recently_used(base, lib, tmp_path):
    res = ResidentExperts(lib, base.fingerprint, capacity=2)
    assert res.expert_set({"a"}).names == ["a"]
    assert res.expert_set({"b"}).names == ["a", "b"]
    assert res.expert_set({"a"}).names == ["a", "b"]  # a hit, and now b is the least recently used
    assert res.expert_set({"c"}).names == ["a", "c"]
    assert res.stats() == {"hits": 1, "misses": 3, "evictions": 1, "resident": 2, "capacity": 2}
    assert res.fits({"d"}, pinned={"a"}) and not res.fits({"d"}, pinned={"a", "c"})
    assert res.expert_set({"d"}, pinned={"c"}).names == ["c", "d"]  # a was older, but c is in use
    with pytest.raises(RoutingError):
        res.expert_set({"nosuch"})
    assert res.needs_all_message("arrow", 4) and res.needs_all_message("arrow", 2) is None
    # a new version of a resident adapter is read again; the old copy stays while a row uses it
    maker = load_base("tiny")
    lib.add("d", random_lora(maker.model, tmp_path / "d2", 9, maker.fingerprint), base.fingerprint)
    try:
        assert not res.fits({"d"}, pinned={"d"})
        old = res.expert_set(set(), pinned={"d"}).experts[1].object_id
        new = res.expert_set({"d"}).experts
        assert [e.name for e in new] == ["c", "d"] and new[1].object_id == lib.get("d").object_id != old
    finally:
        lib.remove("d", version=2)
    with pytest.raises(ValueError):
        ResidentExperts(lib, base.fingerprint, capacity=0)
