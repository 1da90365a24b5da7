"""The main job: recipe → checked plan → gates → streamed shards in a partial folder → renamed into place."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as validated_dataclass

from moemerge.build.card import base_license, model_card
from moemerge.build.plan import build_plan
from moemerge.build.staging import check_output, output_folder, staged_output
from moemerge.build.writer import PlannedTensor, write_json, write_shards
from moemerge.device import resolve_device
from moemerge.errors import MoemergeError
from moemerge.formats import choose_format
from moemerge.formats.common import MoeLayout
from moemerge.formats.format import OutputFormat
from moemerge.gates.compute import GateContext, compute_gates
from moemerge.gates.on_moe import tune_on_moe
from moemerge.hub.download import HubFetcher
from moemerge.inputs.experts import Expert
from moemerge.inputs.families import DenseShape, check_expert_shape, check_tensor_names, dense_shape
from moemerge.inputs.lora import LoraAdapter
from moemerge.inputs.prompts import gather_prompts
from moemerge.inputs.recipe import DTYPE_ALIASES, ExpertSpec, Recipe, load_recipe
from moemerge.inputs.sources import SIDE_FILES, ModelSource, resolve_reference
from moemerge.inputs.vocab import vocab_mismatch
from moemerge.progress import Progress, Silent
from moemerge.tools.verify import DIGESTS, MANIFEST, check_structure

log = logging.getLogger("moemerge")
RECIPE_COPY = "moemerge_recipe.yaml"
TRAINING_REPORT = "gate_training.json"
TUNING_REPORT = "router_tuning.json"


MAX_SEED = 2**63 - 1  # torch generators take 64 bits; the per-tensor noise seeds are taken modulo 2**63


@validated_dataclass(config=ConfigDict(strict=True))
class MergeOptions:
    """Command-line switches, the same for the CLI and the Python API; ranges are checked on creation (a
    pydantic ValidationError; `options_from` turns it into a one-line MoemergeError naming the option)."""

    device: str = "auto"
    dtype: str | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = 0
    shard_size: Annotated[int, Field(gt=0)] = 5_000_000_000
    force: bool = False
    allow_pickle: bool = False
    allow_vocab_mismatch: bool = False  # build with the base's vocabulary when experts added tokens
    batch_size: Annotated[int, Field(ge=1)] = 32
    hub_repo_id: str | None = None  # the Hub repo the output is meant for: named in the model card (cli pushes)


def options_from(**values: object) -> MergeOptions:
    """MergeOptions from command-line values; an out-of-range one is named as its option, in one line."""
    try:
        return MergeOptions(**values)  # type: ignore[arg-type]
    except ValidationError as exc:
        error = exc.errors()[0]
        option = "--" + str(error["loc"][0]).replace("_", "-")
        raise MoemergeError(f"{option} {error['input']}: {error['msg'].lower()}") from None


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


def _output_dtype(options: MergeOptions, recipe: Recipe, base: ModelSource) -> torch.dtype:
    """--dtype, else the recipe's dtype, else the base's own dtype."""
    name = options.dtype or recipe.dtype or base.config.get("torch_dtype") or base.config.get("dtype") or "float32"
    if str(name).lower() not in DTYPE_ALIASES:
        raise MoemergeError(f"dtype {name!r} is not supported; use bfloat16, float16 or float32")
    return getattr(torch, DTYPE_ALIASES[str(name).lower()])


@dataclass
class Inputs:
    """Everything the recipe names, opened and checked against each other from headers alone."""

    base: ModelSource
    shape: DenseShape
    output: OutputFormat
    experts: list[Expert]
    shared: Expert | None
    dropped_tokens: dict[str, list[str]]  # expert label → added tokens the MoE leaves out


def _open_expert(
    index: int,
    spec: ExpertSpec,
    key: str,
    recipe_dir: Path,
    base: ModelSource,
    opened: dict[Path, ModelSource],
    options: MergeOptions,
    hub: HubFetcher | None,
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
    return Expert(index, spec, model, adapter, options.seed, label=key)


def _copy_side_files(base: ModelSource, out: Path) -> None:
    """Tokenizer, chat template and generation config byte for byte: what the base ships is what we ship,
    with one exception, made for compatibility: transformers 5 names its fast tokenizer class
    `TokenizersBackend`, which transformers 4 cannot load; `PreTrainedTokenizerFast` reads the same
    tokenizer.json in both (checked by tests/compat/check_consumers.py)."""
    for name in SIDE_FILES:
        if (base.path / name).is_file():
            shutil.copyfile(base.path / name, out / name)
    tokenizer_config = out / "tokenizer_config.json"
    if tokenizer_config.is_file() and (out / "tokenizer.json").is_file():
        try:
            config = json.loads(tokenizer_config.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return  # copied as it is; transformers will say what is wrong with it
        if isinstance(config, dict) and config.get("tokenizer_class") == "TokenizersBackend":
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            write_json(tokenizer_config, config)


def _open_and_check(recipe: Recipe, recipe_dir: Path, options: MergeOptions, hub: HubFetcher) -> Inputs:
    """Open base and experts, and check from headers alone that they fit together and the output format can
    hold them: every problem is found before a byte of output is written."""
    base_ref = resolve_reference(recipe.base_model, "base_model", recipe_dir, None, hub)
    base = ModelSource(base_ref.model, "base_model", options.allow_pickle)
    shape = dense_shape(base)
    check_tensor_names(base, shape)
    output = choose_format(recipe.architecture, shape.family, base.config, bool(recipe.shared_experts))
    opened: dict[Path, ModelSource] = {base.path.resolve(): base}
    averaged = recipe.non_expert_weights == "average"
    experts = [
        _open_expert(i, spec, f"experts[{i}]", recipe_dir, base, opened, options, hub, averaged)
        for i, spec in enumerate(recipe.experts)
    ]
    shared = [
        _open_expert(len(experts) + i, spec, f"shared_experts[{i}]", recipe_dir, base, opened, options, hub)
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
    beyond = [layer for layer in recipe.moe_layers or () if layer >= shape.num_layers]
    if beyond:
        raise MoemergeError(f"moe_layers: layer {beyond[0]} does not exist; the base has {shape.num_layers} layers")
    for expert in experts:
        expert.down_scale = output.routed_scale(bool(shared))
    return Inputs(base, shape, output, experts, shared[0] if shared else None, dropped)


def _read_paths(recipe_path: Path, inputs: Inputs, prompt_files: list[Path]) -> list[tuple[str, Path]]:
    """Everything the merge reads from disk, named for the message that refuses an OUT placed on it."""
    reads = [("the recipe", recipe_path), ("the source model", inputs.base.path)]
    for expert in inputs.experts + ([inputs.shared] if inputs.shared else []):
        reads.append(("the source model", expert.model.path))
        if expert.adapter is not None:
            reads.append(("the LoRA adapter", expert.adapter.path))
    return reads + [("the prompt file", path) for path in prompt_files]


def _check_plan(plan: list[PlannedTensor], expected: dict[str, tuple[int, ...]], output: str) -> None:
    """The plan holds exactly the tensors the config implies, before any byte is written: a base that lacks
    one its family should have (a bias, a q/k norm) is named now rather than found by the final check."""
    planned = {tensor.name: tensor.shape for tensor in plan}
    for name, shape in expected.items():
        if name not in planned:
            raise MoemergeError(f"base_model: tensor {name} is missing, and a {output} output needs it")
        if planned[name] != shape:
            raise MoemergeError(
                f"base_model: tensor {name} is {list(planned[name])}, config.json implies {list(shape)}"
            )
    for name in planned.keys() - expected.keys():
        raise MoemergeError(f"base_model: tensor {name} has no place in a {output} output")


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
    inputs = _open_and_check(recipe, recipe_path.parent, options, hub)
    base, shape, experts = inputs.base, inputs.shape, inputs.experts
    dtype = _output_dtype(options, recipe, base)
    prompts = gather_prompts(recipe, recipe_path.parent)
    check_output(out, options.force, _read_paths(recipe_path, inputs, prompts.files))
    tuning_prompts = prompts.labelled or [(text, e) for e, group in enumerate(prompts.positive) for text in group]
    if recipe.training.tune_on_moe and len({label for _, label in tuning_prompts}) < 2:
        raise MoemergeError(
            "training.tune_on_moe: routers are tuned on labelled prompts of at least two experts; give the experts "
            "positive_prompts or a dataset_csv"
        )

    moe_layers = recipe.moe_layers if recipe.moe_layers is not None else range(shape.num_layers)
    dense_layers = tuple(layer for layer in range(shape.num_layers) if layer not in moe_layers)
    layout = MoeLayout(
        shape.family.name,
        len(experts),
        recipe.experts_per_token,
        inputs.shared is not None,
        str(dtype).removeprefix("torch."),
        dense_layers,
    )
    config = inputs.output.config(base.config, layout)
    if caveat := inputs.output.caveat(layout):
        log.warning(f"{inputs.output.name}: {caveat}")
    gates: dict[str, torch.Tensor] = {}
    plan = build_plan(
        inputs.output,
        base,
        shape,
        experts,
        inputs.shared,
        dtype,
        lambda layer: gates["rows"][layer],
        recipe.non_expert_weights,
        frozenset(dense_layers),
    )
    _check_plan(plan, inputs.output.expected_tensors(config), inputs.output.name)
    context = GateContext(
        base, shape.num_layers, shape.hidden_size, device, dtype, options.seed, options.batch_size, progress
    )
    result = compute_gates(recipe, prompts, context)
    gates["rows"] = result.rows

    total = sum(t.numel for t in plan)
    per_expert = sum(t.numel for t in plan if ".experts.0." in t.name)
    active = total - per_expert * (len(experts) - recipe.experts_per_token)
    names = recipe.expert_names()
    with staged_output(out, options.force) as partial:
        advance = progress.task("writing shards", sum(t.nbytes for t in plan))
        index, digests = write_shards(plan, partial, options.shard_size, advance)
        write_json(partial / "config.json", config)
        _copy_side_files(base, partial)
        if recipe.training.tune_on_moe:
            sparse = [layer for layer in range(shape.num_layers) if layer not in dense_layers]
            tuned = tune_on_moe(partial, inputs.output, sparse, tuning_prompts, len(experts), recipe.training)
            write_json(partial / TUNING_REPORT, tuned.as_dict())
            digests |= tuned.shard_sha256
        recipe_text = recipe_path.read_text(encoding="utf-8")
        (partial / RECIPE_COPY).write_text(recipe_text, encoding="utf-8")
        write_json(
            partial / MANIFEST,
            {
                "expert_names": names,
                "gate_mode": recipe.gate_mode,
                "experts_per_token": recipe.experts_per_token,
                "seed": options.seed,
                "recipe": recipe.model_dump(mode="json"),
                "sources": hub.sources,
                "architecture": inputs.output.name,
                "dropped_tokens": inputs.dropped_tokens,
                DIGESTS: digests,  # checked by `moemerge verify`
            },
        )
        if result.report is not None:
            write_json(partial / TRAINING_REPORT, result.report.as_dict())
        stats = {"name": out.name, "layers": shape.num_layers, "total_params": total, "active_params": active}
        stats |= {"model_type": inputs.output.model_type, "class_name": inputs.output.class_name, "caveat": caveat}
        stats["dtype"] = str(dtype).removeprefix("torch.")
        training = result.report.as_dict() if result.report is not None else None
        card = model_card(
            recipe, recipe_text, stats, base_license(base.path, base.config), hub.sources, training, options.hub_repo_id
        )
        (partial / "README.md").write_text(card, encoding="utf-8")
        check_structure(partial)
    return MergeSummary(
        out,
        names,
        shape.num_layers,
        total,
        active,
        int(index["metadata"]["total_size"]),
        time.perf_counter() - started,
    )
