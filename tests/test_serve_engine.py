"""What the server's worker is built on, on the tiny model with random LoRA adapters: the token
hooks of generate_routed, the engine's continuous batching (rows joining and leaving between
decode steps) against generate_routed, and the bounded LRU of resident experts in slots."""

import time

import pytest
import torch

from modulora.base import load_base
from modulora.routing.arrow import Arrow
from modulora.routing.batch import generate_routed
from modulora.routing.engine import Engine
from modulora.routing.experts import ExpertSet, RoutingError, load_experts
from modulora.routing.requests import EngineRequest, SamplingParams
from modulora.routing.resident import ResidentExperts

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

NAMES = ("a", "b", "c", "d")


@pytest.fixture(scope="module")
def base():
    return load_base("tiny", dtype="fp32")  # a model of this module's own: routing gets installed on it


@pytest.fixture(scope="module")
def lib(tmp_path_factory, random_library):
    return random_library(tmp_path_factory.mktemp("engine"), NAMES)


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
    return generate_routed(base, experts, [EngineRequest(prompt, route, mode=mode, params=SamplingParams(max_tokens=max_new))])[0]


def new_engine(base, lib):
    eng = Engine(base)
    eng.use_experts(load_experts(lib, fingerprint=base.fingerprint))
    return eng


def request(eng, prompt, route, mode="mixture", max_new=16, **kw):
    ids, span = eng.encode_prompt(prompt)
    return EngineRequest(ids, route, mode=mode, params=SamplingParams(max_tokens=max_new), content_span=span, **kw)


def test_generate_routed_hooks_stream_every_token_and_stop_a_row(base, experts):
    reqs = [EngineRequest(p, r, mode=m, params=SamplingParams(max_tokens=n)) for p, r, m, n in JOBS[:6]]
    plain = generate_routed(base, experts, reqs)
    seen: dict[int, list[int]] = {}
    hooked = generate_routed(base, experts, reqs, on_token=lambda i, t: seen.setdefault(i, []).append(t),
                             should_stop=lambda i: i == 1 and len(seen.get(1, [])) >= 3)
    for i, (a, b) in enumerate(zip(plain, hooked)):
        if i == 1:
            assert b.finish_reason == "stopped" and b.token_ids == a.token_ids[:3] and seen[1] == b.token_ids
        else:
            assert b.token_ids == a.token_ids == seen.get(i, []) and b.text == a.text
            assert b.finish_reason == a.finish_reason == ("length" if len(a.token_ids) == reqs[i].params.max_tokens
                                                           else "stop")
    assert plain[1].finish_reason == "length" and len(plain[1].token_ids) == 20


def test_rows_joining_and_leaving_get_their_solo_answers(base, lib, experts):
    alone = [solo(base, experts, *j) for j in JOBS]
    eng = new_engine(base, lib)
    streamed: dict[int, list[int]] = {}
    reqs = [request(eng, p, r, m, n, on_token=lambda ev, i=i: streamed.setdefault(i, []).append(ev.token))
            for i, (p, r, m, n) in enumerate(JOBS)]
    done = eng.add(reqs[:2])
    widths = []
    for r in reqs[2:]:  # one newcomer between every two decode steps
        done += eng.step()
        done += eng.add([r])
        widths.append((eng.mask.shape[1], max(len(x.pending.ids) + len(x.tokens) for x in eng.rows)))
    while eng.rows:
        done += eng.step()
    answers = dict((id(r), a) for r, a in done)
    assert sorted(answers) == sorted(map(id, reqs)) and eng.cache is None
    for i, (r, a) in enumerate(zip(reqs, alone)):
        got = answers[id(r)]
        assert got.samples[0].token_ids == a.token_ids, i
        assert got.finish_reason == a.finish_reason, i
        assert [t for t in streamed.get(i, []) if t >= 0] == a.token_ids
        if not isinstance(r.route, Arrow):
            assert got.experts == a.experts
    arrow = answers[id(reqs[2])].experts  # mean weights over its own tokens; the last token is not fed back here
    assert set(arrow) == set(NAMES) and abs(sum(arrow.values()) - 1) < 1e-6
    assert max(abs(arrow[n] - alone[2].experts[n]) for n in NAMES) < 0.05
    # the cache never holds more columns than its longest row needs, plus the pending token
    assert all(w <= need + 1 for w, need in widths), widths
    assert eng.prefix_hits >= 1 and eng.prefix_misses >= 1
    eng.release()


