"""The main job: recipe → checked inputs → checked plan → gates, computed while the streamed shards are
written in a partial folder → records → renamed into place. Each step lives in its own module; this one
only runs them in order."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path

from moemerge.device import resolve_device
from moemerge.errors import MoemergeError
from moemerge.files import CONFIG
from moemerge.formats.common import MoeLayout
from moemerge.formats.structure import check_structure
from moemerge.gates.background import gates_in_background
from moemerge.gates.modes import compute_gates
from moemerge.gates.modes.mode import GateContext, GateResult
from moemerge.hub.download import HubFetcher
from moemerge.inputs.prompts import gather_prompts
from moemerge.inputs.recipe import Recipe, load_recipe
from moemerge.output.on_moe import tune_on_moe
from moemerge.output.open_inputs import Inputs, open_inputs, output_dtype
from moemerge.output.options import MergeOptions
from moemerge.output.plan import build_plan, check_plan, parameter_counts
from moemerge.output.records import Made, write_records
from moemerge.output.routing_picture import draw_routing_picture
from moemerge.output.side_files import copy_side_files
from moemerge.output.staging import check_output, output_folder, staged_output
from moemerge.output.writer import PlannedTensor, rewrite_tensors, write_json, write_shards
from moemerge.progress import Progress, Silent

log = logging.getLogger("moemerge")
TUNING_REPORT = "router_tuning.json"


@dataclass
class MergeSummary:
    """What was written, for the closing summary."""

    out: Path
    experts: list[str]
    layers: int
    total_params: int
    active_params: int
    bytes_written: int
    seconds: float


def _layout(recipe: Recipe, inputs: Inputs, dtype_name: str) -> MoeLayout:
    """The MoE's shape: experts, top-k, shared expert, dtype, and which layers stay dense."""
    layers = inputs.shape.num_layers
    moe_layers = recipe.moe_layers if recipe.moe_layers is not None else range(layers)
    dense_layers = tuple(layer for layer in range(layers) if layer not in moe_layers)
    family = inputs.shape.family.name
    shared = inputs.shared is not None
    return MoeLayout(family, len(inputs.experts), recipe.experts_per_token, shared, dtype_name, dense_layers)


def _tuning_prompts(recipe: Recipe, labelled: list[tuple[str, int]], positive: list[list[str]]) -> list:
    """The labelled prompts that tune routers on the MoE: the dataset's rows, and each expert's positive prompts
    where the dataset has no rows of it. An expert with no prompt at all would be tuned never to be chosen (and
    held-out accuracy, measured without it, would not show it), so it is refused before any work."""
    covered = {label for _, label in labelled}
    prompts = list(labelled)
    for e, group in enumerate(positive):
        if e not in covered:
            prompts += [(text, e) for text in group]
    if not recipe.training.tune_on_moe:
        return prompts
    names, found = recipe.expert_names(), {label for _, label in prompts}
    if len(found) < 2:
        raise MoemergeError(
            "training.tune_on_moe: routers are tuned on labelled prompts of at least two experts; give the experts "
            "positive_prompts or a dataset_csv"
        )
    for e in range(len(positive)):
        if e not in found:
            raise MoemergeError(
                f"training.tune_on_moe: experts[{e}] ({names[e]}) has no positive prompts or dataset rows to tune "
                "on, so tuning would learn never to route to it; give it positive_prompts"
            )
        if labelled and e not in covered:
            log.warning(
                f"training.tune_on_moe: experts[{e}] ({names[e]}) has no rows in {Path(recipe.dataset_csv).name}; "
                "its positive prompts stand in for them, so that tuning does not learn never to route to it"
            )
    return prompts


def _unless_gates_refused(advance: Callable[[int], None], pending: Future[GateResult]) -> Callable[[int], None]:
    """The writing's progress, which stops the writing at the next tensor once the gate pass has refused its
    input (hidden states that overflow, no room for the activation spill): otherwise that error comes at the
    routers, after every shard. Other gate errors still wait for the routers, so that a bad source tensor is
    named by the writer first."""

    def checked(units: int) -> None:
        if pending.done() and isinstance(error := pending.exception(), MoemergeError):
            raise error
        advance(units)

    return checked


