"""Open what a recipe names and check, from headers alone, that it fits together and the output format can
hold it: every problem with the inputs is found here, before a byte of output is written."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from moemerge.errors import MoemergeError
from moemerge.formats import choose_format
from moemerge.formats.format import OutputFormat
from moemerge.hub.download import HubFetcher
from moemerge.inputs.experts import Expert
from moemerge.inputs.families import DenseShape, check_expert_shape, check_tensor_names, dense_shape
from moemerge.inputs.lora import LoraAdapter
from moemerge.inputs.recipe import DTYPE_ADVICE, DTYPE_ALIASES, ExpertSpec, Recipe
from moemerge.inputs.sources import ModelSource, resolve_reference
from moemerge.inputs.vocab import vocab_mismatch
from moemerge.output.options import MergeOptions

log = logging.getLogger("moemerge")


@dataclass(frozen=True)
class Inputs:
    """Everything the recipe names, opened and checked against each other from headers alone."""

    base: ModelSource
    shape: DenseShape
    out_format: OutputFormat
    experts: list[Expert]
    shared: Expert | None
    dropped_tokens: dict[str, list[str]]  # expert label → added tokens the MoE leaves out

    def read_paths(self, recipe_path: Path, prompt_files: list[Path]) -> list[tuple[str, Path]]:
        """Everything the merge reads from disk, named for the message that refuses an OUT placed on it."""
        reads = [("the recipe", recipe_path), ("the source model", self.base.path)]
        for expert in self.experts + ([self.shared] if self.shared else []):
            reads.append(("the source model", expert.model.path))
            if expert.adapter is not None:
                reads.append(("the LoRA adapter", expert.adapter.path))
        return reads + [("the prompt file", path) for path in prompt_files]


def output_dtype(options: MergeOptions, recipe: Recipe, base: ModelSource) -> torch.dtype:
    """The option's dtype, else the recipe's dtype, else the base's own dtype."""
    name = options.dtype or recipe.dtype or base.config.get("torch_dtype") or base.config.get("dtype") or "float32"
    if str(name).lower() not in DTYPE_ALIASES:
        raise MoemergeError(f"dtype {name!r} is not supported; {DTYPE_ADVICE}")
    return getattr(torch, DTYPE_ALIASES[str(name).lower()])


def _open_expert(
    index: int,
    spec: ExpertSpec,
    key: str,
    recipe_dir: Path,
    base: ModelSource,
    opened: dict[Path, ModelSource],
    options: MergeOptions,
    hub: HubFetcher,
    down_scale: float,
    uses_non_expert: bool = False,
) -> Expert:
    """An expert's model folder (shared with the base when it is an adapter) and its adapter, opened lazily;
    `opened` holds the model folders opened so far, so each is opened once."""
    ref = resolve_reference(spec.source_model, f"{key}.source_model", recipe_dir, base.path, hub)
    model = opened.get(ref.model.resolve())
    if model is None:
        model = ModelSource(ref.model, f"{key}.source_model", options.allow_pickle)
        opened[ref.model.resolve()] = model
    adapter = LoraAdapter(ref.adapter, f"{key}.source_model", options.allow_pickle) if ref.adapter else None
    if adapter and adapter.ignored and not uses_non_expert:
        log.warning(
            f"{key}: adapter also changes {len(adapter.ignored)} non-MLP modules; only MLPs are used "
            "(non_expert_weights: average would use them too)"
        )
    return Expert(index, spec, model, adapter, options.seed, label=key, down_scale=down_scale)


def open_inputs(recipe: Recipe, recipe_dir: Path, options: MergeOptions, hub: HubFetcher) -> Inputs:
    """Open base and experts, and check from headers alone that they fit together and the output format can
    hold them."""
    base_ref = resolve_reference(recipe.base_model, "base_model", recipe_dir, None, hub)
    base = ModelSource(base_ref.model, "base_model", options.allow_pickle)
    shape = dense_shape(base)
    check_tensor_names(base, shape)
    has_shared = bool(recipe.shared_experts)
    out_format = choose_format(recipe.architecture, shape.family, base.config, len(recipe.shared_experts))
    opened: dict[Path, ModelSource] = {base.path.resolve(): base}
    averaged = recipe.non_expert_weights == "average"
    routed_scale = out_format.routed_scale(has_shared)
    experts = [
        _open_expert(i, spec, f"experts[{i}]", recipe_dir, base, opened, options, hub, routed_scale, averaged)
        for i, spec in enumerate(recipe.experts)
    ]
    shared = [
        _open_expert(len(experts) + i, spec, f"shared_experts[{i}]", recipe_dir, base, opened, options, hub, 1.0)
        for i, spec in enumerate(recipe.shared_experts)
    ]
    if shared and any(spec.positive_prompts or spec.negative_prompts for spec in recipe.shared_experts):
        log.warning("shared_experts[0]: prompts are not used; the shared expert's gate is a constant of about 0.5")
    dropped: dict[str, list[str]] = {}
    for expert in experts + shared:
        if expert.model is not base:
            check_expert_shape(shape, dense_shape(expert.model), expert.label)
            check_tensor_names(expert.model, shape)
        tokens = vocab_mismatch(
            base, expert.model, expert.tokenizer_folder(), expert.label, options.allow_vocab_mismatch
        )
        if tokens:
            log.warning(f"{expert.label}: {len(tokens)} added token(s) left out; the MoE uses the base's vocabulary")
            dropped[expert.label] = tokens
        expert.check(base, shape.num_layers, all_adapted=averaged and expert in experts)
    _check_layers(recipe, shape.num_layers)
    return Inputs(base, shape, out_format, experts, shared[0] if shared else None, dropped)


def _check_layers(recipe: Recipe, num_layers: int) -> None:
    """The layers the recipe names exist, and the layers it trains have routers: before any work, since the
    gates would otherwise refuse them only once the shards are being written."""
    beyond = [layer for layer in recipe.moe_layers or () if layer >= num_layers]
    if beyond:
        raise MoemergeError(f"moe_layers: layer {beyond[0]} does not exist; the base has {num_layers} layers")
    trained = recipe.training.layers or []
    beyond = [layer for layer in trained if layer >= num_layers]
    if beyond:
        raise MoemergeError(f"training.layers: layer {beyond[0]} does not exist; the base has {num_layers} layers")
    dense = [layer for layer in trained if recipe.moe_layers is not None and layer not in recipe.moe_layers]
    if dense:
        raise MoemergeError(
            f"training.layers: layer {dense[0]} stays dense (moe_layers: {recipe.moe_layers}), so it has no router to "
            "train; list layers from moe_layers"
        )
