"""Capture what each layer's router will see: the post-attention RMSNorm output, over real tokens only.

The MoE shares the base's attention and norms, so forward hooks on the dense base give the router's input.
Pad tokens and the special tokens the tokenizer adds (BOS) are left out: BOS hidden states are attention
sinks with outsized norms that would swamp the prompt's own tokens. Prompts are sorted by length so each
batch carries little padding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def pad_ready(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Batching needs a pad token; set one on this in-memory copy only, never on what we save."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def _batches(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int,
    max_tokens: int | None,
) -> Iterator[tuple[list[int], torch.Tensor, list[torch.Tensor]]]:
    """Yield (prompt indices, real-token mask [B,T], router inputs per layer [B,T,H]) batch by batch."""
    device = next(model.parameters()).device
    norms = [layer.post_attention_layernorm for layer in model.model.layers]
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    captured: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, output: captured.append(output)) for m in norms]
    try:
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            batch = tokenizer(
                [prompts[i] for i in chosen],
                return_tensors="pt",
                padding=True,
                truncation=max_tokens is not None,
                max_length=max_tokens,
                return_special_tokens_mask=True,
            )
            real = batch["attention_mask"].bool() & ~batch.pop("special_tokens_mask").bool()
            real = torch.where(real.any(dim=1, keepdim=True), real, batch["attention_mask"].bool())
            captured.clear()
            with torch.inference_mode():
                # The decoder stack alone: the LM head's [batch, tokens, vocab] logits are never needed.
                model.model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
            yield chosen, real.to(device), captured
    finally:
        for hook in hooks:
            hook.remove()


def token_router_inputs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int = 16,
    max_tokens: int = 256,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every real token's router input per layer, [layers, tokens, hidden] float32 on the model's device,
    and the prompt index of each token [tokens]. Prompts are cut at `max_tokens` to bound memory."""
    features: list[torch.Tensor] = []
    owners: list[torch.Tensor] = []
    for chosen, real, captured in _batches(model, tokenizer, prompts, batch_size, max_tokens):
        features.append(torch.stack([hidden[real].float() for hidden in captured]))
        owner = torch.tensor(chosen, device=real.device)[:, None].expand_as(real)
        owners.append(owner[real])
        if on_batch:
            on_batch(len(chosen))
    return torch.cat(features, dim=1), torch.cat(owners)
