"""routing.png: the shares it draws equal the written routers applied to the base's router inputs (computed here
text by text with transformers' hooks); every merge with prompts writes it, lists it in moemerge.json and
shows it in the card; random gates write none and say there is nothing to picture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from support.tiny_models import base_with_experts, write_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from moemerge.gates.prompt_shares import first_choice_shares
from moemerge.gates.router_inputs import CaptureOptions, pad_ready
from moemerge.hf import load_tokenizer
from moemerge.inputs.sources import ModelSource
from moemerge.output.merge import merge

TEXTS = ["aaaa bbb", "abc abc abc", "zz yy", "hello there", "a"]
GROUPS = [0, 0, 1, 1, 2]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    return base_with_experts(tmp_path_factory.mktemp("picture"))


def _expected_shares(base: Path, routers: dict[int, torch.Tensor]) -> torch.Tensor:
    """Each text alone through the dense base; a token's first choice is argmax of router · its
    post-attention-norm output; shares per group and layer over its real tokens."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    counts = torch.zeros(max(GROUPS) + 1, len(routers), 3)
    seen: dict[int, torch.Tensor] = {}
    for layer in routers:  # the model is thrown away after, hooks and all
        model.model.layers[layer].post_attention_layernorm.register_forward_hook(
            lambda _m, _i, out, layer=layer: seen.__setitem__(layer, out[0])
        )
    for text, group in zip(TEXTS, GROUPS, strict=True):
        batch = tokenizer(text, return_tensors="pt", return_special_tokens_mask=True)
        real = ~batch["special_tokens_mask"][0].bool()
        with torch.no_grad():
            model(input_ids=batch["input_ids"])
        for column, (layer, router) in enumerate(sorted(routers.items())):
            first = (seen[layer][real] @ router.T).argmax(dim=-1)
            counts[group, column] += torch.bincount(first, minlength=3).float()
    return counts / counts.sum(dim=-1, keepdim=True)


def test_shares_are_the_routers_first_choices_on_the_base_router_inputs(sources):
    base = sources / "base"
    generator = torch.Generator().manual_seed(5)
    routers = {0: torch.randn(3, 32, generator=generator), 2: torch.randn(3, 32, generator=generator)}
    tokenizer = pad_ready(load_tokenizer(base))
    options = CaptureOptions(torch.device("cpu"), torch.float32, batch_size=2)  # several batches, with padding
    shares = first_choice_shares(ModelSource(base, "base"), tokenizer, TEXTS, GROUPS, routers, options, 64)
    expected = _expected_shares(base, routers)
    assert torch.allclose(shares, expected, atol=1e-6), (shares, expected)
    assert expected.std() > 0.1, "the routers must send the groups' tokens to different experts"


def test_a_merge_with_prompts_draws_lists_and_shows_its_routing_picture(sources, tmp_path):
    experts = [{"source_model": str(sources / f"e{i}"), "name": f"e{i}"} for i in range(3)]
    recipe = write_recipe(tmp_path / "recipe.yaml", sources / "base", experts)
    merge(recipe, tmp_path / "out")
    out = tmp_path / "out"
    record = json.loads((out / "moemerge.json").read_text())["routing_picture"]
    assert record["file"] == "routing.png" and record["texts"] == 3 and record["layers"] == [0, 1, 2]
    with Image.open(out / "routing.png") as picture:
        assert picture.format == "PNG" and picture.width > 300
    card = (out / "README.md").read_text()
    assert "](routing.png)" in card and "each expert's own prompts (3 texts)" in card


def test_trained_gates_picture_their_held_out_prompts(sources, tmp_path):
    experts = [{"source_model": str(sources / f"e{i}"), "name": f"e{i}"} for i in range(3)]
    rows = [f"{letter * (3 + n)} {letter * 2},e{i}" for i, letter in enumerate("abc") for n in range(5)]
    (tmp_path / "labelled.csv").write_text("prompt,expert\n" + "\n".join(rows) + "\n")
    training = {"steps": 20, "holdout": 0.4}
    recipe = write_recipe(
        tmp_path / "recipe.yaml", sources / "base", experts, gate_mode="trained", dataset_csv="labelled.csv"
    )
    text = recipe.read_text() + "training:\n" + "".join(f"  {k}: {v}\n" for k, v in training.items())
    recipe.write_text(text)
    merge(recipe, tmp_path / "out")
    record = json.loads((tmp_path / "out" / "moemerge.json").read_text())["routing_picture"]
    held_out = json.loads((tmp_path / "out" / "gate_training.json").read_text())["holdout_prompts"]
    assert record["prompts"] == "held-out labelled prompts" and record["texts"] == held_out == 3 * 2
    assert (tmp_path / "out" / "routing.png").is_file()


def test_random_gates_draw_nothing_and_the_card_says_so(sources, tmp_path):
    experts = [str(sources / f"e{i}") for i in range(3)]
    recipe = write_recipe(tmp_path / "recipe.yaml", sources / "base", experts, gate_mode="random")
    merge(recipe, tmp_path / "out")
    out = tmp_path / "out"
    assert not (out / "routing.png").exists()
    assert json.loads((out / "moemerge.json").read_text())["routing_picture"]["file"] is None
    card = (out / "README.md").read_text()
    assert "There is nothing to picture: the routers are random" in card and "routing.png" not in card
