"""`trained` gates: per layer, a linear router fitted on labelled prompts' token router inputs.

Every real token of a prompt labelled e should give expert e the highest logit. Each layer's gate is a
softmax regression on the frozen base's router inputs (cross-entropy over experts, classes weighted
equally whatever their token counts), fitted with AdamW on random token batches. Inputs are divided by
the layer's mean router-input norm while fitting so one learning rate suits every layer; the fitted
weights are divided by the same norm afterwards. A held-out share of prompts (stratified per expert) is
kept out of fitting and reported.

Neither memory nor time grows with the labelled set: each layer is fitted while the base is streamed through
it, on at most FEATURE_BUDGET bytes of float32 router inputs. That is every token of a few thousand typical
prompts, and far more distinct tokens than the fitting draws batches from. A larger set is sampled by prompt
(stratified per expert) before anything runs through the base, so a 100,000-prompt CSV costs the forward work
of the few thousand that fill the budget, not of all of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from moemerge.gates.router_inputs import RouterInputs, token_counts
from moemerge.inputs.prompts import split_prompts
from moemerge.inputs.recipe import TrainingSpec

# A fitting step draws 1/SET_SHARE of the set's tokens, within MIN_TOKENS_PER_STEP..TOKENS_PER_STEP
TOKENS_PER_STEP, SET_SHARE, MIN_TOKENS_PER_STEP = 4096, 4, 512
FEATURE_BUDGET = 256 * 2**20  # bytes of one layer's captured router inputs (float32)


def token_budget(hidden: int) -> int:
    """How many tokens' router inputs of one layer fit FEATURE_BUDGET."""
    return max(1, FEATURE_BUDGET // (4 * hidden))


@dataclass
class TrainingReport:
    """Token accuracy of the fitted gates, on the held-out prompts (`accuracy_on` "held-out") or, when none were
    held out (holdout 0, or fewer than 2 prompts per expert), on the training prompts ("training");
    written to the output as gate_training.json."""

    trained_layers: list[int]
    layer_accuracy: list[float]
    expert_accuracy: list[float | None]  # None: no held-out tokens of that expert (JSON has no NaN)
    train_prompts: int
    holdout_prompts: int
    train_tokens: int
    holdout_tokens: int
    seconds: float
    accuracy_on: str = "held-out"
    labelled_prompts: int | None = None  # prompts in the labelled set, when more than fit the token budget

    def as_dict(self) -> dict:
        return asdict(self)


def tokens_per_step(tokens: int) -> int:
    """How many tokens a fitting step draws from a set of `tokens`: a quarter of it, at least
    MIN_TOKENS_PER_STEP (or all of a smaller set) and at most TOKENS_PER_STEP. Drawing nearly all of a small
    set (with replacement) at every step cost four times as long for no better routers: generated gates'
    few thousand tokens (benchmarks/generated_defaults.py)."""
    return min(tokens, max(MIN_TOKENS_PER_STEP, min(TOKENS_PER_STEP, tokens // SET_SHARE)))


def fit_gates(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_experts: int,
    spec: TrainingSpec,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """features [layers, tokens, hidden], labels [tokens] → router weights [layers, experts, hidden], each layer
    fitted on its own (the loss is a sum over layers and AdamW's update is elementwise, so fitting them
    together would give the same weights; but one layer's batch stays in the CPU's cache, and all layers'
    batches at once made a generated merge slower, not faster). `on_step(0)` is called before every step:
    the gate pass's progress, which stops a cancelled pass there (moemerge.gates.background)."""
    return torch.stack([_fit_layer(layer, labels, num_experts, spec, on_step) for layer in features])


def _fit_layer(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_experts: int,
    spec: TrainingSpec,
    on_step: Callable[[int], None] | None,
) -> torch.Tensor:
    """features [tokens, hidden], labels [tokens] → router weights [experts, hidden]: softmax regression, each
    step on tokens_per_step tokens drawn with replacement, gathered into one reused buffer and scaled there
    (a fresh gathered and a fresh scaled copy every step made the fit 3.8 times slower on 5000 tokens)."""
    tokens, hidden = features.shape
    scale = features.norm(dim=-1).mean().clamp_min(1e-6)
    weight = torch.zeros(num_experts, hidden, device=features.device, requires_grad=True)
    counts = torch.bincount(labels, minlength=num_experts).float().clamp_min(1)
    class_weight = counts.sum() / (num_experts * counts)
    optimizer = torch.optim.AdamW([weight], lr=spec.lr, weight_decay=spec.weight_decay)
    generator = torch.Generator(device=features.device).manual_seed(spec.seed)
    batch = features.new_empty(tokens_per_step(tokens), hidden)
    for _ in range(spec.steps):
        if on_step:
            on_step(0)
        pick = torch.randint(tokens, (len(batch),), generator=generator, device=features.device)
        x = torch.index_select(features, 0, pick, out=batch).div_(scale)
        loss = torch.nn.functional.cross_entropy(x @ weight.T, labels[pick], weight=class_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (weight.detach() / scale).cpu()


def token_accuracy(
    rows: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, num_experts: int
) -> tuple[list[float], list[float | None]]:
    """Top-1 accuracy per layer (all tokens) and per expert present in labels (mean over layers)."""
    predicted = torch.einsum("lth,leh->lte", features, rows.to(features.device)).argmax(dim=-1)
    correct = (predicted == labels[None]).float()
    per_layer = correct.mean(dim=1).tolist()
    per_expert = [correct[:, labels == e].mean().item() if (labels == e).any() else None for e in range(num_experts)]
    return per_layer, per_expert


def sample_tokens(candidates: torch.Tensor, labels: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    """At most `limit` of the `candidates` [tokens, bool], drawn at random across the whole set and stratified
    per expert (each expert keeps its share of the candidates): all of them when they fit."""
    if int(candidates.sum()) <= limit:
        return candidates.clone()
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.zeros_like(candidates)
    total = int(candidates.sum())
    for expert in labels[candidates].unique().tolist():
        members = torch.nonzero(candidates & (labels == expert)).squeeze(1)
        share = max(1, len(members) * limit // total)
        chosen[members[torch.randperm(len(members), generator=generator)[:share]]] = True
    return chosen


def _fewest_prompts(holdout: float) -> int:
    """The fewest prompts of an expert that split_prompts leaves at least one of for training (and, from
    two, can hold one out of): the whole set passed that check (inputs.prompts), a sample of it must too."""
    count = 2
    while count - int(round(count * holdout)) < 1:
        count += 1
    return count


def prompts_within_budget(
    token_counts: list[int], labels: list[int], limit: int, seed: int, holdout: float = 0.0
) -> list[int]:
    """Prompts whose real tokens total at most about `limit`: all of them when they fit; else each expert's
    share of `limit` (its share of the set's tokens) filled with its prompts in random order, keeping at least
    two per expert so one can be held out, and as many as `holdout` needs to leave one for training. Sorted
    indices."""
    total = sum(token_counts)
    if total <= limit:
        return list(range(len(token_counts)))
    generator = torch.Generator().manual_seed(seed)
    fewest = _fewest_prompts(holdout)
    chosen = []
    for expert in sorted(set(labels)):
        members = [i for i, label in enumerate(labels) if label == expert]
        share = limit * sum(token_counts[i] for i in members) // total
        used = 0
        for rank, j in enumerate(torch.randperm(len(members), generator=generator).tolist()):
            count = token_counts[members[j]]
            if rank >= fewest and used + count > share:
                break
            chosen.append(members[j])
            used += count
    return sorted(chosen)


def labelled_sample(tokenizer, texts: list[str], labels: list[int], spec: TrainingSpec, hidden: int) -> list[int]:
    """The labelled prompts that fit one layer's token budget at this hidden size (prompts_within_budget), the
    same for trained gates and for tuning on the MoE, since both hold their router inputs in that budget."""
    counts = token_counts(tokenizer, texts, spec.max_tokens)
    return prompts_within_budget(counts, labels, token_budget(hidden), spec.seed, spec.holdout)


def _mean_over_layers(per_layer: list[list[float | None]]) -> list[float | None]:
    """Each expert's accuracy averaged over layers; None where the expert had no scored tokens."""
    return [None if column[0] is None else sum(column) / len(column) for column in zip(*per_layer, strict=True)]


def train_gates(
    inputs: RouterInputs,
    prompt_labels: list[int],
    num_experts: int,
    spec: TrainingSpec,
    layers: list[int],
    token_budget: int,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, TrainingReport]:
    """Fit gates for `layers` on the training prompts; score them on the held-out ones.

    Each layer is fitted as soon as its router inputs are captured and they are dropped before the next
    layer's come, so memory holds one layer's tokens, at most `token_budget` of them (sampled once, the same
    tokens in every layer). Fitting a layer alone gives the same weights as fitting all at once: the loss is
    a sum over layers and AdamW's update is elementwise. Returns rows for `layers` only, [len(layers),
    experts, hidden].
    """
    started = time.perf_counter()
    train, held = split_prompts(prompt_labels, spec.holdout, spec.seed)
    token_labels = torch.tensor(prompt_labels)[inputs.owners]
    in_train = torch.isin(inputs.owners, torch.tensor(train, dtype=torch.long))
    train_share = token_budget * int(in_train.sum()) // max(1, len(token_labels))
    fit_on = sample_tokens(in_train, token_labels, max(1, train_share), spec.seed)
    held_share = max(1, token_budget - int(fit_on.sum()))
    score_on = sample_tokens(~in_train, token_labels, held_share, spec.seed + 1) if held else fit_on  # as before
    keep = fit_on | score_on
    fit_labels, score_labels = token_labels[fit_on], token_labels[score_on]
    fit_in_kept, score_in_kept = fit_on[keep], score_on[keep]
    device = inputs.options.device
    fitted: dict[int, tuple[torch.Tensor, float, list[float | None]]] = {}
    for layer, features in enumerate(inputs.layers(max(layers) + 1, keep, on_batch)):
        if layer not in layers:
            continue
        row = fit_gates(features[None, fit_in_kept.to(device)], fit_labels.to(device), num_experts, spec, on_batch)
        accuracy, expert_accuracy = token_accuracy(
            row, features[None, score_in_kept.to(device)], score_labels.to(device), num_experts
        )
        fitted[layer] = row[0], accuracy[0], expert_accuracy
    report = TrainingReport(
        layers,
        [fitted[layer][1] for layer in layers],
        _mean_over_layers([fitted[layer][2] for layer in layers]),
        len(train),
        len(held),
        int(fit_on.sum()),
        int(score_on.sum()) if held else 0,
        time.perf_counter() - started,
        "held-out" if held else "training",
    )
    return torch.stack([fitted[layer][0] for layer in layers]), report
