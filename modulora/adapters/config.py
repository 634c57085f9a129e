"""The adapter configuration and the one error type users see."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

TYPES = ("lora", "series", "parallel", "prefix")
PLACEMENTS = ("houlsby", "pfeiffer")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_RANK = 256
MAX_BOTTLENECK = 8192
MAX_VIRTUAL_TOKENS = 1024


class AdapterError(ValueError):
    """An adapter cannot be built, read or loaded; the message names the problem."""


@dataclass
class AdapterConfig:
    """Everything needed to rebuild an adapter's modules (its weights live elsewhere)."""

    type: str = "lora"  # "lora" | "series" | "parallel" | "prefix"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = field(default=ALL_LINEAR)
    bottleneck: int = 64
    placement: str = "pfeiffer"  # series only
    scale: float = 1.0
    num_virtual_tokens: int = 16
    use_rslora: bool = False

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists; keep one hashable, comparable form.
        if isinstance(self.target_modules, (list, set, frozenset)):
            self.target_modules = tuple(self.target_modules)

    @property
    def scaling(self) -> float:
        """LoRA's multiplier on B(A(x)): alpha/r, or alpha/sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def validate(self) -> None:
        """Raise AdapterError for the first setting that cannot work."""
        if self.type not in TYPES:
            raise AdapterError(f"unknown adapter type {self.type!r}; use one of {', '.join(TYPES)}")
        _int_in("r", self.r, 1, MAX_RANK)
        _int_in("bottleneck", self.bottleneck, 1, MAX_BOTTLENECK)
        _int_in("num_virtual_tokens", self.num_virtual_tokens, 1, MAX_VIRTUAL_TOKENS)
        if not _real(self.alpha) or self.alpha <= 0:
            raise AdapterError(f"alpha must be a positive number, got {self.alpha!r}")
        if not _real(self.dropout) or not 0 <= self.dropout < 1:
            raise AdapterError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not _real(self.scale):
            raise AdapterError(f"scale must be a finite number, got {self.scale!r}")
        if self.placement not in PLACEMENTS:
            raise AdapterError(f"unknown placement {self.placement!r}; use houlsby or pfeiffer")
        if not isinstance(self.use_rslora, bool):
            raise AdapterError(f"use_rslora must be true or false, got {self.use_rslora!r}")
        mods = self.target_modules
        if self.type == "lora" and (not isinstance(mods, tuple) or not mods
                                    or not all(isinstance(m, str) and m for m in mods)):
            raise AdapterError(f"target_modules must be a non-empty list of module names, got {mods!r}")


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int_in(name: str, value, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise AdapterError(f"{name} must be an integer from {lo} to {hi}, got {value!r}")
