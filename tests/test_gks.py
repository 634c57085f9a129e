"""GenKnowSub: experts minus a general-knowledge LoRA, checked against PEFT's Arrow with
`use_gks=True`, through the command line into a library of their own."""

from __future__ import annotations

import pytest
import torch
from test_routing_layer import close_on_valid, fresh, logits_of, make_lora, peft_logits

from modulora.adapters import read_adapter
from modulora.base import load_base
from modulora.cli import main
from modulora.library import Library
from modulora.routing.arrow import Arrow
from modulora.routing.experts import ExpertSet, load_experts
from modulora.routing.layer import RoutingPlan, install
from modulora.routing.merge import MergeError, load_lora, subtract_general

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

TASKS = ["t0", "t1", "t2", "t3"]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    root = tmp_path_factory.mktemp("gks")
    base = load_base("tiny", dtype="fp32")
    lib = Library(root / "lib")
    dirs = {}
    for i, name in enumerate(TASKS + ["general", "general2"]):
        dirs[name] = make_lora(base.model, root / "dirs" / name, 20 + i, base.fingerprint)
        lib.add(name, dirs[name], base.fingerprint)
    return {"root": root, "lib": lib, "dirs": dirs, "base": base}


def test_each_factor_is_the_expert_minus_the_general_average(lib):
    recs = {r.name: r for r in lib["lib"].list()}
    purified = subtract_general([recs[n] for n in TASKS + ["general"]], [recs["general"], recs["general2"]])
    assert [p.card["name"] for p in purified] == TASKS  # the general one itself is set aside
    e, g1, g2 = (load_lora(recs[n]) for n in ("t1", "general", "general2"))
    m = next(iter(e.A))
    torch.testing.assert_close(purified[1].A[m], e.A[m] - (g1.A[m] + g2.A[m]) / 2)
    torch.testing.assert_close(purified[1].B[m], e.B[m] - (g1.B[m] + g2.B[m]) / 2)
    assert purified[1].card["merge"] == {"method": "gks", "general": ["general", "general2"], "r": 4}


def test_arrow_over_the_purified_library_equals_peft_arrow_with_gks(lib, tmp_path):
    out = tmp_path / "purified"
    assert main(["--library", str(lib["lib"].root), "gks", "--general", "general", "--adapters", ",".join(TASKS),
                 "--out-library", str(out)]) == 0
    purified = Library(out)
    assert sorted(r.name for r in purified.list()) == TASKS
    es = ExpertSet(load_experts(purified, fingerprint=lib["base"].fingerprint))
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 380, (3, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    model = fresh()
    install(model, es)
    from peft import ArrowConfig, create_arrow_model

    for k, temp in ((2, 1.0), (3, 0.5)):
        ours = logits_of(model, ids, mask, RoutingPlan(es, [Arrow(top_k=k, temperature=temp)] * 3))
        pm = create_arrow_model(fresh(), [str(lib["dirs"][n]) for n in TASKS],
                                ArrowConfig(top_k=k, router_temperature=temp, use_gks=True, rng_seed=0),
                                general_adapter_paths=[str(lib["dirs"]["general"])]).eval()
        close_on_valid(ours, peft_logits(pm, ids, mask), mask, atol=1e-4)
        plain = create_arrow_model(fresh(), [str(lib["dirs"][n]) for n in TASKS],
                                   ArrowConfig(top_k=k, router_temperature=temp, rng_seed=0)).eval()
        assert (ours - peft_logits(plain, ids, mask))[mask.bool()].abs().max() > 1e-3  # GKS changed something
    cfg, _, card = read_adapter(purified.get("t0").path)  # a plain PEFT LoRA with its provenance
    assert cfg.type == "lora" and "minus the general knowledge of general" in card["description"]


def test_refusals_name_the_problem_and_write_nothing(lib, tmp_path, capsys):
    root = lib["lib"].root
    odd = make_lora(fresh(), tmp_path / "odd", 40, lib["base"].fingerprint, r=2)
    lib["lib"].add("odd-rank", odd, lib["base"].fingerprint)
    try:
        out = tmp_path / "out"
        assert main(["--library", str(root), "gks", "--general", "general", "--out-library", str(out)]) == 2
        assert "GenKnowSub needs equal ranks" in capsys.readouterr().err
        assert not out.exists()
    finally:
        lib["lib"].remove("odd-rank")
    assert main(["--library", str(root), "gks", "--general", "general", "--out-library", str(root)]) == 2
    assert "must be another library" in capsys.readouterr().err
    assert main(["--library", str(root), "gks", "--general", "nope", "--out-library", str(tmp_path / "o2")]) == 2
    assert "nope" in capsys.readouterr().err
    with pytest.raises(MergeError, match="no task experts left"):
        recs = {r.name: r for r in lib["lib"].list()}
        subtract_general([recs["general"]], [recs["general"]])