def test_the_dense_mixture_and_the_per_row_paths_agree(experts, monkeypatch):
    """Sequence routes with few experts in use take the dense path (all used experts as one LoRA);
    with it switched off the per-row (prompt) and per-expert (decode) paths give the same logits."""
    from modulora.forward import forward
    from modulora.generate import left_pad
    from modulora.routing import layer

    model = load_base("tiny", dtype="fp32").model  # the same weights as `base`, with nothing installed
    routes = [{"a": 1.0}, {"b": 0.3, "c": 0.7}, None, {"d": 1.0}, {"a": 0.5, "d": 0.5}]
    prompts = [[5, 9, 13, 2], [7, 7], [3, 4, 5], [11, 2, 6, 8, 1], [9]]
    ids, mask = left_pad(prompts, 0)
    calls: dict[str, int] = {}
    for path in ("_dense", "_rowwise_mixture", "_grouped"):
        def counted(self, *a, _f=getattr(layer.RoutingPlan, path), _p=path):
            calls[_p] = calls.get(_p, 0) + 1
            return _f(self, *a)
        monkeypatch.setattr(layer.RoutingPlan, path, counted)
    layer.install(model, experts)
    try:
        def run():
            plan = layer.RoutingPlan(experts, routes)
            with layer.routing(model, plan):
                first, cache = forward(model, ids, mask)
                nxt = first[:, -1].argmax(-1, keepdim=True)
                step, _ = forward(model, nxt, torch.cat([mask, torch.ones_like(nxt)], 1), cache)
            return first, step, plan

        dense_first, dense_step, _ = run()
        assert set(calls) == {"_dense"}  # both forwards, every adapted module
        calls.clear()
        monkeypatch.setattr(layer, "DENSE_PROMPT_COLS", 0)
        monkeypatch.setattr(layer, "DENSE_STEP_COLS", 0)
        rows_first, rows_step, _ = run()
        assert set(calls) == {"_rowwise_mixture", "_grouped"} and calls["_grouped"] == calls["_rowwise_mixture"]
        layer.uninstall(model)
        plain, _ = forward(model, ids, mask)
    finally:
        layer.uninstall(model)
    valid = mask.bool()
    assert torch.allclose(dense_first[valid], rows_first[valid], atol=1e-4)
    assert torch.allclose(dense_step, rows_step, atol=1e-4)
    assert torch.equal(dense_first[2][valid[2]], plain[2][valid[2]])  # the base row gets no delta
    assert not torch.allclose(dense_first[0][valid[0]], plain[0][valid[0]], atol=1e-2)  # the others do


def test_a_row_asked_to_stop_leaves_and_the_others_go_on(base, lib, experts):
    alone = [solo(base, experts, *j) for j in JOBS[:3]]
    eng = new_engine(base, lib)
    seen: list[int] = []
    reqs = [request(eng, p, r, m, n) for p, r, m, n in JOBS[:3]]
    reqs[1].on_token = lambda ev: seen.append(ev.token)
    reqs[1].should_stop = lambda: "timeout" if len(seen) >= 4 else None
    answers = eng.run(reqs)
    assert answers[1].finish_reason == "timeout" and answers[1].samples[0].token_ids == alone[1].token_ids[:4]
    assert answers[0].samples[0].token_ids == alone[0].token_ids
    assert answers[2].samples[0].token_ids == alone[2].token_ids
    eng.release()


def test_the_engine_refuses_bad_requests(base, lib):
    eng = Engine(base)
    with pytest.raises(RoutingError, match="unknown expert"):
        eng.add([request(eng, "x", {"a": 1.0})])
    eng.use_experts(load_experts(lib, fingerprint=base.fingerprint))
    bad = [(request(eng, "x", {"zz": 1.0}), "unknown expert"), (request(eng, "x", {"a": 1.0}, mode="blend"), "unknown mode"),
           (request(eng, "x", None, max_new=-1), "max_tokens"), (request(eng, "x", Arrow(top_k=9)), "top_k"),
           (EngineRequest([], None), "no tokens"), (EngineRequest([10 ** 6], None), "token ids"),
           (EngineRequest([5], None, params=SamplingParams(temperature=-1)), "temperature"),
           (EngineRequest([5], None, params=SamplingParams(top_p=0)), "top_p"),
           (EngineRequest([5], None, params=SamplingParams(n=0)), "n must")]
    for req, msg in bad:
        with pytest.raises(RoutingError, match=msg):
            eng.add([req])
    assert eng.rows == []
    eng.release()


