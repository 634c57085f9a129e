"""THE adapter format (docs/formats.md): file names, tensor names per adapter type, config keys,
which PEFT LoRA options are read and which refused, and the one set of size limits.

Writing (`adapters.io`), reading (`adapters.peft_format`, `routing.experts`) and checking before
anything is stored (`modulora.validate`) all use this module, so an adapter that one accepts the
others can use. It imports neither torch nor numpy: tensors are described by their shapes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

# -- files ------------------------------------------------------------------------------------------

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CARD_FILE = "card.json"
README_FILE = "README.md"
ALLOWED_FILES = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, README_FILE)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PICKLE_MESSAGE = "pickle-based weights are not accepted; use safetensors"

# -- adapter types and their settings ---------------------------------------------------------------

TYPES = ("lora", "series", "parallel", "prefix")
OWN_TYPES = ("series", "parallel", "prefix")  # stored with `modulora_type` in adapter_config.json
PLACEMENTS = ("houlsby", "pfeiffer")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The projections a LoRA targets by default, where a base has them, in the order of a block. Phi-3
# fuses q/k/v into qkv_proj and gate/up into gate_up_proj; a LoRA there is one on a plain Linear.
KNOWN_LINEAR = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj",
                "down_proj")
OWN_FIELDS = {"series": ("bottleneck", "placement", "scale", "dropout"),
              "parallel": ("bottleneck", "scale", "dropout"), "prefix": ("num_virtual_tokens",)}
SERIES_SITES = {"houlsby": ("self_attn.o_proj", "mlp.down_proj"), "pfeiffer": ("mlp.down_proj",)}
PARALLEL_SITES = ("mlp",)
PREFIX_KEYS = ("prefix.keys", "prefix.values")


@dataclass(frozen=True)
class Limits:
    """The one set of limits: what training may produce is what the library accepts."""

    max_rank: int = 256
    max_bottleneck: int = 4096
    max_virtual_tokens: int = 512
    max_scaling: float = 1e4  # LoRA alpha / r (or alpha / sqrt(r)): larger overflows float16/32 sums
    # Largest |value| of any stored tensor: sqrt(65504) rounded down, so that the square of every
    # value, and so the product of any two (one term of B @ A, of a norm), is finite in float16,
    # the narrowest dtype an adapter may be applied in. Trained weights are orders of magnitude
    # smaller (LoRA ~1e-2..1, prefix keys/values ~1..10), so a larger value is a broken or hostile
    # file. A per-value bound cannot keep whole sums finite (they grow with rank and width).
    max_weight_abs: float = 255.0
    max_patterns: int = 4096  # entries of rank_pattern / alpha_pattern
    max_file_bytes: int = 512 << 20
    max_json_bytes: int = 8 << 20  # adapter_config.json, README.md and the safetensors header
    # card.json: a description, metrics, the base fingerprint and up to 32 sample inputs (train.py
    # keeps 1000 characters of each) fit in a few tens of KiB; the catalog keeps every card
    max_card_bytes: int = 256 << 10


LIMITS = Limits()


class FormatError(ValueError):
    """An adapter does not follow the format; the message names the file, key or option."""


MAX_JSON_DEPTH = 64  # arrays/objects inside each other in adapter_config.json, card.json, a safetensors header


def parse_json(text: str | bytes, what: str, max_depth: int = MAX_JSON_DEPTH, **kw):
    """`json.loads(text, **kw)` for the file `what`, nested at most `max_depth` arrays/objects
    deep; FormatError naming `what` otherwise, or when it is not JSON (never a RecursionError)."""
    try:
        obj = json.loads(text, **kw)
    except RecursionError:
        obj, deep = None, True
    except ValueError as e:  # also UnicodeDecodeError and errors of an object_pairs_hook
        raise FormatError(f"{what} is not valid JSON: {e}") from None
    else:
        deep, stack = False, [(obj, 1)]
        while stack and not deep:
            value, depth = stack.pop()
            if isinstance(value, (dict, list)):
                deep = depth > max_depth
                stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    if deep:
        raise FormatError(f"{what} is nested deeper than {max_depth} levels of arrays and objects")
    return obj


# -- checks of single values ------------------------------------------------------------------------

def is_real(x) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_int(name: str, value, hi: int, lo: int = 1) -> int:
    """`value` if it is an integer in [lo, hi], else FormatError naming `name`."""
    if type(value) is not int or value < lo:
        raise FormatError(f"{name} must be an integer from {lo} to {hi}, got {value!r}")
    if value > hi:
        raise FormatError(f"{name}={value} is over the limit of {hi}")
    return value


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """LoRA's multiplier on B(A(x)): alpha/r, or alpha/sqrt(r) with rsLoRA."""
    return alpha / (math.sqrt(r) if use_rslora else r)


