"""Which experts a merged model's routers choose for a text, read from the router logits themselves."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moemerge.device import cpu_has_native_bf16
from moemerge.errors import MoemergeError, OptionError
from moemerge.files import CONFIG, MANIFEST, read_json_object
from moemerge.formats import format_of_config
from moemerge.hf import load_model, load_tokenizer
from moemerge.tools.moe_layers import MoeLayers, moe_layers

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


# One colour per expert (by index), shared by every terminal view of routing.
EXPERT_COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan", "white", "bright_red")

# Padded tokens per forward pass: routing only, and with every token's next-token logits ([tokens, vocabulary],
# 200 MB in float32 for the demo's 49k vocabulary at 1024 tokens). Chosen with benchmarks/report_speed.py.
BATCH_TOKENS = 4096
LOSS_BATCH_TOKENS = 1024
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def expert_counts(choices: torch.Tensor, experts: int) -> torch.Tensor:
    """Per expert: how many (layer, token) pairs of `choices` [layers, tokens, k] picked it. The one rule for
    counting top-k routing, used by `moemerge route` and by every reply the engine gives."""
    return torch.bincount(choices.reshape(-1), minlength=experts)


@dataclass
class Routing:
    """Router logits of every routing layer (moemerge.tools.moe_layers) for the real tokens of one text (BOS and
    other added specials left out)."""

    logits: torch.Tensor  # [routing layers, real tokens, experts], float32
    top_k: int
    # [tokens - 1]: negative log-likelihood of each next token (all tokens but the first); None when not asked for
    token_losses: torch.Tensor | None
    real: torch.Tensor  # [tokens] bool: which of the text's tokens are real (`logits` holds those, in order)
    layers: tuple[int, ...]  # the routing layers `logits` holds, in order (a dense layer has no routing)

    @property
    def predicted_tokens(self) -> int:
        """How many next tokens `loss` is over (all tokens but the first)."""
        return max(0, len(self.real) - 1)

    @property
    def loss(self) -> float:
        """Mean next-token negative log-likelihood over the text (routed with `losses`)."""
        if self.token_losses is None:
            raise ValueError("this routing was computed without token losses")
        return float(self.token_losses.mean()) if len(self.token_losses) else float("nan")

    @property
    def choices(self) -> torch.Tensor:
        """[layers, tokens, k] expert indices, as the MoE block picks them."""
        return self.logits.topk(self.top_k, dim=-1).indices

    def shares(self) -> torch.Tensor:
        """Per expert: the fraction of (layer, token) pairs whose top-k included it; sums to top_k."""
        layers, tokens, experts = self.logits.shape
        return expert_counts(self.choices, experts).float() / max(1, layers * tokens)

    def layer_shares(self) -> torch.Tensor:
        """[layers, experts]: per layer, the fraction of tokens whose top-k included each expert."""
        one_hot = torch.nn.functional.one_hot(self.choices, self.logits.shape[-1]).sum(dim=2).float()
        return one_hot.mean(dim=1)

    def layer_top1(self) -> torch.Tensor:
        """[layers]: per layer, the expert that is the first choice of most tokens."""
        first = torch.nn.functional.one_hot(self.logits.argmax(dim=-1), self.logits.shape[-1]).sum(dim=1)
        return first.argmax(dim=-1)

    def top1_accuracy(self, expert: int) -> torch.Tensor:
        """[layers]: the fraction of tokens whose highest-scoring expert is `expert`."""
        return (self.logits.argmax(dim=-1) == expert).float().mean(dim=1)


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, tokens] input ids with the tokenizer's added specials (BOS), and [tokens] which ones are real text."""
    batch = tokenizer(text, return_tensors="pt", return_special_tokens_mask=True)
    real = ~batch["special_tokens_mask"][0].bool()
    return batch["input_ids"], real if real.any() else torch.ones_like(real)


def _next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[tokens - 1] negative log-likelihood of ids[1:] under logits [tokens, vocabulary], on the CPU."""
    return torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:].to(logits.device), reduction="none").cpu()


def next_token_losses(model: PreTrainedModel, ids: torch.Tensor, **forward: object) -> tuple[torch.Tensor, object]:
    """[tokens - 1] negative log-likelihood of each next token of ids [1, tokens], and the model's output.

    From the logits, not `labels=`: with router logits on, the model's loss also holds the auxiliary
    load-balancing term, which is not the text's likelihood."""
    with torch.inference_mode():
        out = model(input_ids=ids.to(model.device), use_cache=False, **forward)
    return _next_token_nll(out.logits[0], ids[0]), out


