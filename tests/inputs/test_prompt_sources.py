"""Prompts from files and from a labelled CSV, and relative paths, used in real merges: each source must give
exactly the gates its prompts written inline give, and different prompts must give different gates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.gate_reference import gate_rows
from support.tiny_models import make_base, read_tensors, write_recipe

from moemerge import MergeOptions, merge

CODE = ["def main(): pass", "import os, sys", "x = 1 + 2"]
PROSE = ["once upon a time", "the cat sat, quietly", "is it raining?"]
CHAT = ["hello there", "how are you?"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("prompts") / "base")


def _rows(folder: Path, base: Path | str, experts: list[dict], name: str, **fields) -> torch.Tensor:
    """Merge two copies of the base with these expert entries (each must say positive_prompts, [] for none: the
    tests' write_recipe fills in a default otherwise); return the router rows."""
    specs = [{"source_model": str(base), **e} for e in experts]
    recipe = write_recipe(folder / f"{name}.yaml", base, specs, **fields)
    merge(recipe, folder / name, MergeOptions(device="cpu"))
    return gate_rows(folder / name)


@pytest.fixture(scope="module")
def inline(base, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The references: the same prompts written inline."""
    folder = tmp_path_factory.mktemp("inline")
    return {
        "plain": _rows(folder, base, [{"positive_prompts": CODE}, {"positive_prompts": PROSE}], "plain"),
        "negative": _rows(
            folder,
            base,
            [{"positive_prompts": CODE, "negative_prompts": CHAT}, {"positive_prompts": PROSE}],
            "negative",
        ),
    }


def test_references_differ(inline):
    """Negative prompts change the rows, so the comparisons below can tell which prompts were used."""
    assert (inline["plain"] - inline["negative"]).abs().max() > 0.1 * inline["plain"].abs().max()


def test_txt_and_jsonl_prompt_files(base, inline, tmp_path):
    (tmp_path / "code.txt").write_text("\n".join(CODE[:2]) + "\n\n")  # blank lines are skipped
    lines = [json.dumps({"prompt": PROSE[0]}), json.dumps({"text": PROSE[1]}), "", json.dumps({"text": PROSE[2]})]
    (tmp_path / "prose.jsonl").write_text("\n".join(lines) + "\n")
    experts = [
        {"positive_prompts": CODE[2:], "positive_prompts_file": str(tmp_path / "code.txt")},  # inline first, then file
        {"positive_prompts": [], "positive_prompts_file": str(tmp_path / "prose.jsonl")},
    ]
    got = _rows(tmp_path, base, experts, "files")
    # The file's order is inline + file, a permutation of CODE: the rows do not depend on prompt order.
    torch.testing.assert_close(got, inline["plain"], rtol=1e-5, atol=1e-6 * inline["plain"].abs().max().item())


def test_negative_prompts_file(base, inline, tmp_path):
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in CHAT) + "\n")
    experts = [
        {"positive_prompts": CODE, "negative_prompts_file": str(tmp_path / "chat.jsonl")},
        {"positive_prompts": PROSE},
    ]
    assert torch.equal(_rows(tmp_path, base, experts, "neg-file"), inline["negative"])


def test_dataset_rows_count_as_positive_prompts(base, inline, tmp_path):
    """dataset_csv rows (expert by name or index; a quoted prompt may span lines) join the inline prompts."""
    multiline = "first line\nsecond, line"
    rows = ["prompt,expert", f'"{CODE[1]}",code', f'"{CODE[2]}",0', f'"{PROSE[2]}",prose', f'"{multiline}",1']
    (tmp_path / "labelled.csv").write_text("\n".join(rows) + "\n")
    experts = [
        {"name": "code", "positive_prompts": CODE[:1]},
        {"name": "prose", "positive_prompts": PROSE[:2]},
    ]
    got = _rows(tmp_path, base, experts, "csv", dataset_csv=str(tmp_path / "labelled.csv"))
    inline_experts = [{"positive_prompts": CODE}, {"positive_prompts": [*PROSE, multiline]}]
    assert torch.equal(got, _rows(tmp_path, base, inline_experts, "csv-inline"))
    # the multi-line row is one prompt: split in two it would give other rows
    split = [{"positive_prompts": CODE}, {"positive_prompts": [*PROSE, *multiline.split("\n")]}]
    assert not torch.allclose(got, _rows(tmp_path, base, split, "csv-split"))


def test_relative_paths_working_directory_first_then_beside_the_recipe(base, tmp_path, monkeypatch):
    """`prompts.txt` and `model` are looked up in the working directory, then next to the recipe."""
    beside, elsewhere = tmp_path / "recipes", tmp_path / "cwd"
    beside.mkdir()
    elsewhere.mkdir()
    other_base = make_base(elsewhere / "model", seed=5)
    (beside / "model").symlink_to(base, target_is_directory=True)
    (beside / "prompts.txt").write_text("\n".join(CODE) + "\n")
    (elsewhere / "prompts.txt").write_text("\n".join(CHAT) + "\n")
    recipe = write_recipe(
        beside / "r.yaml",
        "model",
        [
            {"source_model": "model", "positive_prompts": [], "positive_prompts_file": "prompts.txt"},
            {"source_model": "model", "positive_prompts": PROSE},
        ],
    )

    def merged(cwd: Path, name: str) -> Path:
        monkeypatch.chdir(cwd)
        merge(recipe, tmp_path / name, MergeOptions(device="cpu"))
        return tmp_path / name

    nothing_here = merged(tmp_path, "beside")  # no prompts.txt or model in tmp_path: both come from beside the recipe
    shadowed = merged(elsewhere, "shadowed")  # both exist in the working directory: those win
    monkeypatch.chdir(tmp_path)
    second = {"positive_prompts": PROSE}
    expect_beside = _rows(tmp_path, base, [{"positive_prompts": CODE}, second], "ref-beside")
    expect_cwd = _rows(tmp_path, other_base, [{"positive_prompts": CHAT}, second], "ref-cwd")
    assert torch.equal(gate_rows(nothing_here), expect_beside)
    assert torch.equal(gate_rows(shadowed), expect_cwd)
    attention = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(read_tensors(nothing_here)[attention], read_tensors(base)[attention])
    assert torch.equal(read_tensors(shadowed)[attention], read_tensors(other_base)[attention])
