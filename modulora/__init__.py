"""modulora: one base language model, a library of small adapters, and routing that picks and mixes them."""

__version__ = "0.1.0"
