"""The names a recipe's `architecture:` accepts (inputs.recipe, so that reading a recipe does not import the
formats) are exactly the formats moemerge writes, and every name that leads to a format leads to one it has."""

from __future__ import annotations

from moemerge.formats import FORMATS
from moemerge.inputs.families import FAMILIES
from moemerge.inputs.recipe import ARCHITECTURE_ALIASES, ARCHITECTURES


def test_the_recipe_accepts_exactly_the_formats_written():
    assert ARCHITECTURES == tuple(FORMATS) == ("mixtral", "qwen2_moe", "qwen3_moe")


def test_aliases_and_family_defaults_name_formats():
    assert set(ARCHITECTURE_ALIASES.values()) <= set(FORMATS)
    assert not set(ARCHITECTURE_ALIASES) & set(FORMATS)
    assert {family.default_output for family in FAMILIES.values()} <= set(FORMATS)