def check_alpha(name: str, alpha, r: int, use_rslora: bool, limits: Limits = LIMITS) -> float:
    """`alpha` as a float if it is positive and its scaling is within the limit."""
    if not is_real(alpha) or alpha <= 0:
        raise FormatError(f"{name} must be a finite number > 0, got {alpha!r}")
    scaling = lora_scaling(alpha, r, use_rslora)
    if scaling > limits.max_scaling:
        raise FormatError(f"{name}={alpha!r} with r={r} gives scaling {scaling:.4g}, over the limit of "
                          f"{limits.max_scaling:g}")
    return float(alpha)


# -- tensor names -----------------------------------------------------------------------------------

PEFT_PREFIX = "base_model.model."
# PEFT files drop the adapter name (`lora_A.weight`); a raw PeftModel state_dict keeps it
# (`lora_A.default.weight`). Both are read; files are written without it.
_LORA_KEY = re.compile(r"base_model\.model\.(?P<module>model\.layers\.(?P<layer>\d+)\."
                       r"(?P<site>[A-Za-z_]\w*\.[A-Za-z_]\w*))\.lora_(?P<part>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight")
_BOTTLENECK_KEY = re.compile(r"model\.layers\.(?P<layer>\d+)\.(?P<site>[A-Za-z_][\w.]*?)\."
                             r"adapter_(?P<part>down|up)\.(?P<kind>weight|bias)")
LORA_KEY_EXAMPLE = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def lora_key(module: str, part: str) -> str:
    """File name of a LoRA tensor: `module` is the path in the base model, `part` "A" or "B"."""
    return f"{PEFT_PREFIX}{module}.lora_{part}.weight"


def parse_lora_key(key: str) -> tuple[str, int, str, str] | None:
    """(module path, layer, site inside the layer, "A" or "B") of a LoRA tensor name, or None."""
    m = _LORA_KEY.fullmatch(key)
    return (m["module"], int(m["layer"]), m["site"], m["part"]) if m else None


def bottleneck_key(site_path: str, part: str, kind: str) -> str:
    """File name of a bottleneck tensor: `part` "down" or "up", `kind` "weight" or "bias"."""
    return f"{site_path}.adapter_{part}.{kind}"


def parse_bottleneck_key(key: str) -> tuple[int, str, str] | None:
    """(layer, site inside the layer, "down.weight" etc.) of a bottleneck tensor name, or None."""
    m = _BOTTLENECK_KEY.fullmatch(key)
    return (int(m["layer"]), m["site"], f"{m['part']}.{m['kind']}") if m else None


def bottleneck_sites(kind: str, placement: str) -> tuple[str, ...]:
    """Where in a decoder layer a series or parallel adapter sits."""
    return SERIES_SITES[placement] if kind == "series" else PARALLEL_SITES


# -- LoRA configs (PEFT's LoraConfig JSON) ----------------------------------------------------------

