"""What an MoE output format is to the merge: tensor names, config.json, the tensors a valid output holds."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

from moemerge.formats.common import MoeLayout
from moemerge.inputs.families import InputFamily, mlp_tensor


class OutputFormat(ABC):
    """One MoE layout we write. The merge core only ever talks to this interface, so a new format is one
    new module and one line in the registry."""

    name: str  # the recipe's `architecture:` value
    model_type: str
    class_name: str  # what AutoModelForCausalLM loads it as
    experts_key: str  # the config key holding the number of routed experts
    expert_size_key: str  # the config key holding a routed expert's intermediate size
    holds_shared_expert: bool = False
    holds_dense_layers: bool = False  # config.json can say a layer has a plain MLP (Qwen's mlp_only_layers)
    zero_shared_expert_size: int = 0  # the all-zero shared expert written when the recipe has none
    shared_gate_fill: float = 0.0  # every entry of the shared-expert gate
    refused_families: ClassVar[Mapping[str, str]] = {}  # input family → why this format cannot hold it

    def refusal(self, family: InputFamily, base_config: dict[str, Any]) -> str | None:
        """Why a base of `family` with this config cannot become this format; None when it can."""
        return self.refused_families.get(family.name)

    def zero_biases(self, family: InputFamily) -> tuple[str, ...]:
        """Attention projections whose bias this format's readers expect and the family lacks: written as
        zeros, which compute what the base computes."""
        return ()

    def caveat(self, layout: MoeLayout) -> str | None:
        """What a consumer of this format does differently from transformers, worth a warning at merge time."""
        return None

    @abstractmethod
    def gate_name(self, layer: int) -> str: ...

    @abstractmethod
    def expert_name(self, layer: int, expert: int, projection: str) -> str: ...

    def routed_scale(self, shared_expert: bool) -> float:
        """What the routed experts' down projections are multiplied by, so that with a shared expert the
        layer's output stays on the dense MLP's scale."""
        return 1.0

    def shared_expert_name(self, layer: int, projection: str) -> str:
        raise NotImplementedError(f"{self.name} has no shared expert")

    def shared_gate_name(self, layer: int) -> str:
        raise NotImplementedError(f"{self.name} has no shared expert")

    @abstractmethod
    def config(self, base: dict[str, Any], layout: MoeLayout) -> dict[str, Any]:
        """config.json for the MoE, from the dense base's config."""

    @abstractmethod
    def expected_tensors(self, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """Every tensor an output of this format with this config holds, with its shape."""

    def routed_shapes(self, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """The router and routed experts of every sparse layer, the plain MLP of every dense one
        (`mlp_only_layers`), with their shapes."""
        hidden, inter, count = config["hidden_size"], config[self.expert_size_key], config[self.experts_key]
        dense = set(config.get("mlp_only_layers") or ())
        shapes: dict[str, tuple[int, ...]] = {}
        for layer in range(config["num_hidden_layers"]):
            if layer in dense:
                size = config["intermediate_size"]
                shapes[mlp_tensor(layer, "gate_proj")] = (size, hidden)
                shapes[mlp_tensor(layer, "up_proj")] = (size, hidden)
                shapes[mlp_tensor(layer, "down_proj")] = (hidden, size)
                continue
            shapes[self.gate_name(layer)] = (count, hidden)
            for expert in range(count):
                shapes[self.expert_name(layer, expert, "gate_proj")] = (inter, hidden)
                shapes[self.expert_name(layer, expert, "up_proj")] = (inter, hidden)
                shapes[self.expert_name(layer, expert, "down_proj")] = (hidden, inter)
        return shapes

    def num_experts(self, config: dict[str, Any]) -> int:
        return int(config[self.experts_key])
