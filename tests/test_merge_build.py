"""Merging LoRA experts (concat, linear/SVD, TIES) and building a library (private, MBC)."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import modulora.build as build_mod
from modulora.adapters import AdapterConfig, adapter_state, attach, detach, load_adapter, save_adapter
from modulora.base import load_base
from modulora.build import BuildError, build_library, kmeans
from modulora.forward import forward
from modulora.library import Library
from modulora.routing.merge import (MergeError, add_merge_command, load_lora, lowrank_svd, merge_concat,
                                    merge_linear, merge_ties, save_merged, ties_combine)
from modulora.tasks import make_task, write_jsonl
from modulora.train import TrainConfig

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def make_lora(base, path, *, r=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"), seed=0, rslora=False,
              values=None, fingerprint=None):
    """A LoRA with random (or given) non-zero A and B, saved with a card."""
    model = base.model
    attach(model, AdapterConfig(type="lora", r=r, alpha=alpha, target_modules=targets, use_rslora=rslora,
                                dropout=0.0), seed=seed)
    try:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for k, t in adapter_state(model).items():
                if values is not None:
                    t.copy_(values(k, t))
                else:
                    t.copy_(torch.randn(t.shape, generator=gen) * 0.3)
        card = {"name": path.name, "type": "lora", "samples": [f"{path.name} sample {i}" for i in range(3)],
                "base_fingerprint": fingerprint or base.fingerprint}
        save_adapter(model, path, card=card)
    finally:
        detach(model)
    return path


def module_deltas(model, adapter_dir, x):
    """{module: wrapped(x) - base(x)} for every LoRA module of the adapter, loaded alone."""
    load_adapter(model, adapter_dir)
    try:
        out = {}
        with torch.no_grad():
            for name, mod in model.named_modules():
                if hasattr(mod, "lora_A"):
                    xi = x[..., : mod.lora_A.in_features]
                    out[name] = mod(xi) - torch.nn.functional.linear(xi, mod.weight, mod.bias)
        return out
    finally:
        detach(model)


@pytest.fixture(scope="module")
def experts(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("experts")
    return [make_lora(tiny, d / "e1", r=2, alpha=4.0, seed=1),
            make_lora(tiny, d / "e2", r=4, alpha=16.0, seed=2, rslora=True),
            make_lora(tiny, d / "e3", r=3, alpha=3.0, seed=3)]


# --- merging ---------------------------------------------------------------------------------------

def test_concat_equals_the_output_mixture(tiny, experts, tmp_path):
    w = [0.5, 0.3, -0.2]
    merged = merge_concat(experts, w)
    assert merged.r == 9 and merged.method == "concat"
    out = save_merged(merged, tmp_path / "m")
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(0))
    mixture = {}
    for wi, e in zip(w, experts):
        for m, d in module_deltas(tiny.model, e, x).items():
            mixture[m] = mixture.get(m, 0) + wi * d
    got = module_deltas(tiny.model, out, x)
    assert got.keys() == mixture.keys() and len(got) == 6
    for m in got:
        torch.testing.assert_close(got[m], mixture[m], atol=1e-5, rtol=0)
    card = json.loads((out / "card.json").read_text())
    assert [(c["name"], c["weight"]) for c in card["merged_from"]] == [("e1", 0.5), ("e2", 0.3), ("e3", -0.2)]
    assert card["merge"]["method"] == "concat" and card["base_fingerprint"]["id"] == tiny.fingerprint["id"]
    assert card["samples"][:3] == ["e1 sample 0", "e2 sample 0", "e3 sample 0"]


def test_linear_without_rank_is_concat_and_uniform_weights_by_default(experts):
    a, b = merge_linear(experts), merge_concat(experts, [1 / 3] * 3)
    assert a.method == "linear" and a.card["merge"]["method"] == "linear"
    for m in a.A:
        assert torch.equal(a.A[m], b.A[m]) and torch.equal(a.B[m], b.B[m])
    # any object with name, r, scaling, A, B (a routing LoraExpert) is taken as is
    duck = [SimpleNamespace(**vars(load_lora(e))) for e in experts]
    c = merge_concat(duck, [1 / 3] * 3)
    assert all(torch.equal(c.B[m], b.B[m]) for m in b.B)


def test_linear_rank_is_the_dense_svd_truncation(experts):
    w = [0.6, 0.3, 0.1]
    loras = [load_lora(e) for e in experts]
    for rank in (1, 5):
        merged = merge_linear(experts, w, rank=rank)
        assert merged.r == rank
        for m in merged.A:
            dense = sum(wi * e.scaling * (e.B[m].double() @ e.A[m].double()) for wi, e in zip(w, loras))
            U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
            best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
            torch.testing.assert_close(merged.delta(m).double(), best, atol=1e-5, rtol=0)
            err = torch.linalg.matrix_norm(merged.delta(m).double() - dense)
            assert abs(err - S[rank:].square().sum().sqrt()) < 1e-5
    # the factored SVD agrees with the dense one
    e = loras[0]
    m = next(iter(e.A))
    U, S, Vh = lowrank_svd(e.B[m].double(), e.A[m].double())
    torch.testing.assert_close(S, torch.linalg.svdvals(e.B[m].double() @ e.A[m].double())[: S.numel()])


def _diag_lora(tiny, path, diag):
    """r=len(diag) LoRA on q_proj whose update (scaling 1) is diag(diag) in the top-left corner."""
    r = len(diag)

    def values(key, t):
        out = torch.zeros_like(t)
        for i, v in enumerate(diag):
            if "lora_A" in key:
                out[i, i] = 1.0
            else:
                out[i, i] = v
        return out

    return make_lora(tiny, path, r=r, alpha=float(r), targets=("q_proj",), values=values)


def test_ties_matches_a_hand_computed_merge(tiny, tmp_path):
    e1 = _diag_lora(tiny, tmp_path / "t1", [6.0, -2.0, 0.5, 3.0])
    e2 = _diag_lora(tiny, tmp_path / "t2", [2.0, 4.0, -5.0, 0.1])
    density = 3 / (64 * 64)  # keep each update's 3 largest entries: drops 0.5 and 0.1
    # uniform: signs +, +, -, +; entry 0 agrees (mean 4), 1 -> only e2 (4), 2 -> e2 (-5), 3 -> e1 (3)
    # weights .75/.25: entry 0 -> (.75*6 + .25*2) / 1 = 5; entry 1 elected - (-1.5 + 1) -> e1 (-2)
    for weights, expected in ((None, [4.0, 4.0, -5.0, 3.0]), ([0.75, 0.25], [5.0, -2.0, -5.0, 3.0])):
        merged = merge_ties([e1, e2], weights, density=density, rank=4)
        for m in merged.A:
            want = torch.zeros(64, 64)
            want[:4, :4] = torch.diag(torch.tensor(expected))
            torch.testing.assert_close(merged.delta(m), want, atol=1e-5, rtol=0)
    assert merged.card["merge"] == {"method": "ties", "rank": 4, "density": density, "r": 4}
    # the core on a 2x2 example, all entries kept
    got = ties_combine([torch.tensor([[1.0, -3.0], [2.0, 0.0]]), torch.tensor([[3.0, 1.0], [-1.0, 0.0]])],
                       [0.5, 0.5], density=1.0)
    torch.testing.assert_close(got, torch.tensor([[2.0, -3.0], [2.0, 0.0]]))


def test_merged_adapter_passes_library_validation_and_loads_in_peft(tiny, experts, tmp_path):
    from peft import PeftModel

    out = save_merged(merge_ties(experts, density=0.5, rank=6), tmp_path / "merged")
    rec = Library(tmp_path / "lib").add("merged", out, tiny.fingerprint)
    assert rec.type == "lora" and rec.card["merge"]["method"] == "ties" and rec.config["r"] == 6
    ids = torch.randint(3, 384, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    model = tiny.model
    load_adapter(model, out)
    try:
        with torch.no_grad():
            ours = forward(model, ids, mask)[0]
    finally:
        detach(model)
    pm = PeftModel.from_pretrained(load_base("tiny", dtype="fp32").model, out)
    pm.eval()
    with torch.no_grad():
        theirs = pm(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_incompatible_experts_are_refused(tiny, experts, tmp_path):
    other = make_lora(tiny, tmp_path / "qk", targets=("q_proj", "k_proj"))
    with pytest.raises(MergeError, match="e1 and qk adapt different modules"):
        merge_concat([experts[0], other])
    fp = {**tiny.fingerprint, "id": "0123456789abcdef"}
    alien = make_lora(tiny, tmp_path / "alien", fingerprint=fp)
    with pytest.raises(MergeError, match="e1 and alien were trained on different base models"):
        merge_linear([experts[0], alien], rank=2)
    with pytest.raises(MergeError, match="3 weights for 2 adapters"):
        merge_concat(experts[:2], [1, 1, 1])
    with pytest.raises(MergeError, match="rank must be"):
        merge_linear(experts, rank=0)
    with pytest.raises(MergeError, match="density"):
        merge_ties(experts, density=0)
    attach(tiny.model, AdapterConfig(type="series", bottleneck=4))
    try:
        save_adapter(tiny.model, tmp_path / "series")
    finally:
        detach(tiny.model)
    with pytest.raises(MergeError, match="only LoRA adapters can be merged"):
        merge_concat([experts[0], tmp_path / "series"])


def test_merge_command_adds_to_the_library(tiny, experts, tmp_path, capsys):
    lib = Library(tmp_path / "lib")
    for e in experts:
        lib.add(e.name, e, tiny.fingerprint)
    parser = argparse.ArgumentParser()
    parser.add_argument("--library")
    add_merge_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["--library", str(tmp_path / "lib"), "merge", "--method", "linear", "--adapters",
                              "e1,e2@1,e3", "--weights", "1,2,3", "--rank", "4", "--name", "mix"])
    args.func(args)
    rec = lib.get("mix")
    assert rec.card["name"] == "mix" and rec.config["r"] == 4
    assert [m["name"] for m in rec.card["merged_from"]] == ["e1@1", "e2@1", "e3@1"]
    assert "into mix v1" in capsys.readouterr().out


# --- building ------------------------------------------------------------------------------------

@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    upper, add = make_task("upper", n=24), make_task("add", n=24)
    for name, task in (("upper", upper), ("upper_copy", upper), ("add", add), ("sum", add)):
        write_jsonl(task, d / f"{name}.jsonl")
    return d


TRAIN = TrainConfig(batch_size=4, max_length=48, lr=1e-2, dtype="fp32", holdout=4)
ADAPTER = AdapterConfig(type="lora", r=2, alpha=4.0, target_modules=("q_proj", "v_proj"))


class CountingTrain:
    def __init__(self, monkeypatch):
        self.calls = []
        real = build_mod.train_adapter

        def counted(base, task, *a, **k):
            self.calls.append(task.name)
            return real(base, task, *a, **k)

        monkeypatch.setattr(build_mod, "train_adapter", counted)


def test_build_private_then_rerun_reuses(tiny, data_dir, tmp_path, monkeypatch):
    lib = Library(tmp_path / "lib")
    count = CountingTrain(monkeypatch)
    s = build_library(tiny, data_dir, tmp_path / "out", lib, mode="private", steps=2, adapter=ADAPTER, train=TRAIN,
                      progress=False)
    assert [r.name for r in lib.list()] == ["add", "sum", "upper", "upper_copy"]
    assert sorted(s["trained"]) == ["add", "sum", "upper", "upper_copy"] and s["reused"] == []
    assert lib.get("upper").card["task"] == "upper" and lib.get("upper").card["train_config"]["steps"] == 2
    again = build_library(tiny, data_dir, tmp_path / "out", lib, mode="private", steps=2, adapter=ADAPTER,
                          train=TRAIN, progress=False)
    assert again["trained"] == [] and sorted(again["reused"]) == sorted(s["trained"]) and len(count.calls) == 4
    assert all(r.version == 1 for r in lib.list())  # nothing re-added
    # other settings: retrained
    third = build_library(tiny, data_dir, tmp_path / "out", lib, mode="private", steps=3, adapter=ADAPTER,
                          train=TRAIN, progress=False)
    assert len(third["trained"]) == 4 and lib.get("add").version == 2


def test_build_mbc_clusters_similar_tasks(tiny, data_dir, tmp_path, monkeypatch):
    lib = Library(tmp_path / "lib")
    count = CountingTrain(monkeypatch)
    s = build_library(tiny, data_dir, tmp_path / "out", lib, mode="mbc", clusters=2, steps=2, mbc_steps=4,
                      adapter=ADAPTER, train=TRAIN, progress=False)
    assert sorted(map(sorted, s["clusters"].values())) == [["add", "sum"], ["upper", "upper_copy"]]
    assert s["clusters"]["cluster-0"] == ["add", "sum"]  # cluster 0 holds the first task
    assert [r.name for r in lib.list()] == ["cluster-0", "cluster-1"]
    card = lib.get("cluster-1").card
    assert card["cluster_tasks"] == ["upper", "upper_copy"] and card["task"] == "cluster-1"
    clustering = json.loads((tmp_path / "out" / "clustering.json").read_text())
    assert clustering["assignment"]["sum"] == "cluster-0" and len(clustering["similarity"]) == 4
    sim = np.array(clustering["similarity"])
    names = clustering["tasks"]
    i, j, k = names.index("upper"), names.index("upper_copy"), names.index("add")
    assert sim[i, j] > sim[i, k]
    assert build_mod.load_clustering(lib) == clustering  # kept in the library too, for the web page
    png = tmp_path / "out" / "similarity.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    assert len(count.calls) == 6  # 4 short + 2 cluster adapters
    again = build_library(tiny, data_dir, tmp_path / "out", lib, mode="mbc", clusters=2, steps=2, mbc_steps=4,
                          adapter=ADAPTER, train=TRAIN, progress=False)
    assert again["trained"] == [] and len(again["reused"]) == 6 and len(count.calls) == 6
    assert again["clusters"] == s["clusters"] and lib.get("cluster-0").version == 1


def test_build_refuses_bad_input_before_training(tiny, data_dir, tmp_path, monkeypatch):
    def never(*a, **k):
        raise AssertionError("trained despite bad input")

    monkeypatch.setattr(build_mod, "train_adapter", never)
    kw = dict(adapter=ADAPTER, train=TRAIN, progress=False)
    with pytest.raises(BuildError, match="data directory not found"):
        build_library(tiny, tmp_path / "nope", tmp_path / "out", **kw)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("x")
    with pytest.raises(BuildError, match="no task files"):
        build_library(tiny, tmp_path / "empty", tmp_path / "out", **kw)
    with pytest.raises(BuildError, match="cannot make 5 clusters from 4 task"):
        build_library(tiny, data_dir, tmp_path / "out", mode="mbc", clusters=5, **kw)
    with pytest.raises(BuildError, match="at least 1"):
        build_library(tiny, data_dir, tmp_path / "out", mode="mbc", clusters=0, **kw)
    with pytest.raises(BuildError, match="needs the number of clusters"):
        build_library(tiny, data_dir, tmp_path / "out", mode="mbc", **kw)
    with pytest.raises(BuildError, match="unknown build mode"):
        build_library(tiny, data_dir, tmp_path / "out", mode="joint", **kw)
    (data_dir / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl: line 1 is not valid JSON"):
        build_library(tiny, data_dir, tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_kmeans_finds_separated_groups_and_never_leaves_a_cluster_empty():
    rng = np.random.default_rng(0)
    centers = np.array([[5.0, 0], [0, 5.0], [-5.0, -5.0]])
    x = np.concatenate([c + rng.normal(size=(6, 2)) * 0.3 for c in centers])
    labels, inertia = kmeans(x, 3, seed=1)
    assert len(set(labels[:6])) == len(set(labels[6:12])) == len(set(labels[12:])) == 1
    assert len(set(labels)) == 3 and inertia < 10
    dup = np.array([[1.0, 0], [1.0, 0], [1.0, 0], [0, 1.0]])
    labels, _ = kmeans(dup, 3, seed=0)
    assert sorted(np.bincount(labels, minlength=3)) == [1, 1, 2]
