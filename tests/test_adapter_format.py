"""One adapter format: every PEFT LoRA that `Library.add` accepts is loadable and routable (its
fixed route and its retrieval route equal PEFT's logits, a uniform mixture with an adapter of
other modules and rank equals PEFT with both adapters active at half weight, Arrow answers), and
every one it refuses is refused with the option's name, leaving the library untouched."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modulora.adapters import load_adapter
from modulora.adapters.format import ALL_LINEAR
from modulora.base import load_base
from modulora.forward import forward
from modulora.library import Library
from modulora.routing.arrow import Arrow
from modulora.routing.embed import BaseEmbedder
from modulora.routing.experts import RoutingError, load_experts, load_experts_from_dirs
from modulora.routing.layer import RoutingPlan, install, routing
from modulora.routing.retrieval import RetrievalRouter
from modulora.routing.slots import ExpertSlots
from modulora.tiny import tiny_model
from modulora.validate import ValidationError

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

ATOL = 1e-4
REFUSED = {"use_dora": True, "bias": "lora_only", "modules_to_save": ["lm_head"]}


@pytest.fixture(scope="module")
def base():
    return load_base("tiny", dtype="fp32")


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 380, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids, mask


def peft_lora(out: Path, fp: dict, seed: int, **options):
    """A PEFT LoRA on the tiny Llama with random non-zero lora_B, saved with a card; returns the
    PeftModel (eval mode) so that its logits can be compared."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(tiny_model()[0], LoraConfig(task_type="CAUSAL_LM", **options))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    pm.save_pretrained(out)
    card = {"name": out.name, "type": "lora", "base_fingerprint": fp, "samples": [f"{out.name} says hello"]}
    (out / "card.json").write_text(json.dumps(card))
    return pm.eval()


def route_logits(library: Library, routes: list, ids, mask, names: list[str] | None = None):
    """Logits of per-row routes over library adapters, loaded into expert slots as the engine
    keeps them (any modules, any ranks), through the multi-expert layer."""
    slots = ExpertSlots()
    for e in load_experts(library, names):
        slots.load(e)
    model = tiny_model()[0]
    install(model, slots)
    with torch.inference_mode(), routing(model, RoutingPlan(slots, routes)):
        return forward(model, ids, mask)[0]


