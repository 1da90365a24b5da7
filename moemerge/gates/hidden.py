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
from moemerge.inputs.families import EMBEDDINGS

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
        return _gram_solve(rows.T @ rows, ridge, target)
    eye = torch.eye(count, device=rows.device, dtype=rows.dtype)
    inner = torch.cholesky_solve(rows @ target, torch.linalg.cholesky(rows @ rows.T + ridge * eye))
    return (target - rows.T @ inner) / ridge


def _gram_solve(gram: torch.Tensor, ridge: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(gram + ridge·I)⁻¹ target for a positive semi-definite gram [hidden, hidden]."""
    eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
    return torch.cholesky_solve(target, torch.linalg.cholesky(gram + ridge * eye))


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


class LayerPool:
    """One layer's router inputs reduced as batches come, so that no prompt count makes it hold every token.

    It keeps each group's token sum and count (positive prompts of expert e: group e, negative ones: −1−e),
    the sum of token norms, and the positive tokens' within-expert scatter Σ residualᵀ residual, merged batch
    by batch (Chan et al.'s pairwise update: each batch centred on its own expert means, plus the shift of
    the means), which is exact and needs no cap. While the positive tokens are fewer than hidden units they
    are kept as they are instead (no larger than the scatter) and solved the Woodbury way.
    """

    def __init__(self, experts: int, hidden: int, positive_tokens: int, device: torch.device) -> None:
        self.experts = experts
        self.sums = torch.zeros(2 * experts, hidden, dtype=torch.float64, device=device)
        self.counts = torch.zeros(2 * experts, dtype=torch.float64, device=device)
        self.norm_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if positive_tokens < hidden else None
        self.scatter = None if self.kept is not None else torch.zeros(hidden, hidden, device=device)

    def add(self, tokens: torch.Tensor, groups: torch.Tensor) -> None:
        """One batch: router inputs [tokens, hidden] and each token's group [tokens]."""
        slots = torch.where(groups >= 0, groups, self.experts - 1 - groups)
        self.norm_sum += tokens.norm(dim=-1).double().sum()
        positive = groups >= 0
        features, labels = tokens[positive], groups[positive]
        if self.kept is not None:
            self.kept.append((features, labels))
        elif len(labels):
            self._merge_scatter(features, labels)
        self.sums.index_add_(0, slots, tokens.double())
        self.counts += torch.bincount(slots, minlength=2 * self.experts).double()

    def _merge_scatter(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        present = torch.bincount(labels, minlength=self.experts).double()
        batch_means = torch.zeros_like(self.sums[: self.experts]).index_add_(0, labels, features.double())
        batch_means /= present.clamp_min(1)[:, None]
        residual = features - batch_means[labels].float()
        before = self.counts[: self.experts]
        old_means = self.sums[: self.experts] / before.clamp_min(1)[:, None]
        weight = before * present / (before + present).clamp_min(1)  # 0 for an expert new or absent
        shift = ((batch_means - old_means) * weight[:, None].sqrt()).float()
        self.scatter += residual.T @ residual + shift.T @ shift

    def rows(self, negative: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's discriminant rows [experts, hidden] and its mean router-input norm."""
        group_means = self.sums / self.counts.clamp_min(1)[:, None]
        # An expert with negative prompts only has no positive mean (zero): its row comes from the negatives.
        means = group_means[: self.experts].clone()
        for e, group in enumerate(negative):
            if group:
                means[e] -= group_means[self.experts + e]
        means = means.float()
        norm = (self.norm_sum / self.counts.sum()).float()
        if self.kept is not None:
            features = torch.cat([f for f, _ in self.kept])
            labels = torch.cat([label for _, label in self.kept])
            return _discriminant(features, labels, means), norm
        count = max(1.0, float(self.counts[: self.experts].sum()))
        hidden = self.scatter.shape[0]
        scale = self.scatter.trace() / (count * hidden)  # trace(Σ) / hidden
        if scale <= 0:  # one token per expert: no spread to learn from, fall back to the plain difference
            return means - means.mean(dim=0), norm
        gram = self.scatter * ((1 - SHRINKAGE) / count)
        return _gram_solve(gram, SHRINKAGE * scale, (means - means.mean(dim=0)).T).T, norm


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
    batch's token router inputs are folded into the layer's running sums (LayerPool) as they come, and the
    layer is reduced to its rows before the next layer's are computed. Also returns the mean router-input
    norm per layer, which sets the gate scale.
    """
    flat = [p for group in (*positive, *negative) for p in group]
    groups = [e for e, group in enumerate(positive) for _ in group]
    groups += [-1 - e for e, group in enumerate(negative) for _ in group]
    inputs = RouterInputs(base, tokenizer, flat, options, MAX_TOKENS)
    token_group = torch.tensor(groups, device=options.device)[inputs.owners.to(options.device)]
    batch_groups = token_group.split(inputs.counts)
    positive_tokens = int((token_group >= 0).sum())
    hidden = base.tensors.shape(EMBEDDINGS)[1]
    rows, norms = [], []
    for batches in inputs.layer_batches(on_batch=on_batch):
        pool = LayerPool(len(positive), hidden, positive_tokens, options.device)
        for batch, tokens in batches:
            pool.add(tokens, batch_groups[batch])
        row, norm = pool.rows(negative)
        rows.append(row)
        norms.append(norm)
    return torch.stack(rows).cpu(), torch.stack(norms).cpu()
