"""Capture what each layer's router will see: the post-attention RMSNorm output, pooled over real tokens.

The MoE shares the base's attention and norms, so forward hooks on the dense base give the router's input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _norm_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    return [layer.post_attention_layernorm for layer in model.model.layers]


def pad_ready(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Batching needs a pad token; set one on this in-memory copy only, never on what we save."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def pooled_router_inputs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Mean router input of each prompt, per layer: a float32 tensor [layers, prompts, hidden].

    Pad tokens and the special tokens the tokenizer adds (BOS) are left out of the mean: BOS hidden states
    are attention sinks with outsized norms that would swamp the prompt's own tokens. Prompts are sorted by
    length so each batch carries little padding.
    """
    device = next(model.parameters()).device
    norms = _norm_modules(model)
    out = torch.zeros(len(norms), len(prompts), model.config.hidden_size)
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    captured: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, output: captured.append(output)) for m in norms]
    try:
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            batch = tokenizer(
                [prompts[i] for i in chosen], return_tensors="pt", padding=True, return_special_tokens_mask=True
            )
            real = batch["attention_mask"].bool() & ~batch.pop("special_tokens_mask").bool()
            real = torch.where(real.any(dim=1, keepdim=True), real, batch["attention_mask"].bool())
            weights = (real.float() / real.sum(dim=1, keepdim=True)).to(device)
            captured.clear()
            with torch.inference_mode():
                model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
            for layer, hidden in enumerate(captured):
                pooled = torch.einsum("bt,bth->bh", weights, hidden.float())
                out[layer, chosen] = pooled.cpu()
            if on_batch:
                on_batch(len(chosen))
    finally:
        for hook in hooks:
            hook.remove()
    return out
