"""What an MoE output format is to the merge: tensor names, config.json, the tensors a valid output holds."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from moemerge.formats.common import MoeLayout
from moemerge.inputs.families import InputFamily, mlp_tensor

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Gating:
    """How a sparse layer of the format weighs its experts, as its readers (transformers, vLLM) compute it: the
    router's softmax over the routed experts, its top k, then these choices."""

    renormalised_top_k: bool = True  # the top-k weights are divided by their sum (Qwen's norm_topk_prob)
    shared_expert_gate: bool = False  # each shared expert's output is scaled by sigmoid(gate · h), a [1, hidden] gate


class OutputFormat(ABC):
    """One MoE layout we write. The merge core only ever talks to this interface, so a new format is one
    new module and one line in the registry."""

    name: str  # the recipe's `architecture:` value
    title: str  # the format's name in prose (help, README, compatibility table)
    model_type: str
    class_name: str  # what AutoModelForCausalLM loads it as
    experts_key: str  # the config key holding the number of routed experts
    expert_size_key: str  # the config key holding a routed expert's intermediate size
    shared_experts: int = 0  # shared experts a sparse layer can hold beside the routed ones (a recipe's at most)
    gating: Gating = Gating()
    holds_dense_layers: bool = False  # config.json can say a layer has a plain MLP (Qwen's mlp_only_layers)
    zero_shared_expert_size: int = 0  # the all-zero shared expert written when the recipe has none
    shared_gate_fill: float = 0.0  # every entry of the shared-expert gate
    moe_attributes: tuple[str, ...] = ("mlp",)  # the loaded decoder layer's attribute holding its MoE block
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

    def moe_block(self, model: torch.nn.Module, layer: int) -> torch.nn.Module | None:
        """Layer `layer`'s MoE block in a model transformers loaded from this format: the module holding the
        router (`.gate`) and the routed experts (`.experts`). None for a dense layer (mlp_only_layers)."""
        decoder = model.model.layers[layer]
        for attribute in self.moe_attributes:
            block = getattr(decoder, attribute, None)
            if hasattr(block, "gate") and hasattr(block, "experts"):
                return block
        return None
