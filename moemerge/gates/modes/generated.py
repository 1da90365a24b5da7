"""`generated`: the experts write their own labelled set from their positive prompts (gates/expert_texts.py),
and the routers are fitted on it exactly as `trained` gates are fitted on a dataset (modes/trained.py's
fit_labelled: the same sampling to the token budget, the same fit, the same held-out report). What they
wrote goes to the output as generated_texts.jsonl."""

from __future__ import annotations

from dataclasses import replace

import torch

from moemerge.device import cpu_has_native_bf16
from moemerge.gates.expert_texts import Continuation, labelled_texts, load_writer, write_expert_texts
from moemerge.gates.modes.mode import GateContext, GateMode, GateResult, capture_dtype, release
from moemerge.gates.modes.trained import fit_labelled
from moemerge.inputs.gate_modes import GATE_MODE_SPECS
from moemerge.inputs.recipe import GenerateSpec, TrainingSpec

# Fit on each prompt followed by its continuation, not on the continuation alone: measured in
# benchmarks/generated_defaults.py (docs/decisions.md).
WITH_PROMPT = True
# The fitted routers' logits are multiplied by this: fitted on a few dozen generated texts, the routers mix
# their top experts more evenly than the texts warrant, and sharper mixing came closer to the oracle's
# perplexity on both seeds (benchmarks/generated_defaults.py; docs/decisions.md). Token choices, and so the
# reported accuracy, are the same at any sharpness.
SHARPNESS = 2.0
# The fit's steps and learning rate where the recipe's training block sets neither: a few thousand generated
# tokens are fitted as well in 60 steps at 0.05 as in trained gates' 300 at 0.01, in a fifth of the time
# (benchmarks/generated_defaults.py; docs/decisions.md).
FIT_DEFAULTS = {"steps": 60, "lr": 0.05}


def settings(ctx: GateContext) -> GenerateSpec:
    """The recipe's generate block, its seed defaulting to the merge's seed option."""
    spec = ctx.recipe.generate
    return spec if spec.seed is not None else spec.model_copy(update={"seed": ctx.seed})


def fit_settings(training: TrainingSpec) -> TrainingSpec:
    """The recipe's training block, with FIT_DEFAULTS for the keys it leaves out."""
    unset = {key: value for key, value in FIT_DEFAULTS.items() if key not in training.model_fields_set}
    return training.model_copy(update=unset)


def writing_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the experts write in: bfloat16 on a CPU that computes it natively, whatever the output's
    dtype (sampled text needs no more precision, and decoding took half the time of float32 on the demo),
    else the capture dtype (emulated bfloat16 is slow)."""
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else capture_dtype(device, dtype)


def _write(ctx: GateContext, spec: GenerateSpec) -> list[Continuation]:
    """Every expert's continuations; the dense model that wrote them is let go before fitting starts."""
    model = load_writer(ctx.base.path, ctx.device, writing_dtype(ctx.device, ctx.dtype))
    try:
        return write_expert_texts(model, ctx.tokenizer(), ctx.experts, ctx.prompts.positive, spec, ctx.progress.task)
    finally:
        del model
        release(ctx.device)


def compute(ctx: GateContext) -> GateResult:
    spec = settings(ctx)
    written = _write(ctx, spec)
    names = ctx.recipe.expert_names()
    texts, labels = labelled_texts(written, names, WITH_PROMPT)
    fitting = replace(ctx, recipe=ctx.recipe.model_copy(update={"training": fit_settings(ctx.recipe.training)}))
    result = fit_labelled(fitting, texts, labels, ctx.prompts.positive)
    rows = result.rows.clone()
    rows[result.report.trained_layers] *= SHARPNESS
    return replace(result, rows=rows, written=[row.record(names, spec) for row in written])


MODES = (GateMode(GATE_MODE_SPECS["generated"], compute),)
