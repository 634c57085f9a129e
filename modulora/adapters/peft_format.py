"""Translating LoRA between our AdapterConfig and PEFT's LoraConfig JSON and key names.

PEFT (0.21) writes keys as `base_model.model.<module>.lora_A.weight`, without the adapter
name; a raw PeftModel state_dict carries it (`lora_A.default.weight`). We accept both.
"""

from __future__ import annotations

import re

from .config import ALL_LINEAR, AdapterConfig, AdapterError

PEFT_PREFIX = "base_model.model."

# PEFT options that change what the adapter computes or where it lives; only their neutral value
# (None, False, empty) is accepted.
_UNSUPPORTED = {
    "use_dora": "DoRA", "lora_bias": "LoRA bias terms", "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
    "rank_pattern": "per-module ranks (rank_pattern)", "alpha_pattern": "per-module alphas (alpha_pattern)",
    "layers_to_transform": "adapting only some layers (layers_to_transform)",
    "layer_replication": "layer_replication", "modules_to_save": "fully trained extra modules (modules_to_save)",
    "trainable_token_indices": "trainable token embeddings", "target_parameters": "target_parameters",
    "alora_invocation_tokens": "activated LoRA", "use_qalora": "QALoRA", "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing", "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA", "megatron_config": "Megatron layers",
}
# Initialisations that rewrite the base weights, so the adapter does not fit the plain base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_[AB])(?:\.[^.]+)?\.weight$")


def to_peft_json(cfg: AdapterConfig, base_name: str | None) -> dict:
    """PEFT's LoraConfig fields for this adapter (enough for `PeftModel.from_pretrained`)."""
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": cfg.r, "lora_alpha": alpha, "lora_dropout": cfg.dropout, "target_modules": list(cfg.target_modules),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": cfg.use_rslora, "use_dora": False,
        "lora_bias": False, "init_lora_weights": True, "inference_mode": True, "rank_pattern": {},
        "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None,
    }


def peft_key(key: str) -> str:
    """The canonical file name of a LoRA tensor: adapter name dropped, PEFT prefix present."""
    m = _KEY.match(key)
    if m:
        key = f"{m['module']}.{m['part']}.weight"
    if key.startswith("model.layers."):
        key = PEFT_PREFIX + key
    return key


def from_peft_json(raw: dict, keys: list[str]) -> AdapterConfig:
    """Our config for a PEFT LoRA, refusing options we would silently get wrong."""
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"unsupported PEFT adapter type {raw.get('peft_type')!r}; only LORA can be read")
    if raw.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterError(f"unsupported PEFT task_type {raw['task_type']!r}; only CAUSAL_LM adapters fit")
    if raw.get("bias", "none") != "none":
        raise AdapterError(f"unsupported PEFT option bias={raw['bias']!r}; only bias='none' is supported")
    for opt, what in _UNSUPPORTED.items():
        if raw.get(opt) not in (None, False, {}, [], ""):
            raise AdapterError(f"unsupported PEFT option {opt}={raw[opt]!r}: {what} is not supported")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise AdapterError(f"unsupported PEFT option init_lora_weights={init!r}: it changes the base "
                           "weights, so the adapter does not fit the plain base model")
    present = []
    for k in keys:
        m = _KEY.match(k)
        name = m["module"].rsplit(".", 1)[-1] if m else None
        if name and name not in present:
            present.append(name)
    if not present:
        raise AdapterError("the weights file holds no LoRA tensors (no '...lora_A.weight' keys)")
    listed = raw.get("target_modules")
    if isinstance(listed, (list, tuple)):  # PEFT matches these as name suffixes
        short = {str(t).rsplit(".", 1)[-1] for t in listed}
        extra = [n for n in present if n not in short]
        if extra:
            raise AdapterError(f"weights hold LoRA tensors for {', '.join(extra)}, which target_modules "
                               f"{sorted(short)} does not list")
    # A string (a regex, or 'all-linear') is PEFT's own matcher: the weights say what it matched.
    order = {n: i for i, n in enumerate(ALL_LINEAR)}
    targets = tuple(sorted(present, key=lambda n: (order.get(n, len(order)), n)))
    try:
        cfg = AdapterConfig(type="lora", r=raw.get("r", 8), alpha=float(raw.get("lora_alpha", 8)),
                            dropout=float(raw.get("lora_dropout", 0.0)), target_modules=targets,
                            use_rslora=bool(raw.get("use_rslora", False)))
    except (TypeError, ValueError) as e:
        raise AdapterError(f"bad value in adapter_config.json: {e}") from None
    cfg.validate()
    return cfg
