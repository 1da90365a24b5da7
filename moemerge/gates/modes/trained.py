"""`trained`: routers fitted on a labelled set (gates/trained.py), the recipe's dataset_csv here; the fit
takes any in-memory (texts, labels), so a mode that makes its own labelled set calls fit_labelled too."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace

import torch

from moemerge.gates.modes.hidden import prompt_rows
from moemerge.gates.modes.mode import GateContext, GateMode, GateResult
from moemerge.gates.router_inputs import RouterInputs
from moemerge.gates.trained import labelled_sample, token_budget, train_gates
from moemerge.inputs.gate_modes import GATE_MODE_SPECS

log = logging.getLogger("moemerge")


def fit_labelled(ctx: GateContext, texts: list[str], labels: list[int], own_prompts: list[list[str]]) -> GateResult:
    """Fit the routers of recipe.training's layers on `texts` labelled by expert index (sampled to the token
    budget); the other layers keep hidden-state gates from each expert's `own_prompts` plus its sampled texts
    and the recipe's negative prompts."""
    recipe = ctx.recipe
    spec = recipe.training
    budget = token_budget(ctx.hidden_size)
    tokenizer = ctx.tokenizer()
    chosen = labelled_sample(tokenizer, texts, labels, spec, ctx.hidden_size)
    if len(chosen) < len(texts):
        log.info(
            f"training: {len(chosen)} of {len(texts)} labelled prompts fill the {budget}-token budget "
            "per layer; only those run through the base"
        )
    # checked by open_inputs: they exist and have routers; by default every layer with a router
    layers = spec.layers or recipe.moe_layers or list(range(ctx.num_layers))
    inputs = RouterInputs(
        ctx.base, tokenizer, [texts[i] for i in chosen], ctx.capture_options(spec.batch_size), spec.max_tokens
    )
    advance = ctx.progress.task(f"router inputs on {ctx.device.type}", len(chosen) * (max(layers) + 1))
    chosen_labels = [labels[i] for i in chosen]
    trained, report = train_gates(inputs, chosen_labels, len(recipe.experts), spec, layers, budget, advance)
    if len(chosen) < len(texts):
        report = replace(report, labelled_prompts=len(texts))
    rows = torch.zeros(ctx.num_layers, len(recipe.experts), ctx.hidden_size)
    rows[layers] = trained
    untrained = [layer for layer in range(ctx.num_layers) if layer not in layers]
    if untrained:
        positive = [list(group) for group in own_prompts]
        for i in chosen:
            positive[labels[i]].append(texts[i])
        rows[untrained] = prompt_rows(ctx, tokenizer, positive, ctx.prompts.negative)[untrained]
    for layer, accuracy in zip(report.trained_layers, report.layer_accuracy, strict=True):
        log.info(f"layer {layer}: {report.accuracy_on} routing accuracy {accuracy:.3f}")
    return GateResult(rows, report)


def compute(ctx: GateContext) -> GateResult:
    """Fit on the dataset's rows; gather_prompts appended them last to each expert's positive prompts, so the
    prompts before them are the expert's own."""
    labelled = ctx.prompts.labelled
    rows = Counter(label for _, label in labelled)
    own = [group[: len(group) - rows[e]] for e, group in enumerate(ctx.prompts.positive)]
    return fit_labelled(ctx, [text for text, _ in labelled], [label for _, label in labelled], own)


MODES = (GateMode(GATE_MODE_SPECS["trained"], compute),)
