"""`training.tune_on_moe` pushes the labelled prompts through the MoE once, layer by layer, keeping their hidden
states between layers. Its definition is the plain one: layer i's router inputs are what the MoE computes when
run up to layer i, with the routers of the layers before i already tuned. Here that definition is computed
independently, one prompt at a time (no padding, no batching), a truncated forward pass per tuned layer, and
the merge's tuning must choose the same routers with the same weights up to float noise.

The fitting itself (fit_gates and token_accuracy from moemerge.gates.trained, split_prompts from
moemerge.inputs.prompts) is shared with the reference: it is tested in test_trained_gates.py; what
is tested here is which inputs it is given.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from support.tiny_models import load_model, make_base, make_expert, read_tensors, tiny_tokenizer, write_recipe

from moemerge.gates.trained import fit_gates, token_accuracy
from moemerge.inputs.prompts import split_prompts
from moemerge.inputs.recipe import TrainingSpec
from moemerge.output.merge import merge

LETTERS = ["abcdefgh", "ijklmnop", "qrstuvwx"]
TRAINING = {"lr": 0.05, "batch_size": 4}  # several padded batches of unequal lengths


def labelled_prompts() -> list[tuple[str, int]]:
    """Eight prompts per expert of its own letters, 3 to 20 characters long, so batches carry padding."""
    rng = random.Random(7)
    return [
        ("".join(rng.choice(letters) for _ in range(rng.randint(3, 20))), expert)
        for expert, letters in enumerate(LETTERS)
        for _ in range(8)
    ]


def reference_tuning(folder, labelled: list[tuple[str, int]], sparse: list[int], spec: TrainingSpec) -> dict:
    """Routers tuned by definition: for each sparse layer in turn, every prompt alone through the MoE cut after
    that layer (routers of earlier layers already tuned), its real tokens' post-attention-norm outputs (BOS
    left out) in order of prompt length (shortest first, ties in prompt order) as the fitting sees them."""
    model, tokenizer = load_model(folder), tiny_tokenizer()
    encoded = [tokenizer(text, return_special_tokens_mask=True) for text, _ in labelled]
    order = sorted(range(len(labelled)), key=lambda i: len(encoded[i]["input_ids"]))
    labels = torch.tensor([labelled[i][1] for i in order])
    counts = [len(encoded[i]["input_ids"]) - sum(encoded[i]["special_tokens_mask"]) for i in order]
    owners = torch.tensor(order).repeat_interleave(torch.tensor(counts))
    token_labels = labels.repeat_interleave(torch.tensor(counts))
    train, held = split_prompts([label for _, label in labelled], spec.holdout, spec.seed)
    in_train, scored = torch.isin(owners, torch.tensor(train)), torch.isin(owners, torch.tensor(held))
    layers = model.model.layers
    result = {"routers": {}, "replaced": [], "before": [], "after": []}
    for layer in sparse:
        features = []
        model.model.layers = layers[: layer + 1]
        for i in order:
            seen = []
            hook = layers[layer].post_attention_layernorm.register_forward_hook(lambda _m, _i, o, s=seen: s.append(o))
            with torch.no_grad():
                model.model(input_ids=torch.tensor([encoded[i]["input_ids"]]))
            hook.remove()
            real = ~torch.tensor(encoded[i]["special_tokens_mask"], dtype=torch.bool)
            features.append(seen[0][0, real])
        model.model.layers = layers
        features = torch.cat(features)[None]
        router = layers[layer].mlp.gate
        fitted = fit_gates(features[:, in_train], token_labels[in_train], len(LETTERS), spec)
        before = token_accuracy(router.weight[None], features[:, scored], token_labels[scored], len(LETTERS))[0][0]
        after = token_accuracy(fitted, features[:, scored], token_labels[scored], len(LETTERS))[0][0]
        if after >= before:
            with torch.no_grad():
                router.weight.copy_(fitted[0])
        result["replaced"].append(after >= before)
        result["before"].append(before)
        result["after"].append(max(before, after))
        result["routers"][f"model.layers.{layer}.block_sparse_moe.gate.weight"] = router.weight.detach().clone()
    return result


def merged(tmp_path, name: str, gate_mode: str, steps: int, tune: bool, moe_layers: list[int] | None):
    base = tmp_path / "base"
    if not base.exists():
        make_base(base, num_hidden_layers=4, initializer_range=0.02)
    experts = []
    for i in range(len(LETTERS)):
        folder = tmp_path / f"e{i}"
        expert = folder if folder.exists() else make_expert(base, folder, seed=i + 1, scale=0.3)
        prompts = [text for text, label in labelled_prompts() if label == i]
        experts.append({"source_model": str(expert), "positive_prompts": prompts})
    fields = {"gate_mode": gate_mode, "training": TRAINING | {"steps": steps, "tune_on_moe": tune}}
    if moe_layers is not None:
        fields["moe_layers"] = moe_layers
    merge(write_recipe(tmp_path / f"{name}.yaml", base, experts, **fields), tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize(
    ("gate_mode", "steps", "moe_layers", "keeps"),
    [("random", 60, None, False), ("hidden", 2, None, True), ("random", 60, [0, 2, 3], False)],
    ids=["random-every-layer", "hidden-keeps-some-routers", "random-layer-1-dense"],
)
def test_one_pass_tuning_equals_a_truncated_pass_per_layer(tmp_path, gate_mode, steps, moe_layers, keeps):
    """`keeps`: the case has a layer whose router is kept (2 fitting steps do worse than hidden gates there),
    so both branches are compared; every case replaces the router of a layer that later layers depend on."""
    plain = merged(tmp_path, "plain", gate_mode, steps, tune=False, moe_layers=moe_layers)
    tuned = merged(tmp_path, "tuned", gate_mode, steps, tune=True, moe_layers=moe_layers)
    sparse = moe_layers or [0, 1, 2, 3]
    expected = reference_tuning(plain, labelled_prompts(), sparse, TrainingSpec(**TRAINING, steps=steps))
    report = json.loads((tuned / "router_tuning.json").read_text())
    assert any(expected["replaced"][:-1]) and all(expected["replaced"]) != keeps, expected["replaced"]
    assert report["layers"] == sparse
    assert report["replaced"] == expected["replaced"]
    assert report["accuracy_before"] == pytest.approx(expected["before"], abs=1e-6)
    assert report["accuracy_after"] == pytest.approx(expected["after"], abs=1e-6)
    written = read_tensors(tuned)
    for name, router in expected["routers"].items():
        error = (written[name] - router).abs().max() / router.abs().max()
        assert error < 1e-5, (name, float(error))