def test_resident_experts_evict_the_least_recently_used(base, lib, tmp_path, random_lora):
    res = ResidentExperts(lib, base.fingerprint, capacity=2)

    def resident(needed, pinned=frozenset()):
        res.ensure(needed, pinned)
        return res.slots.loaded()

    assert resident({"a"}) == ["a"]
    assert resident({"b"}) == ["a", "b"]
    assert resident({"a"}) == ["a", "b"]  # a hit, and now b is the least recently used
    slot_a = res.slots.index("a")
    assert resident({"c"}) == ["a", "c"] and res.slots.index("a") == slot_a  # a stayed in its slot
    assert res.stats() == {"hits": 1, "misses": 3, "evictions": 1, "resident": 2, "capacity": 2}
    assert res.fits({"d"}, pinned={"a"}) and not res.fits({"d"}, pinned={"a", "c"})
    assert resident({"d"}, pinned={"c"}) == ["c", "d"]  # a was older, but c is in use
    with pytest.raises(RoutingError):
        res.ensure({"nosuch"})
    assert res.needs_all_message("arrow", 4) and res.needs_all_message("arrow", 2) is None
    # a new version of a resident adapter is read again; the old copy stays while a row uses it
    maker = load_base("tiny", dtype="fp32")
    lib.add("d", random_lora(maker.model, tmp_path / "d2", 9, maker.fingerprint), base.fingerprint)
    try:
        assert not res.fits({"d"}, pinned={"d"})
        res.ensure(set(), pinned={"d"})
        old = res.slots.experts[res.slots.index("d")].object_id
        assert resident({"d"}) == ["c", "d"]
        new = res.slots.experts[res.slots.index("d")].object_id
        assert new == lib.get("d").object_id != old
    finally:
        lib.remove("d", version=2)
    with pytest.raises(ValueError):
        ResidentExperts(lib, base.fingerprint, capacity=0)


def test_newcomers_gather_for_a_few_steps_while_rows_run(base, lib):
    """While rows run, fewer than join_min waiting prompts are held for at most join_wait_steps
    decode steps (one prefill for several); with nothing running nobody waits."""
    from modulora.serve import Scheduler, _Item

    s = Scheduler(base, lib, max_batch=8, join_min=3, join_wait_steps=2)
    item = lambda: _Item([5, 6], "x", "a", params=SamplingParams(max_tokens=4))  # noqa: E731
    s.queue.put_nowait(item())
    assert not s._hold()  # nothing runs: the newcomer starts at once
    s.engine.rows = [object()]
    held = []
    for _ in range(4):
        held.append(s._hold())
        s.steps += 1
    assert held == [True, True, False, True]  # joins at the second step after it was first held
    s.queue.put_nowait(item())
    assert s._hold()
    s.queue.put_nowait(item())
    assert not s._hold()  # three wait: enough to join now
    s.engine.rows = [object()] * 7
    s.queue.get_nowait(), s.queue.get_nowait()
    assert not s._hold()  # one free row and one waiting: it joins
    while not s.queue.empty():
        s.queue.get_nowait()
    assert s._hold()  # nothing waits: nothing to admit
    s.engine.rows = []
    with pytest.raises(ValueError):
        Scheduler(base, lib, join_min=0)


