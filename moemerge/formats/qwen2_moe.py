"""Qwen2-MoE: routed experts plus one shared expert with a sigmoid gate; attention carries q/k/v biases.

With a shared expert in the recipe, its gate is a tiny constant (sigmoid ≈ 0.5) and the merge halves the
routed experts' down projections, so each layer's output is the mean of the routed mix and the shared
expert: the MLP keeps the dense model's scale. Without one, the format still needs a shared expert: it is
written with all-zero weights, so it adds exactly nothing, at intermediate size 32. Not 0: transformers
loads empty tensors, but llama.cpp reads a size of 0 as "use intermediate_size" and then rejects the
tensors' shapes; 32 is the smallest size its quantizers take in whole blocks.

The gate is not exactly zero because llama.cpp computes this sigmoid as silu(x) / x, which is 0/0 at x = 0.
2**-14 is the smallest normal float16, so no reader flushes it to zero; it moves the shared expert's weight
from 0.5 by about 2**-16 times the sum of the router input's components.
"""

from __future__ import annotations

from typing import Any

from moemerge.formats.common import MoeLayout, attention_head_dim, dense_shapes, rope_settings
from moemerge.formats.format import Gating
from moemerge.formats.qwen_moe import QwenMoeFormat
from moemerge.inputs.families import InputFamily

SHARED_GATE_WEIGHT = 0.5  # sigmoid(≈0): the shared expert's weight in the mix
SHARED_GATE_FILL = 2.0**-14  # every entry of the shared-expert gate (see the module docstring)
QKV = ("q_proj", "k_proj", "v_proj")
# Rope types llama.cpp's converter carries into a Qwen2-MoE GGUF (it writes rope_freqs for Llama only).
_CONVERTED_ROPE = (None, "default", "yarn")


class Qwen2Moe(QwenMoeFormat):
    name = "qwen2_moe"
    title = "Qwen2-MoE"
    model_type = "qwen2_moe"
    class_name = "Qwen2MoeForCausalLM"
    shared_experts = 1
    gating = Gating(shared_expert_gate=True)
    zero_shared_expert_size = 32
    shared_gate_fill = SHARED_GATE_FILL
    refused_families = {
        "qwen3": "Qwen3 attention normalises q and k (q_norm/k_norm), which Qwen2-MoE lacks; "
        "use architecture: qwen3_moe",
    }

    def refusal(self, family: InputFamily, base_config: dict[str, Any]) -> str | None:
        window = family.sliding_window(base_config)
        if window:
            return (
                f"the base attends through a sliding window of {window} tokens in every layer, which Qwen2-MoE "
                "applies to some layers only; use architecture: mixtral"
            )
        heads = base_config["num_attention_heads"]
        if attention_head_dim(base_config) * heads != base_config["hidden_size"]:
            return (
                f"head_dim {attention_head_dim(base_config)} × {heads} heads is not hidden_size "
                f"{base_config['hidden_size']}, and transformers 4, vLLM and llama.cpp size Qwen2-MoE attention "
                "from hidden_size; use architecture: mixtral"
            )
        rope = (rope_settings(base_config)["rope_scaling"] or {}).get("rope_type")
        if rope not in _CONVERTED_ROPE:
            return f"rope_type {rope} is lost when llama.cpp converts Qwen2-MoE; use architecture: mixtral"
        return super().refusal(family, base_config)

    def zero_biases(self, family: InputFamily) -> tuple[str, ...]:
        return () if "q_proj.bias" in family.attention_extras else QKV

    def caveat(self, layout: MoeLayout) -> str | None:
        notes = [super().caveat(layout)]
        if layout.experts_per_token < layout.num_experts:
            notes.append(
                "llama.cpp does not renormalise Qwen2-MoE's top-k router weights (transformers and vLLM do): "
                "there each layer's routed output is scaled by the chosen experts' share of the softmax"
            )
        return "; ".join(note for note in notes if note) or None

    def routed_scale(self, shared_expert: bool) -> float:
        return 1.0 - SHARED_GATE_WEIGHT if shared_expert else 1.0

    def shared_expert_name(self, layer: int, projection: str) -> str:
        return f"model.layers.{layer}.mlp.shared_expert.{projection}.weight"

    def shared_gate_name(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.shared_expert_gate.weight"

    def config(self, base: dict[str, Any], layout: MoeLayout) -> dict[str, Any]:
        shared = base["intermediate_size"] if layout.shared_expert else self.zero_shared_expert_size
        return {**self.qwen_config(base, layout), "qkv_bias": True, "shared_expert_intermediate_size": shared}

    def expected_tensors(self, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        heads, head_dim = config["num_attention_heads"], attention_head_dim(config)
        kv = config.get("num_key_value_heads", heads) * head_dim
        biases = {"q_proj.bias": (heads * head_dim,), "k_proj.bias": (kv,), "v_proj.bias": (kv,)}
        shapes = {**dense_shapes(config, biases if config.get("qkv_bias", True) else {}), **self.routed_shapes(config)}
        hidden, shared = config["hidden_size"], config["shared_expert_intermediate_size"]
        dense = set(config.get("mlp_only_layers") or ())
        for layer in range(config["num_hidden_layers"]):
            if layer in dense:
                continue
            shapes[self.shared_expert_name(layer, "gate_proj")] = (shared, hidden)
            shapes[self.shared_expert_name(layer, "up_proj")] = (shared, hidden)
            shapes[self.shared_expert_name(layer, "down_proj")] = (hidden, shared)
            shapes[self.shared_gate_name(layer)] = (1, hidden)
        return shapes
