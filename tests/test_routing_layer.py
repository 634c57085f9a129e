"""The multi-expert layer: compositions against single adapters and PEFT, batch invariance,
padding, the KV cache, Arrow (against an SVD reference and PEFT's Arrow), prototype caching,
and refusals of bad input."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from modulora.adapters import AdapterConfig, attach, detach, load_adapter, save_adapter
from modulora.adapters.lora import LoraLinear
from modulora.adapters.wrap import wrappers
from modulora.base import load_base
from modulora.forward import forward
from modulora.library import Library
from modulora.routing import arrow as arrow_mod
from modulora.routing.arrow import Arrow
from modulora.routing.batch import generate_routed
from modulora.routing.requests import EngineRequest, SamplingParams
from modulora.routing.experts import (ExpertSet, RoutingError, load_experts, load_experts_from_dirs)
from modulora.routing.layer import MultiLoraLinear, RoutingPlan, install, installed, routing, uninstall

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

NAMES = ["e0", "e1", "e2", "e3", "e4"]  # e4 has rank 2 (padded to 4 in the set)
ATOL = 5e-5  # fp32 rounding of batched vs single-row matmuls; a routing mix-up moves logits by >1e-2


def fresh():
    return load_base("tiny", dtype="fp32").model


def make_lora(model, out, seed, fp, r=4, alpha=8.0, targets=None):
    """A LoRA with random A and B, B's first rank component dominant (a clear top singular value)."""
    cfg = AdapterConfig(type="lora", r=r, alpha=alpha, dropout=0.0,
                        **({"target_modules": tuple(targets)} if targets else {}))
    attach(model, cfg, seed=seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for _, mod in wrappers(model):
            B = torch.randn(mod.lora_B.weight.shape, generator=gen) * 0.15
            B[:, 0] *= 4
            mod.lora_B.weight.copy_(B)
    save_adapter(model, out, card={"name": out.name, "type": "lora", "base_fingerprint": fp})
    detach(model)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing")
    base = load_base("tiny", dtype="fp32")
    dirs = {}
    for i, name in enumerate(NAMES):
        dirs[name] = make_lora(base.model, root / "dirs" / name, i, base.fingerprint, r=2 if name == "e4" else 4,
                               alpha=4.0 if name == "e4" else 8.0)
    lib = Library(root / "lib")
    for name in NAMES:
        lib.add(name, dirs[name], base.fingerprint)
    experts = load_experts(lib, fingerprint=base.fingerprint)
    es = ExpertSet(experts)
    model = fresh()
    install(model, es)
    yield {"base": base, "dirs": dirs, "lib": lib, "experts": {e.name: e for e in experts}, "es": es,
           "model": model, "root": root}
    uninstall(model)


@pytest.fixture(scope="module")
def batch():
    """Four left-padded rows of random token ids."""
    gen = torch.Generator().manual_seed(3)
    lengths = [9, 5, 7, 3]
    seqs = [torch.randint(3, 380, (n,), generator=gen).tolist() for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


def logits_of(model, ids, mask, plan=None):
    with torch.inference_mode():
        if plan is None:
            return forward(model, ids, mask)[0]
        with routing(model, plan):
            return forward(model, ids, mask)[0]


def peft_logits(pm, ids, mask):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        return pm(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def close_on_valid(a, b, mask, atol=ATOL):
    m = mask.bool()
    torch.testing.assert_close(a[m], b[m], atol=atol, rtol=0)


class Capture:
    """Records (input, output) of chosen MultiLoraLinear modules on every call."""

    def __init__(self, model, names):
        self.calls = {n: [] for n in names}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(mod, args, out):
            self.calls[name].append((args[0].detach().clone(), out.detach().clone(), mod))
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


MODS = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"]


def lora_delta(e, module, x):
    return e.scaling * (x @ e.A[module].T @ e.B[module].T)


def seq_delta(experts, route, mode, module, x):
    total = sum(route.values())
    w = {n: v / total for n, v in route.items()}
    if mode == "mixture":
        return sum(w[n] * lora_delta(experts[n], module, x) for n in w)
    R = max(experts[n].r for n in w)
    A = sum(w[n] * F.pad(experts[n].A[module], (0, 0, 0, R - experts[n].r)) for n in w)
    B = sum(w[n] * experts[n].scaling * F.pad(experts[n].B[module], (0, R - experts[n].r)) for n in w)
    return x @ A.T @ B.T


def svd_prototype(e, module, kind="product"):
    _, _, Vh = torch.linalg.svd((e.A[module] if kind == "a" else e.B[module] @ e.A[module]).double())
    return Vh[0].float()


def arrow_delta(experts, names, spec, mode, module, x):
    """Reference Arrow from dense SVD prototypes, token by token; a module Arrow does not route
    in mixes every expert with equal weights."""
    if spec.modules is not None and not re.search(spec.modules, module):
        return seq_delta(experts, {n: 1.0 for n in names}, mode, module, x), None
    if spec.prototypes == "spectral":  # |B A x|, from the dense update
        scores = torch.stack([(x @ (experts[n].scaling * experts[n].B[module] @ experts[n].A[module]).T).norm(dim=-1)
                              for n in names], -1)
    else:
        scores = x @ torch.stack([svd_prototype(experts[n], module, spec.prototypes) for n in names]).T
    if spec.normalize:
        scores = scores / x.norm(dim=-1, keepdim=True)
    vals, idx = scores.abs().topk(spec.top_k, dim=-1)
    w = torch.softmax(vals / spec.temperature, -1)
    out = torch.zeros(x.shape[0], experts[names[0]].B[module].shape[0])
    for t in range(x.shape[0]):
        chosen = {names[int(i)]: float(v) for i, v in zip(idx[t], w[t])}
        out[t] = seq_delta(experts, chosen, mode, module, x[t:t + 1])[0]
    return out, w


def check_arrow_rows(setup, batch, plan):
    """Each row's delta at MODS equals the reference Arrow of its spec (None rows: nothing added)."""
    ids, mask = batch
    cap = Capture(setup["model"], MODS)
    try:
        logits_of(setup["model"], ids, mask, plan)
    finally:
        cap.close()
    for module in MODS:
        x, y, mod = cap.calls[module][0]
        delta = y - F.linear(x, mod.weight)
        for i, (spec, mode) in enumerate(zip(plan.routes, plan.modes)):
            v = mask[i].bool()
            if spec is None:
                assert delta[i].abs().max() == 0
                continue
            want, _ = arrow_delta(setup["experts"], list(spec.experts or NAMES), spec, mode, module, x[i][v])
            torch.testing.assert_close(delta[i][v], want, atol=ATOL, rtol=0)


def step(model, plan, ids, mask, cache=None):
    with torch.inference_mode(), routing(model, plan):
        return forward(model, ids, mask, cache)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["e1", "e4"])
def test_one_expert_weight_one_equals_the_adapter_and_peft(setup, batch, name):
    from peft import PeftModel

    ids, mask = batch
    es, model = setup["es"], setup["model"]
    routed = logits_of(model, ids, mask, RoutingPlan(es, [{name: 1.0}] * 4))
    alone = fresh()
    load_adapter(alone, setup["dirs"][name])
    close_on_valid(routed, logits_of(alone, ids, mask), mask)
    pm = PeftModel.from_pretrained(fresh(), setup["dirs"][name]).eval()
    close_on_valid(routed, peft_logits(pm, ids, mask), mask)
    assert (routed - logits_of(model, ids, mask))[mask.bool()].abs().max() > 1e-2  # the expert does something
    # a decode step (grouped kernel) too
    with torch.inference_mode():
        logits, cache = step(model, RoutingPlan(es, [{name: 1.0}] * 4), ids, mask)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        m2 = torch.cat([mask, torch.ones(4, 1, dtype=mask.dtype)], 1)
        routed2, _ = step(model, RoutingPlan(es, [{name: 1.0}] * 4), nxt, m2, cache)
        alone2, _ = forward(alone, nxt, m2, forward(alone, ids, mask)[1])
    torch.testing.assert_close(routed2, alone2, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["mixture", "average"])
def test_sequence_routes_equal_manual_compositions_layer_by_layer(setup, batch, mode):
    """Per module: mixture = weighted sum of single-adapter deltas; average = the averaged LoRA;
    in the prompt (row-wise kernel) and in a decode step (expert-grouped kernel); pads get zero."""
    ids, mask = batch
    es, model, experts = setup["es"], setup["model"], setup["experts"]
    routes = [{"e0": 0.3, "e1": 0.7}, {"e2": 1.0}, {"e1": 2.0, "e3": 1.0, "e4": 1.0}, None]
    plan = RoutingPlan(es, routes, mode)
    cap = Capture(model, MODS)
    try:
        logits, cache = step(model, plan, ids, mask)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        m2 = torch.cat([mask, torch.tensor([[1], [0], [1], [1]])], 1)  # row 1 finished: a pad this step
        step(model, plan, nxt, m2, cache)
    finally:
        cap.close()
    for module in MODS:
        (x1, y1, mod), (x2, y2, _) = cap.calls[module]
        for x, y, valid in ((x1, y1, mask.bool()), (x2, y2, m2[:, -1:].bool())):
            delta = y - F.linear(x, mod.weight)
            for i, route in enumerate(routes):
                want = torch.zeros_like(delta[i]) if route is None else seq_delta(experts, route, mode, module, x[i])
                want = want * valid[i].unsqueeze(-1)
                torch.testing.assert_close(delta[i], want, atol=ATOL, rtol=0)


def test_average_mode_equals_an_averaged_adapter(setup, batch):
    ids, mask = batch
    es, experts = setup["es"], setup["experts"]
    w = {"e0": 0.25, "e2": 0.75}
    routed = logits_of(setup["model"], ids, mask, RoutingPlan(es, [w] * 4, "average"))
    avg = fresh()
    attach(avg, AdapterConfig(type="lora", r=4, alpha=4.0, dropout=0.0))  # scaling 1
    with torch.no_grad():
        for name, mod in wrappers(avg):
            assert isinstance(mod, LoraLinear)
            mod.lora_A.weight.copy_(sum(v * experts[n].A[name] for n, v in w.items()))
            mod.lora_B.weight.copy_(sum(v * experts[n].scaling * experts[n].B[name] for n, v in w.items()))
    close_on_valid(routed, logits_of(avg, ids, mask), mask)
    mixed = logits_of(setup["model"], ids, mask, RoutingPlan(es, [w] * 4, "mixture"))
    assert (mixed - routed)[mask.bool()].abs().max() > 1e-4  # the two compositions differ


def test_routing_weights_sum_to_one(setup):
    es = setup["es"]
    plan = RoutingPlan(es, [{"e0": 3.0, "e1": 1.0}, {"e2": 0.2}, {"e0": 1, "e1": 1, "e3": 1}], "mixture")
    assert plan.routes[0] == {"e0": 0.75, "e1": 0.25} and plan.routes[1] == {"e2": 1.0}
    torch.testing.assert_close(plan.mix.w.sum(1), torch.ones(3))
    x = torch.randn(50, 64)
    for k in (1, 3, 5):
        idx, w = arrow_mod.route_tokens(x, torch.randn(5, 64), Arrow(top_k=k, temperature=0.5))
        assert idx.shape == (50, k) and (w > 0).all()
        torch.testing.assert_close(w.sum(1), torch.ones(50))
        assert all(len(set(r)) == k for r in idx.tolist())  # k distinct experts per token


def test_padding_tokens_get_no_routing(setup, batch):
    ids, mask = batch
    es, model = setup["es"], setup["model"]
    routes = [Arrow(top_k=2), {"e1": 1.0}, {"e0": 0.5, "e3": 0.5}, Arrow(top_k=3)]
    plan = RoutingPlan(es, routes, ["mixture", "mixture", "average", "average"], explain=True)
    cap = Capture(model, MODS)
    try:
        logits_of(model, ids, mask, plan)
    finally:
        cap.close()
    pads = ~mask.bool()
    for module in MODS:
        x, y, mod = cap.calls[module][0]
        delta = y - F.linear(x, mod.weight)
        assert delta[pads].abs().max() == 0  # exactly the base output
        assert (delta[mask.bool()].abs().amax(-1) > 0).all()
    torch.testing.assert_close(plan.tokens_seen, mask.sum(1).double())
    _, per_layer = plan.report(0)
    for weights in per_layer.values():
        assert math.isclose(sum(weights.values()), 1.0, rel_tol=1e-6)  # means over valid tokens only


@pytest.mark.parametrize("kernel", ["used", "sorted"])
@pytest.mark.parametrize("mode", ["mixture", "average"])
def test_arrow_equals_svd_reference(setup, batch, monkeypatch, kernel, mode):
    if kernel == "used":
        monkeypatch.setattr(arrow_mod, "DENSE_MAX_RATIO", float("inf"))
    else:
        monkeypatch.setattr(arrow_mod, "DENSE_MAX_RATIO", 0.0)
        monkeypatch.setattr(arrow_mod, "DENSE_MAX_TOKENS", 0)
    ids, mask = batch
    es, model, experts = setup["es"], setup["model"], setup["experts"]
    specs = [Arrow(top_k=2), Arrow(top_k=3, temperature=0.5, normalize=True), None,
             Arrow(top_k=2, experts=("e1", "e2", "e4"))]
    check_arrow_rows(setup, batch, RoutingPlan(es, specs, mode))
    # every row Arrow and no padding: the product accumulates straight into the base output
    spec = specs[1]
    cap = Capture(model, MODS[:1])
    try:
        logits_of(model, ids[:, -3:], mask[:, -3:], RoutingPlan(es, [spec] * 4, mode))
    finally:
        cap.close()
    x, y, mod = cap.calls[MODS[0]][0]
    want, _ = arrow_delta(experts, NAMES, spec, mode, MODS[0], x.reshape(-1, x.shape[-1]))
    torch.testing.assert_close((y - F.linear(x, mod.weight)).reshape(want.shape), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["mixture", "average"])
def test_arrow_prototypes_from_a_or_the_spectrum_and_routing_in_some_modules_only(setup, batch, mode):
    """`prototypes="a"` scores by A's top right singular vector, "spectral" by |B A x| (SpectR);
    `modules` routes per token only where the pattern matches, every expert at equal weight
    elsewhere (and the report says so)."""
    es, experts = setup["es"], setup["experts"]
    specs = [Arrow(top_k=2, prototypes="a"), Arrow(top_k=1, modules=r"mlp"),
             Arrow(top_k=3, prototypes="spectral", normalize=True),
             Arrow(top_k=2, prototypes="spectral", modules=r"self_attn\.q_proj", temperature=2.0)]
    plan = RoutingPlan(es, specs, mode, explain=True)
    check_arrow_rows(setup, batch, plan)
    _, per_module = plan.report(1)
    for module, weights in per_module.items():
        if "mlp" in module:  # top-1: a token's whole weight on one expert
            assert sum(weights.values()) == pytest.approx(1.0)
        else:
            assert weights == pytest.approx({n: 1 / len(NAMES) for n in NAMES})
    # A's prototypes differ from the product's (else the first row would prove nothing)
    a, product = arrow_mod.prototypes(es, "a"), arrow_mod.prototypes(es)
    assert float((a[MODS[0]] - product[MODS[0]]).abs().max()) > 0.1
    for kind in ("a", "spectral"):
        assert setup["lib"].get_derived(experts["e0"].object_id, arrow_mod.PROTOTYPES[kind]) is not None
    # e4 has rank 2 in a set of rank 4: its spectrum is padded with zero rows
    spectral = arrow_mod.prototypes(es, "spectral")[MODS[0]]
    e4 = es.index("e4")
    assert spectral.shape == (len(es), 4, 64) and spectral[e4, 2:].abs().max() == 0


def test_arrow_equals_peft_arrow(setup, batch):
    from peft import ArrowConfig, create_arrow_model

    ids, mask = batch
    names = ["e0", "e1", "e2", "e3"]  # PEFT's Arrow needs equal ranks
    es = ExpertSet([setup["experts"][n] for n in names])
    model = fresh()
    install(model, es)
    for k, temp in ((2, 1.0), (3, 0.7)):
        ours = logits_of(model, ids, mask, RoutingPlan(es, [Arrow(top_k=k, temperature=temp)] * 4))
        pm = create_arrow_model(fresh(), [str(setup["dirs"][n]) for n in names],
                                ArrowConfig(top_k=k, router_temperature=temp, rng_seed=0)).eval()
        close_on_valid(ours, peft_logits(pm, ids, mask), mask, atol=1e-4)


def test_prototypes_are_top_singular_vectors_and_cached(setup, tmp_path, monkeypatch):
    lib, base = setup["lib"], setup["base"]
    es = ExpertSet(load_experts(lib))
    protos = arrow_mod.prototypes(es)
    for i, name in enumerate(es.names):
        e = es.experts[i]
        for m in es.modules:
            v = protos[m][i]
            assert abs(float(v.norm()) - 1) < 1e-5
            assert abs(abs(float(v @ svd_prototype(e, m))) - 1) < 1e-5  # equal up to sign
        cached = lib.get_derived(e.object_id, arrow_mod.ARROW_KIND)
        assert cached is not None
    # a second set over the same library: nothing recomputed
    calls = []
    real = arrow_mod.compute_prototypes
    monkeypatch.setattr(arrow_mod, "compute_prototypes", lambda e, kind="product": calls.append(e.name) or real(e, kind))
    again = arrow_mod.prototypes(ExpertSet(load_experts(lib)))
    assert calls == []
    for m in es.modules:
        torch.testing.assert_close(again[m], protos[m])
    # a new adapter: only it is computed
    make_lora(fresh(), tmp_path / "e5", 5, base.fingerprint)
    lib.add("e5", tmp_path / "e5", base.fingerprint)
    try:
        arrow_mod.prototypes(ExpertSet(load_experts(lib)))
        assert calls == ["e5"]
    finally:
        lib.remove("e5")


def test_batch_invariance_with_mixed_policies(setup, batch):
    """A request's logits and greedy answer do not depend on the rest of its batch."""
    ids, mask = batch
    es, model = setup["es"], setup["model"]
    routes = [{"e1": 1.0}, Arrow(top_k=2), {"e0": 1, "e2": 1, "e3": 1}, None]
    together = logits_of(model, ids, mask, RoutingPlan(es, routes))
    for i, r in enumerate(routes):
        n = int(mask[i].sum())
        alone = logits_of(model, ids[i:i + 1, -n:], mask[i:i + 1, -n:], RoutingPlan(es, [r]))
        torch.testing.assert_close(together[i, -n:], alone[0], atol=ATOL, rtol=0)

    base = setup["base"]
    base = type(base)(model=model, tokenizer=base.tokenizer, name=base.name, fingerprint=base.fingerprint)
    prompts = ["Add 2 and 3.", "The capital of France is", "Reverse the word abc", "yes or no?"]
    reqs = [EngineRequest(p, r, params=SamplingParams(max_tokens=6)) for p, r in zip(prompts, routes)]
    joint = generate_routed(base, es, reqs)
    for r, a in zip(reqs, joint):
        assert generate_routed(base, es, [r])[0].text == a.text


def test_kv_cache_equals_full_recompute(setup, batch):
    ids, mask = batch
    es, model = setup["es"], setup["model"]
    routes = [Arrow(top_k=2), {"e0": 0.4, "e4": 0.6}, {"e1": 0.5, "e2": 0.5}, Arrow(top_k=3)]
    modes = ["mixture", "mixture", "average", "average"]
    plan = RoutingPlan(es, routes, modes)
    steps = []
    with torch.inference_mode():
        logits, cache = step(model, plan, ids, mask)
        seq, m = ids, mask
        for _ in range(4):
            nxt = logits[:, -1:].argmax(-1)
            seq = torch.cat([seq, nxt], 1)
            m = torch.cat([m, torch.ones_like(nxt)], 1)
            logits, cache = step(model, plan, nxt, m, cache)
            steps.append(logits[:, -1])
        full = logits_of(model, seq, m, RoutingPlan(es, routes, modes))
    for s, got in enumerate(steps):
        torch.testing.assert_close(got, full[:, ids.shape[1] + s], atol=ATOL, rtol=0)


def test_generate_routed_explains(setup):
    base = setup["base"]
    base = type(base)(model=fresh(), tokenizer=base.tokenizer, name=base.name, fingerprint=base.fingerprint)
    es = setup["es"]
    reqs = [EngineRequest("Add 2 and 3.", Arrow(top_k=2), params=SamplingParams(max_tokens=4)),
            EngineRequest("yes or no?", {"e2": 3, "e0": 1}, mode="average", params=SamplingParams(max_tokens=3)),
            EngineRequest("hello", None, params=SamplingParams(max_tokens=2))]
    answers = generate_routed(base, es, reqs, batch_size=2, explain=True)
    assert len(answers) == 3 and all(isinstance(a.text, str) for a in answers)
    a = answers[0]
    assert set(a.per_layer) == set(es.modules) and len(a.experts) >= 2
    assert math.isclose(sum(a.experts.values()), 1.0, rel_tol=1e-6)
    for weights in a.per_layer.values():
        assert 1 <= len(weights) <= len(es) and math.isclose(sum(weights.values()), 1.0, rel_tol=1e-6)
    assert answers[1].experts == {"e2": 0.75, "e0": 0.25}
    assert answers[2].experts == {}
    # the model is left as found: no wrappers, base parameter names
    assert not any(isinstance(m, MultiLoraLinear) for m in base.model.modules())
    assert set(base.model.state_dict()) == set(fresh().state_dict())


# ---------------------------------------------------------------------------------------------
# bad input: a clear RoutingError, never a silent fallback to the base


def test_unknown_adapter_name(setup):
    with pytest.raises(RoutingError, match="nope"):
        load_experts(setup["lib"], ["e0", "nope"])
    with pytest.raises(RoutingError, match="unknown expert 'nope'"):
        RoutingPlan(setup["es"], [{"e0": 1.0}, {"nope": 1.0}])
    with pytest.raises(RoutingError, match="unknown expert"):
        RoutingPlan(setup["es"], [Arrow(top_k=1, experts=["e0", "zz"])])
    with pytest.raises(RoutingError, match="unknown expert 'nope'"):
        generate_routed(setup["base"], setup["es"], [EngineRequest("hi", {"e0": 1}), EngineRequest("hi", {"nope": 1})])


def test_adapter_for_another_base(setup, tmp_path):
    fp = setup["base"].fingerprint
    other = dict(fp, weights="0" * 16, id="f" * 16)
    d = make_lora(fresh(), tmp_path / "alien", 9, other)
    lib = Library(tmp_path / "lib")
    lib.add("alien", d)
    with pytest.raises(RoutingError, match="another base"):
        load_experts(lib, fingerprint=fp)
    with pytest.raises(RoutingError, match="another base"):
        load_experts_from_dirs([d], fingerprint=fp)
    # shapes of another base: caught when installing
    e = load_experts_from_dirs([setup["dirs"]["e0"]])[0]
    e.A = {m.replace("layers.1", "layers.7"): t for m, t in e.A.items()}
    e.B = {m.replace("layers.1", "layers.7"): t for m, t in e.B.items()}
    with pytest.raises(RoutingError, match="another base"):
        install(fresh(), ExpertSet([e]))


def test_empty_library(tmp_path):
    with pytest.raises(RoutingError, match="empty"):
        load_experts(Library(tmp_path / "empty"))
    with pytest.raises(RoutingError, match="at least one expert"):
        ExpertSet([])


def test_top_k_larger_than_the_experts(setup):
    with pytest.raises(RoutingError, match="top_k=6 is larger than the number of experts"):
        RoutingPlan(setup["es"], [Arrow(top_k=6)])
    with pytest.raises(RoutingError, match="top_k=3 is larger"):
        RoutingPlan(setup["es"], [None, Arrow(top_k=3, experts=("e0", "e1"))])


def test_experts_with_different_module_sets(setup, batch, tmp_path):
    """An expert of q_proj/v_proj only shares a set with full ones: routed alone it gives the
    adapter's own logits, and the full expert's logits do not change beside it."""
    ids, mask = batch
    d = make_lora(fresh(), tmp_path / "qv", 11, setup["base"].fingerprint, targets=("q_proj", "v_proj"))
    qv = load_experts_from_dirs([d])[0]
    es = ExpertSet([setup["experts"]["e0"], qv])
    model = fresh()
    install(model, es)
    both = logits_of(model, ids, mask, RoutingPlan(es, [{"qv": 1.0}, {"e0": 1.0}, {"qv": 1.0}, {"e0": 1.0}]))
    uninstall(model)
    attached = fresh()
    load_adapter(attached, d)
    with torch.inference_mode():
        alone, _ = forward(attached, ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(both[0][valid[0]], alone[0][valid[0]], atol=ATOL, rtol=0)
    install(model, ExpertSet([setup["experts"]["e0"]]))
    e0 = logits_of(model, ids, mask, RoutingPlan(installed(model), [{"e0": 1.0}] * 4))
    uninstall(model)
    torch.testing.assert_close(both[1][valid[1]], e0[1][valid[1]], atol=ATOL, rtol=0)


def test_other_bad_input(setup, tmp_path):
    es = setup["es"]
    for w in (0.0, -1.0, float("nan"), "1"):
        with pytest.raises(RoutingError, match="weight"):
            RoutingPlan(es, [{"e0": w}])
    with pytest.raises(RoutingError, match="names no experts"):
        RoutingPlan(es, [{}])
    with pytest.raises(RoutingError, match="mode"):
        RoutingPlan(es, [{"e0": 1}], "sum")
    with pytest.raises(RoutingError, match="temperature"):
        RoutingPlan(es, [Arrow(top_k=1, temperature=0)])
    with pytest.raises(RoutingError, match="prototypes must be one of product, a, spectral"):
        RoutingPlan(es, [Arrow(top_k=1, prototypes="b")])
    with pytest.raises(RoutingError, match="regular expression"):
        RoutingPlan(es, [Arrow(top_k=1, modules="mlp(")])
    with pytest.raises(RoutingError, match="matches none of the experts' modules"):
        RoutingPlan(es, [Arrow(top_k=1, modules="attention")])
    with pytest.raises(RoutingError, match="unknown Arrow setting 'temp'"):
        arrow_mod.arrow_route(2, {"temp": 0.5})
    with pytest.raises(RoutingError, match="a route is"):
        RoutingPlan(es, ["e0"])
    install(setup["model"], es)  # the same set again: nothing to do (an expert store that grew wraps more)
    with pytest.raises(RoutingError, match="already installed"):
        install(setup["model"], ExpertSet([setup["experts"]["e0"]]))
    attached = fresh()
    load_adapter(attached, setup["dirs"]["e0"])
    with pytest.raises(RoutingError, match="adapter is attached"):
        install(attached, es)
    with pytest.raises(RoutingError, match="not installed"):
        with routing(fresh(), RoutingPlan(es, [None])):
            pass
    # a non-LoRA adapter named explicitly
    m = fresh()
    attach(m, AdapterConfig(type="series", bottleneck=4))
    save_adapter(m, tmp_path / "series")
    setup["lib"].add("series", tmp_path / "series")
    try:
        with pytest.raises(RoutingError, match="series adapter"):
            load_experts(setup["lib"], ["e0", "series"])
        assert [e.name for e in load_experts(setup["lib"])] == NAMES  # skipped when not named
    finally:
        setup["lib"].remove("series")
    # the plan must match the batch
    with pytest.raises(RoutingError, match="rows"):
        logits_of(setup["model"], torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long),
                  RoutingPlan(es, [None, None, None]))


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [2, 0, 3, 1]])
def test_every_row_its_own_expert(setup, batch, monkeypatch, order):
    """Every row its own expert: in slot order the prompt uses the experts' tensors as they are
    and the decode step multiplies straight into the output (no gather, no scatter); in another
    order through the gathered paths. Either way each row equals its adapter alone."""
    from modulora.routing import layer

    ids, mask = batch
    es, model = setup["es"], setup["model"]
    routes = [{NAMES[i]: 1.0} for i in order]
    m2 = torch.cat([mask, torch.tensor([[1], [0], [1], [1]])], 1)  # row 1 finished: a pad this step
    for dense in (True, False):
        if not dense:  # the per-row prompt kernel and the per-expert decode kernel
            monkeypatch.setattr(layer, "DENSE_PROMPT_COLS", 0)
            monkeypatch.setattr(layer, "DENSE_STEP_COLS", 0)
        plan = RoutingPlan(es, routes)
        assert (plan.mix.row_span is not None, plan.mix.slot_rows is None) == ((order == [0, 1, 2, 3],) * 2)
        with torch.inference_mode():
            logits, cache = step(model, plan, ids, mask)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            routed2, _ = step(model, plan, nxt, m2, cache)
        for i, e in enumerate(order):
            alone = fresh()
            load_adapter(alone, setup["dirs"][NAMES[e]])
            with torch.inference_mode():
                want, c = forward(alone, ids[i:i + 1], mask[i:i + 1])
                want2, _ = forward(alone, nxt[i:i + 1], m2[i:i + 1], c)
            close_on_valid(logits[i:i + 1], want, mask[i:i + 1])
            if m2[i, -1]:
                torch.testing.assert_close(routed2[i], want2[0], atol=ATOL, rtol=0)


