"""Output format: the classic Hub Mixtral layout and its config.json, readable by every Mixtral consumer."""

from __future__ import annotations

from typing import Any

MLP_TO_MIXTRAL = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
# Keys of a Llama/Mistral config that mean the same in a Mixtral config.
SHARED_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "attention_dropout",
)


def gate_name(layer: int) -> str:
    return f"model.layers.{layer}.block_sparse_moe.gate.weight"


def expert_name(layer: int, expert: int, projection: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{MLP_TO_MIXTRAL[projection]}.weight"


def rope_settings(base: dict[str, Any]) -> dict[str, Any]:
    """Rope in the classic keys (rope_theta, rope_scaling) that transformers 4 and 5, vLLM and llama.cpp read.

    transformers 5 writes `rope_parameters`; older readers ignore it, so we translate it back.
    """
    params = dict(base.get("rope_parameters") or {})
    theta = base.get("rope_theta", params.pop("rope_theta", 10000.0))
    scaling = base.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    return {"rope_theta": theta, "rope_scaling": scaling}


def mixtral_config(base: dict[str, Any], num_experts: int, experts_per_token: int, dtype: str) -> dict[str, Any]:
    """config.json for the MoE: the base's sizes, with deliberate choices where Mixtral differs.

    - head_dim is written explicitly: Mixtral readers otherwise assume hidden_size / num_attention_heads.
    - tie_word_embeddings is false: we write lm_head.weight (a copy of the embeddings for tied bases), so
      every consumer finds an output matrix whatever its tying support.
    - sliding_window comes from the base, whose attention the MoE uses (None for Llama bases).
    """
    config: dict[str, Any] = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        **{key: base[key] for key in SHARED_CONFIG_KEYS if key in base},
        "head_dim": base.get("head_dim") or base["hidden_size"] // base["num_attention_heads"],
        "num_key_value_heads": base.get("num_key_value_heads", base["num_attention_heads"]),
        **rope_settings(base),
        "sliding_window": base.get("sliding_window"),
        "tie_word_embeddings": False,
        "num_local_experts": num_experts,
        "num_experts_per_tok": experts_per_token,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    return config
