"""Routing the other adapter families: series and parallel adapters mixed by output per request,
prefix adapters selected per request, in heterogeneous batches with LoRA and base rows; checked
against the same adapter attached alone (`using_adapter`), and through the Router and the CLI."""

from __future__ import annotations

import pytest
import torch

from modulora.adapters import AdapterConfig, adapter_state, attach, detach, load_adapter, save_adapter
from modulora.base import load_base
from modulora.cli import main
from modulora.forward import PREFIX_ATTR, forward
from modulora.generate import generate, using_adapter
from modulora.library import Library
from modulora.routing.api import Router
from modulora.routing.arrow import Arrow
from modulora.routing.engine import Engine
from modulora.routing.requests import EngineRequest, SamplingParams
from modulora.routing.batch import generate_routed
from modulora.routing.experts import ExpertSet, RoutingError, load_experts
from modulora.routing.family import FamilyPlan, load_family
from modulora.routing.layer import installed

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

ADAPTERS = {  # name -> (config, std of the random weights)
    "s1": (AdapterConfig(type="series", bottleneck=8, dropout=0.0), 0.3),
    "s2": (AdapterConfig(type="series", bottleneck=4, scale=0.5, dropout=0.0), 0.3),
    "h1": (AdapterConfig(type="series", placement="houlsby", bottleneck=8, dropout=0.0), 0.3),
    "p1": (AdapterConfig(type="parallel", bottleneck=8, dropout=0.0), 0.3),
    "p2": (AdapterConfig(type="parallel", bottleneck=6, scale=2.0, dropout=0.0), 0.3),
    "pre4": (AdapterConfig(type="prefix", num_virtual_tokens=4), 1.0),
    "pre8": (AdapterConfig(type="prefix", num_virtual_tokens=8), 1.0),
    "l1": (AdapterConfig(type="lora", r=4, dropout=0.0), 0.3),
}
ATOL = 1e-5
PROMPTS = ["Add 2 and 3.", "The capital of France is", "Reverse the word abc", "yes or no?", "apple river"]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """A library with every adapter above (random weights), its family experts, and a tiny base."""
    root = tmp_path_factory.mktemp("family")
    base = load_base("tiny", dtype="fp32")
    lib = Library(root / "lib")
    dirs = {}
    for seed, (name, (cfg, std)) in enumerate(ADAPTERS.items()):
        attach(base.model, cfg, seed=seed)
        gen = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            for t in adapter_state(base.model).values():
                t.copy_(torch.randn(t.shape, generator=gen) * std)
        dirs[name] = save_adapter(base.model, root / name,
                                  card={"name": name, "type": cfg.type, "base_fingerprint": base.fingerprint})
        detach(base.model)
        lib.add(name, dirs[name], base.fingerprint)
    others = load_family(lib, [n for n in ADAPTERS if n != "l1"], fingerprint=base.fingerprint)
    return {"base": base, "lib": lib, "dirs": dirs, "others": others, "root": root}


def padded(lengths, seed=3):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, 380, (n,), generator=gen)
        mask[i, width - n:] = 1
    return ids, mask


@torch.inference_mode()
def alone(fam, name, ids, mask):
    """Logits of one row (unpadded) with the adapter attached alone (None: the base)."""
    n = int(mask.sum())
    with using_adapter(fam["base"], fam["dirs"][name] if name else None) as model:
        return forward(model, ids[None, -n:], mask[None, -n:])[0][0]


def answer_alone(fam, name, prompt, n=8):
    with using_adapter(fam["base"], fam["dirs"][name] if name else None) as model:
        return generate(model, fam["base"].tokenizer, [prompt], max_new_tokens=n)[0]


@pytest.mark.parametrize("name", ["s1", "h1", "p1"])
def test_bottleneck_routed_alone_equals_the_attached_adapter(fam, name):
    """Weight 1: the same logits as the adapter attached; rows that did not select it stay base."""
    model = fam["base"].model
    ids, mask = padded([9, 5, 7, 3])
    routes = [{name: 1.0}, None, {name: 1.0}, None]
    with torch.inference_mode(), FamilyPlan(model, routes, fam["others"]).applied(model):
        got = forward(model, ids, mask)[0]
    for i, r in enumerate(routes):
        n = int(mask[i].sum())
        torch.testing.assert_close(got[i, -n:], alone(fam, r and name, ids[i], mask[i]), atol=ATOL, rtol=0)
    answer = generate_routed(fam["base"], None, [EngineRequest(PROMPTS[0], {name: 1.0}, params=SamplingParams(max_tokens=8))],
                             others=fam["others"])[0]
    assert answer.text == answer_alone(fam, name, PROMPTS[0])
    assert answer.experts == {name: 1.0}


