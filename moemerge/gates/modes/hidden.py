"""`hidden`: each expert's row from the hidden states its prompts give at each router (gates/hidden.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moemerge.gates.hidden import hidden_prototypes
from moemerge.gates.modes.mode import GateContext, GateMode, GateResult
from moemerge.gates.rows import router_rows, warn_parallel
from moemerge.inputs.gate_modes import GATE_MODE_SPECS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def prompt_rows(
    ctx: GateContext, tokenizer: PreTrainedTokenizerBase, positive: list[list[str]], negative: list[list[str]]
) -> torch.Tensor:
    """Router rows [layers, experts, hidden] from each expert's positive and negative prompts; a progress step
    of its own, since the merge's cancellation is checked at every batch (moemerge.gates.background)."""
    total = sum(len(group) for group in (*positive, *negative)) * ctx.num_layers
    advance = ctx.progress.task(f"hidden states on {ctx.device.type}", total)
    options = ctx.capture_options(ctx.batch_size)
    prototypes, token_norm = hidden_prototypes(ctx.base, tokenizer, positive, negative, options, advance)
    return router_rows(prototypes, token_norm, ctx.recipe.gate_scale)


def compute(ctx: GateContext) -> GateResult:
    rows = prompt_rows(ctx, ctx.tokenizer(), ctx.prompts.positive, ctx.prompts.negative)
    warn_parallel(rows, ctx.recipe.expert_names())
    return GateResult(rows)


MODES = (GateMode(GATE_MODE_SPECS["hidden"], compute),)
