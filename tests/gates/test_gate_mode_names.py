"""Every gate mode the recipe accepts (declared in inputs.gate_modes, so that reading a recipe does not import
the gate code) is one moemerge computes (gates.modes), with its whole contract: card text, what it needs
(enforced when the recipe is read), a row in the README's table and comments, a benchmark row, and tests."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moemerge.cli import app
from moemerge.errors import MoemergeError
from moemerge.gates.modes import GATE_MODES
from moemerge.inputs.gate_modes import GATE_MODE_SPECS, Needs
from moemerge.inputs.recipe import parse_recipe

ROOT = Path(__file__).resolve().parents[2]


def _recipe(mode: str, *, prompts: bool = True, dataset: bool = False) -> dict:
    experts = [{"source_model": name, "positive_prompts": [f"{name} text"] if prompts else []} for name in ("a", "b")]
    return {"base_model": "base", "gate_mode": mode, "experts": experts} | ({"dataset_csv": "d.csv"} if dataset else {})


def _refusal(data: dict) -> str:
    with pytest.raises(MoemergeError) as info:
        parse_recipe(data)
    return str(info.value)


def test_the_recipe_accepts_exactly_the_modes_computed():
    assert list(GATE_MODES) == list(GATE_MODE_SPECS)
    assert all(GATE_MODES[name].spec is GATE_MODE_SPECS[name] for name in GATE_MODES)
    for name, spec in GATE_MODE_SPECS.items():
        assert parse_recipe(_recipe(name, dataset=spec.needs is Needs.DATASET)).gate_mode == name
    listed = _refusal(_recipe("smart")).split("; use ")[-1]
    assert re.split(r", | or ", listed) == list(GATE_MODES)


@pytest.mark.parametrize("name", list(GATE_MODE_SPECS))
def test_every_mode_declares_card_text_and_needs(name):
    spec = GATE_MODE_SPECS[name]
    assert isinstance(spec.needs, Needs)
    assert spec.card.strip() and "\n" not in spec.card and spec.card[0].islower()  # completes "The routers were "
    assert callable(GATE_MODES[name].compute)
    others = [other.card for other in GATE_MODE_SPECS.values() if other is not spec]
    assert spec.card not in others, "two modes the model card cannot tell apart"


@pytest.mark.parametrize("name", list(GATE_MODE_SPECS))
def test_the_recipe_checks_what_each_mode_needs(name):
    spec = GATE_MODE_SPECS[name]
    if spec.needs is Needs.NOTHING:
        assert parse_recipe(_recipe(name, prompts=False)).gate_mode == name
    elif spec.needs is Needs.PROMPTS:
        assert f"positive_prompts is empty, but gate_mode {name}" in _refusal(_recipe(name, prompts=False))
    else:
        assert f"gate_mode {name} needs dataset_csv" in _refusal(_recipe(name))
        assert parse_recipe(_recipe(name, prompts=False, dataset=True)).gate_mode == name


def test_the_readme_documents_every_mode():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    comments = re.findall(r"^gate_mode: \w+ +# (.+)$", readme, re.MULTILINE)
    assert comments and all(comment.split(" | ") == list(GATE_MODE_SPECS) for comment in comments)
    table = readme.split("| gate_mode | needs | the routers |\n|---|---|---|\n")[1].split("\n\n")[0]
    rows = [re.match(r"\| `(\w+)`[^|]*\| ([^|]+) \|", line).groups() for line in table.splitlines()]
    assert rows == [(name, spec.needs.value) for name, spec in GATE_MODE_SPECS.items()]


def test_the_cli_help_lists_every_mode():
    shown = " ".join(CliRunner().invoke(app, ["merge", "--help"]).output.split())  # rich wraps the lines
    assert all(f"{name} needs {spec.needs.value}" in shown for name, spec in GATE_MODE_SPECS.items())


def test_the_routing_benchmark_measures_every_mode(monkeypatch):
    path = ROOT / "benchmarks" / "routing_quality.py"
    monkeypatch.setattr(sys, "path", list(sys.path))  # the benchmark puts examples/ on it
    module_spec = importlib.util.spec_from_file_location("routing_quality", path)
    benchmark = importlib.util.module_from_spec(module_spec)
    monkeypatch.setitem(sys.modules, "routing_quality", benchmark)  # its dataclasses look themselves up there
    module_spec.loader.exec_module(benchmark)
    rows = benchmark.methods(list(benchmark.METHODS), [30.0], Path("labelled.csv"))
    assert {row.gate_mode for row in rows} - {None} == set(GATE_MODE_SPECS)


@pytest.mark.parametrize("name", list(GATE_MODE_SPECS))
def test_every_mode_has_tests_of_its_own(name):
    here = Path(__file__).resolve()
    tests = [path for path in (ROOT / "tests").rglob("test_*.py") if path != here]
    assert any(f'"{name}"' in path.read_text(encoding="utf-8") for path in tests), f"no test names {name!r}"