@pytest.mark.parametrize("a,b,site,width", [("s1", "s2", "model.layers.1.mlp.down_proj", 128),
                                            ("p1", "p2", "model.layers.1.mlp", 64)])
def test_mixture_is_the_weighted_sum_of_the_deltas(fam, a, b, site, width):
    """At a site: base + sum_e w_e delta_e, where delta_e is what the adapter adds attached alone
    (its scale included); rows compute only the experts they chose."""
    x = torch.randn(3, 5, width, generator=torch.Generator().manual_seed(0))
    plain = load_base("tiny", dtype="fp32").model
    with torch.inference_mode():
        base_out = plain.get_submodule(site)(x)
        delta = {}
        for name in (a, b):
            load_adapter(plain, fam["dirs"][name])
            delta[name] = plain.get_submodule(site)(x) - base_out
            detach(plain)
        model = fam["base"].model
        routes = [{a: 0.3, b: 0.7}, None, {b: 1.0}]
        with FamilyPlan(model, routes, fam["others"]).applied(model):
            got = model.get_submodule(site)(x)
    assert delta[a].abs().max() > 1e-3 and delta[b].abs().max() > 1e-3
    torch.testing.assert_close(got[0], base_out[0] + 0.3 * delta[a][0] + 0.7 * delta[b][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[1], base_out[1], atol=0, rtol=0)
    torch.testing.assert_close(got[2], base_out[2] + delta[b][2], atol=1e-6, rtol=0)


def test_prefix_per_request_is_batch_invariant(fam):
    """Rows with prefixes of different lengths, a LoRA row, a series row and a base row in one
    engine batch: each row's prompt log-probabilities and greedy answer are those of its adapter
    attached alone (a prefix leads its row's cache and takes no position)."""
    base, others = fam["base"], fam["others"]
    model = base.model
    es = ExpertSet(load_experts(fam["lib"], fingerprint=base.fingerprint))
    names = ["pre4", "l1", None, "pre8", "s1"]
    ids, mask = padded([6, 9, 4, 7, 5])
    eng = Engine(base)
    eng.use_experts(es.experts)
    eng.use_family(others)
    rows = [ids[i, -int(mask[i].sum()):].tolist() for i in range(len(names))]
    reqs = [EngineRequest(r, {n: 1.0} if n else None, params=SamplingParams(max_tokens=0, prompt_logprobs=True))
            for r, n in zip(rows, names)]
    try:
        got = eng.run(reqs)
    finally:
        eng.release()
    for i, name in enumerate(names):
        want = torch.log_softmax(alone(fam, name, ids[i], mask[i]).float(), -1)
        want = [float(want[j, t]) for j, t in enumerate(rows[i][1:])]
        have = [e.logprob for e in got[i].prompt_logprobs[1:]]
        assert max(abs(a - b) for a, b in zip(have, want)) < ATOL, name

    reqs = [EngineRequest(p, {n: 1.0} if n else None, params=SamplingParams(max_tokens=8)) for p, n in zip(PROMPTS, names)]
    answers = generate_routed(base, es, reqs, others=others, batch_size=5, explain=True)
    for name, prompt, ans in zip(names, PROMPTS, answers):
        assert ans.text == answer_alone(fam, name, prompt), name
    assert answers[0].experts == {"pre4": 1.0} and answers[2].experts == {}
    assert set(answers[4].per_layer) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    # the model is left as found: no prefix, no hooks, no multi-expert layers
    assert getattr(model, PREFIX_ATTR, None) is None
    assert not any(m._forward_hooks for m in model.modules())
    assert installed(model) is None


def test_rows_that_finish_leave_the_batch_and_the_rest_are_unchanged(fam, monkeypatch):
    """Requests with different token limits in one running batch (LoRA, series, parallel, prefix
    and base rows together): as rows finish, the batch narrows (the KV cache, the per-row prefix
    columns and bottleneck groups follow); every answer is still what its adapter gives alone."""
    base, others = fam["base"], fam["others"]
    es = ExpertSet(load_experts(fam["lib"], fingerprint=base.fingerprint))
    names = ["pre4", "s1", "l1", "pre8", None, "p1"]
    limits = [2, 8, 1, 8, 3, 5]
    prompts = PROMPTS + ["one more"]
    reqs = [EngineRequest(p, {n: 1.0} if n else None, params=SamplingParams(max_tokens=k))
            for p, n, k in zip(prompts, names, limits)]
    seen: list[list[int]] = []
    real = Engine._drop

    def spy(self, keep):
        seen.append(list(keep))
        return real(self, keep)

    monkeypatch.setattr(Engine, "_drop", spy)
    answers = generate_routed(base, es, reqs, others=others, batch_size=6)
    assert seen and len(seen[0]) < 6, "no row left the batch"
    for name, prompt, k, ans in zip(names, prompts, limits, answers):
        assert ans.text == answer_alone(fam, name, prompt, n=k), name
        assert len(ans.token_ids) <= k


@pytest.mark.parametrize("route,mode,needle", [
    ({"s1": 1, "p1": 1}, "mixture", r"route mixes s1 \(series pfeiffer\) and p1 \(parallel\)"),
    ({"s1": 1, "h1": 1}, "mixture", r"mixes s1 \(series pfeiffer\) and h1 \(series houlsby\)"),
    ({"l1": 1, "s1": 1}, "mixture", r"mixes l1 \(LoRA\) and s1"),
    ({"pre4": 1, "l1": 1}, "mixture", r"mixes pre4 \(prefix\) and l1 \(LoRA\)"),
    ({"pre4": 1, "pre8": 1}, "mixture", "selects one prefix adapter"),
    ({"s1": 1, "s2": 1}, "average", "averaging.*LoRA experts only"),
    ({"nosuch": 1}, "mixture", "unknown expert 'nosuch'"),
    ({"s1": -1}, "mixture", "weight"),
])
def test_incompatible_routes_are_clear_errors(fam, route, mode, needle):
    es = ExpertSet(load_experts(fam["lib"], fingerprint=fam["base"].fingerprint))
    with pytest.raises(RoutingError, match=needle):
        generate_routed(fam["base"], es, [EngineRequest("hi", {"s1": 1.0}), EngineRequest("hi", route, mode=mode)],
                        others=fam["others"])


def test_arrow_needs_lora_experts(fam):
    with pytest.raises(RoutingError, match="Arrow"):
        generate_routed(fam["base"], None, [EngineRequest("hi", Arrow(top_k=1))], others=fam["others"])


def run(capsys, lib, *argv):
    code = main(["--library", str(lib), *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_routes_family_adapters(capsys, fam):
    lib = fam["root"] / "lib"
    code, out, err = run(capsys, lib, "generate", "--base", "tiny", "--route", "s1", "--prompt", "x",
                         "--max-new-tokens", "6", "--explain")
    assert code == 0 and "s1 1.00" in out, err
    code, single, err = run(capsys, lib, "generate", "--base", "tiny", "--adapter", "s1", "--prompt", "x",
                            "--max-new-tokens", "6")
    assert code == 0 and out.startswith(f">>> x\n{single}"), (out, single)
    code, out, err = run(capsys, lib, "generate", "--base", "tiny", "--route", "s1:1,s2:3", "--prompt", "x",
                         "--max-new-tokens", "2", "--explain")
    assert code == 0 and "s2 0.75, s1 0.25" in out, err
    code, out, err = run(capsys, lib, "generate", "--base", "tiny", "--route", "pre8", "--prompt", "x",
                         "--max-new-tokens", "2", "--explain")
    assert code == 0 and "pre8 1.00" in out, err
    code, out, err = run(capsys, lib, "generate", "--base", "tiny", "--route", "s1,p1", "--prompt", "x")
    assert code == 2 and "mixes s1" in err and "Traceback" not in err, err


def test_library_without_lora(capsys, fam, tmp_path):
    """Family routes need no LoRA expert set; LoRA policies say there is none to route."""
    lib = Library(tmp_path / "lib")
    lib.add("s1", fam["dirs"]["s1"], fam["base"].fingerprint)
    lib.add("pre4", fam["dirs"]["pre4"], fam["base"].fingerprint)
    answers = Router(fam["base"], lib).answer(["x", "y", "z"], ["s1", "pre4", "base"], max_new_tokens=3)
    assert [a.experts for a in answers] == [{"s1": 1.0}, {"pre4": 1.0}, {}]
    assert answers[0].text == answer_alone(fam, "s1", "x", 3)
    code, out, err = run(capsys, tmp_path / "lib", "generate", "--base", "tiny", "--route", "uniform", "--prompt", "x")
    assert code == 2 and "no LoRA adapters" in err, err
