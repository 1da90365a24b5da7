"""Experts whose vocabulary differs from the base's: refused by default naming the tokens, built on request."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest
import torch
from support.paths import CLI
from support.tiny_models import make_base, make_expert, make_lora, read_tensors, tiny_tokenizer, write_recipe

from moemerge.cli import error_line
from moemerge.errors import MoemergeError
from moemerge.output.merge import MergeOptions, merge


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    base = make_base(root / "base")
    grown = make_base(root / "grown", seed=1, vocab_size=66)  # two tokens added by a fine-tune
    (grown / "added_tokens.json").write_text(json.dumps({"<tool>": 64, "</tool>": 65}))
    padded = make_base(root / "padded", seed=3)  # same 64 rows: the tokenizer's 35 tokens leave room for more
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<tool>"]})
    tokenizer.save_pretrained(padded)
    return {"base": base, "grown": grown, "shrunk": make_base(root / "shrunk", seed=2, vocab_size=62), "padded": padded}


def test_added_tokens_are_named_and_the_way_out_given(tmp_path, models):
    recipe = write_recipe(tmp_path / "r.yaml", models["base"], [models["base"], models["grown"]])
    with pytest.raises(MoemergeError) as info:
        merge(recipe, tmp_path / "out")
    message = str(info.value)
    assert message.startswith("experts[1]: its vocabulary has 66 embedding rows, the base's 64")
    assert "adds 2 token(s) the base lacks: '<tool>', '</tool>'" in message and " allow_vocab_mismatch " in message
    assert "--" not in message and "pass --allow-vocab-mismatch to build" in error_line(info.value)
    assert not (tmp_path / "out").exists()


def test_tokens_added_inside_a_padded_vocabulary_are_found(tmp_path, models):
    """Same number of embedding rows, but the expert's tokenizer has a token the base's does not know."""
    recipe = write_recipe(tmp_path / "r.yaml", models["base"], [models["base"], models["padded"]], gate_mode="random")
    with pytest.raises(MoemergeError, match=r"^experts\[1\]: it adds 1 token\(s\) the base lacks: '<tool>'\. Use"):
        merge(recipe, tmp_path / "out")
    merge(recipe, tmp_path / "out", MergeOptions(allow_vocab_mismatch=True))
    assert json.loads((tmp_path / "out" / "moemerge.json").read_text())["dropped_tokens"] == {"experts[1]": ["<tool>"]}


def test_adapter_that_ships_a_tokenizer_with_added_tokens(tmp_path, models):
    """LoRA fine-tunes that add tokens save their tokenizer beside the adapter: it is checked like a model's."""
    adapter = tmp_path / "adapter"
    make_lora(models["base"], adapter, seed=1)
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.save_pretrained(adapter)
    recipe = write_recipe(tmp_path / "r.yaml", models["base"], [models["base"], adapter], gate_mode="random")
    with pytest.raises(MoemergeError, match=r"^experts\[1\]: it adds 1 token\(s\) the base lacks: '<\|im_start\|>'"):
        merge(recipe, tmp_path / "out")


def test_fewer_rows_only_warn(tmp_path, models, caplog):
    """A trimmed (padded) vocabulary is harmless for the expert's MLP: a warning, and the merge goes on."""
    recipe = write_recipe(tmp_path / "r.yaml", models["base"], [models["shrunk"], models["base"]], gate_mode="random")
    with caplog.at_level(logging.WARNING, logger="moemerge"):
        merge(recipe, tmp_path / "out")
    assert "experts[0]: 62 embedding rows, the base's 64; ids 62..63 were never seen by it" in caplog.text
    assert json.loads((tmp_path / "out" / "moemerge.json").read_text())["dropped_tokens"] == {}


def test_allowed_mismatch_keeps_the_base_vocabulary_and_records_what_was_left_out(tmp_path, models, caplog):
    recipe = write_recipe(tmp_path / "r.yaml", models["base"], [models["base"], models["grown"]], gate_mode="random")
    with caplog.at_level(logging.WARNING, logger="moemerge"):
        merge(recipe, tmp_path / "out", MergeOptions(allow_vocab_mismatch=True))
    assert "experts[1]: 2 added token(s) left out" in caplog.text
    manifest = json.loads((tmp_path / "out" / "moemerge.json").read_text())
    assert manifest["dropped_tokens"] == {"experts[1]": ["<tool>", "</tool>"]}
    written, base, grown = read_tensors(tmp_path / "out"), read_tensors(models["base"]), read_tensors(models["grown"])
    assert torch.equal(written["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 64
    want = grown["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(written["model.layers.1.block_sparse_moe.experts.1.w3.weight"], want)


def test_cli_flag(tmp_path, models):
    expert = make_expert(models["grown"], tmp_path / "grown-expert", seed=5)
    recipe = write_recipe(tmp_path / "r.yaml", models["base"], [models["base"], expert], gate_mode="random")
    command = [CLI, str(recipe), str(tmp_path / "out")]
    refused = subprocess.run(command, capture_output=True, text=True)
    assert refused.returncode != 0 and "--allow-vocab-mismatch" in refused.stderr
    done = subprocess.run([*command, "--allow-vocab-mismatch"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "2 added token(s) left out" in done.stderr
