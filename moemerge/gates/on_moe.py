"""Routers tuned on the MoE itself (`training.tune_on_moe`): refit each router on the inputs the merged MoE
really gives it.

Hidden and trained gates are fitted on the dense base's router inputs. In the MoE, layer i's router sees
what layers < i compute with their experts' MLPs and their routers, and (with non_expert_weights: average)
with other attention, so its inputs drift from the base's. Here the merged output is loaded as the MoE it
is, and its routers are refitted layer by layer, in order: layer i's router inputs are captured with the
routers of layers < i already refitted, a softmax-regression router is fitted on them (as trained gates
are, moemerge.gates.trained) from the labelled prompts' training share, and it replaces the router only
where its held-out routing accuracy is at least the current router's on the same inputs; so tuning never
lowers a layer's held-out accuracy on the inputs it sees. The new routers are written over the old ones in
the shards, in place (same names, shapes and dtype).

Cost: the whole MoE in memory (unlike the streamed merge), and one truncated forward pass per sparse layer.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moemerge.files import SAFETENSORS_INDEX as INDEX_NAME
from moemerge.formats.format import OutputFormat
from moemerge.gates.router_inputs import pad_ready, prompt_batches
from moemerge.gates.trained import fit_gates, split_prompts, token_accuracy
from moemerge.hf import load_model, load_tokenizer
from moemerge.inputs.recipe import TrainingSpec
from moemerge.inputs.safetensors_header import read_header

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
    shard_sha256: dict[str, str] = field(default_factory=dict)  # the rewritten shards' new digests

    def as_dict(self) -> dict:
        return asdict(self)


def _router(layer: torch.nn.Module) -> torch.nn.Module:
    """The router module: `block_sparse_moe.gate` in transformers 4's Mixtral, `mlp.gate` elsewhere."""
    moe = getattr(layer, "block_sparse_moe", None) or layer.mlp
    return moe.gate


def _layer_inputs(model, tokenizer, texts: list[str], layer: int, spec: TrainingSpec) -> tuple[torch.Tensor, ...]:
    """Router inputs of `layer` for every real token [tokens, hidden], and each token's prompt [tokens]: a hook
    on that layer's post-attention norm, the decoder stack cut after `layer`, so later layers cost nothing."""
    layers = model.model.layers
    captured: list[torch.Tensor] = []
    hook = layers[layer].post_attention_layernorm.register_forward_hook(lambda _m, _i, out: captured.append(out))
    features, owners = [], []
    model.model.layers = layers[: layer + 1]
    try:
        for batch in prompt_batches(tokenizer, texts, spec.batch_size, spec.max_tokens):
            captured.clear()
            with torch.inference_mode():
                model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            features.append(captured[0][batch.real].float())
            owners.append(torch.tensor(batch.prompts)[:, None].expand_as(batch.real)[batch.real])
    finally:
        model.model.layers = layers
        hook.remove()
    return torch.cat(features), torch.cat(owners)


def tune_on_moe(
    folder: Path,
    output: OutputFormat,
    sparse_layers: list[int],
    labelled: list[tuple[str, int]],
    num_experts: int,
    spec: TrainingSpec,
) -> TuningReport:
    """Refit the routers of the MoE written in `folder` (config.json and shards), layer by layer, and write
    the replaced ones back into its shards."""
    model = load_model(folder, torch.float32)
    tokenizer = pad_ready(load_tokenizer(folder))
    texts, labels = [text for text, _ in labelled], [label for _, label in labelled]
    train, held = split_prompts(labels, spec.holdout, spec.seed)
    scored_prompts = held or train
    report = TuningReport([], [], [], [], len(train), len(held))
    replaced: dict[str, torch.Tensor] = {}
    for layer in sparse_layers:
        features, owners = _layer_inputs(model, tokenizer, texts, layer, spec)
        token_labels = torch.tensor(labels, device=owners.device)[owners]
        in_train = torch.isin(owners, torch.tensor(train, device=owners.device))
        scored = torch.isin(owners, torch.tensor(scored_prompts, device=owners.device))
        router = _router(model.model.layers[layer])
        current = router.weight.detach().float()[None]
        fitted = fit_gates(features[None, in_train], token_labels[in_train], num_experts, spec)
        before = token_accuracy(current, features[None, scored], token_labels[scored], num_experts)[0][0]
        after = token_accuracy(fitted, features[None, scored], token_labels[scored], num_experts)[0][0]
        better = after >= before
        if better:
            with torch.no_grad():
                router.weight.copy_(fitted[0].to(router.weight.dtype))
            replaced[output.gate_name(layer)] = fitted[0]
        report.layers.append(layer)
        report.accuracy_before.append(before)
        report.accuracy_after.append(max(before, after))
        report.replaced.append(better)
        log.info(f"layer {layer}: routing accuracy on the MoE's own inputs {before:.3f} -> {max(before, after):.3f}")
    del model
    for file in rewrite_tensors(folder, replaced):
        with file.open("rb") as handle:  # the shard's digest as recorded at write time no longer holds
            report.shard_sha256[file.name] = hashlib.file_digest(handle, "sha256").hexdigest()
    return report


def rewrite_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> list[Path]:
    """Overwrite tensors of a safetensors folder in place, each in the dtype and shape it already has; returns
    the files changed (their digests must be taken again)."""
    index = folder / INDEX_NAME
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else []
    files = [folder / name for name in files] or sorted(folder.glob("*.safetensors"))
    changed = []
    for file in files:
        infos = read_header(file)
        mine = [name for name in tensors if name in infos]
        if not mine:
            continue
        changed.append(file)
        with file.open("r+b") as handle:
            for name in mine:
                info = infos[name]
                value = tensors[name].to(info.dtype).reshape(info.shape).contiguous()
                handle.seek(info.start)
                handle.write(value.view(torch.uint8).numpy().tobytes())
    return changed
