"""The format registry (moemerge.formats.FORMATS) is the one list of output formats: every format class is in
it, the names a recipe's `architecture:` accepts (inputs.recipe, so that reading a recipe does not import the
formats) are exactly its names, and every text that lists the formats (the CLI's help, the package docstring,
the README's recipe reference, the compatibility table, the model card) names each one; each format is in the
shape tests and the end-to-end family tests. A format added without its registry entry, texts or tests
fails here (docs/layout.md, "Adding an output format")."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_families import PAIRS
from test_format_shapes import CASES, base_config, layout
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

import moemerge
import moemerge.formats
from moemerge.cli import app
from moemerge.formats import FORMATS
from moemerge.formats.format import OutputFormat
from moemerge.inputs.families import FAMILIES
from moemerge.inputs.recipe import ARCHITECTURE_ALIASES, ARCHITECTURES, parse_recipe
from moemerge.output.card import model_card

ROOT = Path(__file__).resolve().parents[2]
# the input family each format is built from in the tests below (one it can hold)
FAMILY_OF = {"mixtral": "llama", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3"}


def format_classes() -> set[type]:
    """Every concrete OutputFormat subclass defined in a module of moemerge/formats."""
    found = set()
    for module in pkgutil.iter_modules(moemerge.formats.__path__, "moemerge.formats."):
        for _, cls in inspect.getmembers(importlib.import_module(module.name), inspect.isclass):
            if issubclass(cls, OutputFormat) and not inspect.isabstract(cls) and cls.__module__ == module.name:
                found.add(cls)
    return found


def test_every_format_class_is_in_the_registry():
    assert format_classes() == {type(fmt) for fmt in FORMATS.values()}
    assert all(name == fmt.name for name, fmt in FORMATS.items())


def test_the_recipe_accepts_exactly_the_formats_written():
    assert ARCHITECTURES == tuple(FORMATS) == ("mixtral", "qwen2_moe", "qwen3_moe")


def test_aliases_and_family_defaults_name_formats():
    assert set(ARCHITECTURE_ALIASES.values()) <= set(FORMATS)
    assert not set(ARCHITECTURE_ALIASES) & set(FORMATS)
    assert {family.default_output for family in FAMILIES.values()} <= set(FORMATS)


def test_every_text_that_lists_the_formats_names_each_registered_one():
    titles = ", ".join(fmt.title for fmt in FORMATS.values())
    assert f"({titles})" in CliRunner().invoke(app, ["--help"], terminal_width=200).output
    assert f"({titles})" in moemerge.__doc__
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    listed = re.search(r"^architecture: \S+ +# ([\w| ]+?) \(", readme, re.MULTILINE)
    assert listed and listed.group(1).split(" | ") == list(FORMATS)
    table = (ROOT / "docs" / "compatibility.md").read_text(encoding="utf-8")
    rows = [line.split("|")[2] for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert all(any(fmt.title in row for row in rows) for fmt in FORMATS.values())


@pytest.mark.parametrize("name", list(FORMATS))
def test_the_model_card_names_the_format(name):
    fmt = FORMATS[name]
    experts = [{"source_model": "a"}, {"source_model": "b"}]
    recipe = parse_recipe({"base_model": "org/base", "experts": experts, "gate_mode": "random"})
    stats = {"name": "out", "layers": 2, "total_params": 10, "active_params": 8, "model_type": fmt.model_type}
    stats |= {"title": fmt.title, "class_name": fmt.class_name}
    card = model_card(recipe, "base_model: org/base\n", stats, None)
    assert f"A {fmt.title} mixture of experts" in card and f"It loads as `{fmt.class_name}`" in card


def test_every_format_is_in_the_shape_and_end_to_end_tests():
    assert {case[0] for case in CASES} == set(FORMATS)
    assert {class_name for *_, class_name in PAIRS} == {fmt.class_name for fmt in FORMATS.values()}


@pytest.mark.parametrize("name", list(FORMATS))
def test_the_router_lookup_finds_the_router_written_under_the_gate_name(tmp_path, name):
    """A model transformers builds from the format's config.json, saved: the module `moe_block(model, layer)`
    returns holds as its `gate` the router saved under the format's gate name; a dense layer has none."""
    fmt = FORMATS[name]
    family = FAMILY_OF[name]
    dense = (1,) if fmt.holds_dense_layers else ()
    config = fmt.config(base_config(family), layout(family, bool(fmt.shared_experts), dense))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    sparse = [layer for layer in range(config["num_hidden_layers"]) if layer not in dense]
    with torch.no_grad():
        for layer in sparse:
            fmt.moe_block(model, layer).gate.weight.fill_(layer + 1.0)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    for layer in sparse:
        assert torch.equal(saved[fmt.gate_name(layer)], torch.full_like(saved[fmt.gate_name(layer)], layer + 1.0))
    assert all(fmt.moe_block(model, layer) is None for layer in dense)
