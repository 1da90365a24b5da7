"""`moe_layers`: the MoE on chosen layers only; the others keep one MLP.

Expected outputs come from the dense models themselves: a base MLP module applied to the same input, and a
dense model whose sparse layer's MLP is replaced by hand with the experts' common MLP.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from support.tiny_models import input_ids, load_model, logits_of, make_base, make_expert, read_tensors, write_recipe

from moemerge.errors import MoemergeError
from moemerge.output.merge import merge

QWEN = [("qwen2", "qwen2_moe"), ("qwen3", "qwen3_moe")]


def hidden_input(rows: int = 40, hidden: int = 32) -> torch.Tensor:
    return torch.randn(1, rows, hidden, generator=torch.Generator().manual_seed(7))


def expected_logits(base, expert, sparse_layer: int, ids: torch.Tensor) -> torch.Tensor:
    """The base with the expert's MLP in `sparse_layer` only: what an MoE of copies of that expert on that
    one layer computes."""
    model = load_model(base)
    donor = load_model(expert)
    model.model.layers[sparse_layer].mlp.load_state_dict(donor.model.layers[sparse_layer].mlp.state_dict())
    return logits_of(model, ids)


@pytest.mark.parametrize(("family", "architecture"), QWEN)
def test_qwen_dense_layers_are_the_base_mlp(tmp_path, family, architecture):
    base = make_base(tmp_path / "base", family)
    experts = [make_expert(base, tmp_path / f"e{i}", seed=i + 1, scale=0.2) for i in range(3)]
    recipe = write_recipe(tmp_path / "r.yaml", base, experts, moe_layers=[1])
    merge(recipe, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == architecture
    assert config["mlp_only_layers"] == [0, 2]
    moe, dense = load_model(tmp_path / "out"), load_model(base)
    x = hidden_input()
    with torch.no_grad():
        for layer in (0, 2):
            assert torch.equal(moe.model.layers[layer].mlp(x), dense.model.layers[layer].mlp(x)), layer
        sparse = moe.model.layers[1].mlp(x)
        sparse = sparse[0] if isinstance(sparse, tuple) else sparse
        assert not torch.allclose(sparse, dense.model.layers[1].mlp(x), atol=1e-3)
    names = read_tensors(tmp_path / "out")
    assert "model.layers.0.mlp.gate.weight" not in names
    assert "model.layers.1.mlp.gate.weight" in names


@pytest.mark.parametrize(("family", "architecture"), [("llama", "mixtral"), *QWEN])
def test_moe_on_one_layer_of_identical_experts_is_the_dense_model_with_that_mlp(tmp_path, family, architecture):
    base = make_base(tmp_path / "base", family)
    expert = make_expert(base, tmp_path / "e", seed=3, scale=0.2)
    copies = [shutil.copytree(expert, tmp_path / f"c{i}") for i in range(3)]
    recipe = write_recipe(tmp_path / "r.yaml", base, copies, moe_layers=[1], architecture=architecture)
    merge(recipe, tmp_path / "out")
    ids = input_ids()
    want = expected_logits(base, expert, 1, ids)
    assert torch.allclose(logits_of(load_model(tmp_path / "out"), ids), want, atol=1e-5, rtol=0)
    assert not torch.allclose(logits_of(load_model(base), ids), want, atol=1e-3)


def test_mixtral_dense_layers_hold_the_base_mlp_in_every_slot(tmp_path):
    base = make_base(tmp_path / "base")
    experts = [make_expert(base, tmp_path / f"e{i}", seed=i + 1, scale=0.2) for i in range(3)]
    recipe = write_recipe(tmp_path / "r.yaml", base, experts, moe_layers=[0, 2], experts_per_token=2)
    merge(recipe, tmp_path / "out")
    out, b = read_tensors(tmp_path / "out"), read_tensors(base)
    for slot in range(3):
        for short, projection in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
            name = f"model.layers.1.block_sparse_moe.experts.{slot}.{short}.weight"
            assert torch.equal(out[name], b[f"model.layers.1.mlp.{projection}.weight"]), name
    assert torch.equal(out["model.layers.1.block_sparse_moe.gate.weight"], torch.zeros(3, 32))
    moe, dense = load_model(tmp_path / "out"), load_model(base)
    x = hidden_input()
    with torch.no_grad():
        got = moe.model.layers[1].mlp(x)  # transformers 5's name for block_sparse_moe
        got = got[0] if isinstance(got, tuple) else got
        assert torch.allclose(got, dense.model.layers[1].mlp(x), atol=1e-6, rtol=0)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "layers [1] hold the same MLP in every expert slot" in card


def test_qwen_dense_layers_are_named_in_the_card(tmp_path):
    base = make_base(tmp_path / "base", "qwen3")
    experts = [make_expert(base, tmp_path / f"e{i}", seed=i + 1) for i in range(2)]
    merge(write_recipe(tmp_path / "r.yaml", base, experts, moe_layers=[2]), tmp_path / "out")
    assert "layers [0, 1] are dense (mlp_only_layers)" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize(
    ("layers", "message"),
    [([3], "moe_layers: layer 3 does not exist; the base has 3 layers"), ([1, 1], "list each layer once")],
)
def test_bad_moe_layers_are_refused_in_one_line(tmp_path, layers, message):
    base = make_base(tmp_path / "base")
    experts = [make_expert(base, tmp_path / f"e{i}", seed=i + 1) for i in range(2)]
    with pytest.raises(MoemergeError, match=message) as error:
        merge(write_recipe(tmp_path / "r.yaml", base, experts, moe_layers=layers), tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def _trained_recipe(tmp_path, **fields):
    base = make_base(tmp_path / "base")
    experts = [make_expert(base, tmp_path / f"e{i}", seed=i + 1) for i in range(2)]
    dataset = tmp_path / "d.csv"
    dataset.write_text("prompt,expert\n" + "".join(f"{'ab'[e] * (n + 3)},{e}\n" for e in range(2) for n in range(6)))
    return write_recipe(tmp_path / "r.yaml", base, experts, gate_mode="trained", dataset_csv=str(dataset), **fields)


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ([0], r"training.layers: layer 0 stays dense \(moe_layers: \[1\]\), so it has no router to train"),
        ([1, 2], r"training.layers: layer 2 stays dense"),
        ([5], r"training.layers: layer 5 does not exist; the base has 3 layers"),
    ],
)
def test_trained_layers_without_a_router_are_refused_before_any_work(tmp_path, monkeypatch, layers, message):
    """Refused while the inputs are checked: the gate pass never starts, no partial folder is made."""
    recipe = _trained_recipe(tmp_path, moe_layers=[1], training={"steps": 5, "layers": layers})

    def no_gates(*args, **kwargs):
        raise AssertionError("the gate pass started")

    monkeypatch.setattr("moemerge.output.merge.compute_gates", no_gates)
    with pytest.raises(MoemergeError, match=message) as error:
        merge(recipe, tmp_path / "out")
    assert "\n" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "d.csv", "e0", "e1", "r.yaml"]


def test_trained_gates_train_only_the_moe_layers_by_default(tmp_path):
    merge(_trained_recipe(tmp_path, moe_layers=[1], training={"steps": 5}), tmp_path / "out")
    report = json.loads((tmp_path / "out" / "gate_training.json").read_text())
    assert report["trained_layers"] == [1] and len(report["layer_accuracy"]) == 1, report


def test_average_makes_a_dense_layer_the_mean_of_the_experts_mlps(tmp_path):
    base = make_base(tmp_path / "base", "qwen3")
    experts = [make_expert(base, tmp_path / f"e{i}", seed=i + 1, scale=0.2) for i in range(3)]
    recipe = write_recipe(tmp_path / "r.yaml", base, experts, moe_layers=[1], non_expert_weights="average")
    merge(recipe, tmp_path / "out")
    out, own = read_tensors(tmp_path / "out"), [read_tensors(e) for e in experts]
    for projection in ("gate_proj", "up_proj", "down_proj"):
        name = f"model.layers.2.mlp.{projection}.weight"
        expected = (sum(t[name].double() for t in own) / 3).float()
        assert torch.allclose(out[name], expected, atol=1e-7, rtol=1e-6), name


@pytest.mark.parametrize(("family", "shared"), [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_active_parameters_leave_out_the_routed_experts_a_token_skips(tmp_path, family, shared):
    """Three experts, top 2, one sparse layer of three: a token skips one routed expert's MLP in every layer
    that has expert slots (all three in Mixtral, whose dense layers keep them; the sparse one in Qwen). The
    count comes from the written tensors and config.json, not from the merge's names."""
    base = make_base(tmp_path / "base", family)
    experts = [make_expert(base, tmp_path / f"e{i}", seed=i + 1) for i in range(3)]
    fields = {"shared_experts": [{"source_model": str(base)}]} if shared else {}
    recipe = write_recipe(tmp_path / "r.yaml", base, experts, gate_mode="random", moe_layers=[1], **fields)
    summary = merge(recipe, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    total = sum(tensor.numel() for tensor in read_tensors(tmp_path / "out").values())
    slot_layers = config["num_hidden_layers"] - len(config.get("mlp_only_layers", []))
    expert_size = 3 * config["hidden_size"] * config.get("moe_intermediate_size", config["intermediate_size"])
    assert (summary.total_params, summary.active_params) == (total, total - (3 - 2) * slot_layers * expert_size)