# Options that change what the adapter computes or where it lives: only their neutral value
# (None, False, empty) is accepted. bias is checked on its own ("none" only).
REFUSED_OPTIONS = {
    "use_dora": "DoRA (weight-decomposed LoRA) needs magnitude vectors that no route applies",
    "lora_bias": "LoRA bias terms are not applied by routes",
    "fan_in_fan_out": "it is for Conv1D layers (GPT-2); Llama layers are nn.Linear",
    "modules_to_save": "it stores full copies of base modules, which routes cannot mix",
    "layer_replication": "layer replication changes the base model's layers",
    "trainable_token_indices": "trainable token embeddings are not applied by routes",
    "target_parameters": "adapting raw parameters is not supported", "alora_invocation_tokens": "activated LoRA",
    "use_qalora": "QALoRA", "use_bdlora": "BD-LoRA", "arrow_config": "PEFT's own Arrow routing",
    "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA", "kasa_config": "KaSA",
    "megatron_config": "Megatron layers",
}
# Initialisations that rewrite the base weights, so the adapter does not fit the plain base.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# rank_pattern / alpha_pattern keys are matched as PEFT does, `(.*\.)?(key)$` on the module path;
# only plain module names (with '.' as PEFT's wildcard) are read, so no pattern can run away.
_PATTERN_KEY = re.compile(r"[A-Za-z0-9_.]{1,200}")


@dataclass(frozen=True)
class LoraSpec:
    """What a PEFT LoRA adapter_config.json says, checked. The tensors say which modules exist."""

    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str  # names matched as suffixes, or one regex
    layers: tuple[int, ...] | None  # layers_to_transform
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()

    def rank(self, module: str) -> int:
        """The rank PEFT gives `module` (full path): rank_pattern's first match, else r."""
        return _pattern_value(self.rank_pattern, module, self.r)

    def alpha_of(self, module: str) -> float:
        """The alpha PEFT gives `module`: alpha_pattern's first match, else lora_alpha."""
        return _pattern_value(self.alpha_pattern, module, self.alpha)


def _pattern_value(pattern: tuple, module: str, default):
    for key, value in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_spec(raw: dict, limits: Limits = LIMITS) -> LoraSpec:
    """Check a PEFT LoRA config; FormatError names the first option that cannot be honoured."""
    if raw.get("peft_type") != "LORA":
        raise FormatError(f"unsupported PEFT type {raw.get('peft_type')!r}; only LORA is supported")
    if raw.get("task_type") not in (None, "CAUSAL_LM"):
        raise FormatError(f"unsupported PEFT task_type {raw['task_type']!r}; only CAUSAL_LM adapters fit")
    if raw.get("bias", "none") != "none":
        raise FormatError(f"unsupported PEFT option bias={raw['bias']!r}: trained biases are not applied "
                          "by routes; use bias='none'")
    for opt, why in REFUSED_OPTIONS.items():
        if raw.get(opt) not in (None, False, {}, [], ""):
            raise FormatError(f"unsupported PEFT option {opt}={raw[opt]!r}: {why}")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise FormatError(f"unsupported PEFT option init_lora_weights={init!r}: it changes the base "
                          "weights, so the adapter does not fit the plain base model")
    r = check_int("LoRA rank r", raw.get("r"), limits.max_rank)
    rslora = raw.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise FormatError(f"use_rslora must be true or false, got {rslora!r}")
    alpha = check_alpha("lora_alpha", raw.get("lora_alpha", 8), r, rslora, limits)
    dropout = raw.get("lora_dropout", 0.0)
    if not is_real(dropout) or not 0 <= dropout < 1:
        raise FormatError(f"lora_dropout must be a number in [0, 1), got {dropout!r}")
    return LoraSpec(r=r, alpha=alpha, dropout=float(dropout), use_rslora=rslora,
                    target_modules=_targets(raw.get("target_modules")), layers=_layers(raw),
                    rank_pattern=_pattern(raw, "rank_pattern", limits),
                    alpha_pattern=_pattern(raw, "alpha_pattern", limits))


