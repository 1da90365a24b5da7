"""The routed-expert layout Qwen2-MoE and Qwen3-MoE share: `mlp.gate` and `mlp.experts.E.<projection>`."""

from __future__ import annotations

from typing import Any

from moemerge.formats.common import MoeLayout, dense_config
from moemerge.formats.format import OutputFormat


class QwenMoeLayout(OutputFormat):
    experts_key = "num_experts"
    expert_size_key = "moe_intermediate_size"

    def gate_name(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.gate.weight"

    def expert_name(self, layer: int, expert: int, projection: str) -> str:
        return f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight"

    def qwen_config(self, base: dict[str, Any], layout: MoeLayout) -> dict[str, Any]:
        """Every layer sparse, top-k weights renormalised as Mixtral does (so N identical experts equal the
        dense MLP), and no sliding window: the bases we accept attend to the whole context."""
        return {
            "architectures": [self.class_name],
            "model_type": self.model_type,
            **dense_config(base, layout),
            "intermediate_size": base["intermediate_size"],
            "moe_intermediate_size": base["intermediate_size"],
            "num_experts": layout.num_experts,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": base["num_hidden_layers"],
        }