def test_experts_of_different_modules_and_ranks_share_the_slots(base, lib, tmp_path):
    """A LoRA on q_proj/v_proj only, of another rank, loads into a free slot beside full ones: its
    route answers as the adapter attached alone, the others' answers do not change, and Arrow
    routes over all of them (an expert is never picked at a module it does not adapt)."""
    from modulora.adapters import AdapterConfig, attach, detach, save_adapter
    from modulora.adapters.wrap import wrappers
    from modulora.generate import using_adapter
    from modulora.routing.experts import load_experts_from_dirs

    maker = load_base("tiny", dtype="fp32")
    attach(maker.model, AdapterConfig(type="lora", r=2, alpha=4.0, target_modules=("q_proj", "v_proj")), seed=3)
    gen = torch.Generator().manual_seed(77)
    with torch.no_grad():
        for _, mod in wrappers(maker.model):
            mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=gen) * 0.5)
    save_adapter(maker.model, tmp_path / "qv", card={"name": "qv", "type": "lora", "base_fingerprint": base.fingerprint})
    detach(maker.model)

    eng = new_engine(base, lib)
    before = eng.run([request(eng, "hello there", {"a": 1.0}, max_new=8)])[0].samples[0].token_ids
    slots = eng.experts.slots
    kept = {n: slots.index(n) for n in NAMES}
    eng.use_experts(load_experts_from_dirs([tmp_path / "qv"]))
    assert {n: slots.index(n) for n in NAMES} == kept  # nobody moved
    assert bool(slots.present["model.layers.0.self_attn.q_proj"][slots.index("qv")])
    assert not bool(slots.present["model.layers.0.mlp.up_proj"][slots.index("qv")])
    got = eng.run([request(eng, "hello there", {"a": 1.0}, max_new=8), request(eng, "hello there", {"qv": 1.0}, max_new=8),
                   request(eng, "hello there", Arrow(top_k=2), max_new=8)])
    eng.release()
    assert got[0].samples[0].token_ids == before
    with using_adapter(maker, tmp_path / "qv") as model:
        from modulora.generate import generate_ids

        ids, _ = eng.encode_prompt("hello there")
        alone = generate_ids(model, [ids], maker.tokenizer.eos_token_id, maker.tokenizer.pad_token_id, 8)[0]
    assert got[1].samples[0].token_ids == alone
    assert set(got[2].experts) <= set(NAMES) | {"qv"} and abs(sum(got[2].experts.values()) - 1) < 1e-6
    # evicting frees the slot; the next load reuses it
    slot = slots.index("qv")
    eng.experts._evict("qv")
    assert slots.names[slot] is None and not bool(slots.A["model.layers.0.self_attn.q_proj"][slot].any())


def test_an_expert_already_in_its_slot_is_not_copied_again(base, lib):
    eng = new_engine(base, lib)
    experts = [eng.experts.slots.experts[eng.experts.slots.index(n)] for n in NAMES]
    version = eng.experts.slots.version
    eng.use_experts(experts, exclusive=True)  # the same objects: nothing moves
    assert eng.experts.slots.version == version
    fresh = load_experts(lib, ["a"], fingerprint=base.fingerprint)  # a new object of the same name: copied
    eng.use_experts(fresh)
    assert eng.experts.slots.version > version and eng.experts.slots.experts[eng.experts.slots.index("a")] is fresh[0]
    eng.release()


LONG = " ".join(f"w{i}" for i in range(60))  # a prompt of ~100+ tokens on the tiny tokenizer


def test_chunked_prefill_gives_the_same_answers_and_logprobs(base, lib):
    """A prompt fed 7 tokens per step answers as one fed whole: greedy tokens, Arrow weights,
    and every prompt token's log-probability."""
    jobs = [(LONG, {"a": 1.0}), (LONG + " Peru", Arrow(top_k=2)), ("short", {"b": 0.5, "c": 0.5}),
            (LONG, None)]
    got = {}
    for chunk in (7, 4096):
        eng = new_engine(base, lib)
        eng.prefill_chunk = chunk
        reqs = [request(eng, p, r, max_new=6) for p, r in jobs]
        for r in reqs:
            r.params = SamplingParams(max_tokens=6, prompt_logprobs=True, logprobs=2)
        got[chunk] = eng.run(reqs)
        eng.release()
    for small, whole in zip(got[7], got[4096]):
        assert small.samples[0].token_ids == whole.samples[0].token_ids
        assert len(small.prompt_logprobs) == len(whole.prompt_logprobs) == small.prompt_tokens
        for x, y in zip(small.prompt_logprobs[1:], whole.prompt_logprobs[1:]):
            assert x.token == y.token and abs(x.logprob - y.logprob) < 1e-4
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
        assert small.experts.keys() == whole.experts.keys()
        # batches of other shapes move Arrow's near-ties (top-k) a little: as in the test above
        assert all(abs(small.experts[k] - whole.experts[k]) < 0.01 for k in small.experts), (small.experts, whole.experts)


