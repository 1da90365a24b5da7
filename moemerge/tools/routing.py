"""Which experts a merged model's routers choose for a text, read from the router logits themselves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moemerge.errors import MoemergeError
from moemerge.files import CONFIG, MANIFEST, read_json_object
from moemerge.formats import format_of_config
from moemerge.hf import load_model, load_tokenizer
from moemerge.tools.moe_layers import moe_layers

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


# One colour per expert (by index), shared by every terminal view of routing.
EXPERT_COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan", "white", "bright_red")


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
    token_losses: torch.Tensor  # [tokens - 1]: negative log-likelihood of each next token (all tokens but the first)
    real: torch.Tensor  # [tokens] bool: which of the text's tokens are real (`logits` holds those, in order)
    layers: tuple[int, ...]  # the routing layers `logits` holds, in order (a dense layer has no routing)

    @property
    def predicted_tokens(self) -> int:
        """How many next tokens `loss` is over (all tokens but the first)."""
        return len(self.token_losses)

    @property
    def loss(self) -> float:
        """Mean next-token negative log-likelihood over the text."""
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


def next_token_losses(model: PreTrainedModel, ids: torch.Tensor, **forward: object) -> tuple[torch.Tensor, object]:
    """[tokens - 1] negative log-likelihood of each next token of ids [1, tokens], and the model's output.

    From the logits, not `labels=`: with router logits on, the model's loss also holds the auxiliary
    load-balancing term, which is not the text's likelihood."""
    with torch.inference_mode():
        out = model(input_ids=ids.to(model.device), use_cache=False, **forward)
    targets = ids[0, 1:].to(model.device)
    losses = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), targets, reduction="none")
    return losses.cpu(), out


def route(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str) -> Routing:
    """Run the MoE once over `text`; returns router logits of its real tokens and the text's token losses."""
    moe = moe_layers(model)
    ids, real = tokenize(tokenizer, text)
    losses, out = next_token_losses(model, ids, output_router_logits=True)
    logits = moe.routing_logits(out.router_logits).float().cpu()[:, real]
    return Routing(logits, model.config.num_experts_per_tok, losses, real, moe.routing)


def expert_names(out: Path, count: int) -> list[str]:
    """Names saved by the merge in moemerge.json, or expert0.. for outputs made elsewhere."""
    manifest = out / MANIFEST
    if manifest.is_file():
        names = read_json_object(manifest).get("expert_names") or []
        if len(names) == count:
            return names
    return [f"expert{i}" for i in range(count)]


def load_moe(out: Path, device: torch.device) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, list[str]]:
    """A merged output, its tokenizer and its expert names; refuses folders that are not MoE outputs."""
    if not (out / CONFIG).is_file():
        raise MoemergeError(f"{out}: not a model folder (no {CONFIG})")
    config = read_json_object(out / CONFIG)
    count = format_of_config(config, str(out / CONFIG)).num_experts(config)
    model = load_model(out, torch.float32).to(device)
    tokenizer = load_tokenizer(out)
    return model, tokenizer, expert_names(out, count)
