"""The merge plan: every output tensor, where it comes from, its shape and dtype, known before any byte moves."""

from __future__ import annotations

from collections.abc import Callable

import torch

from moemerge.arch import MLP_PROJECTIONS, copied_tensors, mlp_tensor
from moemerge.experts import Expert
from moemerge.mixtral import expert_name, gate_name
from moemerge.sources import ModelSource
from moemerge.writer import PlannedTensor

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


def _layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else -1


def _copy(base: ModelSource, name: str, dtype: torch.dtype, out_name: str | None = None) -> PlannedTensor:
    return PlannedTensor(
        out_name or name,
        base.tensors.shape(name),
        dtype,
        lambda: base.tensors.load(name).to(dtype),
        f"base {name}",
        base.tensors.byte_range(name, dtype),
    )


def _expert(expert: Expert, base: ModelSource, layer: int, projection: str, dtype: torch.dtype) -> PlannedTensor:
    return PlannedTensor(
        expert_name(layer, expert.index, projection),
        base.tensors.shape(mlp_tensor(layer, projection)),
        dtype,
        lambda: expert.tensor(layer, projection, dtype),
        f"experts[{expert.index}] {mlp_tensor(layer, projection)}",
        expert.source_bytes(layer, projection, dtype),
    )


def build_plan(
    base: ModelSource,
    experts: list[Expert],
    num_layers: int,
    hidden_size: int,
    dtype: torch.dtype,
    gate_rows: Callable[[int], torch.Tensor],
) -> list[PlannedTensor]:
    """Layer by layer, so a reader of one shard finds a whole layer together.

    A tied base has no lm_head.weight; the MoE gets an explicit copy of the embeddings (see mixtral_config).
    """
    copied = copied_tensors(base)
    by_layer: dict[int, list[str]] = {}
    for name in copied:
        by_layer.setdefault(_layer_of(name), []).append(name)
    plan = [_copy(base, name, dtype) for name in by_layer.get(-1, []) if name == EMBED]
    for layer in range(num_layers):
        plan += [_copy(base, name, dtype) for name in by_layer.get(layer, [])]
        plan.append(
            PlannedTensor(
                gate_name(layer), (len(experts), hidden_size), dtype, lambda i=layer: gate_rows(i).to(dtype), "gates"
            )
        )
        for expert in experts:
            plan += [_expert(expert, base, layer, projection, dtype) for projection in MLP_PROJECTIONS]
    plan += [_copy(base, name, dtype) for name in by_layer.get(-1, []) if name != EMBED]
    if LM_HEAD not in copied:
        plan.append(_copy(base, EMBED, dtype, out_name=LM_HEAD))
    return plan
