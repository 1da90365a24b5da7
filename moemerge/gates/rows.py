"""Turn per-expert prompt prototypes into router rows, and warn when two experts cannot be told apart."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("moemerge")
PARALLEL_COSINE = 0.95


def router_rows(prototypes: torch.Tensor, token_norm: torch.Tensor, gate_scale: float) -> torch.Tensor:
    """[layers, experts, hidden] prototypes → router weights whose logits are cosine-like, times gate_scale.

    The mean over experts is removed first: it adds nearly the same logit to every expert and so carries no
    routing information, but it would dominate unnormalised rows (mergekit's rows are almost parallel for
    that reason). Rows are then unit length, divided by the typical router-input norm of the layer, so
    `gate_scale` is the logit a token perfectly aligned with an expert's direction gets.
    """
    centered = prototypes - prototypes.mean(dim=1, keepdim=True)
    unit = centered / centered.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return unit * (gate_scale / token_norm.clamp_min(1e-12))[:, None, None]


def warn_parallel(rows: torch.Tensor, names: list[str]) -> list[str]:
    """Name, per layer, each pair of experts whose router rows point the same way (their prompts overlap)."""
    unit = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cosine = unit @ unit.transpose(1, 2)
    messages = []
    for layer in range(rows.shape[0]):
        for i in range(rows.shape[1]):
            for j in range(i + 1, rows.shape[1]):
                if cosine[layer, i, j] > PARALLEL_COSINE:
                    messages.append(
                        f"layer {layer}: gate vectors of {names[i]} and {names[j]} are nearly parallel "
                        f"(cosine {cosine[layer, i, j]:.3f}); their prompts do not tell them apart"
                    )
    for message in messages:
        log.warning(message)
    return messages
