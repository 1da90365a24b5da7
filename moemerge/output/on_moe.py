"""Routers tuned on the MoE itself (`training.tune_on_moe`): refit each router on the inputs the merged MoE
really gives it.

Hidden and trained gates are fitted on the dense base's router inputs. In the MoE, layer i's router sees
what layers < i compute with their experts' MLPs and their routers, and (with non_expert_weights: average)
with other attention, so its inputs drift from the base's. Here the merged output is loaded as the MoE it
is, and its routers are refitted layer by layer, in order: layer i's router inputs are captured with the
routers of layers < i already refitted, a softmax-regression router is fitted on them (as trained gates
are, moemerge.gates.trained) from the labelled prompts' training share, and it replaces the router only
where its held-out routing accuracy is at least the current router's on the same inputs; so tuning never
lowers a layer's held-out accuracy on the inputs it sees. The new routers are returned, and the writer
writes them over the old ones in the shards, in place (moemerge.output.writer.rewrite_tensors), recording
the rewritten shards' digests as it wrote the others'.

Cost: the whole MoE in memory (unlike the streamed merge), the labelled prompts' hidden states at one layer,
and one forward pass through the MoE, layer by layer (a layer whose router is replaced runs twice). A
labelled set larger than trained gates' token budget is sampled the same way first (stratified per expert),
so the hidden states, like trained gates' router inputs, do not grow with the set.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moemerge.formats.format import OutputFormat
from moemerge.gates.layer_stream import _PassThrough
from moemerge.gates.router_inputs import PromptBatch, pad_ready, prompt_batches
from moemerge.gates.trained import fit_gates, labelled_sample, token_accuracy
from moemerge.hf import load_model, load_tokenizer
from moemerge.inputs.prompts import split_prompts
from moemerge.inputs.recipe import TrainingSpec

log = logging.getLogger("moemerge")


@dataclass
class TuningReport:
    """Held-out routing accuracy per sparse layer on the MoE's own router inputs, before and after."""

    layers: list[int]
    accuracy_before: list[float]
    accuracy_after: list[float]
    replaced: list[bool]
    train_prompts: int
    holdout_prompts: int
    routers: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # tensor name → replaced router

    def as_dict(self) -> dict:
        """The report as router_tuning.json holds it: the accuracies, not the routers."""
        return {key: value for key, value in asdict(self).items() if key != "routers"}


@contextmanager
def _alone(model: torch.nn.Module, layer: int) -> Iterator[torch.nn.Module]:
    """The decoder stack with every layer but `layer` passed through and no final norm: called on layer
    `layer`'s input hidden states as `inputs_embeds`, it returns that layer's output, with the causal and
    padding masks, positions and rotary embeddings the whole model gives that layer (as gates/layer_stream.py
    does for the dense base)."""
    body = model.model
    layers, norm = body.layers, body.norm
    body.layers = torch.nn.ModuleList([module if i == layer else _PassThrough() for i, module in enumerate(layers)])
    body.norm = torch.nn.Identity()
    try:
        yield layers[layer]
    finally:
        body.layers, body.norm = layers, norm


def _run_layer(
    model: torch.nn.Module, layer: int, hidden: list[torch.Tensor], batches: list[PromptBatch]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Layer `layer` applied to every batch's hidden states [B, T, H]: the outputs, batch by batch, and the
    router inputs of every real token [tokens, hidden] (its post-attention norm's output), batches in order."""
    outputs, features = [], []
    with _alone(model, layer) as module:
        seen: list[torch.Tensor] = []
        hook = module.post_attention_layernorm.register_forward_hook(lambda _m, _i, out: seen.append(out))
        try:
            for states, batch in zip(hidden, batches, strict=True):
                with torch.no_grad():
                    out = model.model(inputs_embeds=states, attention_mask=batch.attention_mask, use_cache=False)
                outputs.append(out.last_hidden_state)
                features.append(seen.pop()[batch.real].float())
        finally:
            hook.remove()
    return outputs, torch.cat(features)


def tune_on_moe(
    folder: Path,
    out_format: OutputFormat,
    sparse_layers: list[int],
    labelled: list[tuple[str, int]],
    num_experts: int,
    spec: TrainingSpec,
) -> TuningReport:
    """Refit the routers of the MoE written in `folder` (config.json and shards), layer by layer; the report
    holds the replaced ones (`routers`), for the writer to write into the shards.

    The labelled prompts' hidden states are kept at the current layer's input: layer i is run once on them,
    which gives its router inputs and its output; when its router is replaced it is run again, so that layer
    i+1's inputs come from the new router, as they will in the written MoE.
    """
    model = load_model(folder, torch.float32)
    tokenizer = pad_ready(load_tokenizer(folder))
    texts, labels = [text for text, _ in labelled], [label for _, label in labelled]
    chosen = labelled_sample(tokenizer, texts, labels, spec, model.config.hidden_size)
    if len(chosen) < len(texts):
        log.info(f"tuning on the MoE: {len(chosen)} of {len(texts)} labelled prompts fill the token budget")
        texts, labels = [texts[i] for i in chosen], [labels[i] for i in chosen]
    train, held = split_prompts(labels, spec.holdout, spec.seed)
    batches = prompt_batches(tokenizer, texts, spec.batch_size, spec.max_tokens)
    owners = torch.cat([torch.tensor(b.prompts)[:, None].expand_as(b.real)[b.real] for b in batches])
    token_labels = torch.tensor(labels)[owners]
    in_train = torch.isin(owners, torch.tensor(train))
    scored = torch.isin(owners, torch.tensor(held or train))
    report = TuningReport([], [], [], [], len(train), len(held))
    with torch.no_grad():
        hidden = [model.model.embed_tokens(batch.input_ids) for batch in batches]
    for layer in range(max(sparse_layers, default=-1) + 1):
        outputs, features = _run_layer(model, layer, hidden, batches)
        if layer not in sparse_layers:
            hidden = outputs
            continue
        router = out_format.moe_block(model, layer).gate
        current = router.weight.detach().float()[None]
        fitted = fit_gates(features[None, in_train], token_labels[in_train], num_experts, spec)
        before = token_accuracy(current, features[None, scored], token_labels[scored], num_experts)[0][0]
        after = token_accuracy(fitted, features[None, scored], token_labels[scored], num_experts)[0][0]
        better = after >= before
        if better:
            with torch.no_grad():
                router.weight.copy_(fitted[0].to(router.weight.dtype))
            report.routers[out_format.gate_name(layer)] = fitted[0]
            if layer != max(sparse_layers):  # later routers must see what the new router makes of this layer
                outputs = _run_layer(model, layer, hidden, batches)[0]
        hidden = outputs
        report.layers.append(layer)
        report.accuracy_before.append(before)
        report.accuracy_after.append(max(before, after))
        report.replaced.append(better)
        log.info(f"layer {layer}: routing accuracy on the MoE's own inputs {before:.3f} -> {max(before, after):.3f}")
    return report