def test_a_mixture_every_row_uses_whole_takes_the_dense_kernel_however_wide(setup, batch, monkeypatch):
    """Rows that each use every used expert (a uniform mixture over a library) take the dense
    kernel whatever the column limits: it does the same multiply-adds as the per-row kernels
    without their gathers (2x faster at 48 experts). Its rows equal those of the per-row and
    grouped kernels, which a group where one row uses fewer experts takes under the same limits."""
    from modulora.routing import layer

    ids, mask = batch
    es, model = setup["es"], setup["model"]
    monkeypatch.setattr(layer, "DENSE_PROMPT_COLS", 0)
    monkeypatch.setattr(layer, "DENSE_STEP_COLS", 0)
    uniform = {n: 1.0 for n in NAMES}
    m2 = torch.cat([mask, torch.ones(4, 1, dtype=mask.dtype)], 1)
    out = {}
    for label, routes in (("full", [uniform] * 4), ("not full", [uniform] * 3 + [{NAMES[0]: 1.0}])):
        plan = RoutingPlan(es, routes)
        assert plan.mix.full == (label == "full")
        calls = []
        for path in ("_dense", "_rowwise_mixture", "_grouped"):
            real = getattr(layer.RoutingPlan, path)
            monkeypatch.setattr(layer.RoutingPlan, path,
                                lambda self, *a, _p=path, _r=real: (calls.append(_p), _r(self, *a))[1])
        with torch.inference_mode():
            logits, cache = step(model, plan, ids, mask)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out[label] = (logits, step(model, plan, nxt, m2, cache)[0], nxt)
        want = {"_dense"} if label == "full" else {"_rowwise_mixture", "_grouped"}
        assert set(calls) == want, (label, set(calls))
    (a, a2, na), (b, b2, nb) = out["full"], out["not full"]
    close_on_valid(a[:3], b[:3], mask[:3])
    assert torch.equal(na[:3], nb[:3])
    torch.testing.assert_close(a2[:3], b2[:3], atol=ATOL, rtol=0)


