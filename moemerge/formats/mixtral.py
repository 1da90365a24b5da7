"""Mixtral: the classic Hub layout (block_sparse_moe, w1/w2/w3), readable by every Mixtral consumer."""

from __future__ import annotations

from typing import Any

from moemerge.formats.common import MoeLayout, dense_config, dense_shapes
from moemerge.formats.format import OutputFormat

MLP_TO_MIXTRAL = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


class Mixtral(OutputFormat):
    name = "mixtral"
    title = "Mixtral"
    model_type = "mixtral"
    class_name = "MixtralForCausalLM"
    experts_key = "num_local_experts"
    expert_size_key = "intermediate_size"
    moe_attributes = ("mlp", "block_sparse_moe")  # transformers 5, transformers 4
    refused_families = {
        "qwen2": "Qwen2 attention has q/k/v biases, which Mixtral cannot hold; use architecture: qwen2_moe",
        "qwen3": "Qwen3 attention normalises q and k (q_norm/k_norm), which Mixtral lacks; use architecture: qwen3_moe",
    }

    def caveat(self, layout: MoeLayout) -> str | None:
        if not layout.dense_layers:
            return None
        return (
            f"Mixtral has no dense layers, so layers {list(layout.dense_layers)} hold the same MLP in every "
            "expert slot behind an all-zero router: a dense layer's output (up to rounding), at a sparse layer's size"
        )

    def gate_name(self, layer: int) -> str:
        return f"model.layers.{layer}.block_sparse_moe.gate.weight"

    def expert_name(self, layer: int, expert: int, projection: str) -> str:
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{MLP_TO_MIXTRAL[projection]}.weight"

    def config(self, base: dict[str, Any], layout: MoeLayout) -> dict[str, Any]:
        """sliding_window comes from the base, whose attention the MoE uses (None for Llama bases)."""
        return {
            "architectures": [self.class_name],
            "model_type": self.model_type,
            **dense_config(base, layout),
            "intermediate_size": base["intermediate_size"],
            "sliding_window": base.get("sliding_window"),
            "num_local_experts": layout.num_experts,
            "router_jitter_noise": 0.0,
        }

    def expected_tensors(self, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        return {**dense_shapes(config, {}), **self.routed_shapes(config)}
