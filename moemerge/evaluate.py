"""`moemerge eval`: routing accuracy (and perplexity) of a merged model on a labelled prompt set."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from moemerge.routing import route


@dataclass
class EvalResult:
    """Token-weighted top-1 routing accuracy per expert and per layer; perplexity per expert if asked."""

    experts: list[str]
    prompts: list[int]
    tokens: list[int]
    accuracy: list[float]  # per expert, over all layers and its tokens
    layer_accuracy: list[float]  # per layer, over all tokens
    expert_layer_accuracy: list[list[float]]  # [experts][layers]
    perplexity: list[float | None] | None

    def as_dict(self) -> dict:
        return asdict(self)


def _perplexities(nll: torch.Tensor, predicted: torch.Tensor) -> list[float | None]:
    return [math.exp(n / p) if p else None for n, p in zip(nll.tolist(), predicted.tolist(), strict=True)]


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    names: list[str],
    labelled: list[tuple[str, int]],
    with_perplexity: bool = False,
) -> EvalResult:
    """A token counts as routed correctly in a layer when its highest router logit is its prompt's expert."""
    experts, layers = len(names), model.config.num_hidden_layers
    correct = torch.zeros(experts, layers)
    tokens = torch.zeros(experts)
    prompts = [0] * experts
    nll, predicted = torch.zeros(experts), torch.zeros(experts)
    for text, label in labelled:
        routing = route(model, tokenizer, text)
        count = routing.logits.shape[1]
        correct[label] += routing.top1_accuracy(label) * count
        tokens[label] += count
        prompts[label] += 1
        length = routing.predicted_tokens
        if with_perplexity and length > 0:
            nll[label] += routing.loss * length
            predicted[label] += length
    present = tokens > 0
    per_expert_layer = correct / tokens.clamp_min(1)[:, None]
    return EvalResult(
        experts=names,
        prompts=prompts,
        tokens=[int(t) for t in tokens],
        accuracy=(correct.sum(dim=1) / (tokens * layers).clamp_min(1)).tolist(),
        layer_accuracy=(correct[present].sum(dim=0) / tokens[present].sum().clamp_min(1)).tolist(),
        expert_layer_accuracy=per_expert_layer.tolist(),
        perplexity=[
            math.exp(n / p) if p else float("nan") for n, p in zip(nll.tolist(), predicted.tolist(), strict=True)
        ]
        if with_perplexity
        else None,
    )
