"""Adapters: identity at init, save/load round trips, PEFT compatibility, merging, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from modulora.adapters import (AdapterConfig, AdapterError, adapter_state, attach, attached_config, detach,
                               load_adapter, merge_lora, read_adapter, save_adapter)
from modulora.base import load_base
from modulora.forward import forward

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecations inside PEFT

CONFIGS = {
    "lora": AdapterConfig(type="lora", r=4, alpha=8.0),
    "series-houlsby": AdapterConfig(type="series", bottleneck=8, placement="houlsby"),
    "series-pfeiffer": AdapterConfig(type="series", bottleneck=8, placement="pfeiffer"),
    "parallel": AdapterConfig(type="parallel", bottleneck=8, scale=2.0),
    "prefix": AdapterConfig(type="prefix", num_virtual_tokens=4),
}
KINDS = list(CONFIGS)


def fresh():
    """A new copy of the tiny base (deterministic), for tests that change it or hand it to PEFT."""
    return load_base("tiny", dtype="fp32").model


@pytest.fixture(scope="module")
def model():
    return fresh()


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 384, (2, 9), generator=gen)
    return ids, torch.ones_like(ids)


@pytest.fixture
def attached(model, request):
    """The shared base with the adapter named by the test's `kind` parameter; detached afterwards."""
    attach(model, CONFIGS[request.param])
    yield model
    detach(model)


def logits(m, batch):
    with torch.no_grad():
        return forward(m, *batch)[0]


