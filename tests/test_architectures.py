"""Adapters, PEFT interop and routing on tiny random models of several transformers families:
Llama, Mistral (sliding-window cache layers), Qwen2 (biased q/k/v), Phi-3 (fused qkv_proj and
gate_up_proj) and Gemma2 (head_dim != width / heads, logit softcapping, sliding and full layers).

Per family: every adapter type trains; LoRA goes to PEFT and back with the same logits; one
engine batch with fixed, Arrow and retrieval routes answers every row as its adapter attached
alone; fingerprints tell the families apart. Models that do not fit are refused by name.
"""

from __future__ import annotations

import math

import pytest
import torch

from modulora.adapters import (AdapterConfig, AdapterError, attach, detach, load_adapter, read_adapter,
                               save_adapter)
from modulora.base import BaseModelError, check_fingerprint, load_base
from modulora.data import Example, render_prompt
from modulora.forward import forward
from modulora.generate import generate_ids, using_adapter
from modulora.library import Library
from modulora.routing.arrow import Arrow
from modulora.routing.batch import generate_routed
from modulora.routing.embed import BaseEmbedder
from modulora.routing.experts import load_experts
from modulora.routing.family import load_family
from modulora.routing.requests import EngineRequest, SamplingParams
from modulora.routing.retrieval import RetrievalRouter
from modulora.tasks import make_task
from modulora.tiny import FAMILIES, tiny_model
from modulora.train import TrainConfig, train_adapter

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

