"""The merge plan: every output tensor, where it comes from, its shape and dtype, known before any byte moves."""

from __future__ import annotations

from collections.abc import Callable

import torch

from moemerge.errors import MoemergeError
from moemerge.formats.format import OutputFormat
from moemerge.inputs.experts import Expert
from moemerge.inputs.families import EMBEDDINGS, LM_HEAD, MLP_PROJECTIONS, DenseShape, copied_tensors, mlp_tensor
from moemerge.inputs.sources import ModelSource
from moemerge.output.non_expert import non_expert_tensor
from moemerge.output.writer import PlannedTensor


def _layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else -1


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
    out_format: OutputFormat,
    shared: Expert | None,
    base: ModelSource,
    shape: DenseShape,
    layer: int,
    dtype: torch.dtype,
) -> list[PlannedTensor]:
    """The shared expert's MLP, and its gate where the format has one: a tiny constant, so that the shared
    expert's weight is a fixed one (the format's module says which). Without a shared expert the MLP is all
    zeros, so it adds nothing."""
    hidden = shape.hidden_size
    planned = []
    if out_format.gating.shared_expert_gate:
        fill = out_format.shared_gate_fill
        planned.append(_filled(out_format.shared_gate_name(layer), (1, hidden), dtype, fill, "shared expert gate"))
    for projection in MLP_PROJECTIONS:
        name = out_format.shared_expert_name(layer, projection)
        if shared is not None:
            planned.append(_mlp(shared, base, layer, projection, dtype, name))
        else:
            size = out_format.zero_shared_expert_size
            planned.append(
                _filled(name, (hidden, size) if projection == "down_proj" else (size, hidden), dtype, 0.0, name)
            )
    return planned


def _router(gates: Callable[[], torch.Tensor] | None, layer: int) -> Callable[[], torch.Tensor]:
    if gates is None:

        def unknown() -> torch.Tensor:
            raise RuntimeError("a plan built without gates holds names and shapes only; it cannot be written")

        return unknown
    return lambda: gates()[layer]


def build_plan(
    out_format: OutputFormat,
    base: ModelSource,
    shape: DenseShape,
    experts: list[Expert],
    shared: Expert | None,
    dtype: torch.dtype,
    gates: Callable[[], torch.Tensor] | None,
    non_expert_weights: str = "base",
    dense_layers: frozenset[int] = frozenset(),
) -> list[PlannedTensor]:
    """Layer by layer, so a reader of one shard finds a whole layer together; except the routers, which come
    last, together: they are the only tensors that wait for the gate pass, which runs while the rest is
    written (moemerge.gates.background).

    Shared weights follow the `non_expert_weights` policy (moemerge.output.non_expert). A layer of `dense_layers`
    keeps one MLP, the shared weight `mlp.*_proj` by the same policy: as a dense MLP where the format holds
    one, else in every expert slot, behind an all-zero router (every top-k mix of one MLP is that MLP).
    A tied base has no lm_head.weight; the MoE gets an explicit one (see dense_config).
    `gates` gives the routers' rows [layers, experts, hidden] when they are ready (it may wait for them);
    without it the plan holds names, shapes and sources only (checked before the gate pass starts), and
    cannot be written.
    """

    def shared_weight(name: str, out_name: str | None = None) -> PlannedTensor:
        return non_expert_tensor(non_expert_weights, base, experts, name, dtype, out_name)

    copied = copied_tensors(base)
    by_layer: dict[int, list[str]] = {}
    for name in copied:
        by_layer.setdefault(_layer_of(name), []).append(name)
    plan = [shared_weight(name) for name in by_layer.get(-1, []) if name == EMBEDDINGS]
    routers: list[PlannedTensor] = []
    for layer in range(shape.num_layers):
        plan += [shared_weight(name) for name in by_layer.get(layer, [])]
        for projection in out_format.zero_biases(shape.family):
            rows = base.tensors.shape(f"model.layers.{layer}.self_attn.{projection}.weight")[0]
            bias = f"model.layers.{layer}.self_attn.{projection}.bias"
            plan.append(_filled(bias, (rows,), dtype, 0.0, f"zero {projection} bias"))
        dense = layer in dense_layers
        if dense and out_format.holds_dense_layers:
            plan += [shared_weight(mlp_tensor(layer, projection)) for projection in MLP_PROJECTIONS]
            continue
        gate_shape = (len(experts), shape.hidden_size)
        if dense:
            plan.append(_filled(out_format.gate_name(layer), gate_shape, dtype, 0.0, "router of a dense layer"))
        else:
            router = PlannedTensor(out_format.gate_name(layer), gate_shape, dtype, _router(gates, layer), "gates")
            routers.append(router)
        for expert in experts:
            for projection in MLP_PROJECTIONS:
                out = out_format.expert_name(layer, expert.index, projection)
                if dense:
                    plan.append(shared_weight(mlp_tensor(layer, projection), out))
                else:
                    plan.append(_mlp(expert, base, layer, projection, dtype, out))
        if out_format.shared_experts:
            plan += _shared_expert(out_format, shared, base, shape, layer, dtype)
    plan += [shared_weight(name) for name in by_layer.get(-1, []) if name != EMBEDDINGS]
    if LM_HEAD not in copied:
        plan.append(shared_weight(LM_HEAD))
    return plan + routers


def parameter_counts(
    plan: list[PlannedTensor], out_format: OutputFormat, layers: int, experts: int, experts_per_token: int
) -> tuple[int, int]:
    """The MoE's parameters, all and those one token uses: all but the routed experts it does not run, every
    routed expert the size of the first (by the format's names, in every layer that has expert slots)."""
    total = sum(tensor.numel for tensor in plan)
    first = {out_format.expert_name(layer, 0, projection) for layer in range(layers) for projection in MLP_PROJECTIONS}
    per_expert = sum(tensor.numel for tensor in plan if tensor.name in first)
    return total, total - per_expert * (experts - experts_per_token)


def check_plan(plan: list[PlannedTensor], expected: dict[str, tuple[int, ...]], format_name: str) -> None:
    """The plan holds exactly the tensors the config implies, before any byte is written: a base that lacks
    one its family should have (a bias, a q/k norm) is named now rather than found by the final check."""
    planned = {tensor.name: tensor.shape for tensor in plan}
    for name, shape in expected.items():
        if name not in planned:
            raise MoemergeError(f"base_model: tensor {name} is missing, and a {format_name} output needs it")
        if planned[name] != shape:
            raise MoemergeError(
                f"base_model: tensor {name} is {list(planned[name])}, config.json implies {list(shape)}"
            )
    for name in planned.keys() - expected.keys():
        raise MoemergeError(f"base_model: tensor {name} has no place in a {format_name} output")
