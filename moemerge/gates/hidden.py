"""`hidden` gates: each expert's router row separates its prompts' router inputs from the other experts'.

A plain class mean points mostly along directions in which all router inputs vary a lot anyway. We use
shrinkage linear discriminant directions instead: Σ⁻¹(μₑ − μ̄), where Σ is the within-expert covariance of
the prompts' token router inputs, shrunk halfway towards a multiple of the identity so that a few prompts
suffice. benchmarks/routing_quality.py measures both on SmolLM2 + three domain experts (the "class means"
row of docs/benchmarks.md is this code with SHRINKAGE = 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from moemerge.gates.router_inputs import CaptureOptions, RouterInputs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from moemerge.inputs.sources import ModelSource

SHRINKAGE = 0.5
MAX_TOKENS = 256


def _ridge_solve(rows: torch.Tensor, ridge: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(rowsᵀ rows + ridge·I)⁻¹ target for rows [n, hidden] and target [hidden, k], factoring whichever
    Gram matrix is smaller: with fewer tokens than hidden units, the Woodbury identity turns the
    [hidden, hidden] scatter and its Cholesky factor into [tokens, tokens] ones (both are positive
    definite: a Cholesky solve costs half an LU solve)."""
    count, hidden = rows.shape
    if count >= hidden:
        eye = torch.eye(hidden, device=rows.device, dtype=rows.dtype)
        return torch.cholesky_solve(target, torch.linalg.cholesky(rows.T @ rows + ridge * eye))
    eye = torch.eye(count, device=rows.device, dtype=rows.dtype)
    inner = torch.cholesky_solve(rows @ target, torch.linalg.cholesky(rows @ rows.T + ridge * eye))
    return (target - rows.T @ inner) / ridge


def _discriminant(features: torch.Tensor, labels: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """One layer: positive prompts' token features [tokens, hidden] and their experts [tokens], and each
    expert's target mean [experts, hidden] → Σ_shrunk⁻¹ (means − their mean), [experts, hidden], where
    Σ_shrunk = (1 − SHRINKAGE)·Σ + SHRINKAGE·(trace(Σ)/hidden)·I and Σ = residualᵀ residual / tokens."""
    class_means = torch.stack([features[labels == e].mean(dim=0) for e in range(means.shape[0])])
    residual = features - class_means[labels]
    count = max(1, len(features))
    scale = residual.square().sum() / (count * residual.shape[1])  # trace(Σ) / hidden
    if scale <= 0:  # one token per expert: no spread to learn from, fall back to the plain difference
        return means - means.mean(dim=0)
    rows = residual * ((1 - SHRINKAGE) / count) ** 0.5
    return _ridge_solve(rows, SHRINKAGE * scale, (means - means.mean(dim=0)).T).T


def _mean_or_zero(rows: torch.Tensor) -> torch.Tensor:
    return rows.mean(dim=0) if len(rows) else rows.new_zeros(rows.shape[1:])


def hidden_prototypes(
    base: ModelSource,
    tokenizer: PreTrainedTokenizerBase,
    positive: Sequence[Sequence[str]],
    negative: Sequence[Sequence[str]],
    options: CaptureOptions,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer and expert, the discriminant direction of (positive − negative prompts' mean router input).

    All prompts of all experts go through the base together, batched by length, one layer at a time; each
    layer's token router inputs are reduced to its rows before the next layer's are computed. Also returns
    the mean router-input norm per layer, which sets the gate scale.
    """
    flat = [p for group in (*positive, *negative) for p in group]
    groups = [e for e, group in enumerate(positive) for _ in group]
    groups += [-1 - e for e, group in enumerate(negative) for _ in group]
    inputs = RouterInputs(base, tokenizer, flat, options, MAX_TOKENS)
    token_group = torch.tensor(groups, device=options.device)[inputs.owners.to(options.device)]
    experts = len(positive)
    is_positive = token_group >= 0
    rows, norms = [], []
    for layer in inputs.layers(on_batch=on_batch):
        # An expert with negative prompts only has no positive mean: its row comes from the negatives alone.
        means = torch.stack([_mean_or_zero(layer[token_group == e]) for e in range(experts)])
        for e, group in enumerate(negative):
            if group:
                means[e] -= layer[token_group == -1 - e].mean(dim=0)
        rows.append(_discriminant(layer[is_positive], token_group[is_positive], means))
        norms.append(layer.norm(dim=-1).mean())
    return torch.stack(rows).cpu(), torch.stack(norms).cpu()
