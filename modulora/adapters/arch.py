"""Which causal LMs the adapters fit, and a refusal naming what is missing for the others.

Adapters find their places by name inside the decoder blocks at `model.model.layers`: LoRA wraps
the projections of KNOWN_LINEAR that a block has, series adapters sit after `self_attn.o_proj`
and `mlp.down_proj`, parallel adapters beside `mlp`, and a prefix holds keys and values shaped
by the config's heads. Llama, SmolLM2, Mistral, Qwen2, Phi-3 (fused `qkv_proj` / `gate_up_proj`)
and Gemma2 have these; a model named otherwise is refused with the names it has, since adapting
whatever Linears happen to exist would make adapters that PEFT, routing and the library read
differently.
"""

from __future__ import annotations

from torch import nn

from .config import AdapterError
from .format import KNOWN_LINEAR

BLOCKS = "model.model.layers"
ATTENTION_INPUTS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.qkv_proj",))
REQUIRED = ("self_attn.o_proj", "mlp.down_proj")  # where series adapters sit (mlp: parallel)
CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads")  # prefix shapes, fingerprints


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks (`model.model.layers`), or AdapterError saying what the model has instead."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        children = ", ".join(n for n, _ in model.named_children()) or "none"
        raise AdapterError(f"{_what(model)} is not supported: adapters need a decoder-only causal LM with its "
                           f"blocks at {BLOCKS} (Llama, Mistral, Qwen2, Phi-3, Gemma2 style); this model has no "
                           f"{BLOCKS} (its top-level modules: {children})")
    return layers


def linear_names(layer: nn.Module) -> list[str]:
    """Paths, inside one block, of its nn.Linear modules (e.g. `self_attn.q_proj`)."""
    return [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]


def default_targets(layer: nn.Module) -> tuple[str, ...]:
    """The projections a LoRA adapts by default: those of KNOWN_LINEAR this block has."""
    present = {n.rsplit(".", 1)[-1] for n in linear_names(layer)}
    found = tuple(n for n in KNOWN_LINEAR if n in present)
    if not found:
        raise AdapterError(f"no module LoRA can adapt: expected linear modules named {', '.join(KNOWN_LINEAR)} in "
                           f"the decoder blocks, found {_listed(linear_names(layer))}")
    return found


def check_architecture(model: nn.Module) -> None:
    """AdapterError naming every part that the adapters need and this model lacks."""
    layers = decoder_layers(model)
    cfg = getattr(model, "config", None)
    missing_cfg = [f for f in CONFIG_FIELDS if not isinstance(getattr(cfg, f, None), int)]
    if missing_cfg:
        raise AdapterError(f"{_what(model)} is not supported: its config lacks {', '.join(missing_cfg)}")
    block = layers[0]
    have = set(linear_names(block))
    missing = [p for p in REQUIRED if p not in have]
    if not any(all(p in have for p in group) for group in ATTENTION_INPUTS):
        missing.insert(0, " + ".join(ATTENTION_INPUTS[0]) + " (or self_attn.qkv_proj)")
    if not isinstance(getattr(block, "mlp", None), nn.Module):
        missing.append("mlp")
    if missing:
        raise AdapterError(f"{_what(model)} is not supported: its decoder blocks lack {', '.join(missing)}; "
                           f"they have the linear modules {_listed(sorted(have))}")


def _what(model: nn.Module) -> str:
    archs = getattr(getattr(model, "config", None), "architectures", None)
    return f"the base model ({(archs or [type(model).__name__])[0]})"


def _listed(names: list[str]) -> str:
    return ", ".join(names) if names else "none"
