"""What every MoE format we write shares with its dense base: config keys, rope settings, dense tensor shapes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Keys of a dense config that mean the same in every MoE config we write.
SHARED_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "attention_dropout",
)


@dataclass(frozen=True)
class MoeLayout:
    """The MoE's own sizes, chosen by the recipe, and the input family it is built from."""

    family: str
    num_experts: int
    experts_per_token: int
    shared_expert: bool
    dtype: str
    dense_layers: tuple[int, ...] = ()  # layers the recipe's moe_layers leaves dense


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


def dense_config(base: dict[str, Any], layout: MoeLayout) -> dict[str, Any]:
    """The part of config.json that comes from the base, with the choices every format makes alike.

    - head_dim is written explicitly: MoE readers otherwise assume hidden_size / num_attention_heads.
    - tie_word_embeddings is false: we write lm_head.weight (a copy of the embeddings for tied bases), so
      every consumer finds an output matrix whatever its tying support.
    """
    return {
        **{key: base[key] for key in SHARED_CONFIG_KEYS if key in base},
        "head_dim": attention_head_dim(base),
        "num_key_value_heads": base.get("num_key_value_heads", base["num_attention_heads"]),
        **rope_settings(base),
        "tie_word_embeddings": False,
        "num_experts_per_tok": layout.experts_per_token,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "use_cache": True,
        "torch_dtype": layout.dtype,
    }


def dense_shapes(config: dict[str, Any], attention_extras: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Every tensor outside the MoE blocks, with its shape: embeddings, norms, attention (plus `attention_extras`,
    keyed by the name after `self_attn.`, e.g. `q_proj.bias`)."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = attention_head_dim(config)
    kv_heads = config.get("num_key_value_heads", heads)
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    attention = {
        "q_proj.weight": (heads * head_dim, hidden),
        "k_proj.weight": (kv_heads * head_dim, hidden),
        "v_proj.weight": (kv_heads * head_dim, hidden),
        "o_proj.weight": (hidden, heads * head_dim),
        **attention_extras,
    }
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        shapes[f"{prefix}.input_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (hidden,)
        for name, shape in attention.items():
            shapes[f"{prefix}.self_attn.{name}"] = shape
    return shapes


def attention_head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
