"""Qwen3-MoE: routed experts only; attention normalises q and k per head (q_norm/k_norm), copied from the base."""

from __future__ import annotations

from typing import Any

from moemerge.formats.common import MoeLayout, attention_head_dim, dense_shapes
from moemerge.formats.qwen_moe import QwenMoeFormat

_NO_QK_NORM = (
    "Qwen3-MoE normalises q and k in every attention layer, and a {} base has no q_norm/k_norm weights to "
    "give it (its attention would compute something else); use architecture: {}"
)


class Qwen3Moe(QwenMoeFormat):
    name = "qwen3_moe"
    title = "Qwen3-MoE"
    model_type = "qwen3_moe"
    class_name = "Qwen3MoeForCausalLM"
    refused_families = {
        "llama": _NO_QK_NORM.format("Llama", "mixtral"),
        "mistral": _NO_QK_NORM.format("Mistral", "mixtral"),
        "qwen2": _NO_QK_NORM.format("Qwen2", "qwen2_moe"),
    }

    def config(self, base: dict[str, Any], layout: MoeLayout) -> dict[str, Any]:
        return {**self.qwen_config(base, layout), "attention_bias": False}

    def expected_tensors(self, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        head_dim = (attention_head_dim(config),)
        norms = {"q_norm.weight": head_dim, "k_norm.weight": head_dim}
        return {**dense_shapes(config, norms), **self.routed_shapes(config)}
