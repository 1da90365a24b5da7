"""`moemerge route` as a Python API: each prompt's routing in plain rows, which the command prints as JSON as
they are, or as a table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moemerge.tools.request_routing import RequestRouting, decide
from moemerge.tools.routing import route_texts

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def route_prompts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    names: list[str],
    texts: list[str],
    request_top_k: int = 1,
) -> dict[str, Any]:
    """The routers' choices for each text: its real tokens, each expert's share of (layer, token) slots (the
    shares sum to top-k), the expert with the largest share, the layers that route (a dense layer has no
    router), the first choice of most tokens in each layer, each layer's shares, and the request-level
    decision (the `request_top_k` experts with the highest mean router probability over the text, with their
    weights: what serve's request routing runs)."""
    RequestRouting("request", request_top_k).checked(names)
    rows = []
    for text, routing in zip(texts, route_texts(model, tokenizer, texts), strict=True):
        shares = routing.shares()
        chosen = decide(routing.logits, request_top_k).report(names)["chosen"]
        rows.append(
            {
                "prompt": text,
                "tokens": routing.logits.shape[1],
                "shares": dict(zip(names, shares.tolist(), strict=True)),
                "top_expert": names[int(shares.argmax())],
                "layers": list(routing.layers),
                "layer_top_expert": [names[int(i)] for i in routing.layer_top1()],
                "layer_shares": routing.layer_shares().tolist(),
                "request": {"top_k": request_top_k, "chosen": chosen},
            }
        )
    return {"experts": names, "top_k": model.config.num_experts_per_tok, "prompts": rows}
