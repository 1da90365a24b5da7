"""`moemerge verify` catches outputs that are incomplete or inconsistent; NaN weights are refused at merge."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.paths import CLI
from support.tiny_models import make_base, make_expert, write_recipe

from moemerge import MergeOptions, MoemergeError, merge
from moemerge.tools.verify import verify


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    base = make_base(root / "base")
    recipe = write_recipe(root / "r.yaml", base, [base, base], gate_mode="random")
    merge(recipe, root / "out", MergeOptions(shard_size=30_000))
    return root / "out"


def _copy(merged: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(merged, tmp_path / "out"))


def test_good_output_verifies(merged):
    run = subprocess.run([CLI, "verify", str(merged)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "ok" in run.stderr
    assert verify(merged, deep=True) == 3 * (2 + 4 + 1 + 2 * 3) + 3  # per layer: norms, attention, gate, experts


def test_missing_shard(merged, tmp_path):
    out = _copy(merged, tmp_path)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(MoemergeError, match=f"lists {victim.name}, which is missing"):
        verify(out)


def test_tensor_missing_from_index(merged, tmp_path):
    out = _copy(merged, tmp_path)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"].pop("model.norm.weight")
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MoemergeError, match="model.norm.weight"):
        verify(out)


def test_config_disagrees_with_tensors(merged, tmp_path):
    out = _copy(merged, tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["num_local_experts"] = 3
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoemergeError, match="block_sparse_moe"):
        verify(out)


def test_nan_values_found_by_deep_check(merged, tmp_path):
    out = _copy(merged, tmp_path)
    shard = sorted(out.glob("model-*.safetensors"))[0]
    tensors = load_file(str(shard))
    name = next(iter(tensors))
    tensors[name][0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    verify(out, deep=False)
    with pytest.raises(MoemergeError, match=f"{name} holds NaN"):
        verify(out, deep=True)
    run = subprocess.run([CLI, "verify", str(out)], capture_output=True, text=True)
    assert run.returncode == 1 and "NaN" in run.stderr


def test_nan_in_expert_weights_refused_at_merge(tmp_path):
    base = make_base(tmp_path / "base")
    expert = make_expert(base, tmp_path / "expert", seed=1)
    weights = load_file(str(expert / "model.safetensors"))
    weights["model.layers.1.mlp.up_proj.weight"][3, 3] = float("inf")
    save_file(weights, str(expert / "model.safetensors"), metadata={"format": "pt"})
    recipe = write_recipe(tmp_path / "r.yaml", base, [base, expert], gate_mode="random")
    run = subprocess.run([CLI, str(recipe), str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 1
    assert "experts[1] model.layers.1.mlp.up_proj.weight: NaN or Inf" in run.stderr
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.moemerge-partial-*"))
    assert torch.isinf(load_file(str(expert / "model.safetensors"))["model.layers.1.mlp.up_proj.weight"]).any()


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c: c.pop("num_local_experts"), "config.json: missing key num_local_experts"),
        (lambda c: c.update(num_hidden_layers="3"), "config.json: a size is not a whole number"),
        (lambda c: c.update(model_type="llama"), "config.json: model_type 'llama' is not an MoE format"),
    ],
    ids=["missing-key", "string-size", "dense"],
)
def test_broken_config_is_named_in_one_line(merged, tmp_path, edit, expected):
    out = _copy(merged, tmp_path)
    config = json.loads((out / "config.json").read_text())
    edit(config)
    (out / "config.json").write_text(json.dumps(config))
    run = subprocess.run([CLI, "verify", str(out)], capture_output=True, text=True)
    assert run.returncode == 1 and expected in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_config_that_is_not_an_object(merged, tmp_path):
    out = _copy(merged, tmp_path)
    (out / "config.json").write_text("[1, 2]")
    with pytest.raises(MoemergeError, match="config.json: not a JSON object"):
        verify(out)