@pytest.mark.parametrize("average", [False, True])
def test_arrow_kernels_agree(average):
    """Every kernel of arrow.mixed_delta gives the per-token reference, with and without `out`."""
    gen = torch.Generator().manual_seed(0)
    E, R, d_in, d_out, n, k = 9, 3, 16, 12, 40, 2
    A, Bt = torch.randn(E, R, d_in, generator=gen), torch.randn(E, R, d_out, generator=gen)
    x = torch.randn(n, d_in, generator=gen)
    idx, w = arrow_mod.route_tokens(x, torch.randn(E, d_in, generator=gen), Arrow(top_k=k))
    want = torch.zeros(n, d_out)
    for t in range(n):
        a = sum(w[t, j] * A[idx[t, j]] for j in range(k))
        b = sum(w[t, j] * Bt[idx[t, j]] for j in range(k))
        want[t] = (b.T @ a @ x[t]) if average else sum(
            w[t, j] * (Bt[idx[t, j]].T @ (A[idx[t, j]] @ x[t])) for j in range(k))
    used = torch.bincount(idx.reshape(-1), minlength=E).nonzero().squeeze(1)
    got = {
        "dense": arrow_mod.dense_delta(x, A, Bt, arrow_mod.coefficients(idx, w, E), average),
        "pairs": arrow_mod._pair_delta(x, A, Bt, idx, w, average),
        "used": arrow_mod._used_delta(x, A, Bt, idx, w, used, average),
        "sorted": arrow_mod._sorted_delta(x, A, Bt, idx, w, torch.bincount(idx.reshape(-1), minlength=E).tolist(),
                                          average),
        "dispatch": arrow_mod.mixed_delta(x, A, Bt, idx, w, average),
        "dispatch, few tokens": arrow_mod.mixed_delta(x[:3], A, Bt, idx[:3], w[:3], average),
        "into out": arrow_mod.mixed_delta(x[:3], A, Bt, idx[:3], w[:3], average, out=torch.ones(3, d_out)) - 1,
    }
    for name, value in got.items():
        ref = want[:3] if "few" in name or "out" in name else want
        torch.testing.assert_close(value, ref, atol=1e-4, rtol=1e-4, msg=name)