def test_a_long_prompt_never_holds_a_running_row_more_than_one_chunk(base, lib):
    eng = new_engine(base, lib)
    eng.prefill_chunk = 16
    fed: list[int] = []  # tokens of each forward
    hook = base.model.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["input_ids"].numel()),
                                                with_kwargs=True)
    try:
        running = request(eng, "x y", {"a": 1.0}, max_new=40)
        running.params = SamplingParams(max_tokens=40, ignore_eos=True)
        done = eng.add([running])
        long = request(eng, LONG * 2, {"b": 1.0}, max_new=2)
        n_long = len(long.prompt)
        assert n_long > 10 * eng.prefill_chunk
        fed.clear()
        done += eng.add([long])
        steps, tokens = 0, []
        while eng.prefilling:
            before = len(eng.rows[0].tokens)
            done += eng.step()
            steps += 1
            tokens.append(len(eng.rows[0].tokens) - before)
        assert steps >= n_long // eng.prefill_chunk - 1
        assert all(t == 1 for t in tokens)  # the running row got a token every step
        assert max(fed) <= eng.prefill_chunk and sum(fed) >= n_long  # no forward fed more than a chunk
        while eng.busy:
            done += eng.step()
    finally:
        hook.remove()
        eng.release()
    answers = {id(r): a for r, a in done}
    assert len(answers[id(running)].samples[0].token_ids) == 40
    assert answers[id(long)].samples[0].finish_reason in ("length", "stop")


def test_a_request_stopped_while_prefilling_leaves_at_once(base, lib):
    eng = new_engine(base, lib)
    eng.prefill_chunk = 8
    flag: list[str] = []
    long = request(eng, LONG, {"a": 1.0}, max_new=4, should_stop=lambda: flag[0] if flag else None)
    other = request(eng, LONG, {"b": 1.0}, max_new=4)
    done = eng.add([long, other])
    assert eng.prefilling and not eng.rows
    flag.append("client_disconnect")
    done += eng.step()
    assert [(r is long, a.finish_reason) for r, a in done] == [(True, "client_disconnect")]
    while eng.busy:
        done += eng.step()
    assert {id(r) for r, _ in done} == {id(long), id(other)}
    assert eng.clear("error") == [] and eng.load == 0
    eng.release()


def test_a_request_is_answered_by_the_versions_it_arrived_with(base, tmp_path, random_library, random_lora):
    """Versions are pinned when a request arrives: a newer upload while it waits does not change
    its answer (the older version is loaded for it), a delete and re-upload is a 409 naming the
    adapter, and the routing trace names the versions."""
    from modulora.base import load_base
    from modulora.serve import Scheduler, _Item
    from modulora.serve.errors import APIError

    lib = random_library(tmp_path, ["a", "b"])
    arrived = {r.name: (r.version, r.object_id) for r in lib.list()}
    maker = load_base("tiny", dtype="fp32")
    s = Scheduler(base, lib)
    s.start()
    try:
        def ask(route, pins=None):
            it = _Item(base.tokenizer("Peru")["input_ids"], "Peru", route, params=SamplingParams(max_tokens=6))
            if pins:
                it.pins = dict(pins)
            s.submit([it])
            return it.future.result(timeout=60)

        first = ask("a")
        assert first.versions == {"a": 1}
        lib.add("a", random_lora(maker.model, tmp_path / "a2", 7, maker.fingerprint), maker.fingerprint)
        newer = ask("a")
        assert newer.versions == {"a": 2} and newer.token_ids != first.token_ids
        pinned = ask("a", arrived)  # arrived before version 2: answered by version 1
        assert pinned.versions == {"a": 1} and pinned.token_ids == first.token_ids
        assert ask("a").token_ids == newer.token_ids  # and the next one by version 2 again
        lib.remove("b")
        lib.add("b", random_lora(maker.model, tmp_path / "b2", 8, maker.fingerprint), maker.fingerprint)
        with pytest.raises(APIError) as e:
            ask("a:0.5,b:0.5", arrived)
        assert e.value.status == 409 and "adapter b (version 1" in str(e.value) and "replaced" in str(e.value)
        assert ask("a:0.5,b:0.5").versions == {"a": 2, "b": 2}
    finally:
        s.stop()
        s.engine.release()