def _targets(value) -> tuple[str, ...] | str:
    if isinstance(value, str) and value:
        return value  # a regex (or 'all-linear'): the tensors say what it matched
    if isinstance(value, list) and value and all(isinstance(t, str) and t for t in value):
        return tuple(value)
    raise FormatError(f"target_modules must be a non-empty list of module names or a regex string, "
                      f"got {value!r}")


def _layers(raw: dict) -> tuple[int, ...] | None:
    value = raw.get("layers_to_transform")
    if value is None or value == []:
        return None
    items = [value] if type(value) is int else value
    if not isinstance(items, list) or not all(type(i) is int and i >= 0 for i in items):
        raise FormatError(f"layers_to_transform must be a layer index or a list of them, got {value!r}")
    return tuple(items)


def _pattern(raw: dict, option: str, limits: Limits) -> tuple:
    value = raw.get(option) or {}
    if not isinstance(value, dict):
        raise FormatError(f"{option} must map module names to values, got {value!r}")
    if len(value) > limits.max_patterns:
        raise FormatError(f"{option} has {len(value)} entries, over the limit of {limits.max_patterns}")
    out = []
    for key, v in value.items():
        if not _PATTERN_KEY.fullmatch(key):
            raise FormatError(f"{option} key {key!r} is not supported: use module names or paths "
                              "(letters, digits, '_' and '.'), not regular expressions")
        if option == "rank_pattern":
            v = check_int(f"{option}[{key!r}]", v, limits.max_rank)
        elif not is_real(v) or v <= 0:
            raise FormatError(f"{option}[{key!r}] must be a finite number > 0, got {v!r}")
        out.append((key, v))
    return tuple(out)


@dataclass(frozen=True)
class LoraModule:
    """One adapted module of a LoRA file: its rank, alpha, scaling and tensor names."""

    r: int
    alpha: float
    scaling: float
    a_key: str
    b_key: str


def lora_modules(spec: LoraSpec, shapes: dict[str, list[int]], fingerprint: dict | None = None,
                 limits: Limits = LIMITS) -> dict[str, LoraModule]:
    """Module path -> LoraModule for every module the file adapts (the tensors present are the
    truth), checked against the config and, with a base fingerprint, against the base's layers
    and module shapes. FormatError names the first tensor that does not fit."""
    fp = fingerprint or {}
    groups: dict[str, dict[str, str]] = {}
    sites: dict[str, str] = {}
    for key in shapes:
        parsed = parse_lora_key(key)
        if parsed is None:
            raise FormatError(f"unexpected tensor key {key!r}; a LoRA file holds keys like "
                              f"{LORA_KEY_EXAMPLE}")
        module, layer, site, part = parsed
        if "num_layers" in fp and layer >= fp["num_layers"]:
            raise FormatError(f"tensor {key!r} is for layer {layer}, but the base model has "
                              f"{fp['num_layers']} layers")
        if "modules" in fp and site not in fp["modules"]:
            raise FormatError(f"tensor {key!r} adapts {site}, which the base model does not have "
                              f"(it has {', '.join(fp['modules'])})")
        if isinstance(spec.target_modules, tuple):  # PEFT matches names as suffixes of the path
            if not any(module == t or module.endswith("." + t) for t in spec.target_modules):
                raise FormatError(f"tensor {key!r} adapts {site}, which target_modules "
                                  f"{list(spec.target_modules)} does not list")
            if spec.layers is not None and layer not in spec.layers:
                raise FormatError(f"tensor {key!r} is for layer {layer}, not in layers_to_transform "
                                  f"{list(spec.layers)}")
        group = groups.setdefault(module, {})
        if part in group:
            raise FormatError(f"lora_{part} of {module} appears twice ({group[part]!r} and {key!r})")
        group[part] = key
        sites[module] = site
    if not groups:
        raise FormatError("it holds no LoRA tensors (no '...lora_A.weight' keys)")
    out = {}
    for module, group in sorted(groups.items()):
        for part in "AB":
            if part not in group:
                raise FormatError(f"missing tensor {lora_key(module, part)!r}: {module} has only one of "
                                  "lora_A / lora_B")
        a, b = group["A"], group["B"]
        r = spec.rank(module)
        origin = " (from rank_pattern)" if r != spec.r else ""
        out_in = fp.get("modules", {}).get(sites[module], [None, None])
        expect_shape(a, shapes[a], [r, out_in[1]], f"lora_A is [r, in] with r={r}{origin}")
        expect_shape(b, shapes[b], [out_in[0], r], f"lora_B is [out, r] with r={r}{origin}")
        if 0 in list(shapes[a]) + list(shapes[b]):
            raise FormatError(f"tensor {a!r} or {b!r} is empty")
        alpha = spec.alpha_of(module)
        check_alpha(f"the lora_alpha of {module}", alpha, r, spec.use_rslora, limits)
        out[module] = LoraModule(r=r, alpha=alpha, scaling=lora_scaling(alpha, r, spec.use_rslora), a_key=a, b_key=b)
    return out


