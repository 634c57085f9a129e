"""Parameter-efficient adapters over one base model: LoRA, series (Houlsby / Pfeiffer) and
parallel bottleneck adapters, and prefix tuning, behind one attach / save / load interface.

The torch-using parts load on first use, so that `modulora.adapters.format` (the format, used by
`modulora.validate` and the library commands) imports without torch.
"""

import importlib
import sys
import types

from .config import AdapterConfig, AdapterError

_LAZY = {"attach": ".attach", "detach": ".attach", "attached_config": ".attach", "adapter_state": ".attach",
         "merge_lora": ".attach", "save_adapter": ".io", "read_adapter": ".io", "load_adapter": ".io"}

__all__ = ["AdapterConfig", "AdapterError", "attach", "detach", "attached_config", "adapter_state",
           "save_adapter", "read_adapter", "load_adapter", "merge_lora"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """Importing the submodule `attach` sets the package attribute `attach`; keep the function
    of that name there instead, as an eager `from .attach import attach` would."""

    def __setattr__(self, name, value):
        if name == "attach" and isinstance(value, types.ModuleType):
            value = value.attach
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