def _batches(
    encoded: list[tuple[torch.Tensor, torch.Tensor]], budget: int
) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Consecutive runs of tokenized texts whose padded size (texts × longest) stays within `budget` tokens (a
    longer text goes alone)."""
    batch: list[tuple[torch.Tensor, torch.Tensor]] = []
    for item in encoded:
        width = max([item[0].shape[1]] + [ids.shape[1] for ids, _ in batch])
        if batch and (len(batch) + 1) * width > budget:
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def _route_batch(
    model: PreTrainedModel, moe: MoeLayers, batch: list[tuple[torch.Tensor, torch.Tensor]], losses: bool
) -> Iterator[Routing]:
    """One forward pass over texts padded on the right, with an attention mask: a causal model's real tokens
    attend only to the tokens before them, so each text's router logits are those it gets alone (up to float
    rounding), at its own positions. Without `losses` the language-model head runs on one position only."""
    lengths = [ids.shape[1] for ids, _ in batch]
    ids = torch.zeros(len(batch), max(lengths), dtype=torch.long)  # padding: any id, masked out, after the text
    mask = torch.zeros_like(ids)
    for row, ((text_ids, _), length) in enumerate(zip(batch, lengths, strict=True)):
        ids[row, :length] = text_ids[0]
        mask[row, :length] = 1
    with torch.inference_mode():
        out = model(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            use_cache=False,
            output_router_logits=True,
            logits_to_keep=0 if losses else 1,
        )
    logits = moe.routing_logits(out.router_logits).float().cpu().unflatten(1, ids.shape)
    for row, ((text_ids, real), length) in enumerate(zip(batch, lengths, strict=True)):
        token_losses = _next_token_nll(out.logits[row, :length], text_ids[0]) if losses else None
        yield Routing(
            logits[:, row, :length][:, real], model.config.num_experts_per_tok, token_losses, real, moe.routing
        )


def route_texts(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], losses: bool = False
) -> Iterator[Routing]:
    """Each text's routing, in order, from forward passes over batches of texts (what `report`, `route` and
    `eval` run); with `losses`, also each text's token losses."""
    moe = moe_layers(model)
    encoded = [tokenize(tokenizer, text) for text in texts]
    for batch in _batches(encoded, LOSS_BATCH_TOKENS if losses else BATCH_TOKENS):
        yield from _route_batch(model, moe, batch, losses)


def route(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str, losses: bool = True) -> Routing:
    """Run the MoE once over `text`; returns router logits of its real tokens and (with `losses`) its token
    losses."""
    return next(route_texts(model, tokenizer, [text], losses))


def routing_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The dtype to route in: `auto` is bfloat16 on a CPU that computes it natively (several times faster,
    and top-1 experts agree with float32 routing on nearly every token: benchmarks/report_speed.py), float32
    elsewhere; or the dtype named."""
    if choice == "auto":
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32
    if choice not in DTYPES:
        raise OptionError("{dtype} {choice!r}: use auto, " + " or ".join(DTYPES), choice=choice)
    return DTYPES[choice]


def expert_names(out: Path, count: int) -> list[str]:
    """Names saved by the merge in moemerge.json, or expert0.. for outputs made elsewhere."""
    manifest = out / MANIFEST
    if manifest.is_file():
        names = read_json_object(manifest).get("expert_names") or []
        if len(names) == count:
            return names
    return [f"expert{i}" for i in range(count)]


def load_moe(
    out: Path, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, list[str]]:
    """A merged output (in `dtype`), its tokenizer and its expert names; refuses folders that are not MoE
    outputs."""
    if not (out / CONFIG).is_file():
        raise MoemergeError(f"{out}: not a model folder (no {CONFIG})")
    config = read_json_object(out / CONFIG)
    count = format_of_config(config, str(out / CONFIG)).num_experts(config)
    model = load_model(out, dtype).to(device)
    tokenizer = load_tokenizer(out)
    return model, tokenizer, expert_names(out, count)
