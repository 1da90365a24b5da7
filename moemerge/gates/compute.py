"""Pick the gate mode's method and return router weights for every layer."""

from __future__ import annotations

import gc
import logging
from collections import Counter
from dataclasses import dataclass, replace

import torch

from moemerge.gates.cheap_embed import embedding_prototypes
from moemerge.gates.hidden import hidden_prototypes
from moemerge.gates.random_gates import random_gates
from moemerge.gates.router_inputs import CaptureOptions, RouterInputs, pad_ready
from moemerge.gates.rows import router_rows, warn_parallel
from moemerge.gates.trained import TrainingReport, labelled_sample, token_budget, train_gates
from moemerge.hf import load_tokenizer
from moemerge.inputs.prompts import ExpertPrompts
from moemerge.inputs.recipe import Recipe
from moemerge.inputs.sources import ModelSource
from moemerge.progress import Progress

log = logging.getLogger("moemerge")


@dataclass
class GateResult:
    """float32 router weights [layers, experts, hidden], and the training report for trained gates."""

    rows: torch.Tensor
    report: TrainingReport | None = None


@dataclass
class GateContext:
    """What every gate method may need besides the recipe."""

    base: ModelSource
    num_layers: int
    hidden_size: int
    device: torch.device
    dtype: torch.dtype
    seed: int
    batch_size: int
    progress: Progress


def _cpu_has_native_bf16() -> bool:
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # no public API for this yet
    return bool(probe and probe())


def capture_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the base computes router inputs in: on CUDA the output dtype. On CPU bfloat16 when the
    output is bfloat16 and the CPU computes it natively (faster than float32 at the same routing accuracy and
    half the memory: benchmarks/capture_dtype.py, results in benchmarks/results/capture_dtype-*), else
    float32: emulated half precision is slow, and float16 on CPU loses accuracy."""
    if device.type == "cuda":
        return dtype
    return torch.bfloat16 if dtype == torch.bfloat16 and _cpu_has_native_bf16() else torch.float32


def _release(device: torch.device) -> None:
    """Return the capture's memory before writing starts."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _cheap_embed(ctx: GateContext, tokenizer, prompts: ExpertPrompts) -> tuple[torch.Tensor, torch.Tensor]:
    embed = ctx.base.tensors.load("model.embed_tokens.weight")
    prototypes = embedding_prototypes(embed, tokenizer, prompts.positive, prompts.negative, ctx.num_layers)
    # Without a forward pass, estimate the router input's norm from each post-attention norm's weight.
    norms = [f"model.layers.{i}.post_attention_layernorm.weight" for i in range(ctx.num_layers)]
    return prototypes, torch.stack([ctx.base.tensors.load(name).float().norm() for name in norms])


def _trained(ctx: GateContext, recipe: Recipe, tokenizer, prompts: ExpertPrompts) -> GateResult:
    """Fit the chosen layers; the others keep hidden-state gates from the same prompts."""
    spec = recipe.training
    budget = token_budget(ctx.hidden_size)
    every_text, every_label = [text for text, _ in prompts.labelled], [label for _, label in prompts.labelled]
    chosen = labelled_sample(tokenizer, every_text, every_label, spec, ctx.hidden_size)
    texts = [every_text[i] for i in chosen]
    labels = [every_label[i] for i in chosen]
    if len(chosen) < len(prompts.labelled):
        log.info(
            f"training: {len(chosen)} of {len(prompts.labelled)} labelled prompts fill the {budget}-token budget "
            "per layer; only those run through the base"
        )
    # checked by open_inputs: they exist and have routers; by default every layer with a router
    layers = spec.layers or recipe.moe_layers or list(range(ctx.num_layers))
    options = _capture_options(ctx, spec.batch_size)
    inputs = RouterInputs(ctx.base, tokenizer, texts, options, spec.max_tokens)
    advance = ctx.progress.task(f"router inputs on {ctx.device.type}", len(texts) * (max(layers) + 1))
    trained, report = train_gates(inputs, labels, len(recipe.experts), spec, layers, budget, advance)
    if len(chosen) < len(prompts.labelled):
        report = replace(report, labelled_prompts=len(prompts.labelled))
    rows = torch.zeros(ctx.num_layers, len(recipe.experts), ctx.hidden_size)
    rows[layers] = trained
    untrained = [layer for layer in range(ctx.num_layers) if layer not in layers]
    if untrained:
        # its own progress step: the merge's cancellation is checked at every batch (moemerge.gates.background)
        positive = _with_sampled_rows(prompts, chosen)
        total = sum(len(g) for g in (*positive, *prompts.negative)) * ctx.num_layers
        advance = ctx.progress.task(f"hidden states on {ctx.device.type}", total)
        prototypes, token_norm = hidden_prototypes(
            ctx.base, tokenizer, positive, prompts.negative, _capture_options(ctx, ctx.batch_size), advance
        )
        rows[untrained] = router_rows(prototypes, token_norm, recipe.gate_scale)[untrained]
    for layer, accuracy in zip(report.trained_layers, report.layer_accuracy, strict=True):
        log.info(f"layer {layer}: {report.accuracy_on} routing accuracy {accuracy:.3f}")
    return GateResult(rows, report)


def _with_sampled_rows(prompts: ExpertPrompts, chosen: list[int]) -> list[list[str]]:
    """Each expert's positive prompts with its dataset rows (appended last when the prompts were read) cut to
    the sampled ones, so the hidden pass for untrained layers does not grow with the labelled set either."""
    rows = Counter(label for _, label in prompts.labelled)
    sampled: list[list[str]] = [[] for _ in prompts.positive]
    for i in chosen:
        text, label = prompts.labelled[i]
        sampled[label].append(text)
    return [group[: len(group) - rows[e]] + sampled[e] for e, group in enumerate(prompts.positive)]


def _capture_options(ctx: GateContext, batch_size: int) -> CaptureOptions:
    return CaptureOptions(ctx.device, capture_dtype(ctx.device, ctx.dtype), batch_size)


def compute_gates(recipe: Recipe, prompts: ExpertPrompts, ctx: GateContext) -> GateResult:
    """Router weights for every layer; the capture's memory is freed before this returns."""
    if recipe.gate_mode in ("random", "uniform_random"):
        return GateResult(
            random_gates(recipe.gate_mode, ctx.num_layers, len(recipe.experts), ctx.hidden_size, ctx.seed)
        )
    tokenizer = pad_ready(load_tokenizer(ctx.base.path))
    if recipe.gate_mode == "cheap_embed":
        prototypes, token_norm = _cheap_embed(ctx, tokenizer, prompts)
    else:
        try:
            if recipe.gate_mode == "trained":
                return _trained(ctx, recipe, tokenizer, prompts)
            total = sum(len(g) for g in (*prompts.positive, *prompts.negative)) * ctx.num_layers
            advance = ctx.progress.task(f"hidden states on {ctx.device.type}", total)
            prototypes, token_norm = hidden_prototypes(
                ctx.base, tokenizer, prompts.positive, prompts.negative, _capture_options(ctx, ctx.batch_size), advance
            )
        finally:
            _release(ctx.device)
    rows = router_rows(prototypes, token_norm, recipe.gate_scale)
    warn_parallel(rows, recipe.expert_names())
    return GateResult(rows)
