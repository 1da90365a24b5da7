"""Every recipe shipped in recipes/ and examples/ is a valid recipe (they are what users copy)."""

from __future__ import annotations

import pytest
from support.paths import ROOT

from moemerge.inputs.recipe import load_recipe

RECIPES = sorted(ROOT.glob("recipes/*.yaml")) + sorted(ROOT.glob("examples/*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_is_valid(path):
    recipe = load_recipe(path)
    assert len(recipe.experts) >= 2
    assert len(set(recipe.expert_names())) == len(recipe.experts)


def test_recipes_folder_is_not_empty():
    assert len(RECIPES) >= 4
