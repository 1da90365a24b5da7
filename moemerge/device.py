"""Where hidden states are computed: CUDA when present (or asked for), else the CPU; whether the CPU computes
bfloat16 natively; and how a helper thread keeps torch off the cores the gate pass computes on."""

from __future__ import annotations

import ctypes
import re
from functools import cache
from pathlib import Path

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


def one_torch_thread() -> None:
    """Make torch compute on one core in the calling thread only (other threads keep theirs). A helper thread
    that runs torch beside the gate pass gets an OpenMP team of its own, and once the process has more OpenMP
    threads than cores, the OpenMP runtime (libgomp) stops spin-waiting in every team: the gate pass's many
    small operations then took 25% longer on two cores (a generated demo merge: 45 s, and 35 s with this).
    OpenMP thread counts are per thread; torch sets this thread's at its first use, so that comes first."""
    torch.get_num_threads()
    for runtime in _openmp_runtimes():
        if set_threads := getattr(runtime, "omp_set_num_threads", None):
            set_threads(1)


@cache
def _openmp_runtimes() -> tuple[ctypes.CDLL, ...]:
    """The OpenMP runtimes loaded in this process (torch's among them), from /proc/self/maps; none where there is
    no such file (not Linux). Not threadpoolctl: it finds libc by running ldconfig, and a child forked from a
    merge counts the merge's memory a second time until it runs ldconfig."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return ()
    found = re.findall(r"(/\S*/lib(?:gomp|iomp5|omp)[^/\s]*\.so[^/\s]*)$", maps, flags=re.MULTILINE)
    return tuple(ctypes.CDLL(path) for path in sorted(set(found)))
