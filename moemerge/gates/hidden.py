"""`hidden` gates: each expert's router row points at the mean router input of its prompts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from moemerge.router_inputs import pooled_router_inputs


def hidden_prototypes(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    positive: Sequence[Sequence[str]],
    negative: Sequence[Sequence[str]],
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer and expert: mean pooled router input of positive prompts minus that of negative prompts.

    All prompts of all experts go through the model together, batched by length. Also returns the mean
    router-input norm per layer, which sets the gate scale.
    """
    flat = [p for group in (*positive, *negative) for p in group]
    pooled = pooled_router_inputs(model, tokenizer, flat, batch_size, on_batch)
    layers, hidden = pooled.shape[0], pooled.shape[2]
    prototypes = torch.zeros(layers, len(positive), hidden)
    start = 0
    for sign, groups in ((1.0, positive), (-1.0, negative)):
        for expert, group in enumerate(groups):
            if group:
                prototypes[:, expert] += sign * pooled[:, start : start + len(group)].mean(dim=1)
            start += len(group)
    return prototypes, pooled.norm(dim=-1).mean(dim=1)