class _NoSync(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on any operation that reads a value back from the device (or whose output shape
    depends on the values: on a GPU each of these waits for the device)."""

    READ_BACK = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "unique_consecutive", "_unique2",
                           "bincount", "repeat_interleave", "argwhere"})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []))
        if name in self.READ_BACK or bool_index:
            raise AssertionError(f"{name} reads a value back from the device in a decode step")
        return func(*args, **(kwargs or {}))


READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


def _read_back(name):
    def fail(self, *args, **kwargs):
        raise AssertionError(f"Tensor.{name} reads a value back from the device in a decode step")
    return fail


def _guarded(fn):
    """fn with every read-back failing while it runs (and only then)."""
    def run(self, *args):
        saved = {n: torch.Tensor.__dict__.get(n) for n in READS}
        for n in READS:
            setattr(torch.Tensor, n, _read_back(n))
        try:
            with _NoSync():
                return fn(self, *args)
        finally:
            for n, f in saved.items():
                if f is None:
                    delattr(torch.Tensor, n)
                else:
                    setattr(torch.Tensor, n, f)
    return run


def test_a_decode_step_reads_nothing_back_from_the_device(setup, batch, monkeypatch):
    """Building a decode step's weights and every kernel of a step (dense, grouped, per-row
    average, Arrow dense and per-token gather) run on the device alone: no value is read back."""
    from modulora.routing import layer

    ids, mask = batch
    es, model = setup["es"], setup["model"]
    routes = [{"e1": 1.0}, Arrow(top_k=2), {"e0": 1, "e2": 1, "e3": 1}, {"e0": 0.5, "e1": 0.5}]
    modes = ["mixture", "mixture", "average", "mixture"]
    m2 = torch.cat([mask, torch.tensor([[1], [0], [1], [1]])], 1)
    real_begin, real_apply = layer.RoutingPlan.begin, layer.RoutingPlan.apply
    for cols in (layer.DENSE_STEP_COLS, 0):
        monkeypatch.setattr(layer, "DENSE_STEP_COLS", cols)
        plan = RoutingPlan(es, routes, modes)
        assert not plan.mix.full  # rows 0 and 3 use different experts: cols picks the kernel
        with torch.inference_mode():
            logits, cache = step(model, plan, ids, mask)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            monkeypatch.setattr(layer.RoutingPlan, "begin", _guarded(real_begin))
            monkeypatch.setattr(layer.RoutingPlan, "apply", _guarded(real_apply))
            try:
                step(model, plan, nxt, m2, cache)
            finally:
                monkeypatch.undo()
        assert plan.tokens_seen.tolist() == (mask.sum(1) + m2[:, -1]).tolist()


def test_a_bf16_prompt_multiplies_its_experts_in_bf16_and_a_decode_step_in_fp32(setup, batch):
    """A bf16 base (what serve loads on a CPU with AMX): a prompt multiplies the experts in bf16,
    on copies the slots make once, with no cast of the activations; a decode step of a few rows
    stays in the set's fp32. Both give each row its own composition within bf16 rounding."""
    ids, mask = batch
    es, experts = setup["es"], setup["experts"]
    model = fresh().to(torch.bfloat16)
    install(model, es)
    routes = [{"e0": 0.3, "e1": 0.7}, Arrow(top_k=2), {"e2": 1.0}, None]
    plan = RoutingPlan(es, routes, ["mixture", "mixture", "average", "mixture"])
    cap = Capture(model, MODS)
    try:
        logits, cache = step(model, plan, ids, mask)
        assert {d for (_, d) in es._copies} == {torch.bfloat16}   # the prompt's products
        copies = dict(es._copies)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        step(model, plan, nxt, torch.cat([mask, torch.ones(4, 1, dtype=mask.dtype)], 1), cache)
        assert es._copies.keys() == copies.keys()                  # no copy made for the decode step
        assert all(es.stacks(m, d)[0] is copies[(m, d)][0] for m, d in copies)  # made once
    finally:
        cap.close()
        uninstall(model)
    for module in MODS:
        for x, y, mod in cap.calls[module]:
            assert y.dtype == torch.bfloat16
            x = x.float()
            delta = y.float() - F.linear(x, mod.weight.float())
            for i, route in enumerate(routes[:3:2] + routes[3:]):
                row = [0, 2, 3][i]
                want = (torch.zeros_like(delta[row]) if route is None else
                        seq_delta(experts, route, ["mixture", "average", "mixture"][i], module, x[row]))
                want = want * (mask[row].bool().unsqueeze(-1) if x.shape[1] > 1 else 1)
                scale = y[row].float().abs().max()
                assert (delta[row] - want).abs().max() < 0.02 * scale, (module, row)
            other = seq_delta(experts, {"e3": 1.0}, "mixture", module, x[2])
            assert (other - delta[2]).abs().max() > 0.05 * y[2].float().abs().max()  # a mix-up would show


