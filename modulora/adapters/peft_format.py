"""Translating LoRA between our AdapterConfig and PEFT's LoraConfig JSON; the rules are `format`'s."""

from __future__ import annotations

from .config import AdapterConfig, AdapterError
from .format import (CONFIG_FILE, KNOWN_LINEAR, WEIGHTS_FILE, FormatError, exact_targets, lora_config_json,
                     lora_key, lora_modules, lora_spec, parse_lora_key)


def to_peft_json(cfg: AdapterConfig, base_name: str | None) -> dict:
    """PEFT's LoraConfig fields for this adapter (enough for `PeftModel.from_pretrained`). A LoRA
    read from a file names exactly its modules, with their own ranks and alphas."""
    if cfg.modules is None:
        return lora_config_json(cfg.r, cfg.alpha, cfg.dropout, cfg.target_modules, cfg.use_rslora, base_name)
    ranks = {m: r for m, (r, _) in cfg.modules.items() if r != cfg.r}
    alphas = {m: a for m, (_, a) in cfg.modules.items() if a != cfg.alpha}
    return lora_config_json(cfg.r, cfg.alpha, cfg.dropout, exact_targets(cfg.modules), cfg.use_rslora,
                            base_name, ranks, alphas)


def peft_key(key: str) -> str:
    """The canonical file name of a LoRA tensor (no adapter name); other keys unchanged."""
    parsed = parse_lora_key(key)
    return lora_key(parsed[0], parsed[3]) if parsed else key


def from_peft_json(raw: dict, shapes: dict[str, list[int]]) -> AdapterConfig:
    """Our config for a PEFT LoRA whose tensors have `shapes`, refusing what we would get wrong."""
    try:
        spec = lora_spec(raw)
    except FormatError as e:
        raise AdapterError(f"{CONFIG_FILE}: {e}") from None
    try:
        modules = lora_modules(spec, shapes)
    except FormatError as e:
        raise AdapterError(f"{WEIGHTS_FILE}: {e}") from None
    order = {n: i for i, n in enumerate(KNOWN_LINEAR)}
    names = {m.rsplit(".", 1)[-1] for m in modules}
    cfg = AdapterConfig(type="lora", r=spec.r, alpha=spec.alpha, dropout=spec.dropout,
                        target_modules=tuple(sorted(names, key=lambda n: (order.get(n, len(order)), n))),
                        use_rslora=spec.use_rslora, modules={m: (v.r, v.alpha) for m, v in modules.items()})
    cfg.validate()
    return cfg
