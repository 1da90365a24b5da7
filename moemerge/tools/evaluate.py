"""`moemerge eval`: routing accuracy (and perplexity) of a merged model on a labelled prompt set, per token and
per request (one decision per text, see moemerge/tools/request_routing.py)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from moemerge.tools.moe_layers import moe_layers
from moemerge.tools.request_routing import decide, restricted
from moemerge.tools.routing import Routing, next_token_losses, route_texts, tokenize

DECIDE_TOKENS = 32  # request perplexity: decided from the text's first tokens (BOS included), scored on the rest


@dataclass
class EvalResult:
    """Token-weighted top-1 routing accuracy per expert and per layer; perplexity per expert if asked."""

    experts: list[str]
    prompts: list[int]
    tokens: list[int]
    layers: list[int]  # the routing layers the per-layer lists are about (a dense layer does not route)
    accuracy: list[float]  # per expert, over the routing layers and its tokens
    layer_accuracy: list[float]  # per routing layer, over all tokens
    expert_layer_accuracy: list[list[float]]  # [experts][routing layers]
    perplexity: list[float | None] | None
    # per request: the share of an expert's texts whose request decision (whole text, top-1 of top-k) is the expert
    request_accuracy: list[float | None]
    # per expert, over its texts' tokens after the first `decide_tokens`: request routing decided from those first
    # tokens, and token routing on the same scored tokens (None without perplexity or without such tokens)
    request_perplexity: list[float | None] | None
    scored_token_perplexity: list[float | None] | None
    request_top_k: int = 1
    decide_tokens: int = DECIDE_TOKENS
    request_mixing: str = "router"

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
    request_top_k: int = 1,
    decide_tokens: int = DECIDE_TOKENS,
    request_mixing: str = "router",
    on_routing: Callable[[int, Routing], None] | None = None,
) -> EvalResult:
    """A token counts as routed correctly in a layer when its highest router logit is its prompt's expert; a
    text, when its request decision's first expert is its label. `on_routing(i, routing)` hears each text's
    routing as it is computed (the report draws from them without routing the texts again)."""
    routing_layers = moe_layers(model).routing
    experts, layers = len(names), len(routing_layers)
    correct = torch.zeros(experts, layers)
    tokens = torch.zeros(experts)
    prompts = [0] * experts
    requests_right = [0] * experts
    nll, predicted = torch.zeros(experts), torch.zeros(experts)
    request_nll, token_nll, scored = torch.zeros(experts), torch.zeros(experts), torch.zeros(experts)
    routings = route_texts(model, tokenizer, [text for text, _ in labelled], losses=with_perplexity)
    for index, ((text, label), routing) in enumerate(zip(labelled, routings, strict=True)):
        if on_routing is not None:
            on_routing(index, routing)
        count = routing.logits.shape[1]
        correct[label] += routing.top1_accuracy(label) * count
        tokens[label] += count
        prompts[label] += 1
        requests_right[label] += decide(routing.logits, request_top_k).experts[0] == label
        length = routing.predicted_tokens
        if with_perplexity and length > 0:
            nll[label] += routing.token_losses.sum()
            predicted[label] += length
        decided_on = int(routing.real[:decide_tokens].sum())
        if with_perplexity and length >= decide_tokens and decided_on:
            decision = decide(routing.logits[:, :decided_on], request_top_k, request_mixing)
            ids, _ = tokenize(tokenizer, text)
            with restricted(model, decision):
                losses, _ = next_token_losses(model, ids)
            request_nll[label] += losses[decide_tokens - 1 :].sum()
            token_nll[label] += routing.token_losses[decide_tokens - 1 :].sum()
            scored[label] += length - decide_tokens + 1
    present = tokens > 0
    per_expert_layer = correct / tokens.clamp_min(1)[:, None]
    return EvalResult(
        experts=names,
        prompts=prompts,
        layers=list(routing_layers),
        tokens=[int(t) for t in tokens],
        accuracy=(correct.sum(dim=1) / (tokens * layers).clamp_min(1)).tolist(),
        layer_accuracy=(correct[present].sum(dim=0) / tokens[present].sum().clamp_min(1)).tolist(),
        expert_layer_accuracy=per_expert_layer.tolist(),
        perplexity=[
            math.exp(n / p) if p else float("nan") for n, p in zip(nll.tolist(), predicted.tolist(), strict=True)
        ]
        if with_perplexity
        else None,
        request_accuracy=[right / n if n else None for right, n in zip(requests_right, prompts, strict=True)],
        request_perplexity=_perplexities(request_nll, scored) if with_perplexity else None,
        scored_token_perplexity=_perplexities(token_nll, scored) if with_perplexity else None,
        request_top_k=request_top_k,
        decide_tokens=decide_tokens,
        request_mixing=request_mixing,
    )
