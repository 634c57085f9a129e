"""Attaching one adapter to a base model in place, detaching it, and naming its tensors.

State names follow docs/formats.md: LoRA uses PEFT's names, the others their module paths.
What was attached (its configuration, and the base's requires_grad flags to restore) is kept on
the adapter's own modules (its wrappers, or its prefix), never on the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..forward import PREFIX_ATTR
from .arch import decoder_layers, default_targets, linear_names
from .bottleneck import ParallelMLP, SeriesLinear
from .config import AdapterConfig, AdapterError
from .format import ALL_LINEAR, PREFIX_KEYS, bottleneck_key, bottleneck_sites, lora_key
from .lora import LoraLinear
from .prefix import init_prefix
from .wrap import replace, wrappers

_RECORD = "modulora_attached"  # on each of the adapter's modules: its _Attached


@dataclass
class _Attached:
    """What `detach` needs: the adapter's configuration and the base's requires_grad flags."""

    cfg: AdapterConfig
    flags: dict[str, bool]


def _attached(model: nn.Module) -> _Attached | None:
    prefix = getattr(model, PREFIX_ATTR, None)
    if prefix is not None and _RECORD in prefix.__dict__:
        return prefix.__dict__[_RECORD]
    for _, mod in wrappers(model):
        if _RECORD in mod.__dict__:
            return mod.__dict__[_RECORD]
    return None


def attached_config(model: nn.Module) -> AdapterConfig | None:
    """A copy of the attached adapter's configuration, or None."""
    rec = _attached(model)
    return None if rec is None else dataclasses.replace(rec.cfg)


def attach(model: nn.Module, cfg: AdapterConfig, seed: int = 0) -> None:
    """Inject a fresh adapter in place; only its parameters are left trainable.

    LoRA and bottleneck adapters start as the identity (zero B / zero up-projection).
    """
    cfg.validate()
    if attached_config(model) is not None:
        raise AdapterError("an adapter is already attached to this model; detach it first")
    layers = decoder_layers(model)
    cfg = _resolved(cfg, layers)
    gen = torch.Generator().manual_seed(seed)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    prefix = init_prefix(model, cfg.num_virtual_tokens, gen) if cfg.type == "prefix" else None
    for p in model.parameters():
        p.requires_grad_(False)
    record = _Attached(dataclasses.replace(cfg), flags)
    try:
        for path, original in _targets(model, layers, cfg):
            # new submodules (dropout) start in training mode; follow the base's mode
            wrapper = _wrap(original, path, cfg, gen, model).train(original.training)
            wrapper.__dict__[_RECORD] = record
            replace(model, path, wrapper)
        if prefix is not None:
            prefix.__dict__[_RECORD] = record
            setattr(model, PREFIX_ATTR, prefix.train(model.training))
    except Exception:
        _restore(model, flags)
        raise


def _resolved(cfg: AdapterConfig, layers: nn.ModuleList) -> AdapterConfig:
    """`cfg` with the default LoRA targets (ALL_LINEAR: every projection) narrowed to the known
    projections this base has, e.g. qkv_proj, o_proj, gate_up_proj, down_proj on Phi-3; what is
    saved (and so what PEFT reads) names only modules that exist."""
    if cfg.type != "lora" or cfg.modules is not None or cfg.target_modules != ALL_LINEAR:
        return cfg
    return dataclasses.replace(cfg, target_modules=default_targets(layers[0]))


def _targets(model: nn.Module, layers: nn.ModuleList, cfg: AdapterConfig) -> list[tuple[str, nn.Module]]:
    """(path in the model, module) of every module this adapter wraps."""
    if cfg.type == "lora" and cfg.modules is not None:  # read from a file: exactly these
        out = []
        for path in cfg.modules:
            try:
                out.append((path, model.get_submodule(path)))
            except AttributeError:
                raise AdapterError(f"the adapter adapts {path}, which the base model does not have") from None
        return out
    return [(f"model.layers.{i}.{site}", layer.get_submodule(site))
            for i, layer in enumerate(layers) for site in _sites(layer, cfg)]


