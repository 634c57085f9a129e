"""Writing and reading adapter directories (docs/formats.md); nothing is ever unpickled."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .attach import adapter_state, attach, attached_config, detach
from .config import AdapterConfig, AdapterError
from .format import (CARD_FILE, CONFIG_FILE, OWN_FIELDS, PICKLE_SUFFIXES, WEIGHTS_FILE, FormatError, own_settings,
                     parse_json)
from .peft_format import from_peft_json, peft_key, to_peft_json


def config_json(cfg: AdapterConfig, base_name: str | None = None) -> dict:
    """The adapter_config.json content: PEFT's LoraConfig for LoRA, our own fields otherwise."""
    if cfg.type == "lora":
        return to_peft_json(cfg, base_name)
    own = {k: getattr(cfg, k) for k in OWN_FIELDS[cfg.type]}
    return {"modulora_type": cfg.type, **own, "base_model_name_or_path": base_name}


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, card: dict | None = None,
                 base_name: str | None = None) -> Path:
    """Write the attached adapter to `out_dir` atomically (a temp dir renamed into place), so a
    crash never leaves a half-written adapter; an existing adapter there is replaced."""
    cfg = attached_config(model)
    if cfg is None:
        raise AdapterError("no adapter is attached to this model; nothing to save")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise AdapterError(f"cannot save adapter: {out} exists and is not a directory")
    if base_name is None:
        base_name = getattr(getattr(model, "config", None), "name_or_path", None) or None
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in adapter_state(model).items()}
    return write_adapter_dir(out, cfg, tensors, card, base_name)


def write_adapter_dir(out_dir: str | os.PathLike, cfg: AdapterConfig, tensors: dict[str, torch.Tensor],
                      card: dict | None = None, base_name: str | None = None) -> Path:
    """Write config, weights and card atomically (a temp dir renamed into place), so a crash
    never leaves a half-written adapter; an existing adapter there is replaced."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(config_json(cfg, base_name), indent=2))
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if card is not None:
            (tmp / CARD_FILE).write_text(json.dumps(card, indent=2, default=str))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_adapter(path: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor], dict | None]:
    """Config, tensors (names as in docs/formats.md) and card of an adapter directory, without
    a model. Refuses pickled weights and anything we could not load faithfully."""
    d = Path(path)
    if not d.exists():
        raise AdapterError(f"adapter directory not found: {d}")
    if not d.is_dir():
        raise AdapterError(f"{d} is not an adapter directory (expected a folder with {CONFIG_FILE} "
                           f"and {WEIGHTS_FILE})")
    raw = _read_json(d / CONFIG_FILE, required=True)
    state = _read_weights(d)
    card = _read_json(d / CARD_FILE, required=False)
    if "modulora_type" in raw:
        cfg = _own_config(raw)
    elif "peft_type" in raw:
        cfg = from_peft_json(raw, {k: list(v.shape) for k, v in state.items()})
        state = {peft_key(k): v for k, v in state.items()}
    else:
        raise AdapterError(f"{d / CONFIG_FILE} names neither peft_type nor modulora_type")
    return cfg, state, card


def _read_json(p: Path, required: bool) -> dict | None:
    if not p.exists():
        if required:
            raise AdapterError(f"{p.parent} has no {p.name}; not an adapter directory")
        return None
    try:
        data = parse_json(p.read_text(), str(p))
    except (OSError, UnicodeDecodeError) as e:
        raise AdapterError(f"{p} is not valid JSON: {e}") from None
    except FormatError as e:
        raise AdapterError(str(e)) from None
    if not isinstance(data, dict):
        raise AdapterError(f"{p} must hold a JSON object, found {type(data).__name__}")
    return data


def _read_weights(d: Path) -> dict[str, torch.Tensor]:
    p = d / WEIGHTS_FILE
    if not p.exists():
        pickled = sorted(f.name for f in d.iterdir() if f.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise AdapterError(f"{d} holds pickle weights ({', '.join(pickled)}), which are refused because "
                               f"loading pickle can run code; save them as {WEIGHTS_FILE} (safetensors)")
        raise AdapterError(f"{d} has no {WEIGHTS_FILE}")
    try:
        state = load_file(str(p))
    except Exception as e:  # SafetensorError, header or size problems; never unpickled
        with open(p, "rb") as f:
            head = f.read(4)
        # a safetensors file may start with 0x80 too (a header of 0x..80 bytes), so ask only now
        if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
            raise AdapterError(f"{p} is a pickle/torch.save file, not safetensors; pickle weights are refused") from None
        raise AdapterError(f"{p} is not a valid safetensors file (corrupt or truncated): {e}") from None
    for k, v in state.items():
        if not v.is_floating_point():
            raise AdapterError(f"tensor {k!r} in {p} has dtype {v.dtype}; adapter weights must be floating point")
    return state


def _own_config(raw: dict) -> AdapterConfig:
    kind = raw["modulora_type"]
    try:
        fields = own_settings(kind, raw)
    except FormatError as e:
        raise AdapterError(f"{CONFIG_FILE}: {e}") from None
    cfg = AdapterConfig(type=kind, **fields)
    cfg.validate()
    return cfg


def load_adapter(model: nn.Module, path_or_parts) -> AdapterConfig:
    """Attach an adapter read from a directory (or from `read_adapter`'s result) to `model`.

    Every tensor must be expected, present and of the right shape, else AdapterError naming it;
    on error the model is left without adapter.
    """
    if isinstance(path_or_parts, (tuple, list)):
        cfg, state = path_or_parts[0], path_or_parts[1]
    else:
        cfg, state, _ = read_adapter(path_or_parts)
    attach(model, cfg)
    try:
        target = adapter_state(model)
        unknown = sorted(set(state) - set(target))
        if unknown:
            raise AdapterError(f"unexpected tensor {unknown[0]!r} in adapter: this {cfg.type} adapter on "
                               f"this base has no such tensor ({len(unknown)} unexpected in all)")
        missing = sorted(set(target) - set(state))
        if missing:
            raise AdapterError(f"adapter is missing tensor {missing[0]!r} ({len(missing)} missing in all)")
        for k, t in target.items():
            if tuple(state[k].shape) != tuple(t.shape):
                raise AdapterError(f"tensor {k!r} has shape {list(state[k].shape)} but this base expects "
                                   f"{list(t.shape)}; was the adapter made for another base model?")
        with torch.no_grad():
            for k, t in target.items():
                t.copy_(state[k])
    except BaseException:
        detach(model)
        raise
    return attached_config(model)
