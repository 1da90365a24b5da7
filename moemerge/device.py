"""Where hidden states are computed: CUDA when present (or asked for), else the CPU; and whether the CPU computes
bfloat16 natively."""

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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16/AMX): there bfloat16 matmuls run several
    times faster than float32; elsewhere they are emulated and slower."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # no public API for this yet
    return bool(probe and probe())
