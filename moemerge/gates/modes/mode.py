"""What a gate mode is to the merge: a name the recipe accepts (declared in moemerge.inputs.gate_modes with
what it needs and its model-card text) and a function from a GateContext to router weights. The merge only
ever talks to this contract, so a new mode is one new module and one line in the registry."""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moemerge.device import cpu_has_native_bf16
from moemerge.gates.router_inputs import CaptureOptions, pad_ready
from moemerge.gates.trained import TrainingReport
from moemerge.hf import load_tokenizer
from moemerge.inputs.experts import Expert
from moemerge.inputs.gate_modes import GateModeSpec
from moemerge.inputs.prompts import ExpertPrompts
from moemerge.inputs.recipe import Recipe
from moemerge.inputs.sources import ModelSource
from moemerge.progress import Progress

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class GateResult:
    """float32 router weights [layers, experts, hidden], the training report for fitted gates, and the
    labelled texts a mode wrote for itself (one JSON-ready record each; the output keeps them)."""

    rows: torch.Tensor
    report: TrainingReport | None = None
    written: list[dict] | None = None


@dataclass
class GateContext:
    """Everything a gate mode may read: the recipe and its prompts, the opened base and experts (each expert
    yields its own MLP weights, so a mode can run it as a dense model), and where and how to compute."""

    recipe: Recipe
    prompts: ExpertPrompts
    base: ModelSource
    experts: list[Expert]
    num_layers: int
    hidden_size: int
    device: torch.device
    dtype: torch.dtype
    seed: int
    batch_size: int
    progress: Progress

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The base's tokenizer, ready to pad batches."""
        return pad_ready(load_tokenizer(self.base.path))

    def capture_options(self, batch_size: int) -> CaptureOptions:
        """How the base computes router inputs: on this context's device, in capture_dtype."""
        return CaptureOptions(self.device, capture_dtype(self.device, self.dtype), batch_size)


@dataclass(frozen=True)
class GateMode:
    """One gate mode: its declaration (name, needs, card text) and how it computes the routers."""

    spec: GateModeSpec
    compute: Callable[[GateContext], GateResult]

    @property
    def name(self) -> str:
        return self.spec.name


def capture_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the base computes router inputs in: on CUDA the output dtype. On CPU bfloat16 when the
    output is bfloat16 and the CPU computes it natively (faster than float32 at the same routing accuracy and
    half the memory: benchmarks/capture_dtype.py, results in benchmarks/results/capture_dtype-*), else
    float32: emulated half precision is slow, and float16 on CPU loses accuracy."""
    if device.type == "cuda":
        return dtype
    return torch.bfloat16 if dtype == torch.bfloat16 and cpu_has_native_bf16() else torch.float32


def release(device: torch.device) -> None:
    """Return a capture's memory before writing goes on."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