def _plan(inputs: Inputs, recipe: Recipe, layout: MoeLayout, gates, dtype) -> list[PlannedTensor]:
    return build_plan(
        inputs.out_format,
        inputs.base,
        inputs.shape,
        inputs.experts,
        inputs.shared,
        dtype,
        gates,
        recipe.non_expert_weights,
        frozenset(layout.dense_layers),
    )


def merge(
    recipe_path: str | Path, out: str | Path, options: MergeOptions | None = None, progress: Progress | None = None
) -> MergeSummary:
    """Build the MoE described by `recipe_path` into the folder `out`; nothing appears at `out` on failure."""
    options = options or MergeOptions()
    progress = progress or Silent()
    started = time.perf_counter()
    recipe_path, out = Path(recipe_path), output_folder(Path(out))
    recipe = load_recipe(recipe_path)
    device = resolve_device(options.device)
    check_output(out, options.force, [("the recipe", recipe_path)])  # before any download
    hub = HubFetcher(options.allow_pickle, progress=progress)  # Hub ids → cached folders; records commits
    inputs = open_inputs(recipe, recipe_path.parent, options, hub)
    base, shape, experts, out_format = inputs.base, inputs.shape, inputs.experts, inputs.out_format
    dtype = output_dtype(options, recipe, base)
    prompts = gather_prompts(recipe, recipe_path.parent)
    check_output(out, options.force, inputs.read_paths(recipe_path, prompts.files))
    tuning_prompts = _tuning_prompts(recipe, prompts.labelled, prompts.positive)

    layout = _layout(recipe, inputs, str(dtype).removeprefix("torch."))
    config = out_format.config(base.config, layout)
    if caveat := out_format.caveat(layout):
        log.warning(f"{out_format.name}: {caveat}")
    check_plan(_plan(inputs, recipe, layout, None, dtype), out_format.expected_tensors(config), out_format.name)
    context = GateContext(
        recipe,
        prompts,
        base,
        experts,
        shape.num_layers,
        shape.hidden_size,
        device,
        dtype,
        options.seed,
        options.batch_size,
        progress,
    )
    with (
        gates_in_background(lambda shown: compute_gates(replace(context, progress=shown)), progress) as pending,
        staged_output(out, options.force) as partial,
    ):
        plan = _plan(inputs, recipe, layout, lambda: pending.result().rows, dtype)
        advance = _unless_gates_refused(progress.task("writing shards", sum(t.nbytes for t in plan)), pending)
        index, digests = write_shards(plan, partial, options.shard_size, advance)
        gates = pending.result()
        write_json(partial / CONFIG, config)
        copy_side_files(base.path, partial)
        sparse = [layer for layer in range(shape.num_layers) if layer not in layout.dense_layers]
        if recipe.training.tune_on_moe:
            tuned = tune_on_moe(partial, out_format, sparse, tuning_prompts, len(experts), recipe.training)
            write_json(partial / TUNING_REPORT, tuned.as_dict())
            digests |= rewrite_tensors(partial, tuned.routers)
        gate_names = {layer: out_format.gate_name(layer) for layer in sparse}
        picture = draw_routing_picture(partial, context, gate_names)  # after tuning: final routers
        total, active = parameter_counts(plan, out_format, shape.num_layers, len(experts), recipe.experts_per_token)
        recipe_text = recipe_path.read_text(encoding="utf-8")
        made = Made(
            recipe,
            recipe_text,
            options,
            inputs,
            hub.sources,
            digests,
            gates.report,
            caveat,
            dtype,
            total,
            active,
            gates.written,
            picture,
        )
        write_records(partial, out.name, made)
        check_structure(partial)
    return MergeSummary(
        out,
        recipe.expert_names(),
        shape.num_layers,
        total,
        active,
        int(index["metadata"]["total_size"]),
        time.perf_counter() - started,
    )