def peft_pair_logits(odd: Path, plain: Path, ids, mask):
    """PEFT with both adapters active at once and each one's B halved: the uniform mixture."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(tiny_model()[0], odd, adapter_name="odd")
    pm.load_adapter(plain, adapter_name="plain")
    pm.base_model.set_adapter(["odd", "plain"])
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(0.5)
    return peft_logits(pm.eval(), ids, mask)


def peft_logits(pm, ids, mask):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        return pm(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@st.composite
def lora_options(draw) -> dict:
    """PEFT LoraConfig options, over every option the format has a rule for."""
    targets = draw(st.lists(st.sampled_from(ALL_LINEAR), min_size=1, max_size=4, unique=True))
    opts = {"r": draw(st.integers(1, 4)), "lora_alpha": draw(st.sampled_from([1, 4, 8, 16])),
            "lora_dropout": draw(st.sampled_from([0.0, 0.1])), "use_rslora": draw(st.booleans()),
            "init_lora_weights": draw(st.sampled_from([True, False, "gaussian"])),
            "fan_in_fan_out": draw(st.booleans())}  # PEFT turns it off on nn.Linear
    if draw(st.booleans()):
        opts["target_modules"] = r".*\.(" + "|".join(targets) + ")"
    else:
        opts["target_modules"] = targets
        if draw(st.booleans()):
            opts["layers_to_transform"] = draw(st.sampled_from([[0], [1], 1]))
    if draw(st.booleans()):
        opts["rank_pattern"] = {draw(st.sampled_from(targets)): draw(st.integers(1, 6))}
    if draw(st.booleans()):
        opts["alpha_pattern"] = {draw(st.sampled_from(["model.layers.0.self_attn.q_proj", *targets])):
                                 draw(st.sampled_from([2, 32]))}
    if draw(st.integers(0, 3)) == 0:
        key = draw(st.sampled_from(sorted(REFUSED)))
        opts[key] = REFUSED[key]
    return opts


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(opts=lora_options(), seed=st.integers(0, 1000))
def test_accepted_means_routable_refused_means_untouched(base, batch, opts, seed):
    ids, mask = batch
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pm = peft_lora(tmp / "odd", base.fingerprint, seed, **opts)
        lib = Library(tmp / "lib")
        before = snapshot(lib.root)
        refused = [k for k in REFUSED if opts.get(k) == REFUSED[k]]
        if refused:
            with pytest.raises(ValidationError, match=refused[0]):
                lib.add("odd", tmp / "odd", base.fingerprint)
            assert lib.list() == [] and snapshot(lib.root) == before
            return
        lib.add("odd", tmp / "odd", base.fingerprint)

        # accepted => a fixed route, and the adapter attached alone, give PEFT's logits
        expected = peft_logits(pm, ids, mask)
        valid = mask.bool()
        torch.testing.assert_close(route_logits(lib, [{"odd": 1.0}] * 2, ids, mask, ["odd"])[valid], expected[valid],
                                   atol=ATOL, rtol=0)
        alone = tiny_model()[0]
        load_adapter(alone, lib.get("odd").path)
        with torch.inference_mode():
            torch.testing.assert_close(forward(alone, ids, mask)[0][valid], expected[valid], atol=ATOL, rtol=0)

        # uniform / Arrow / retrieval over this adapter and a plain one of every module (rank 4):
        # they share the expert slots whatever modules and ranks they have
        peft_lora(tmp / "plain", base.fingerprint, seed + 1, r=4, lora_alpha=8, target_modules=list(ALL_LINEAR))
        lib.add("plain", tmp / "plain", base.fingerprint)
        experts = load_experts(lib, fingerprint=base.fingerprint)
        assert [e.name for e in experts] == ["odd", "plain"]
        retrieval = RetrievalRouter(lib, BaseEmbedder(base)).route(["odd says hello", "plain says hello"], top_k=1)
        assert [list(r) for r in retrieval] == [["odd"], ["plain"]]
        got = route_logits(lib, retrieval, ids, mask)
        torch.testing.assert_close(got[0][valid[0]], expected[0][valid[0]], atol=ATOL, rtol=0)
        uniform = route_logits(lib, [{"odd": 0.5, "plain": 0.5}] * 2, ids, mask)
        # two experts summed in another order than PEFT's: hypothesis finds logits ~2e-4 apart
        torch.testing.assert_close(uniform[valid], peft_pair_logits(tmp / "odd", tmp / "plain", ids, mask)[valid],
                                   atol=3 * ATOL, rtol=0)
        assert torch.isfinite(route_logits(lib, [Arrow(top_k=1)] * 2, ids, mask)[valid]).all()


@pytest.mark.parametrize("change,option", [
    ({"lora_alpha": -8}, "lora_alpha"), ({"lora_alpha": 1e308}, "lora_alpha"),
    ({"alpha_pattern": {"q_proj": 0}}, "alpha_pattern"), ({"rank_pattern": {"(q|v)_proj": 4}}, "rank_pattern"),
    ({"layers_to_transform": ["0"]}, "layers_to_transform"), ({"lora_dropout": 1.5}, "lora_dropout"),
])
def test_bad_values_are_refused_at_add(base, tmp_path, change, option):
    peft_lora(tmp_path / "a", base.fingerprint, 0, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    lib = Library(tmp_path / "lib")
    with pytest.raises(ValidationError, match=option):
        lib.add("a", tmp_path / "a", base.fingerprint)
    assert lib.list() == []


def test_an_unreadable_adapter_never_breaks_the_others(base, tmp_path, caplog):
    lib = Library(tmp_path / "lib")
    for name in ("good", "bad"):
        peft_lora(tmp_path / name, base.fingerprint, 1, r=2, lora_alpha=4, target_modules=["q_proj"])
        lib.add(name, tmp_path / name, base.fingerprint)
    stored = lib.get("bad").path / "adapter_config.json"  # damaged after it was checked
    stored.chmod(0o644)
    stored.write_text(json.dumps({**json.loads(stored.read_text()), "lora_alpha": -8}))
    with caplog.at_level(logging.WARNING, logger="modulora.routing.experts"):
        assert [e.name for e in load_experts(lib, None, base.fingerprint)] == ["good"]
    assert "bad@1" in caplog.text and "lora_alpha" in caplog.text
    assert [e.name for e in load_experts(lib, ["good"])] == ["good"]
    with pytest.raises(RoutingError, match="cannot read adapter bad@1: .*lora_alpha"):
        load_experts(lib, ["bad"])


def test_scaling_is_folded_per_module(base, tmp_path):
    """rank_pattern / alpha_pattern / rsLoRA: B carries alpha_m / sqrt(r_m); `r` is the largest rank."""
    peft_lora(tmp_path / "p", base.fingerprint, 2, r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"],
              rank_pattern={"v_proj": 4}, alpha_pattern={"model.layers.1.self_attn.q_proj": 9})
    raw = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    e = load_experts_from_dirs([tmp_path / "p"])[0]
    assert e.r == 4 and e.scaling == 1.0
    for m, alpha, r in [("model.layers.0.self_attn.q_proj", 4, 2), ("model.layers.1.self_attn.q_proj", 9, 2),
                        ("model.layers.0.self_attn.v_proj", 4, 4)]:
        stored = raw[f"base_model.model.{m}.lora_B.weight"]
        assert e.A[m].shape[0] == r
        torch.testing.assert_close(e.B[m], stored * (alpha / r ** 0.5))


def test_the_format_imports_without_torch():
    code = "import sys, modulora.adapters.format, modulora.validate; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
