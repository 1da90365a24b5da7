"""`cheap_embed` gates: mean input embedding of each expert's prompts, the same row for every layer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _mean_embedding(embed: torch.Tensor, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> torch.Tensor:
    if not prompts:  # an expert with negative prompts only: its row comes from the negatives alone
        return torch.zeros(embed.shape[1])
    means = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] or tokenizer(prompt)["input_ids"]
        means.append(embed[ids].float().mean(dim=0))
    return torch.stack(means).mean(dim=0)


def embedding_prototypes(
    embed: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase,
    positive: Sequence[Sequence[str]],
    negative: Sequence[Sequence[str]],
    layers: int,
) -> torch.Tensor:
    """[layers, experts, hidden]: no forward pass, so it is fast but blind to context."""
    rows = []
    for pos, neg in zip(positive, negative, strict=True):
        row = _mean_embedding(embed, tokenizer, pos)
        if neg:
            row = row - _mean_embedding(embed, tokenizer, neg)
        rows.append(row)
    return torch.stack(rows).unsqueeze(0).expand(layers, -1, -1).clone()
