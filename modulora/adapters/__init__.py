"""Parameter-efficient adapters over one base model: LoRA, series (Houlsby / Pfeiffer) and
parallel bottleneck adapters, and prefix tuning, behind one attach / save / load interface."""

from .attach import adapter_state, attach, attached_config, detach, merge_lora
from .config import AdapterConfig, AdapterError
from .io import load_adapter, read_adapter, save_adapter

__all__ = ["AdapterConfig", "AdapterError", "attach", "detach", "attached_config", "adapter_state",
           "save_adapter", "read_adapter", "load_adapter", "merge_lora"]
