"""The adapter configuration and the one error type users see. Rules and limits: `format`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .format import (ALL_LINEAR, LIMITS, TYPES, FormatError, check_alpha, check_int, check_settings,
                     lora_scaling)


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
    # A LoRA read from a file: module path -> (rank, alpha) of exactly the modules it adapts
    # (layers_to_transform, rank_pattern, alpha_pattern). None: every target module of every
    # layer, with rank r and alpha (a fresh adapter).
    modules: dict[str, tuple[int, float]] | None = None

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists; keep one hashable, comparable form.
        if isinstance(self.target_modules, (list, set, frozenset)):
            self.target_modules = tuple(self.target_modules)

    @property
    def scaling(self) -> float:
        """LoRA's multiplier on B(A(x)): alpha/r, or alpha/sqrt(r) with rsLoRA."""
        return lora_scaling(self.alpha, self.r, self.use_rslora)

    def module_rank(self, module: str) -> int:
        """The rank of one adapted module (full path)."""
        return self.r if self.modules is None else self.modules[module][0]

    def module_scaling(self, module: str) -> float:
        """The scaling of one adapted module (full path): per module for a LoRA read from a file."""
        if self.modules is None:
            return self.scaling
        r, alpha = self.modules[module]
        return lora_scaling(alpha, r, self.use_rslora)

    def validate(self) -> None:
        """Raise AdapterError for the first setting that cannot work."""
        try:
            self._check()
        except FormatError as e:
            raise AdapterError(str(e)) from None

    def _check(self) -> None:
        if self.type not in TYPES:
            raise FormatError(f"unknown adapter type {self.type!r}; use one of {', '.join(TYPES)}")
        if not isinstance(self.use_rslora, bool):
            raise FormatError(f"use_rslora must be true or false, got {self.use_rslora!r}")
        check_int("r", self.r, LIMITS.max_rank)
        check_alpha("alpha", self.alpha, self.r, self.use_rslora)
        check_settings({"bottleneck": self.bottleneck, "num_virtual_tokens": self.num_virtual_tokens,
                        "placement": self.placement, "scale": self.scale, "dropout": self.dropout})
        mods = self.target_modules
        if self.type == "lora" and (not isinstance(mods, tuple) or not mods
                                    or not all(isinstance(m, str) and m for m in mods)):
            raise FormatError(f"target_modules must be a non-empty list of module names, got {mods!r}")
        for module, (r, alpha) in (self.modules or {}).items():
            check_int(f"the rank of {module}", r, LIMITS.max_rank)
            check_alpha(f"the alpha of {module}", alpha, r, self.use_rslora)
