"""Seeded initialisers, drawn on the CPU so that a seed gives the same adapter on any device."""

from __future__ import annotations

import math

import torch


def uniform_fan_in(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): what kaiming_uniform(a=sqrt(5)) gives nn.Linear."""
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound
