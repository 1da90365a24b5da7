"""OUT never lands on what the recipe reads: models, LoRA adapters (plain, `model+adapter`, their parents,
inside them), prompt files, the dataset CSV, the recipe itself, through symlinks too, with or without
--force. Each refusal is exit 1 and one `error:` line, and the whole work folder is byte for byte as before
(no source touched, no OUT, no partial folder, no parent folder created)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.hostile import assert_refused, copy_sources, make_sources, run_cli, tree
from support.tiny_models import read_tensors, write_recipe

UP1 = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def masters(tmp_path_factory) -> Path:
    root = make_sources(tmp_path_factory.mktemp("masters"))
    nan = shutil.copytree(root / "e1", root / "nan")
    tensors = load_file(str(nan / "model.safetensors"))
    tensors["model.layers.2.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(nan / "model.safetensors"))
    return root


@dataclass
class Work:
    root: Path
    base: Path
    expert: Path
    lora: Path
    nan: Path

    def recipe(self, experts: list, name: str = "recipe.yaml", **fields) -> Path:
        return write_recipe(self.root / name, self.base, experts, **fields)


@pytest.fixture
def work(masters, tmp_path) -> Work:
    models = tmp_path / "models"
    copy_sources(masters, models)
    shutil.copytree(masters / "nan", models / "nan")
    return Work(tmp_path, models / "base", models / "e1", models / "lora", models / "nan")


# Each case: the work folder → (command line after `moemerge`, parts of the error line).
Case = Callable[[Work], tuple[list, tuple[str, ...]]]


def c_out_is_lora_forced(w: Work):
    return [w.recipe([w.expert, w.lora]), w.lora, "--force"], ("inside or around the LoRA adapter", str(w.lora))


def c_out_is_plus_adapter_forced(w: Work):
    recipe = w.recipe([w.expert, f"{w.base}+{w.lora}"])
    return [recipe, w.lora, "--force"], ("the LoRA adapter",)


def c_out_is_adapter_parent_forced(w: Work):
    holder = w.root / "adapters"
    holder.mkdir()
    lora = shutil.move(w.lora, holder / "mine")
    return [w.recipe([w.expert, lora]), holder, "--force"], (f"{holder} is inside or around the LoRA adapter",)


def c_out_inside_lora(w: Work):
    return [w.recipe([w.expert, w.lora]), w.lora / "merged"], ("inside or around the LoRA adapter",)


def c_out_deep_inside_lora_forced(w: Work):
    return [w.recipe([w.expert, w.lora]), w.lora / "a" / "b", "--force"], ("the LoRA adapter",)


def c_out_is_expert_forced(w: Work):
    return [w.recipe([w.expert, w.lora]), w.expert, "--force"], ("inside or around the source model",)


def c_out_is_models_folder_forced(w: Work):
    return [w.recipe([w.expert, w.lora]), w.root / "models", "--force"], ("inside or around",)


def c_out_holds_prompt_file_forced(w: Work):
    prompts = w.root / "prompts"
    prompts.mkdir()
    (prompts / "code.txt").write_text("def f(x): return x\n")
    recipe = w.recipe([{"source_model": str(w.expert), "positive_prompts_file": str(prompts / "code.txt")}, w.lora])
    return [recipe, prompts, "--force"], ("inside or around the prompt file", "code.txt")


def c_out_holds_negative_prompt_file_forced(w: Work):
    prompts = w.root / "negatives"
    prompts.mkdir()
    (prompts / "not.jsonl").write_text('{"prompt": "zzz"}\n')
    expert = {"source_model": str(w.expert), "negative_prompts_file": "negatives/not.jsonl"}  # next to the recipe
    return [w.recipe([expert, w.lora]), prompts, "--force"], ("the prompt file",)


def c_out_holds_dataset_forced(w: Work):
    data = w.root / "data"
    data.mkdir()
    rows = "prompt,expert\n" + "".join(f"{'ab'[i % 2] * 5},{i % 2}\n" for i in range(8))
    (data / "train.csv").write_text(rows)
    recipe = w.recipe([w.expert, w.lora], gate_mode="trained", dataset_csv=str(data / "train.csv"))
    return [recipe, data, "--force"], ("the prompt file", "train.csv")


def c_out_holds_recipe_forced(w: Work):
    folder = w.root / "recipes"
    folder.mkdir()
    return [w.recipe([w.expert, w.lora], name="recipes/r.yaml"), folder, "--force"], ("inside or around the recipe",)


def c_out_is_link_to_lora_forced(w: Work):
    link = w.root / "link"
    link.symlink_to(w.lora, target_is_directory=True)
    return [w.recipe([w.expert, w.lora]), link, "--force"], ("the LoRA adapter",)


def c_out_is_link_to_base_forced(w: Work):
    link = w.root / "link"
    link.symlink_to(w.base, target_is_directory=True)
    return [w.recipe([w.expert, w.lora]), link, "--force"], ("the source model",)


def c_out_under_linked_folder_in_lora(w: Work):
    link = w.root / "shortcut"
    link.symlink_to(w.lora, target_is_directory=True)
    return [w.recipe([w.expert, w.lora]), link / "merged"], ("the LoRA adapter",)


def c_lora_reached_through_link_forced(w: Work):
    link = w.root / "lora link"
    link.symlink_to(w.lora, target_is_directory=True)
    return [w.recipe([w.expert, link]), w.lora, "--force"], ("the LoRA adapter",)


def c_refused_mid_write_leaves_no_new_parents(w: Work):
    """NaN found while shards are written: the partial folder goes, and so do the folders made for OUT."""
    recipe = w.recipe([w.nan, w.lora])
    return [recipe, w.root / "new" / "deeper" / "out", "--shard-size", "2KB"], ("NaN or Inf",)


CASES: list[Case] = [
    c_out_is_lora_forced,
    c_out_is_plus_adapter_forced,
    c_out_is_adapter_parent_forced,
    c_out_inside_lora,
    c_out_deep_inside_lora_forced,
    c_out_is_expert_forced,
    c_out_is_models_folder_forced,
    c_out_holds_prompt_file_forced,
    c_out_holds_negative_prompt_file_forced,
    c_out_holds_dataset_forced,
    c_out_holds_recipe_forced,
    c_out_is_link_to_lora_forced,
    c_out_is_link_to_base_forced,
    c_out_under_linked_folder_in_lora,
    c_lora_reached_through_link_forced,
    c_refused_mid_write_leaves_no_new_parents,
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__.removeprefix("c_"))
def test_out_on_a_read_path_is_refused(work, case, monkeypatch):
    monkeypatch.chdir(work.root)
    args, expect = case(work)
    before = tree(work.root)
    assert_refused(run_cli(*args, "--device", "cpu"), *expect)
    assert tree(work.root) == before


def test_plus_inside_an_adapter_path_splits_where_both_parts_exist(work):
    """`base+my+lora`: the adapter folder's own '+' is not the separator; the split whose parts exist is."""
    plus = work.root / "my+lora"
    shutil.move(work.lora, plus)
    out = work.root / "out"
    result = run_cli(work.recipe([work.expert, f"{work.base}+{plus}"]), out, "--device", "cpu")
    assert result.rc == 0, result.stderr
    a = load_file(str(plus / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.1.mlp.up_proj"
    delta = a[f"{prefix}.lora_B.weight"] @ a[f"{prefix}.lora_A.weight"] * (8 / 4)  # alpha / r of make_lora
    want = load_file(str(work.base / "model.safetensors"))[UP1] + delta
    got = read_tensors(out)["model.layers.1.block_sparse_moe.experts.1.w3.weight"]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_force_over_an_output_symlink_replaces_its_target(work):
    """The link keeps pointing at the (new) output; no partial folder is left beside the link or the target."""
    target = work.root / "disk" / "merged"
    target.mkdir(parents=True)
    (target / "old.txt").write_text("old output")
    link = work.root / "out"
    link.symlink_to(target, target_is_directory=True)
    result = run_cli(work.recipe([work.expert, work.lora], gate_mode="random"), link, "--force", "--device", "cpu")
    assert result.rc == 0, result.stderr
    assert link.is_symlink() and link.readlink() == target
    assert not (target / "old.txt").exists()
    assert json.loads((target / "config.json").read_text())["num_local_experts"] == 2
    assert sorted(p.name for p in work.root.iterdir()) == ["disk", "models", "out", "recipe.yaml"]
    assert [p.name for p in target.parent.iterdir()] == ["merged"]
