"""Bottleneck adapters (Houlsby/Pfeiffer series and parallel): `scale * up(relu(down(dropout(h))))`.

The up-projection starts at zero, so an attached adapter first reproduces the base model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .initialisers import uniform_fan_in
from .wrap import Wrapper


class _Bottleneck(Wrapper):
    def _add_bottleneck(self, hidden: int, size: int, scale: float, dropout: float, gen: torch.Generator,
                        device: torch.device) -> None:
        self.adapter_down = nn.Linear(hidden, size, device=device, dtype=torch.float32)
        self.adapter_up = nn.Linear(size, hidden, device=device, dtype=torch.float32)
        self.adapter_dropout = nn.Dropout(dropout)
        self.scale = scale
        with torch.no_grad():
            self.adapter_down.weight.copy_(uniform_fan_in((size, hidden), gen))
            self.adapter_down.bias.zero_()
            self.adapter_up.weight.zero_()
            self.adapter_up.bias.zero_()

    def bottleneck(self, h: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(h.device.type):  # under autocast the matmuls cast anyway
            h = h.to(self.adapter_down.weight.dtype)
        h = self.adapter_dropout(h)
        out = self.adapter_up(F.relu(self.adapter_down(h)))
        return (self.scale * out).to(like.dtype)


class SeriesLinear(_Bottleneck):
    """After a sub-layer's output projection: `y = W x; y + scale * up(relu(down(y)))`."""

    def __init__(self, base: nn.Linear, size: int, scale: float, dropout: float, gen: torch.Generator):
        super().__init__(base)
        self._add_bottleneck(base.out_features, size, scale, dropout, gen, base.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y + self.bottleneck(y, y)


class ParallelMLP(_Bottleneck):
    """Beside the MLP, fed with the MLP's input: `mlp(x) + scale * up(relu(down(x)))`."""

    def __init__(self, mlp: nn.Module, hidden: int, size: int, scale: float, dropout: float,
                 gen: torch.Generator):
        super().__init__(mlp)
        device = next(mlp.parameters()).device
        self._add_bottleneck(hidden, size, scale, dropout, gen, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.wrapped(x)  # the original MLP; its children are the ones adopted here
        return y + self.bottleneck(x, y)
