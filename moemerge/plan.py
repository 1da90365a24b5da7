"""The merge plan: every output tensor, where it comes from, its shape and dtype, known before any byte moves."""

from __future__ import annotations

from collections.abc import Callable

import torch

from moemerge.arch import EMBEDDINGS, MLP_PROJECTIONS, DenseShape, copied_tensors, mlp_tensor
from moemerge.experts import Expert
from moemerge.formats.format import OutputFormat
from moemerge.sources import ModelSource
from moemerge.writer import PlannedTensor

LM_HEAD = "lm_head.weight"


def _layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else -1


def _copy(base: ModelSource, name: str, dtype: torch.dtype, out_name: str | None = None) -> PlannedTensor:
    return PlannedTensor(
        out_name or name,
        base.tensors.shape(name),
        dtype,
        lambda: base.tensors.load(name),
        f"base {name}",
        base.tensors.byte_range(name, dtype),
    )


def _mlp(expert: Expert, base: ModelSource, layer: int, projection: str, dtype: torch.dtype, out: str) -> PlannedTensor:
    return PlannedTensor(
        out,
        base.tensors.shape(mlp_tensor(layer, projection)),
        dtype,
        lambda: expert.tensor(layer, projection),
        f"{expert.label} {mlp_tensor(layer, projection)}",
        expert.source_bytes(layer, projection, dtype),
    )


def _filled(name: str, shape: tuple[int, ...], dtype: torch.dtype, value: float, why: str) -> PlannedTensor:
    return PlannedTensor(name, shape, dtype, lambda: torch.full(shape, value, dtype=dtype), why)


def _shared_expert(
    output: OutputFormat, shared: Expert | None, base: ModelSource, shape: DenseShape, layer: int, dtype: torch.dtype
) -> list[PlannedTensor]:
    """The shared expert's MLP and its gate, a tiny constant: a weight of about 0.5 (see formats.qwen2_moe).
    Without a shared expert the MLP is all zeros, so it adds nothing."""
    hidden = shape.hidden_size
    planned = [
        _filled(output.shared_gate_name(layer), (1, hidden), dtype, output.shared_gate_fill, "shared expert gate")
    ]
    for projection in MLP_PROJECTIONS:
        name = output.shared_expert_name(layer, projection)
        if shared is not None:
            planned.append(_mlp(shared, base, layer, projection, dtype, name))
        else:
            size = output.zero_shared_expert_size
            planned.append(
                _filled(name, (hidden, size) if projection == "down_proj" else (size, hidden), dtype, 0.0, name)
            )
    return planned


def build_plan(
    output: OutputFormat,
    base: ModelSource,
    shape: DenseShape,
    experts: list[Expert],
    shared: Expert | None,
    dtype: torch.dtype,
    gate_rows: Callable[[int], torch.Tensor],
) -> list[PlannedTensor]:
    """Layer by layer, so a reader of one shard finds a whole layer together.

    A tied base has no lm_head.weight; the MoE gets an explicit copy of the embeddings (see dense_config).
    """
    copied = copied_tensors(base)
    by_layer: dict[int, list[str]] = {}
    for name in copied:
        by_layer.setdefault(_layer_of(name), []).append(name)
    plan = [_copy(base, name, dtype) for name in by_layer.get(-1, []) if name == EMBEDDINGS]
    for layer in range(shape.num_layers):
        plan += [_copy(base, name, dtype) for name in by_layer.get(layer, [])]
        for projection in output.zero_biases(shape.family):
            rows = base.tensors.shape(f"model.layers.{layer}.self_attn.{projection}.weight")[0]
            bias = f"model.layers.{layer}.self_attn.{projection}.bias"
            plan.append(_filled(bias, (rows,), dtype, 0.0, f"zero {projection} bias"))
        plan.append(
            PlannedTensor(
                output.gate_name(layer),
                (len(experts), shape.hidden_size),
                dtype,
                lambda i=layer: gate_rows(i),
                "gates",
            )
        )
        for expert in experts:
            plan += [
                _mlp(expert, base, layer, projection, dtype, output.expert_name(layer, expert.index, projection))
                for projection in MLP_PROJECTIONS
            ]
        if output.holds_shared_expert:
            plan += _shared_expert(output, shared, base, shape, layer, dtype)
    plan += [_copy(base, name, dtype) for name in by_layer.get(-1, []) if name != EMBEDDINGS]
    if LM_HEAD not in copied:
        plan.append(_copy(base, EMBEDDINGS, dtype, out_name=LM_HEAD))
    return plan
