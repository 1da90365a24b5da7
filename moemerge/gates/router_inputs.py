"""Capture what each layer's router will see: the post-attention RMSNorm output, over real tokens only,
one layer at a time.

The MoE shares the base's attention and norms, so the dense base's post_attention_layernorm output is the
router's input. The prompts go through the base one decoder layer at a time (moemerge.gates.layer_stream), so a
consumer gets layer i's router inputs for every prompt, uses them and lets them go before layer i+1's come:
memory holds one layer's weights, the prompts' hidden states (moemerge.gates.activations) and one layer's capture.

Pad tokens and the special tokens the tokenizer adds (BOS) are left out: BOS hidden states are attention
sinks with outsized norms that would swamp the prompt's own tokens. Prompts are sorted by length so each
batch carries little padding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moemerge.errors import MoemergeError
from moemerge.gates.activations import DEFAULT_BUDGET, Activations
from moemerge.gates.layer_stream import LayerStack
from moemerge.inputs.sources import ModelSource

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


# Padded tokens per forward pass. Large batches amortise the per-operation cost that dominates small ones on
# CPU (about 2x faster capture at 256 short prompts per batch than at 16 on the 1b base), and this cap keeps
# long prompts from making a batch's activations large whatever batch_size allows.
BATCH_TOKENS = 4096
PAD = "<moemerge-pad>"  # a pad token for a tokenizer that has none to lend (pad_ready)


def pad_ready(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Batching needs a pad token; set one on this in-memory copy only, never on what we save. A tokenizer
    with no pad, eos or unk token gets a new one: its id may lie past the embedding, so `prompt_batches`
    writes 0 at padded positions (which no real token sees), and no token that text can hold becomes special."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            tokenizer.add_special_tokens({"pad_token": PAD})
        else:
            tokenizer.pad_token = fallback
    tokenizer.padding_side = "right"
    return tokenizer


@dataclass(frozen=True)
class CaptureOptions:
    """Where and how router inputs are computed: device, compute dtype, prompts per batch, activation
    bytes kept in memory (the rest go to a temporary file)."""

    device: torch.device
    dtype: torch.dtype
    batch_size: int = 256
    activation_budget: int = DEFAULT_BUDGET


@dataclass(frozen=True)
class PromptBatch:
    """Prompts tokenized together: their indices, ids and padding mask [B, T], and which tokens are real."""

    prompts: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    real: torch.Tensor


def _special_masks(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_tokens: int | None) -> list:
    """Each prompt's special-tokens mask after truncation to `max_tokens` (its length is the prompt's)."""
    encoded = tokenizer(
        list(prompts), truncation=max_tokens is not None, max_length=max_tokens, return_special_tokens_mask=True
    )
    return encoded["special_tokens_mask"]


def token_counts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_tokens: int | None) -> list[int]:
    """Each prompt's real tokens after truncation to `max_tokens`: those that are not special, or all of them
    when every one is (the rule of `prompt_batches`)."""
    return [len(mask) - sum(mask) or len(mask) for mask in _special_masks(tokenizer, prompts, max_tokens)]


def _length_groups(lengths: list[int], batch_size: int, batch_tokens: int) -> list[list[int]]:
    """Prompt indices sorted by length, cut into batches of at most `batch_size` prompts whose padded size
    (prompts × longest) stays within `batch_tokens`; a longer prompt goes alone."""
    groups: list[list[int]] = [[]]
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        group = groups[-1]
        if group and (len(group) >= batch_size or (len(group) + 1) * lengths[i] > batch_tokens):
            groups.append(group := [])
        group.append(i)
    return groups if groups[0] else []


def prompt_batches(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int,
    max_tokens: int | None,
    batch_tokens: int = BATCH_TOKENS,
) -> list[PromptBatch]:
    """Prompts sorted by length, batched and padded; real tokens are neither padding nor added special tokens
    (a prompt with no other token keeps its special ones, so that it still counts)."""
    lengths = [len(mask) for mask in _special_masks(tokenizer, prompts, max_tokens)]
    batches = []
    for chosen in _length_groups(lengths, batch_size, batch_tokens):
        batch = tokenizer(
            [prompts[i] for i in chosen],
            return_tensors="pt",
            padding=True,
            truncation=max_tokens is not None,
            max_length=max_tokens,
            return_special_tokens_mask=True,
        )
        attention = batch["attention_mask"].bool()
        real = attention & ~batch["special_tokens_mask"].bool()
        real = torch.where(real.any(dim=1, keepdim=True), real, attention)
        ids = batch["input_ids"].masked_fill(~attention, 0)  # right padding under causal attention: never seen
        batches.append(PromptBatch(chosen, ids, batch["attention_mask"], real))
    return batches


class RouterInputs:
    """The router inputs of a prompt set, layer by layer.

    `owners` gives the prompt index of every real token, in the order each layer's capture lists them, and
    `counts` how many of them each batch has.
    """

    def __init__(
        self,
        base: ModelSource,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[str],
        options: CaptureOptions,
        max_tokens: int | None,
    ) -> None:
        self.base, self.options = base, options
        self.batches = prompt_batches(tokenizer, prompts, options.batch_size, max_tokens)
        owners = [torch.tensor(b.prompts)[:, None].expand_as(b.real)[b.real] for b in self.batches]
        self.owners = torch.cat(owners) if owners else torch.zeros(0, dtype=torch.long)
        self.counts = [len(o) for o in owners]  # real tokens per batch

    def layers(
        self, count: int | None = None, keep: torch.Tensor | None = None, on_batch: Callable[[int], None] | None = None
    ) -> Iterator[torch.Tensor]:
        """For layers 0..count-1 (all by default) in turn: the router input of every real token, or of those
        `keep` [tokens, bool] marks, as float32 [tokens, hidden] on the capture device.

        Layer i's weights are read when it is reached and dropped before layer i+1's are read; `on_batch`
        hears of every batch of prompts done, layer after layer.
        """
        for batches in self.layer_batches(count, keep, on_batch):
            yield torch.cat([tokens for _, tokens in batches])

    def layer_batches(
        self, count: int | None = None, keep: torch.Tensor | None = None, on_batch: Callable[[int], None] | None = None
    ) -> Iterator[Iterator[tuple[int, torch.Tensor]]]:
        """As `layers`, but each layer comes as an iterator over (batch index, that batch's captured tokens),
        to be exhausted before the next layer's: a consumer that folds them into running sums never holds a
        whole layer's tokens. Batch i's owners are `owners.split(counts)[i]` (all of them: no `keep`)."""
        stack = LayerStack(self.base, self.options.device, self.options.dtype)
        count = stack.num_layers if count is None else count
        kept = keep.to(self.options.device).split(self.counts) if keep is not None else None
        shapes = [(*b.input_ids.shape, stack.hidden_size) for b in self.batches]
        with Activations(shapes, self.options.dtype, self.options.device, self.options.activation_budget) as hidden:
            for i, batch in enumerate(self.batches):
                hidden[i] = stack.embed(batch.input_ids)
            for layer in range(count):
                yield self._layer(stack, layer, hidden, kept, last=layer == count - 1, on_batch=on_batch)

    def _layer(
        self,
        stack: LayerStack,
        layer: int,
        hidden: Activations,
        kept: Sequence[torch.Tensor] | None,
        last: bool,
        on_batch: Callable[[int], None] | None,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Run every batch through one layer, updating `hidden` in place, and yield each batch's captured tokens."""
        with stack.loaded(layer) as module:
            seen: list[torch.Tensor] = []
            hook = module.post_attention_layernorm.register_forward_hook(lambda _m, _i, out: seen.append(out))
            try:
                for i, batch in enumerate(self.batches):
                    out = stack.forward(hidden[i], batch.attention_mask)
                    if not last:
                        hidden[i] = out
                    tokens = seen.pop()[batch.real.to(out.device)].float()
                    if not torch.isfinite(tokens).all():
                        raise MoemergeError(_overflow(layer, self.options.dtype))
                    if on_batch:
                        on_batch(len(batch.prompts))
                    yield i, tokens if kept is None else tokens[kept[i]]
            finally:
                hook.remove()


def _overflow(layer: int, dtype: torch.dtype) -> str:
    """Finite weights can still compute hidden states beyond the dtype's range: then no gate can be fitted on them
    (the solve would fail on infinities), so say where and what to try."""
    name = str(dtype).removeprefix("torch.")
    remedy = "gate_mode random sets routers without running the base" if dtype == torch.float32 else "try dtype float32"
    return (
        f"base_model: the router inputs of layer {layer} are not finite: the base's hidden states overflow {name} on "
        f"the prompts (its weights are finite); {remedy}"
    )
