"""LoRA: a low-rank update beside a frozen Linear, `y = W x + scaling * B(A(dropout(x)))`.

Submodules are named `lora_A` / `lora_B` (bias-free Linears) so that state names map onto
PEFT's by adding a prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .initialisers import uniform_fan_in
from .wrap import Wrapper


class LoraLinear(Wrapper):
    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float, gen: torch.Generator):
        super().__init__(base)
        device = base.weight.device
        # Adapter weights stay float32 (the base may be bf16): small, and they are what trains.
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout)
        self.scaling = scaling
        with torch.no_grad():
            self.lora_A.weight.copy_(uniform_fan_in((r, base.in_features), gen))
            self.lora_B.weight.zero_()  # starts as the base model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the matmuls cast anyway
            x = x.to(self.lora_A.weight.dtype)
        delta = self.lora_B(self.lora_A(self.lora_dropout(x)))
        return y + (self.scaling * delta).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (in place: the base Linear is changed)."""
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()
        self.weight.add_((self.scaling * delta).to(self.weight.dtype))
