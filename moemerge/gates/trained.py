"""`trained` gates: per layer, a linear router fitted on labelled prompts' token router inputs.

Every real token of a prompt labelled e should give expert e the highest logit. Each layer's gate is a
softmax regression on the frozen base's router inputs (cross-entropy over experts, classes weighted
equally whatever their token counts), fitted with AdamW on random token batches. Inputs are divided by
the layer's mean router-input norm while fitting so one learning rate suits every layer; the fitted
weights are divided by the same norm afterwards. A held-out share of prompts (stratified per expert) is
kept out of fitting and reported.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from moemerge.recipe import TrainingSpec

TOKENS_PER_STEP = 4096


@dataclass
class TrainingReport:
    """Token accuracy of the fitted gates, on the held-out prompts (`accuracy_on` "held-out") or, when none were
    held out (holdout 0, or fewer than 2 prompts per expert), on the training prompts ("training");
    written to the output as gate_training.json."""

    trained_layers: list[int]
    layer_accuracy: list[float]
    expert_accuracy: list[float]
    train_prompts: int
    holdout_prompts: int
    train_tokens: int
    holdout_tokens: int
    seconds: float
    accuracy_on: str = "held-out"

    def as_dict(self) -> dict:
        return asdict(self)


def split_prompts(labels: list[int], holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified split: each expert keeps `holdout` of its prompts aside (none if it has fewer than 2)."""
    generator = torch.Generator().manual_seed(seed)
    train, held = [], []
    for expert in sorted(set(labels)):
        members = [i for i, label in enumerate(labels) if label == expert]
        order = [members[j] for j in torch.randperm(len(members), generator=generator).tolist()]
        count = int(round(len(members) * holdout)) if len(members) > 1 else 0
        held += order[:count]
        train += order[count:]
    return sorted(train), sorted(held)


def fit_gates(features: torch.Tensor, labels: torch.Tensor, num_experts: int, spec: TrainingSpec) -> torch.Tensor:
    """features [layers, tokens, hidden], labels [tokens] → router weights [layers, experts, hidden]."""
    layers, tokens, hidden = features.shape
    scale = features.norm(dim=-1).mean(dim=1).clamp_min(1e-6)  # [layers]
    weight = torch.zeros(layers, num_experts, hidden, device=features.device, requires_grad=True)
    counts = torch.bincount(labels, minlength=num_experts).float().clamp_min(1)
    class_weight = counts.sum() / (num_experts * counts)
    optimizer = torch.optim.AdamW([weight], lr=spec.lr, weight_decay=spec.weight_decay)
    generator = torch.Generator(device=features.device).manual_seed(spec.seed)
    for _ in range(spec.steps):
        pick = torch.randint(tokens, (min(TOKENS_PER_STEP, tokens),), generator=generator, device=features.device)
        x = features[:, pick] / scale[:, None, None]
        logits = torch.einsum("lth,leh->lte", x, weight)
        target = labels[pick].expand(layers, -1)
        # Summed over layers, so each layer's fit is independent of which other layers are trained.
        loss = (
            torch.nn.functional.cross_entropy(logits.reshape(-1, num_experts), target.reshape(-1), weight=class_weight)
            * layers
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (weight.detach() / scale[:, None, None]).cpu()


def token_accuracy(
    rows: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, num_experts: int
) -> tuple[list[float], list[float]]:
    """Top-1 accuracy per layer (all tokens) and per expert present in labels (mean over layers)."""
    predicted = torch.einsum("lth,leh->lte", features, rows.to(features.device)).argmax(dim=-1)
    correct = (predicted == labels[None]).float()
    per_layer = correct.mean(dim=1).tolist()
    per_expert = [
        correct[:, labels == e].mean().item() if (labels == e).any() else float("nan") for e in range(num_experts)
    ]
    return per_layer, per_expert


def train_gates(
    features: torch.Tensor,
    owners: torch.Tensor,
    prompt_labels: list[int],
    num_experts: int,
    spec: TrainingSpec,
) -> tuple[torch.Tensor, TrainingReport]:
    """Fit gates for spec.layers (all by default) on the training prompts; score them on the held-out ones.

    Returns rows for the trained layers only, [len(trained layers), experts, hidden].
    """
    started = time.perf_counter()
    layers = spec.layers if spec.layers is not None else list(range(features.shape[0]))
    train, held = split_prompts(prompt_labels, spec.holdout, spec.seed)
    token_labels = torch.tensor(prompt_labels, device=features.device)[owners]
    in_train = torch.isin(owners, torch.tensor(train, device=owners.device))
    chosen = features[layers]
    rows = fit_gates(chosen[:, in_train], token_labels[in_train], num_experts, spec)
    scored = ~in_train if held else in_train
    per_layer, per_expert = token_accuracy(rows, chosen[:, scored], token_labels[scored], num_experts)
    report = TrainingReport(
        layers,
        per_layer,
        per_expert,
        len(train),
        len(held),
        int(in_train.sum()),
        int((~in_train).sum()),
        time.perf_counter() - started,
        "held-out" if held else "training",
    )
    return rows, report