def test_a_route_over_the_library_chooses_again_when_an_adapter_it_chose_is_deleted(base, tmp_path, random_library):
    """`uniform` resolved before a delete runs over what is left (no 400, no 409: only routes that
    name adapters are pinned); a route naming the deleted adapter is a 400 naming it."""
    from modulora.serve import Scheduler, _Item

    lib = random_library(tmp_path, ["a", "b", "c"])
    s = Scheduler(base, lib)
    items = [_Item(base.tokenizer("Peru")["input_ids"], "Peru", route, params=SamplingParams(max_tokens=2))
             for route in ("uniform", "c")]
    for it in items:
        it.pins = {r.name: (r.version, r.object_id) for r in lib.list()}
    s._resolve(items)
    assert set(items[0].resolved) == {"a", "b", "c"}
    lib.remove("c")
    s._start(s._prepare(items, free=8))
    assert set(items[0].resolved) == {"a", "b"} and s.engine.load == 1 and not items[0].future.done()
    err = items[1].future.exception(timeout=1)
    assert err.status == 400 and "c" in str(err)
    s.engine.clear("error")
    late = _Item(base.tokenizer("Peru")["input_ids"], "Peru", "uniform", params=SamplingParams(max_tokens=2))
    s._resolve([late])
    s._load([late], {})
    lib.remove("b")  # deleted after its LoRA was loaded: the request runs with the resident copy
    assert s._family([late]) == [late] and not late.future.done()
    s.engine.release()


def test_a_library_route_whose_choice_is_deleted_just_before_it_starts_chooses_again(base, tmp_path, random_library,
                                                                                     monkeypatch):
    """The race a soak found: `uniform` chose a, b and c; c is deleted after the scheduler's look at
    the library and before the request starts. Not a 400: it waits for the next admission and
    chooses again among what is left."""
    from modulora.serve import Scheduler, _Item

    lib = random_library(tmp_path, ["a", "b", "c"])
    s = Scheduler(base, lib)
    it = _Item(base.tokenizer("Peru")["input_ids"], "Peru", "uniform", params=SamplingParams(max_tokens=2))
    s._resolve([it])
    assert set(it.resolved) == {"a", "b", "c"}
    stale, real = lib.latest_object_ids(), lib.latest_object_ids
    lib.remove("c")
    looks = iter([stale])  # the scheduler's first look predates the delete, every later one sees it
    monkeypatch.setattr(lib, "latest_object_ids", lambda: next(looks, None) or real())
    assert s._prepare([it], free=8) == [] and list(s.deferred) == [it] and not it.future.done()
    reqs = s._prepare(list(s.deferred), free=8)
    assert len(reqs) == 1 and set(it.resolved) == {"a", "b"} and not it.future.done()
    s.engine.release()


def test_token_routing_adds_up_to_the_answers_mean_weights(base, lib):
    """An Arrow row's per-token weights are its own: the first token carries the prompt's mean,
    and prompt mean x prompt tokens + the later tokens' weights = the answer's mean x all tokens
    fed (the last token is not fed back)."""
    eng = new_engine(base, lib)
    req = request(eng, "Peru is a country", Arrow(top_k=2), max_new=7)
    req.params = SamplingParams(max_tokens=7, ignore_eos=True)
    req.token_routing = True
    other = request(eng, "x", {"a": 1.0}, max_new=3)  # a batch neighbour that did not ask
    answer, plain = eng.run([req, other])
    steps = answer.samples[0].routing
    assert len(steps) == 7 and plain.samples[0].routing is None
    prompt = req.content_span[1] - req.content_span[0]
    fed = prompt + len(steps) - 1
    for name, mean in answer.experts.items():
        added = steps[0].experts.get(name, 0) * prompt + sum(s.experts.get(name, 0) for s in steps[1:])
        assert abs(added - mean * fed) < 1e-4, (name, added, mean * fed)
    eng.release()


def test_a_failure_while_admitting_fails_the_newcomers_not_the_running_requests(base, tmp_path, random_library):
    """A bug or a library race while a newcomer is resolved is a 500 for that newcomer; the
    requests already generating finish their answers."""
    from modulora.serve import Scheduler, _Item
    from modulora.serve.errors import APIError

    lib = random_library(tmp_path, ["a", "b"])
    s = Scheduler(base, lib)
    s.start()
    try:
        ids = base.tokenizer("Peru")["input_ids"]
        running = _Item(ids, "Peru", "a", params=SamplingParams(max_tokens=40, ignore_eos=True))
        s.submit([running])
        while not s.engine.rows:
            time.sleep(0.01)
        real = s.router.resolve_traced

        def broken(*args, **kwargs):
            raise RuntimeError("the library changed underneath")

        s.router.resolve_traced = broken
        newcomer = _Item(ids, "Peru", "b", params=SamplingParams(max_tokens=4))
        s.submit([newcomer])
        err = newcomer.future.exception(timeout=60)
        assert isinstance(err, APIError) and err.status == 500 and "library changed underneath" in str(err)
        s.router.resolve_traced = real
        assert len(running.future.result(timeout=60).token_ids) == 40
    finally:
        s.stop()
        s.engine.release()
