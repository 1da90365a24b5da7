"""Where the written routers send a prompt set: per layer, the share of each group's tokens whose first choice
is each expert, with the routers applied to the dense base's router inputs (what hidden and trained gates are
fitted on), one layer at a time, so memory holds one layer of the base and one layer's tokens, never the MoE.

In the MoE, a router's inputs also carry what earlier layers' experts computed, so later layers drift from
this; `moemerge report` shows the MoE's own routing."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from moemerge.gates.router_inputs import CaptureOptions, RouterInputs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from moemerge.inputs.sources import ModelSource


def first_choice_shares(
    base: ModelSource,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    groups: Sequence[int],
    routers: Mapping[int, torch.Tensor],
    options: CaptureOptions,
    max_tokens: int,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """[group, layer (routers' keys in order), expert]: the share of the group's real tokens whose highest
    router logit (`routers[layer]` [experts, hidden] · router input) is each expert. `groups[i]` is text i's
    group (0..max); a group without tokens gets zeros."""
    layers = sorted(routers)
    experts = next(iter(routers.values())).shape[0]
    count = max(groups) + 1
    inputs = RouterInputs(base, tokenizer, list(texts), options, max_tokens)
    token_groups = torch.tensor(list(groups))[inputs.owners]
    totals = torch.bincount(token_groups, minlength=count).clamp_min(1).float()
    shares = torch.zeros(count, len(layers), experts)
    position = {layer: i for i, layer in enumerate(layers)}
    for layer, features in enumerate(inputs.layers(layers[-1] + 1, on_batch=on_batch)):
        if layer not in position:
            continue
        first = (features @ routers[layer].to(features.device, features.dtype).T).argmax(dim=-1).cpu()
        counts = torch.zeros(count, experts).index_put_((token_groups, first), torch.ones(len(first)), accumulate=True)
        shares[:, position[layer]] = counts / totals[:, None]
    return shares
