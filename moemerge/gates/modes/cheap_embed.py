"""`cheap_embed`: each expert's row from the mean input embedding of its prompts, with no forward pass."""

from __future__ import annotations

import torch

from moemerge.gates.cheap_embed import embedding_prototypes
from moemerge.gates.modes.mode import GateContext, GateMode, GateResult
from moemerge.gates.rows import router_rows, warn_parallel
from moemerge.inputs.gate_modes import GATE_MODE_SPECS


def compute(ctx: GateContext) -> GateResult:
    prompts, tokenizer = ctx.prompts, ctx.tokenizer()
    embed = ctx.base.tensors.load("model.embed_tokens.weight")
    prototypes = embedding_prototypes(embed, tokenizer, prompts.positive, prompts.negative, ctx.num_layers)
    # Without a forward pass, estimate the router input's norm from each post-attention norm's weight.
    norms = [f"model.layers.{i}.post_attention_layernorm.weight" for i in range(ctx.num_layers)]
    token_norm = torch.stack([ctx.base.tensors.load(name).float().norm() for name in norms])
    rows = router_rows(prototypes, token_norm, ctx.recipe.gate_scale)
    warn_parallel(rows, ctx.recipe.expert_names())
    return GateResult(rows)


MODES = (GateMode(GATE_MODE_SPECS["cheap_embed"], compute),)
