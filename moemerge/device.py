"""Where hidden states are computed: CUDA when present (or asked for), else the CPU."""

from __future__ import annotations

import torch

from moemerge.errors import OptionError


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise OptionError("{device} cuda: no CUDA device is available here; use {device} auto or cpu")
    if choice not in ("cpu", "cuda"):
        raise OptionError("{device} {choice!r}: use auto, cpu or cuda", choice=choice)
    return torch.device(choice)
