"""Turn per-expert prompt prototypes into router rows, and warn when two experts cannot be told apart."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("moemerge")
PARALLEL_COSINE = 0.95
# A centred prototype this small next to the layer's largest prototype is zero up to rounding: the expert's
# prompts give the same router inputs as the others'. Normalising it would blow rounding noise up to a
# full-size, random router row, so it stays zero.
ZERO_RELATIVE = 1e-5


def router_rows(prototypes: torch.Tensor, token_norm: torch.Tensor, gate_scale: float) -> torch.Tensor:
    """[layers, experts, hidden] prototypes → router weights whose logits are cosine-like, times gate_scale.

    The mean over experts is removed first: it adds nearly the same logit to every expert and so carries no
    routing information, but it would dominate unnormalised rows (mergekit's rows are almost parallel for
    that reason). Rows are then unit length, divided by the typical router-input norm of the layer, so
    `gate_scale` is the logit a token perfectly aligned with an expert's direction gets.
    """
    centered = prototypes - prototypes.mean(dim=1, keepdim=True)
    norm = centered.norm(dim=-1, keepdim=True)
    largest = prototypes.norm(dim=-1, keepdim=True).amax(dim=1, keepdim=True)
    unit = torch.where(norm > ZERO_RELATIVE * largest, centered / norm.clamp_min(1e-12), 0.0)
    return unit * (gate_scale / token_norm.clamp_min(1e-12))[:, None, None]


def warn_parallel(rows: torch.Tensor, names: list[str]) -> list[str]:
    """Name, per layer, each pair of experts whose router rows point the same way (their prompts overlap),
    and the experts whose rows are zero: prompts the router cannot tell apart at all (say, prompts that
    differ only in characters the tokenizer maps to <unk>)."""
    messages = _warn_zero(rows, names)
    unit = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cosine = unit @ unit.transpose(1, 2)
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


def _warn_zero(rows: torch.Tensor, names: list[str]) -> list[str]:
    """One warning for all zero rows, naming the experts and how many layers."""
    zero = rows.abs().amax(dim=-1) == 0  # [layers, experts]
    if not zero.any():
        return []
    layers = int(zero.any(dim=1).sum())
    who = ", ".join(names[e] for e in range(rows.shape[1]) if zero[:, e].any())
    scope = "all zero: the router matrix is empty" if bool(zero.all()) else f"zero for {who}"
    message = (
        f"router rows are {scope} in {layers} of {rows.shape[0]} layers: the experts' prompts give identical "
        "router inputs (prompts that differ only in characters the tokenizer maps to <unk> look alike to it), "
        "so the router cannot tell the experts apart; give each expert prompts in words the tokenizer knows"
    )
    return [message]