ADAPTERS = {  # name -> (adapter, task it trains on)
    "lora": (AdapterConfig(type="lora", r=4, dropout=0.0), "capital"),
    "lora2": (AdapterConfig(type="lora", r=2, dropout=0.0, target_modules=("o_proj", "down_proj")), "upper"),
    "series": (AdapterConfig(type="series", placement="houlsby", bottleneck=8, dropout=0.0), "capital"),
    "parallel": (AdapterConfig(type="parallel", bottleneck=8, dropout=0.0), "capital"),
    "prefix": (AdapterConfig(type="prefix", num_virtual_tokens=4), "capital"),
}
# Large steps, so that two of them make adapters that visibly change the logits.
LR = {"lora": 0.05, "lora2": 0.05, "series": 0.05, "parallel": 0.05, "prefix": 0.5}
DEFAULT_TARGETS = {"phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")}
PEFT_ATOL = 1e-4
ROUTE_ATOL = 1e-4
PROMPTS = ["Peru", "The capital of France is", "apple river stone", "yes or no?", "Add 2 and 3.", "x"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small batches on a busy 2-core machine: one intra-op thread is faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def base_name(family: str) -> str:
    return "tiny" if family == "llama" else f"tiny-{family}"


@pytest.fixture(scope="module", params=FAMILIES)
def arch(request, tmp_path_factory):
    """A tiny base of one family, every adapter type trained on it for 2 steps, and a library."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    base = load_base(base_name(family), dtype="float32")
    lib = Library(root / "lib")
    dirs, metrics = {}, {}
    for name, (cfg, task) in ADAPTERS.items():
        dirs[name] = root / name
        metrics[name] = train_adapter(base, make_task(task, n=24), cfg,
                                      TrainConfig(steps=2, batch_size=4, holdout=0, dtype="fp32", lr=LR[name],
                                                  max_samples=8),
                                      dirs[name], progress=False)
        lib.add(name, dirs[name], base.fingerprint)
    return {"family": family, "base": base, "root": root, "lib": lib, "dirs": dirs, "metrics": metrics}


def token_ids(base, prompt: str) -> list[int]:
    """A user prompt in the chat template, as the engine and `generate` encode it."""
    return base.tokenizer(render_prompt(base.tokenizer, Example("", prompt, "")), add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def alone_logits(arch, name: str | None, ids: list[int]) -> torch.Tensor:
    """Logits [t, V] of one unpadded row with the adapter attached alone (None: the base)."""
    with using_adapter(arch["base"], arch["dirs"][name] if name else None) as model:
        x = torch.tensor([ids])
        return forward(model, x, torch.ones_like(x))[0][0]


def alone_tokens(arch, name: str | None, ids: list[int], n: int) -> list[int]:
    """n greedy tokens (end of text not stopping) with the adapter attached alone."""
    with using_adapter(arch["base"], arch["dirs"][name] if name else None) as model:
        return generate_ids(model, [ids], -1, arch["base"].tokenizer.pad_token_id, n)[0]


def run_rows(arch, experts, routes: list, names: list[str | None], limits: list[int] | None = None, others=None):
    """Answers of one engine batch (prompt log-probabilities on), checked row by row against the
    adapter each row names attached alone: the same greedy tokens, log-probabilities within
    ROUTE_ATOL. Rows end only at their token limit (by default 5 for every row: the batch never
    narrows)."""
    base = arch["base"]
    limits = limits or [5] * len(routes)
    prompts = [token_ids(base, p) for p in PROMPTS[:len(routes)]]
    reqs = [EngineRequest(ids, route, params=SamplingParams(max_tokens=k, prompt_logprobs=True, ignore_eos=True))
            for ids, route, k in zip(prompts, routes, limits)]
    answers = generate_routed(base, experts, reqs, others=others, batch_size=len(reqs))
    for name, ids, k, ans in zip(names, prompts, limits, answers):
        want = torch.log_softmax(alone_logits(arch, name, ids).float(), -1)
        want = [float(want[j, t]) for j, t in enumerate(ids[1:])]
        have = [e.logprob for e in ans.prompt_logprobs[1:]]
        assert len(have) == len(want), (arch["family"], name)
        assert max(abs(a - b) for a, b in zip(have, want)) < ROUTE_ATOL, (arch["family"], name)
        assert ans.token_ids == alone_tokens(arch, name, ids, k), (arch["family"], name)
    return answers


# -- training ---------------------------------------------------------------------------------------

def test_every_adapter_type_trains_and_changes_the_model(arch):
    """Two steps of each type run, are saved with this base's fingerprint, and change the logits
    (so that the equalities below are not those of the base with itself)."""
    ids = token_ids(arch["base"], PROMPTS[0])
    plain = alone_logits(arch, None, ids)
    for name, m in arch["metrics"].items():
        assert m["steps"] == 2 and math.isfinite(m["first_loss"]) and math.isfinite(m["train_loss"]), name
        cfg, _, card = read_adapter(arch["dirs"][name])
        assert cfg.type == ADAPTERS[name][0].type and card["base_fingerprint"] == arch["base"].fingerprint
        assert (alone_logits(arch, name, ids) - plain).abs().max() > 1e-3, name


def test_default_lora_targets_are_the_projections_the_family_has(arch):
    cfg = read_adapter(arch["dirs"]["lora"])[0]
    expected = DEFAULT_TARGETS.get(arch["family"], ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"))
    assert cfg.target_modules == expected
    adapted = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in read_adapter(arch["dirs"]["lora"])[1]}
    assert adapted == set(expected)


# -- PEFT, both ways ----------------------------------------------------------------------------------

def _batch(arch):
    rows = [token_ids(arch["base"], p) for p in PROMPTS[:3]]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), arch["base"].tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


@torch.inference_mode()
def _peft_logits(pm, ids, mask):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return pm(input_ids=ids, attention_mask=mask, position_ids=pos).logits


@torch.inference_mode()
def _our_logits(model, ids, mask):
    return forward(model, ids, mask)[0]


def test_our_lora_loads_in_peft_with_the_same_logits(arch):
    from peft import PeftModel

    ids, mask = _batch(arch)
    valid = mask.bool()
    with using_adapter(arch["base"], arch["dirs"]["lora"]) as model:
        ours = _our_logits(model, ids, mask)
    pm = PeftModel.from_pretrained(tiny_model(family=arch["family"])[0], arch["dirs"]["lora"]).eval()
    theirs = _peft_logits(pm, ids, mask)
    assert (ours - theirs)[valid].abs().max() < PEFT_ATOL
    assert (ours - _our_logits(arch["base"].model, ids, mask))[valid].abs().max() > 1e-3


def test_peft_lora_loads_in_ours_with_the_same_logits(arch, tmp_path):
    from peft import LoraConfig, get_peft_model

    targets = list(DEFAULT_TARGETS.get(arch["family"], ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")))
    pm = get_peft_model(tiny_model(family=arch["family"])[0],
                        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    pm.eval()
    ids, mask = _batch(arch)
    valid = mask.bool()
    theirs = _peft_logits(pm, ids, mask)
    pm.save_pretrained(tmp_path / "peft")
    model = arch["base"].model
    load_adapter(model, tmp_path / "peft")
    try:
        ours = _our_logits(model, ids, mask)
    finally:
        detach(model)
    assert (ours - theirs)[valid].abs().max() < PEFT_ATOL
    assert (ours - _our_logits(model, ids, mask))[valid].abs().max() > 1e-3


# -- routing: one batch, every row as its adapter alone ---------------------------------------------

FIXED = ["lora", "series", "parallel", "prefix", None, "lora2"]


def fixed_rows(arch, limits: list[int] | None = None):
    base, lib = arch["base"], arch["lib"]
    others = load_family(lib, ["series", "parallel", "prefix"], fingerprint=base.fingerprint)
    experts = load_experts(lib, ["lora", "lora2"], fingerprint=base.fingerprint)
    return run_rows(arch, experts, [{n: 1.0} if n else None for n in FIXED], FIXED, limits, others)


def test_mixed_batch_of_fixed_routes_equals_each_adapter_alone(arch):
    """LoRA, series, parallel, prefix and base rows in one engine batch."""
    fixed_rows(arch)


def test_rows_leaving_the_batch_keep_their_answers(arch):
    """Rows stop after different numbers of tokens, so the batch narrows (cache rows and leading
    columns dropped); every row still answers as its adapter alone (sliding-window families too:
    the engine's cache keeps every column, the model's mask applies the window)."""
    fixed_rows(arch, [6, 2, 5, 1, 3, 4])


def test_arrow_and_retrieval_routes_equal_the_adapter_they_pick(arch):
    """Arrow over one LoRA expert gives it weight 1 at every token; retrieval (on the base's own
    embeddings) picks one adapter per request. Either way a row is that adapter alone."""
    base, lib = arch["base"], arch["lib"]
    one = load_experts(lib, ["lora"], fingerprint=base.fingerprint)
    answers = run_rows(arch, one, [Arrow(top_k=1), {"lora": 1.0}, None], ["lora", "lora", None])
    assert answers[0].experts == {"lora": 1.0}

    router = RetrievalRouter(lib, embedder=BaseEmbedder(base))
    assert router.names == ["lora", "lora2"]  # LoRA adapters only, each with its card samples
    picked = router.route(PROMPTS[:4], top_k=1)
    assert all(len(r) == 1 and next(iter(r.values())) == 1.0 for r in picked)
    both = load_experts(lib, ["lora", "lora2"], fingerprint=base.fingerprint)
    run_rows(arch, both, picked, [next(iter(r)) for r in picked])


# -- fingerprints and refusals ----------------------------------------------------------------------

def test_fingerprints_tell_the_families_apart():
    prints = {f: load_base(base_name(f)).fingerprint for f in FAMILIES}
    assert len({fp["id"] for fp in prints.values()}) == len(FAMILIES)
    assert len({fp["architecture"] for fp in prints.values()}) == len(FAMILIES)
    assert prints["phi3"]["modules"]["self_attn.qkv_proj"] == [128, 64]
    assert prints["gemma2"]["modules"]["self_attn.q_proj"] == [128, 64]  # head_dim 32, not 64 / 4
    for a in FAMILIES:
        for b in FAMILIES:
            if a != b:
                with pytest.raises(BaseModelError, match="made for another base model"):
                    check_fingerprint(prints[a], prints[b])


def test_an_adapter_for_one_family_is_refused_on_another(tmp_path):
    base = load_base("tiny")
    attach(base.model, AdapterConfig(type="lora", r=2, target_modules=("q_proj",)))
    save_adapter(base.model, tmp_path / "q")
    detach(base.model)
    phi3 = load_base("tiny-phi3")
    with pytest.raises(AdapterError, match="self_attn.q_proj, which the base model does not have"):
        load_adapter(phi3.model, tmp_path / "q")
    with pytest.raises(AdapterError, match=r"target module\(s\) q_proj not found.*qkv_proj"):
        attach(phi3.model, AdapterConfig(type="lora", target_modules=("q_proj",)))


def _save(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_unsupported_architectures_are_refused_naming_what_is_missing(tmp_path):
    """A causal LM laid out otherwise (GPT-2: transformer.h, Conv1D), one whose blocks name their
    projections otherwise, and a model that is no causal LM at all: refused at load, with what
    was expected and what was found; adapters refuse such a model the same way at attach."""
    import transformers

    from modulora.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(BaseModelError,
                       match=r"GPT2LMHeadModel.*model\.model\.layers.*top-level modules: transformer, lm_head"):
        load_base(_save(gpt2, tok, tmp_path / "gpt2"))
    with pytest.raises(AdapterError, match="blocks at model.model.layers"):
        attach(gpt2, AdapterConfig())

    opt = transformers.OPTForCausalLM(transformers.OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64,
                                                             num_hidden_layers=1, num_attention_heads=2,
                                                             word_embed_proj_dim=32))
    with pytest.raises(BaseModelError, match="model.model.layers"):
        load_base(_save(opt, tok, tmp_path / "opt"))

    phi = transformers.PhiForCausalLM(transformers.PhiConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                             num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(BaseModelError, match=r"\(PhiForCausalLM\) is not supported: its decoder blocks lack self_attn."
                                             r"o_proj, mlp.down_proj; they have the linear modules .*mlp.fc1"):
        load_base(_save(phi, tok, tmp_path / "phi"))
    with pytest.raises(AdapterError, match=r"series adapter sits at mlp.down_proj.*no mlp.down_proj.*self_attn.dense"):
        attach(phi, AdapterConfig(type="series"))
    # LoRA on the projections it has, by name, still works on such a model in memory
    attach(phi, AdapterConfig(type="lora", r=2, target_modules=("q_proj", "v_proj")))
    detach(phi)

    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(vocab_size=len(tok), d_model=32, d_ff=64,
                                                                       num_layers=1, num_heads=2, d_kv=16))
    with pytest.raises(BaseModelError, match="as a decoder-only causal LM: Unrecognized configuration class"):
        load_base(_save(t5, tok, tmp_path / "t5"))


def test_a_block_with_unknown_projection_names_is_refused_with_both_lists():
    from torch import nn

    model = tiny_model()[0]
    for layer in model.model.layers:  # rename every Linear: wq, wk, ... as some checkpoints do
        attn, mlp = layer.self_attn, layer.mlp
        for old, new in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")):
            setattr(attn, new, getattr(attn, old))
            delattr(attn, old)
        for old, new in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            setattr(mlp, new, getattr(mlp, old))
            delattr(mlp, old)
    assert isinstance(model.model.layers[0].self_attn.wq, nn.Linear)
    with pytest.raises(AdapterError, match=r"no module LoRA can adapt: expected linear modules named q_proj, .*"
                                           r"gate_up_proj, down_proj in the decoder blocks, found self_attn.wq, "):
        attach(model, AdapterConfig())
    from modulora.adapters.arch import check_architecture

    with pytest.raises(AdapterError, match=r"lack self_attn.q_proj \+ self_attn.k_proj \+ self_attn.v_proj "
                                           r"\(or self_attn.qkv_proj\), self_attn.o_proj, mlp.down_proj"):
        check_architecture(model)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_sequences_longer_than_the_sliding_window_answer_as_without_a_cache(family):
    """The engine's cache keeps every column and the model's mask applies the window: past the
    window (8 tokens here), greedy answers equal a plain forward over the whole sequence."""
    from modulora.routing.engine import Engine
    from modulora.routing.requests import EngineRequest, SamplingParams

    base = load_base(base_name(family), dtype="float32")
    base.model.config.sliding_window = 8
    prompts = [list(range(5, 25)), list(range(30, 42))]
    answers = Engine(base).run([EngineRequest(p, None, params=SamplingParams(max_tokens=6, ignore_eos=True))
                                for p in prompts])
    for p, a in zip(prompts, answers):
        ids = list(p)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(base.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert a.token_ids == ids[len(p):]