def _sites(layer: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Names, inside one decoder layer, of the modules this adapter wraps."""
    if cfg.type == "prefix":
        return []
    if cfg.type in ("series", "parallel"):
        sites = list(bottleneck_sites(cfg.type, cfg.placement))
        names = {n for n, _ in layer.named_modules()}
        missing = [s for s in sites if s not in names]
        if missing:
            raise AdapterError(f"a {cfg.type} adapter sits at {', '.join(sites)}, but the base model's decoder "
                               f"blocks have no {', '.join(missing)} (their linear modules: "
                               f"{', '.join(linear_names(layer)) or 'none'})")
        return sites
    found = [n for n, m in layer.named_modules() if n.rsplit(".", 1)[-1] in cfg.target_modules]
    missing = set(cfg.target_modules) - {n.rsplit(".", 1)[-1] for n in found}
    if missing:
        raise AdapterError(f"target module(s) {', '.join(sorted(missing))} not found in the base model's layers "
                           f"(their linear modules: {', '.join(linear_names(layer)) or 'none'})")
    return found


def _wrap(module: nn.Module, path: str, cfg: AdapterConfig, gen: torch.Generator, model: nn.Module) -> nn.Module:
    if cfg.type == "parallel":
        return ParallelMLP(module, model.config.hidden_size, cfg.bottleneck, cfg.scale, cfg.dropout, gen)
    if not isinstance(module, nn.Linear):
        raise AdapterError(f"{cfg.type} adapters wrap nn.Linear modules, found {type(module).__name__}")
    if cfg.type == "lora":
        return LoraLinear(module, cfg.module_rank(path), cfg.module_scaling(path), cfg.dropout, gen)
    return SeriesLinear(module, cfg.bottleneck, cfg.scale, cfg.dropout, gen)


def detach(model: nn.Module) -> None:
    """Put the original modules back (same objects, same weights) and drop any prefix."""
    record = _attached(model)
    for name, wrapper in wrappers(model):
        replace(model, name, wrapper.unwrap())
    if hasattr(model, PREFIX_ATTR):
        delattr(model, PREFIX_ATTR)
    _restore(model, None if record is None else record.flags)


def _restore(model: nn.Module, flags: dict[str, bool] | None) -> None:
    if flags is None:
        return
    for name, wrapper in wrappers(model):  # after a failed attach: undo what was wrapped
        replace(model, name, wrapper.unwrap())
    for n, p in model.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The attached adapter's tensors under their file names (detached, sharing memory)."""
    cfg = attached_config(model)
    if cfg is None:
        raise AdapterError("no adapter is attached to this model")
    state: dict[str, torch.Tensor] = {}
    for name, mod in wrappers(model):
        if isinstance(mod, LoraLinear):
            for part in "AB":
                state[lora_key(name, part)] = getattr(mod, f"lora_{part}").weight.detach()
        else:
            for part in ("down", "up"):
                lin = getattr(mod, f"adapter_{part}")
                state[bottleneck_key(name, part, "weight")] = lin.weight.detach()
                state[bottleneck_key(name, part, "bias")] = lin.bias.detach()
    prefix = getattr(model, PREFIX_ATTR, None)
    if prefix is not None:
        state[PREFIX_KEYS[0]] = prefix.keys.detach()
        state[PREFIX_KEYS[1]] = prefix.values.detach()
    return state


def merge_lora(model: nn.Module) -> None:
    """Fold an attached LoRA into the base weights and remove its wrappers (no inference cost).

    The base Linear weights change in place; the model then has no adapter attached.
    """
    cfg = attached_config(model)
    if cfg is None or cfg.type != "lora":
        what = "no adapter" if cfg is None else f"a {cfg.type} adapter"
        raise AdapterError(f"merge_lora needs an attached LoRA adapter, this model has {what}")
    for _, mod in wrappers(model):
        mod.merge()
    detach(model)
