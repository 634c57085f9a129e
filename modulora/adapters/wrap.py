"""Swapping a base module for an adapter wrapper and back, without renaming base weights.

A wrapper adopts the wrapped module's own parameters, buffers and children under the same
names, so `model.state_dict()`, the base fingerprint and checkpoints keep their base key names
while an adapter is attached; `unwrap` puts the very same original module back.
"""

from __future__ import annotations

from torch import nn


class Wrapper(nn.Module):
    """Base class of the adapter wrappers; subclasses add adapter submodules and a forward."""

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        object.__setattr__(self, "wrapped", wrapped)  # unregistered: its tensors are adopted below
        self._parameters.update(wrapped._parameters)
        self._buffers.update(wrapped._buffers)
        self._modules.update(wrapped._modules)
        self.training = wrapped.training

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            wrapped = self.__dict__.get("wrapped")
            if wrapped is None:
                raise
            return getattr(wrapped, name)  # e.g. in_features, config

    def train(self, mode: bool = True) -> "Wrapper":
        super().train(mode)
        self.wrapped.training = mode  # children are shared, only the flag of the original is not
        return self

    def unwrap(self) -> nn.Module:
        """The original module, holding whatever tensors the wrapper holds now (they may have
        been replaced, e.g. by `.to()` with swapped parameters)."""
        wrapped = self.wrapped
        for store in ("_parameters", "_buffers", "_modules"):
            mine, theirs = getattr(self, store), getattr(wrapped, store)
            for key in theirs:
                theirs[key] = mine[key]
        wrapped.train(self.training)
        return wrapped


def replace(root: nn.Module, name: str, new: nn.Module) -> None:
    """Set the submodule at dotted `name` inside `root`."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def wrappers(model: nn.Module) -> list[tuple[str, Wrapper]]:
    """Every adapter wrapper in the model with its dotted name, outermost first."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Wrapper)]

