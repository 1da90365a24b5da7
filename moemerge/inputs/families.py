"""Input families: which dense architectures we read, and the names of their tensors.

All four share the SwiGLU MLP (gate/up/down_proj) the experts come from; they differ in attention only,
which the MoE copies from the base as it is. Each family is one line of FAMILIES.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moemerge.errors import MoemergeError
from moemerge.inputs.sources import ModelSource


@dataclass(frozen=True)
class InputFamily:
    """A dense family: what its attention holds beyond q/k/v/o weights, the MoE format it becomes, and
    whether its `sliding_window` is in force (Qwen configs carry one that only `use_sliding_window` turns on)."""

    name: str
    attention_extras: tuple[str, ...]
    default_output: str
    windowed: bool = False

    def sliding_window(self, config: dict) -> int | None:
        """The window every layer attends through, or None for full attention."""
        window = config.get("sliding_window") if self.windowed else None
        return window if window and window < config.get("max_position_embeddings", window + 1) else None


FAMILIES = {
    "LlamaForCausalLM": InputFamily("llama", (), "mixtral"),
    "MistralForCausalLM": InputFamily("mistral", (), "mixtral", windowed=True),
    "Qwen2ForCausalLM": InputFamily("qwen2", ("q_proj.bias", "k_proj.bias", "v_proj.bias"), "qwen2_moe"),
    "Qwen3ForCausalLM": InputFamily("qwen3", ("q_norm.weight", "k_norm.weight"), "qwen3_moe"),
}
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
EMBEDDINGS = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
_GLOBAL_TENSORS = (EMBEDDINGS, "model.norm.weight", LM_HEAD)
# Config switches that add weights no output format holds.
_REFUSED_FLAGS = {
    "attention_bias": "an o_proj bias (and q/k/v biases outside Qwen2), which no MoE format moemerge writes holds",
    "mlp_bias": "MLP biases, which no MoE format moemerge writes holds",
    "use_sliding_window": "a sliding window on some layers only, which moemerge does not carry over",
}


@dataclass(frozen=True)
class DenseShape:
    """The family and sizes every expert must share with the base."""

    family: InputFamily
    num_layers: int
    hidden_size: int
    intermediate_size: int


def mlp_tensor(layer: int, projection: str) -> str:
    return f"model.layers.{layer}.mlp.{projection}.weight"


def stored_name(source: ModelSource, name: str) -> str:
    """Where `source` keeps the weight `name`: a tied model's lm_head is its embeddings."""
    return EMBEDDINGS if name == LM_HEAD and not source.tensors.has(name) else name


def dense_shape(source: ModelSource) -> DenseShape:
    """Check the folder is a family we read, and return its sizes; name the architecture otherwise."""
    config = source.config
    architectures = config.get("architectures") or [config.get("model_type", "unknown")]
    arch = architectures[0]
    if arch not in FAMILIES:
        raise MoemergeError(
            f"{source.label}: architecture {arch} is not supported; moemerge reads {', '.join(FAMILIES)} models"
        )
    for flag, what in _REFUSED_FLAGS.items():
        if config.get(flag):
            raise MoemergeError(f"{source.label}: {flag} is true: {what}")
    if config.get("hidden_act", "silu") != "silu":
        raise MoemergeError(f"{source.label}: hidden_act {config['hidden_act']!r}; MoE experts use silu")
    try:
        return DenseShape(
            FAMILIES[arch],
            int(config["num_hidden_layers"]),
            int(config["hidden_size"]),
            int(config["intermediate_size"]),
        )
    except KeyError as exc:
        raise MoemergeError(f"{source.path / 'config.json'}: missing key {exc.args[0]}") from None


def _layer_tensor_pattern(family: InputFamily) -> re.Pattern[str]:
    attention = "|".join(
        re.escape(name)
        for name in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", *family.attention_extras)
    )
    return re.compile(
        rf"model\.layers\.(\d+)\.(?:(?:input_layernorm|post_attention_layernorm|mlp\.(?:gate|up|down)_proj)\.weight"
        rf"|self_attn\.(?:{attention}))"
    )


def check_tensor_names(source: ModelSource, shape: DenseShape) -> None:
    """Every tensor must be a floating-point one we know where to put; a stray tensor (say, a bias Llama
    should not have) is refused by name."""
    pattern = _layer_tensor_pattern(shape.family)
    for name in source.tensors.names():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if not source.tensors.dtype(name).is_floating_point:
            dtype = str(source.tensors.dtype(name)).removeprefix("torch.")
            raise MoemergeError(f"{source.label}: tensor {name} is {dtype}; model weights are floating point")
        if name in _GLOBAL_TENSORS:
            continue
        match = pattern.fullmatch(name)
        if match is None:
            raise MoemergeError(
                f"{source.label}: unexpected tensor {name}; moemerge reads plain {shape.family.name} weights"
            )
        if int(match.group(1)) >= shape.num_layers:
            raise MoemergeError(f"{source.label}: tensor {name} is beyond num_hidden_layers={shape.num_layers}")


def copied_tensors(source: ModelSource) -> list[str]:
    """The base tensors the MoE shares verbatim: everything but the MLPs (and rotary caches)."""
    return [n for n in source.tensors.names() if ".mlp." not in n and not n.endswith("rotary_emb.inv_freq")]


def check_expert_shape(base: DenseShape, expert: DenseShape, label: str) -> None:
    """An expert must be the same network as the base up to its weights; say which size differs.

    The vocabulary is checked apart (moemerge.inputs.vocab), since it has a way out."""
    if expert.family != base.family:
        raise MoemergeError(
            f"{label}: a {expert.family.name} model, but the base is {base.family.name}; experts must match the base"
        )
    for field in ("num_layers", "hidden_size", "intermediate_size"):
        want, got = getattr(base, field), getattr(expert, field)
        if want != got:
            raise MoemergeError(
                f"{label}: {field} is {got} but the base model's is {want}; experts must match the base"
            )
