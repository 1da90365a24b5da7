"""Which decoder layers of a loaded MoE route, and their router modules: the one place the tools look for them.

A layer routes when it holds an MoE block (found by the output format's `moe_block`: a module with a router `gate`
beside its `experts`) whose router weight is not all zero. A layer that `moe_layers` left dense has no block in
Qwen2-MoE and Qwen3-MoE (`mlp_only_layers`). Mixtral has no dense layers, so the merge writes one as the same MLP
in every expert slot behind an all-zero router: a router that scores every expert alike chooses nothing, so that
layer does not route either. Routing accuracy, shares, request decisions and `layers` counts are over the routing
layers only; request routing restricts every block's router (on a dense Mixtral layer the experts are one MLP, so
that changes nothing).

With `output_router_logits`, transformers returns one logits tensor per block, in layer order (a dense Qwen
layer has none, a dense Mixtral layer has its all-zero router's); `routing_logits` keeps the routing layers'.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moemerge.errors import MoemergeError
from moemerge.files import MANIFEST, read_json_object
from moemerge.formats import format_of_config

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class MoeLayers:
    """A loaded MoE's blocks by layer, the layers that route, and how its merge scaled the routed experts."""

    blocks: dict[int, torch.nn.Module]  # layer → its MoE block, for every layer that has one, in layer order
    routing: tuple[int, ...]  # the layers whose router chooses
    # what the merge multiplied the routed experts by to make room for a shared expert it added (Qwen2-MoE's
    # `routed_scale`); None when the output has no such shared expert
    routed_scale: float | None = None

    @property
    def routers(self) -> dict[int, torch.nn.Module]:
        """Layer → router module, for the routing layers."""
        return {layer: self.blocks[layer].gate for layer in self.routing}

    def routing_logits(self, router_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """The model's `router_logits` (one per block) → [routing layers, tokens, experts]."""
        recorded = list(self.blocks)
        if len(router_logits) != len(recorded):
            raise MoemergeError(
                f"the model returned {len(router_logits)} router logits for {len(recorded)} MoE blocks; "
                "this transformers version records routers differently"
            )
        return torch.stack([router_logits[recorded.index(layer)] for layer in self.routing])


def _routed_scale(model: PreTrainedModel) -> float | None:
    """From the output's moemerge.json: the format's routed scale when the recipe had a shared expert."""
    manifest = Path(model.name_or_path or ".") / MANIFEST
    if not model.name_or_path or not manifest.is_file():
        return None
    recipe = read_json_object(manifest).get("recipe") or {}
    if not recipe.get("shared_experts"):
        return None
    return format_of_config(model.config.to_dict(), str(manifest)).routed_scale(True)


def moe_layers(model: PreTrainedModel) -> MoeLayers:
    """The model's MoE blocks and routing layers; refuses a model in which no layer routes."""
    fmt = format_of_config(model.config.to_dict(), model.name_or_path or type(model).__name__)
    found = {i: fmt.moe_block(model, i) for i in range(len(model.model.layers))}
    blocks = {i: block for i, block in found.items() if block is not None}
    routing = tuple(i for i, block in blocks.items() if bool(block.gate.weight.detach().any()))
    if not routing:
        raise MoemergeError(
            f"{model.name_or_path or type(model).__name__}: no layer routes (every router is all zero or missing), "
            "so there is no routing to show"
        )
    return MoeLayers(blocks, routing, _routed_scale(model))