def own_settings(kind: str, raw: dict, limits: Limits = LIMITS) -> dict:
    """The settings of a series, parallel or prefix adapter from its config, checked; the size
    (bottleneck or num_virtual_tokens) is required, the rest default as in AdapterConfig."""
    if kind not in OWN_TYPES:
        raise FormatError(f"unknown modulora_type {kind!r}; use {', '.join(OWN_TYPES)}")
    size = "num_virtual_tokens" if kind == "prefix" else "bottleneck"
    if size not in raw:
        raise FormatError(f"a {kind} adapter needs {size}")
    settings = {k: raw[k] for k in OWN_FIELDS[kind] if k in raw}
    check_settings(settings, limits)
    return settings


def check_settings(settings: dict, limits: Limits = LIMITS) -> None:
    """FormatError for the first bad one of the given bottleneck / prefix settings."""
    if "bottleneck" in settings:
        check_int("bottleneck", settings["bottleneck"], limits.max_bottleneck)
    if "num_virtual_tokens" in settings:
        check_int("num_virtual_tokens", settings["num_virtual_tokens"], limits.max_virtual_tokens)
    if "placement" in settings and settings["placement"] not in PLACEMENTS:
        raise FormatError(f"placement must be houlsby or pfeiffer, got {settings['placement']!r}")
    if "scale" in settings and not is_real(settings["scale"]):
        raise FormatError(f"scale must be a finite number, got {settings['scale']!r}")
    dropout = settings.get("dropout", 0.0)
    if not is_real(dropout) or not 0 <= dropout < 1:
        raise FormatError(f"dropout must be a number in [0, 1), got {dropout!r}")


def expect_shape(key: str, shape: list, expected: list, meaning: str) -> None:
    """FormatError unless `shape` matches `expected` (None: any size)."""
    if len(shape) != len(expected) or any(e is not None and s != e for s, e in zip(shape, expected)):
        shown = ["?" if e is None else e for e in expected]
        raise FormatError(f"tensor {key!r} has shape {list(shape)}, expected "
                          f"[{', '.join(map(str, shown))}] ({meaning})")



def lora_config_json(r: int, alpha: float, dropout: float, target_modules, use_rslora: bool,
                     base_name: str | None, rank_pattern: dict | None = None,
                     alpha_pattern: dict | None = None) -> dict:
    """PEFT's LoraConfig fields for an adapter (enough for `PeftModel.from_pretrained`)."""
    def num(x):
        return int(x) if float(x).is_integer() else x

    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": r, "lora_alpha": num(alpha), "lora_dropout": dropout,
        "target_modules": target_modules if isinstance(target_modules, str) else list(target_modules),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": use_rslora, "use_dora": False,
        "lora_bias": False, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": dict(rank_pattern or {}), "alpha_pattern": {k: num(v) for k, v in (alpha_pattern or {}).items()},
        "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None,
    }


def exact_targets(modules) -> str:
    """A target_modules regex that PEFT fullmatches against exactly these module paths."""
    return "(" + "|".join(re.escape(m) for m in sorted(modules)) + ")"
