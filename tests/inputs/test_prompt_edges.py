"""Prompt edge cases from published recipes and hostile users: an expert described only by negative prompts,
prompts the tokenizer cannot tell apart (every character maps to <unk>), and trained gates with an expert
that has no dataset rows."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch
from support.hostile import run_cli
from support.tiny_models import base_with_experts, read_tensors, write_recipe

from moemerge.inputs.prompts import read_dataset_csv


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return base_with_experts(tmp_path_factory.mktemp("prompts"))


def gates(out: Path) -> torch.Tensor:
    tensors = read_tensors(out)
    layers = sorted(n for n in tensors if n.endswith("block_sparse_moe.gate.weight"))
    return torch.stack([tensors[n] for n in layers])


def merge(models: Path, tmp_path: Path, experts: list, caplog, **fields) -> tuple[Path, list[str]]:
    recipe = write_recipe(tmp_path / "r.yaml", models / "base", experts, **fields)
    with caplog.at_level(logging.WARNING, logger="moemerge"):
        result = run_cli(recipe, tmp_path / "out", "--device", "cpu")
    assert result.rc == 0, result.stderr
    assert run_cli("verify", tmp_path / "out").rc == 0
    return tmp_path / "out", [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("gate_mode", ["hidden", "cheap_embed"])
def test_an_expert_with_only_negative_prompts_is_merged_with_a_warning(models, tmp_path, caplog, gate_mode):
    """A published 4x34B recipe's fourth expert: `positive_prompts: [""]` plus negative prompts."""
    experts = [
        {"source_model": str(models / "e0"), "positive_prompts": ["aaaa aaaa"]},
        {"source_model": str(models / "e1"), "positive_prompts": ["bbbb bbbb"]},
        {"source_model": str(models / "e2"), "positive_prompts": [""], "negative_prompts": ["aaaa", "bbbb"]},
    ]
    out, warnings = merge(models, tmp_path, experts, caplog, gate_mode=gate_mode)
    assert any("experts[2]: its positive prompts are empty" in w and "negative prompts" in w for w in warnings)
    rows = gates(out)
    assert torch.isfinite(rows).all()
    assert (rows[:, 2].norm(dim=-1) > 0).all()  # a real row, not a zero one
    # The row comes from the negatives: it points against the mean of experts 0 and 1 (whose prompts are its
    # negatives), so it is not parallel to either of their rows.
    cosine = torch.nn.functional.cosine_similarity(rows[:, 2], rows[:, 0] + rows[:, 1], dim=-1)
    assert (cosine < 0).all(), cosine


def test_prompts_that_differ_only_in_unknown_characters_warn_and_give_zero_rows(models, tmp_path, caplog):
    """The tiny tokenizer knows a-z only: 'é' and 'ß' both become <unk>, so both experts see the same input."""
    experts = [
        {"source_model": str(models / "e0"), "positive_prompts": ["éééé éé"]},
        {"source_model": str(models / "e1"), "positive_prompts": ["ßßßß ßß"]},
    ]
    out, warnings = merge(models, tmp_path, experts, caplog)
    assert torch.count_nonzero(gates(out)) == 0
    zero = [w for w in warnings if "router rows are all zero: the router matrix is empty" in w]
    assert len(zero) == 1 and "<unk>" in zero[0], warnings


def test_distinct_prompts_give_no_zero_row_warning(models, tmp_path, caplog):
    experts = [
        {"source_model": str(models / "e0"), "positive_prompts": ["aaaa aa"]},
        {"source_model": str(models / "e1"), "positive_prompts": ["zzzz zz"]},
    ]
    out, warnings = merge(models, tmp_path, experts, caplog)
    assert (gates(out).norm(dim=-1) > 0).all()
    assert not [w for w in warnings if "router rows are" in w], warnings


def test_trained_gates_with_an_expert_without_rows(models, tmp_path, caplog):
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,expert\n" + "".join(f"{'ab'[i % 2] * 4} {i},{i % 2}\n" for i in range(8)))
    experts = [models / "e0", models / "e1", {"source_model": str(models / "e2"), "name": "idle"}]
    out, warnings = merge(
        models, tmp_path, experts, caplog, gate_mode="trained", dataset_csv=str(csv), training={"steps": 5}
    )
    assert any("experts[2] (idle) has no rows in d.csv" in w for w in warnings), warnings

    def refuse(constant: str) -> None:
        raise AssertionError(f"gate_training.json holds a bare {constant}")

    report = json.loads((out / "gate_training.json").read_text(), parse_constant=refuse)
    assert report["expert_accuracy"][2] is None
    assert all(isinstance(a, float) for a in report["expert_accuracy"][:2])


def test_a_csv_row_longer_than_the_csv_modules_default_limit_is_read(tmp_path):
    """Python's csv refuses fields over 131,072 characters by default; a long document is still a prompt."""
    long = "word " * 60_000  # 300,000 characters
    path = tmp_path / "d.csv"
    path.write_text(f'prompt,expert\n"{long}",b\nshort,0\n')
    limit = csv.field_size_limit()
    assert read_dataset_csv(path, ["a", "b"]) == [(long, 1), ("short", 0)]
    assert csv.field_size_limit() == limit  # the process-wide limit is left as it was
