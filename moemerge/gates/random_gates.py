"""`random` and `uniform_random` gates, seeded: mergekit's baselines for experts with no prompts."""

from __future__ import annotations

import math

import torch


def random_gates(mode: str, layers: int, experts: int, hidden: int, seed: int) -> torch.Tensor:
    """`random`: standard normal rows; `uniform_random`: U(±1/sqrt(hidden)), the default nn.Linear range."""
    generator = torch.Generator().manual_seed(seed)
    if mode == "random":
        return torch.randn(layers, experts, hidden, generator=generator)
    bound = 1.0 / math.sqrt(hidden)
    return torch.rand(layers, experts, hidden, generator=generator) * 2 * bound - bound
