"""Qwen2-MoE: routed experts plus one shared expert with a sigmoid gate; attention may carry q/k/v biases.

Without a shared expert in the recipe, the format still needs one: it is written with all-zero weights, so it
adds exactly nothing, at intermediate size 32. Not 0: transformers loads empty tensors, but llama.cpp reads a
size of 0 as "use intermediate_size" and then rejects the tensors' shapes; 32 is the smallest size its
quantizers take in whole blocks. With one, the shared-expert gate is zero (a
constant sigmoid of 0.5) and the merge halves the routed experts' down projections, so each layer's
output is the mean of the routed mix and the shared expert: N identical experts plus the base as shared
expert give the dense base exactly.
"""

from __future__ import annotations

from typing import Any

from moemerge.formats.common import MoeLayout, attention_head_dim, dense_shapes
from moemerge.formats.qwen_moe import QwenMoeLayout

SHARED_GATE_WEIGHT = 0.5  # sigmoid(0): what a zero shared-expert gate gives the shared expert


class Qwen2Moe(QwenMoeLayout):
    name = "qwen2_moe"
    model_type = "qwen2_moe"
    class_name = "Qwen2MoeForCausalLM"
    holds_shared_expert = True
    zero_shared_expert_size = 32
    refused_families = {
        "qwen3": "Qwen3 attention normalises q and k (q_norm/k_norm), which Qwen2-MoE lacks; "
        "use architecture: qwen3_moe",
    }

    def refusal(self, family: str, base_config: dict[str, Any]) -> str | None:
        window = base_config.get("sliding_window")
        if window and window < base_config.get("max_position_embeddings", window + 1):
            return (
                f"the base attends through a sliding window of {window} tokens in every layer, which Qwen2-MoE "
                "applies to some layers only; use architecture: mixtral"
            )
        return super().refusal(family, base_config)

    def routed_scale(self, shared_expert: bool) -> float:
        return 1.0 - SHARED_GATE_WEIGHT if shared_expert else 1.0

    def shared_expert_name(self, layer: int, projection: str) -> str:
        return f"model.layers.{layer}.mlp.shared_expert.{projection}.weight"

    def shared_gate_name(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.shared_expert_gate.weight"

    def config(self, base: dict[str, Any], layout: MoeLayout) -> dict[str, Any]:
        return {
            **self.qwen_config(base, layout),
            "qkv_bias": layout.family == "qwen2",
            "shared_expert_intermediate_size": base["intermediate_size"]
            if layout.shared_expert
            else self.zero_shared_expert_size,
        }

    def expected_tensors(self, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        heads, head_dim = config["num_attention_heads"], attention_head_dim(config)
        kv = config.get("num_key_value_heads", heads) * head_dim
        biases = {"q_proj.bias": (heads * head_dim,), "k_proj.bias": (kv,), "v_proj.bias": (kv,)}
        shapes = {**dense_shapes(config, biases if config.get("qkv_bias", True) else {}), **self.routed_shapes(config)}
        hidden, shared = config["hidden_size"], config["shared_expert_intermediate_size"]
        for layer in range(config["num_hidden_layers"]):
            shapes[self.shared_expert_name(layer, "gate_proj")] = (shared, hidden)
            shapes[self.shared_expert_name(layer, "up_proj")] = (shared, hidden)
            shapes[self.shared_expert_name(layer, "down_proj")] = (hidden, shared)
            shapes[self.shared_gate_name(layer)] = (1, hidden)
        return shapes
