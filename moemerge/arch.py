"""Input families: which dense architectures we read, and the names of their tensors.

Llama and Mistral share one layout (SwiGLU MLP, no attention bias), so one map serves both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moemerge.errors import MoemergeError
from moemerge.sources import ModelSource

SUPPORTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_LAYER_TENSOR = re.compile(
    r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm|self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)"
    r"\.weight"
)
_GLOBAL_TENSORS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


@dataclass(frozen=True)
class DenseShape:
    """The sizes every expert must share with the base."""

    family: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int


def mlp_tensor(layer: int, projection: str) -> str:
    return f"model.layers.{layer}.mlp.{projection}.weight"


def dense_shape(source: ModelSource) -> DenseShape:
    """Check the folder is a family we read, and return its sizes; name the architecture otherwise."""
    config = source.config
    architectures = config.get("architectures") or [config.get("model_type", "unknown")]
    arch = architectures[0]
    if arch not in SUPPORTED:
        raise MoemergeError(
            f"{source.label}: architecture {arch} is not supported; moemerge reads {', '.join(SUPPORTED)} models"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise MoemergeError(f"{source.label}: {flag} is true, which a Mixtral output cannot hold")
    if config.get("hidden_act", "silu") != "silu":
        raise MoemergeError(f"{source.label}: hidden_act {config['hidden_act']!r}; Mixtral experts use silu")
    try:
        return DenseShape(
            SUPPORTED[arch],
            int(config["num_hidden_layers"]),
            int(config["hidden_size"]),
            int(config["intermediate_size"]),
            int(config["vocab_size"]),
        )
    except KeyError as exc:
        raise MoemergeError(f"{source.path / 'config.json'}: missing key {exc.args[0]}") from None


def check_tensor_names(source: ModelSource, shape: DenseShape) -> None:
    """Every tensor must be one we know where to put; an attention bias or a stray tensor is refused by name."""
    for name in source.tensors.names():
        if name in _GLOBAL_TENSORS or name.endswith("rotary_emb.inv_freq"):
            continue
        match = _LAYER_TENSOR.fullmatch(name)
        if match is None:
            raise MoemergeError(f"{source.label}: unexpected tensor {name}; moemerge reads plain Llama/Mistral weights")
        if int(match.group(1)) >= shape.num_layers:
            raise MoemergeError(f"{source.label}: tensor {name} is beyond num_hidden_layers={shape.num_layers}")


def copied_tensors(source: ModelSource) -> list[str]:
    """The base tensors the MoE shares verbatim: everything but the MLPs (and rotary caches)."""
    return [n for n in source.tensors.names() if ".mlp." not in n and not n.endswith("rotary_emb.inv_freq")]


def check_expert_shape(base: DenseShape, expert: DenseShape, label: str) -> None:
    """An expert must be the same network as the base up to its weights; say which size differs."""
    for field in ("num_layers", "hidden_size", "intermediate_size", "vocab_size"):
        want, got = getattr(base, field), getattr(expert, field)
        if want != got:
            raise MoemergeError(
                f"{label}: {field} is {got} but the base model's is {want}; experts must match the base"
            )