def test_the_slots_keep_their_bf16_copies_up_to_date(setup):
    """stacks() copies are made once; a load or an evict rewrites its slot in them, a grown store
    copies afresh."""
    from modulora.routing.slots import ExpertSlots

    experts = setup["experts"]
    slots = ExpertSlots()  # unbounded: starts with 4 slots and grows
    slots.load(experts["e0"])
    m = MODS[0]
    with torch.inference_mode():  # as in a forward; the loads below come outside one, as in a server
        first = slots.stacks(m, torch.bfloat16)
    assert first[0].dtype == torch.bfloat16 and slots.stacks(m, torch.bfloat16)[0] is first[0]
    assert slots.stacks(m, torch.float32)[0] is slots.A[m]

    def same():
        A, Bt = slots.stacks(m, torch.bfloat16)
        return torch.equal(A, slots.A[m].to(torch.bfloat16)) and torch.equal(Bt, slots.Bt[m].to(torch.bfloat16))

    slot = slots.load(experts["e1"])
    assert slots.stacks(m, torch.bfloat16)[0] is first[0] and first[0][slot].abs().sum() > 0 and same()
    slots.evict("e0")
    assert same()
    for name in ("e2", "e3", "e4", "e0"):  # a fifth expert grows the store to 8 slots
        slots.load(experts[name])
    assert slots.capacity == 8 and slots.stacks(m, torch.bfloat16)[0].shape[0] == 8 and same()