def perturb(m, seed=0, std=0.2):
    """Move every adapter parameter off its (identity) start."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * std)


def test_attach_starts_as_base_then_differs(model, batch):
    base = logits(model, batch)
    for kind, cfg in CONFIGS.items():
        attach(model, cfg)
        try:
            at_init = logits(model, batch)
            if cfg.type == "prefix":  # extra attended tokens cannot be an exact identity
                assert torch.isfinite(at_init).all() and not torch.equal(at_init, base), kind
            else:
                assert torch.equal(at_init, base), kind
            perturb(model)
            assert (logits(model, batch) - base).abs().max() > 1e-3, kind
        finally:
            detach(model)
        assert torch.equal(logits(model, batch), base), f"{kind}: detach did not restore the base"


@pytest.mark.parametrize("kind", KINDS)
def test_save_detach_load_round_trip(kind, model, batch, tmp_path):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = dict(model.named_modules())
    base = logits(model, batch)
    attach(model, CONFIGS[kind], seed=3)
    perturb(model, seed=4)
    adapted = logits(model, batch)
    out = save_adapter(model, tmp_path / "a", card={"name": "a", "type": CONFIGS[kind].type})
    detach(model)
    assert torch.equal(logits(model, batch), base)
    assert dict(model.named_modules()) == modules_before  # the very same module objects
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "card.json"]

    other = fresh()
    cfg = load_adapter(other, out)
    assert cfg == attached_config(other) and cfg.type == CONFIGS[kind].type
    torch.testing.assert_close(logits(other, batch), adapted, atol=1e-6, rtol=0)
    cfg2, state, card = read_adapter(out)
    assert card["name"] == "a" and set(state) == set(adapter_state(other))


@pytest.mark.parametrize("attached", KINDS, indirect=True)
def test_only_adapter_params_train(attached, batch):
    trainable = {n for n, p in attached.named_parameters() if p.requires_grad}
    assert trainable and all(any(s in n for s in ("lora_", "adapter_", "modulora_prefix")) for n in trainable)
    n_adapter = sum(t.numel() for t in adapter_state(attached).values())
    assert n_adapter == sum(p.numel() for p in attached.parameters() if p.requires_grad)

    ids, mask = batch
    params = [p for p in attached.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    attached.train()
    losses = []
    for _ in range(5):
        out, _ = forward(attached, ids, mask)
        loss = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in params)
        assert all(p.grad is None for p in attached.parameters() if not p.requires_grad)
        opt.step()
        losses.append(loss.item())
    attached.eval()
    assert losses[-1] < losses[0] - 1e-3, losses


def test_houlsby_and_pfeiffer_sites(model):
    for placement, sites in (("houlsby", {"self_attn.o_proj", "mlp.down_proj"}), ("pfeiffer", {"mlp.down_proj"})):
        attach(model, AdapterConfig(type="series", bottleneck=8, placement=placement))
        try:
            keys = set(adapter_state(model))
        finally:
            detach(model)
        assert keys == {f"model.layers.{i}.{s}.{p}.{w}" for i in range(2) for s in sites
                        for p in ("adapter_down", "adapter_up") for w in ("weight", "bias")}
    attach(model, AdapterConfig(type="parallel", bottleneck=8))
    try:
        state = adapter_state(model)
    finally:
        detach(model)
    assert state["model.layers.1.mlp.adapter_down.weight"].shape == (8, 64)
    assert state["model.layers.1.mlp.adapter_up.bias"].shape == (64,)


@pytest.mark.parametrize("kind", ["lora", "series-houlsby", "parallel", "prefix"])
def test_bf16_autocast_and_bf16_base(kind, batch):
    m = fresh()
    attach(m, CONFIGS[kind])
    perturb(m)
    ref = logits(m, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = logits(m, batch)
    assert torch.isfinite(low).all() and (low.float() - ref).abs().max() < 0.5
    m16 = load_base("tiny", dtype="fp32").model.to(torch.bfloat16)  # bf16 weights (on a CPU load_base autocasts)
    load_adapter(m16, (attached_config(m), adapter_state(m)))
    out16 = logits(m16, batch)
    assert out16.dtype == torch.bfloat16 and (out16.float() - ref).abs().max() < 0.5


# --- PEFT compatibility -------------------------------------------------------------------------

def _peft_logits(pm, batch):
    with torch.no_grad():
        return pm(input_ids=batch[0], attention_mask=batch[1]).logits


@pytest.mark.parametrize("rslora", [False, True])
def test_our_lora_loads_in_peft(rslora, batch, tmp_path):
    from peft import PeftModel

    ours = fresh()
    attach(ours, AdapterConfig(type="lora", r=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"),
                               use_rslora=rslora))
    perturb(ours)  # non-zero B
    expected = logits(ours, batch)
    save_adapter(ours, tmp_path / "lora")
    pm = PeftModel.from_pretrained(fresh(), tmp_path / "lora")
    pm.eval()
    torch.testing.assert_close(_peft_logits(pm, batch), expected, atol=1e-5, rtol=0)
    assert (expected - logits(fresh(), batch)).abs().max() > 1e-3


@pytest.mark.parametrize("rslora,targets", [(False, ["q_proj", "k_proj", "up_proj"]), (True, ["o_proj", "gate_proj"]),
                                            (False, r".*\.(v_proj|down_proj)")])
def test_peft_lora_loads_in_ours(rslora, targets, batch, tmp_path):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(fresh(), LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=targets,
                                            use_rslora=rslora, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    pm.eval()
    expected = _peft_logits(pm, batch)
    pm.save_pretrained(tmp_path / "peft")
    # The same weights as a raw PeftModel state_dict: keys carry the adapter name (".default").
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "adapter_config.json").write_text((tmp_path / "peft" / "adapter_config.json").read_text())
    save_file({k: v.contiguous() for k, v in pm.state_dict().items() if "lora_" in k}, str(raw / "adapter_model.safetensors"))
    assert any(".default." in k for k in load_file(str(raw / "adapter_model.safetensors")))

    for d in (tmp_path / "peft", raw):
        ours = fresh()
        cfg = load_adapter(ours, d)
        assert cfg.r == 4 and cfg.alpha == 16 and cfg.use_rslora == rslora and cfg.dropout == 0.1
        torch.testing.assert_close(logits(ours, batch), expected, atol=1e-5, rtol=0)
    assert set(read_adapter(tmp_path / "peft")[0].target_modules) == (
        set(targets) if isinstance(targets, list) else {"v_proj", "down_proj"})


def test_merge_lora_matches_unmerged(batch):
    m = fresh()
    attach(m, AdapterConfig(type="lora", r=4, alpha=8.0, use_rslora=True))
    perturb(m)
    unmerged = logits(m, batch)
    merge_lora(m)
    assert attached_config(m) is None and not any("lora" in n for n, _ in m.named_parameters())
    assert type(m.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(m, batch), unmerged, atol=1e-4, rtol=1e-4)
    attach(m, CONFIGS["parallel"])
    with pytest.raises(AdapterError, match="merge_lora needs an attached LoRA"):
        merge_lora(m)
    detach(m)


def test_prefix_incremental_decoding_matches_full_pass(model):
    attach(model, CONFIGS["prefix"])
    try:
        perturb(model, std=0.5)
        gen = torch.Generator().manual_seed(5)
        ids = torch.randint(3, 384, (2, 8), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0  # the second row is left padded
        with torch.no_grad():
            full, _ = forward(model, ids, mask)
            first, cache = forward(model, ids[:, :-1], mask[:, :-1])
            step, _ = forward(model, ids[:, -1:], mask, cache)
        torch.testing.assert_close(first[:, -1], full[:, -2], atol=1e-5, rtol=0)
        torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=0)
    finally:
        detach(model)


# --- bad input -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    m = fresh()
    attach(m, AdapterConfig(type="lora", r=4, target_modules=("q_proj", "v_proj")))
    perturb(m)
    return save_adapter(m, tmp_path_factory.mktemp("lora") / "ok")


def _copy_with(src, dst, state=None, config=None):
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    tensors = load_file(str(src / "adapter_model.safetensors"))
    save_file(state(tensors) if state else tensors, str(dst / "adapter_model.safetensors"))
    return dst


def test_pickle_weights_refused(lora_dir, tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    (d / "adapter_config.json").write_text((lora_dir / "adapter_config.json").read_text())
    torch.save(load_file(str(lora_dir / "adapter_model.safetensors")), d / "adapter_model.bin")
    with pytest.raises(AdapterError, match="pickle"):
        read_adapter(d)
    (d / "adapter_model.bin").rename(d / "adapter_model.safetensors")  # a pickle under the right name
    with pytest.raises(AdapterError, match="pickle"):
        read_adapter(d)


def test_corrupt_safetensors_refused(lora_dir, tmp_path):
    d = _copy_with(lora_dir, tmp_path / "bad")
    (d / "adapter_model.safetensors").write_bytes(b"\x10\x00" + bytes(range(256)) * 4)
    with pytest.raises(AdapterError, match="not a valid safetensors file"):
        read_adapter(d)


def test_missing_directory_and_files(lora_dir, tmp_path):
    with pytest.raises(AdapterError, match="not found"):
        read_adapter(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        read_adapter(tmp_path / "empty")
    d = _copy_with(lora_dir, tmp_path / "noweights")
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="no adapter_model.safetensors"):
        read_adapter(d)


def test_wrong_shape_names_key_and_shapes(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    narrow = LlamaForCausalLM(LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2))
    attach(narrow, AdapterConfig(type="lora", r=4, target_modules=("q_proj",)))
    save_adapter(narrow, tmp_path / "narrow")
    m = fresh()
    with pytest.raises(AdapterError, match=r"lora_A\.weight' has shape \[4, 32\] but this base expects \[4, 64\]"):
        load_adapter(m, tmp_path / "narrow")
    assert attached_config(m) is None and not any(p.requires_grad for p in m.parameters())


def test_unknown_and_missing_keys(lora_dir, tmp_path, model):
    dora = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    with pytest.raises(AdapterError, match="unexpected tensor .*q_proj.lora_magnitude_vector"):
        load_adapter(model, _copy_with(lora_dir, tmp_path / "extra", state=lambda t: {**t, dora: torch.ones(64)}))
    assert attached_config(model) is None
    gone = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    with pytest.raises(AdapterError, match=r"missing tensor .*layers\.1\.self_attn\.v_proj\.lora_B"):
        load_adapter(model, _copy_with(lora_dir, tmp_path / "missing", state=lambda t: {k: v for k, v in t.items() if k != gone}))
    assert attached_config(model) is None
    cfg, state, _ = read_adapter(lora_dir)
    with pytest.raises(AdapterError, match="unexpected tensor 'stray'"):
        load_adapter(model, (cfg, {**state, "stray": torch.zeros(1)}))
    with pytest.raises(AdapterError, match="does not list"):
        read_adapter(_copy_with(lora_dir, tmp_path / "unlisted", state=lambda t: {
            **t, "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 64)}))


@pytest.mark.parametrize("option,message", [
    ({"peft_type": "IA3"}, "unsupported PEFT type 'IA3'"),
    ({"use_dora": True}, "DoRA"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": -8}}, "alpha_pattern"),
    ({"lora_alpha": -8}, "lora_alpha must be a finite number > 0"),
    ({"lora_alpha": 1e308}, "lora_alpha=1e\\+308 with r=4 gives scaling .* over the limit"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"init_lora_weights": "pissa"}, "changes the base"),
    ({"r": 1000}, "r=1000 is over the limit of 256"),
])
def test_unsupported_peft_options(option, message, lora_dir, tmp_path):
    with pytest.raises(AdapterError, match=message):
        read_adapter(_copy_with(lora_dir, tmp_path / "opt", config=option))


def test_nan_weights_are_read(lora_dir, tmp_path):
    d = _copy_with(lora_dir, tmp_path / "nan", state=lambda t: {k: torch.full_like(v, float("nan")) for k, v in t.items()})
    _, state, _ = read_adapter(d)
    assert all(torch.isnan(v).all() for v in state.values())


def test_config_validation_and_double_attach(model):
    for bad, msg in [(dict(type="ia3"), "unknown adapter type"), (dict(r=0), "r must be"), (dict(r=257), "r=257 is over the limit"),
                     (dict(bottleneck=0), "bottleneck must be"), (dict(placement="middle"), "placement"),
                     (dict(dropout=1.0), "dropout"), (dict(alpha=-1.0), "alpha"), (dict(target_modules=()), "target_modules"),
                     (dict(num_virtual_tokens=0), "num_virtual_tokens")]:
        with pytest.raises(AdapterError, match=msg):
            AdapterConfig(**bad).validate()
    with pytest.raises(AdapterError, match="not found"):
        attach(model, AdapterConfig(target_modules=("c_attn",)))
    assert attached_config(model) is None and not any(p.requires_grad for p in model.parameters())
    attach(model, CONFIGS["lora"])
    try:
        with pytest.raises(AdapterError, match="already attached"):
            attach(model, CONFIGS["parallel"])
    finally:
        detach(model)


def test_safetensors_header_starting_with_0x80_is_not_taken_for_pickle(model, tmp_path):
    """A safetensors file whose 8-byte header length has 0x80 as its low byte starts like a pickle;
    it must still load (it did not: a real series adapter hit this)."""
    attach(model, AdapterConfig(type="lora", r=2), seed=0)
    out = save_adapter(model, tmp_path / "a", card={"name": "a", "type": "lora"})
    detach(model)
    weights = out / "adapter_model.safetensors"
    state = load_file(str(weights))
    for pad in range(400):  # grow the metadata until the header length ends in 0x80
        save_file(state, str(weights), metadata={"format": "pt", "pad": "x" * pad})
        if weights.read_bytes()[0] == 0x80:
            break
    assert weights.read_bytes()[0] == 0x80
    _, tensors, _ = read_adapter(out)
    assert all(torch.equal(tensors[k], state[k]) for k in state)
    weights.write_bytes(b"\x80\x04junk")  # a real pickle is still refused, with that reason
    with pytest.raises(AdapterError, match="pickle"):
        read_adapter(out)
