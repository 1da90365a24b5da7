"""Every input family into every output format it can become: what transformers 5 loads, and what it computes.

The reference is always the dense base's own forward pass: an MoE whose experts are all the base's MLP must
give the base's logits, whatever the format. Pairs that cannot work are refused in one line naming why.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from support.tiny_models import (
    assert_same_logits,
    input_ids,
    load_model,
    make_base,
    make_expert,
    read_tensors,
    write_recipe,
)
from transformers import AutoModelForCausalLM

from moemerge.errors import MoemergeError
from moemerge.output.merge import MergeOptions, merge
from moemerge.tools.routing import load_moe, route
from moemerge.tools.verify import verify

# (input family, `architecture:` in the recipe or None for the default, the class transformers must load)
PAIRS = [
    ("llama", None, "MixtralForCausalLM"),
    ("llama3", None, "MixtralForCausalLM"),
    ("llama", "qwen2_moe", "Qwen2MoeForCausalLM"),
    ("mistral", None, "MixtralForCausalLM"),
    ("mistral", "qwen", "Qwen2MoeForCausalLM"),
    ("qwen2", None, "Qwen2MoeForCausalLM"),
    ("qwen3", None, "Qwen3MoeForCausalLM"),
]


# Llama 3.1's rope scaling, with an original context shorter than the test's sequences.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


@pytest.fixture(scope="module")
def family_bases(tmp_path_factory) -> dict[str, Path]:
    """One tiny base per input family (and a Llama 3 with rope scaling), made once for the module."""
    root = tmp_path_factory.mktemp("families")
    family_bases = {
        family: make_base(root / family, family, seed=seed, tie_word_embeddings=family == "qwen2")
        for seed, family in enumerate(("llama", "mistral", "qwen2", "qwen3"))
    }
    # a copy: transformers writes rope_theta into the dict it is given
    family_bases["llama3"] = make_base(
        root / "llama3", "llama", seed=5, rope_scaling=dict(LLAMA3_ROPE), rope_theta=500000.0
    )
    return family_bases


def merged(tmp_path: Path, base: Path, experts: list, **fields) -> Path:
    recipe = write_recipe(tmp_path / "recipe.yaml", base, experts, **fields)
    merge(recipe, tmp_path / "out", MergeOptions(device="cpu", seed=3))
    return tmp_path / "out"


def assert_base_logits(out: Path, base: Path, class_name: str) -> None:
    moe, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert type(moe).__name__ == class_name
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert_same_logits(moe.eval(), load_model(base), input_ids(), class_name)


@pytest.mark.parametrize(("family", "architecture", "class_name"), PAIRS)
def test_copies_of_base_give_base_logits(tmp_path, family_bases, family, architecture, class_name):
    base = family_bases[family]
    fields = {"architecture": architecture} if architecture else {}
    out = merged(tmp_path, base, [base, base, base], gate_mode="hidden", **fields)
    assert_base_logits(out, base, class_name)
    assert verify(out, deep=True) > 0
    manifest = json.loads((out / "moemerge.json").read_text())
    assert manifest["architecture"] == json.loads((out / "config.json").read_text())["model_type"]


def test_llama3_rope_is_written_in_the_classic_keys(tmp_path, family_bases):
    """transformers 4, vLLM and llama.cpp's converter read rope_theta / rope_scaling, not rope_parameters."""
    out = merged(tmp_path, family_bases["llama3"], [family_bases["llama3"]] * 2, gate_mode="random")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 500000.0 and config["rope_scaling"] == LLAMA3_ROPE
    assert "rope_parameters" not in config


def test_qwen2_shared_expert_of_base_mixes_half_and_half(tmp_path, family_bases):
    """Routed experts (down projections halved) plus the shared expert under a gate of sigmoid(2**-14 · Σh):
    with the base everywhere, each layer's MLP output is the base's times (0.5 + that gate)."""
    base = family_bases["qwen2"]
    out = merged(tmp_path, base, [base, base], shared_experts=[{"source_model": str(base)}], gate_mode="random")
    config = json.loads((out / "config.json").read_text())
    assert config["shared_expert_intermediate_size"] == config["moe_intermediate_size"] == 48
    assert "| shared expert |" in (out / "README.md").read_text()
    moe = load_model(out)
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    dense = load_model(base)

    def mixed(_module, inputs, output):
        gate = torch.sigmoid(inputs[0].sum(dim=-1, keepdim=True) * 2.0**-14)
        return output * (0.5 + gate)

    for layer in dense.model.layers:
        layer.mlp.register_forward_hook(mixed)
    assert_same_logits(moe, dense, input_ids(), "qwen2 shared expert")


def test_qwen2_distinct_experts_biases_and_shared_expert(tmp_path, family_bases):
    base = family_bases["qwen2"]
    experts = [make_expert(base, tmp_path / f"e{seed}", seed=seed) for seed in (1, 2)]
    shared = make_expert(base, tmp_path / "shared", seed=9)
    out = merged(tmp_path, base, experts, shared_experts=[{"source_model": str(shared)}])
    written, dense = read_tensors(out), read_tensors(base)
    for layer in range(3):
        for part in ("q", "k", "v"):
            name = f"model.layers.{layer}.self_attn.{part}_proj.bias"
            assert torch.equal(written[name], dense[name]) and dense[name].abs().sum() > 0
        for index, expert in enumerate(experts):
            source = read_tensors(expert)
            for projection in ("gate_proj", "up_proj", "down_proj"):
                want = source[f"model.layers.{layer}.mlp.{projection}.weight"]
                want = want * 0.5 if projection == "down_proj" else want
                assert torch.equal(written[f"model.layers.{layer}.mlp.experts.{index}.{projection}.weight"], want)
        shared_source = read_tensors(shared)
        for projection in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(
                written[f"model.layers.{layer}.mlp.shared_expert.{projection}.weight"],
                shared_source[f"model.layers.{layer}.mlp.{projection}.weight"],
            )
        assert torch.equal(
            written[f"model.layers.{layer}.mlp.shared_expert_gate.weight"], torch.full((1, 32), 2.0**-14)
        )
    assert torch.equal(written["lm_head.weight"], dense["model.embed_tokens.weight"])  # tied base, explicit head


def test_qwen2_without_shared_expert_writes_a_zero_one(tmp_path):
    """A zero shared expert adds nothing; a hidden size of 40 tells its [32, 40] matrices from their transposes."""
    base = make_base(tmp_path / "wide", "qwen2", hidden_size=40, num_attention_heads=5, num_key_value_heads=1)
    out = merged(tmp_path, base, [base, base], gate_mode="random")
    config = json.loads((out / "config.json").read_text())
    assert config["shared_expert_intermediate_size"] == 32 and config["qkv_bias"] is True
    written = read_tensors(out)
    for layer in range(3):
        shared = f"model.layers.{layer}.mlp.shared_expert"
        assert written[f"{shared}.gate_proj.weight"].shape == written[f"{shared}.up_proj.weight"].shape == (32, 40)
        assert written[f"{shared}.down_proj.weight"].shape == (40, 32)
        assert not any(written[f"{shared}.{p}.weight"].any() for p in ("gate_proj", "up_proj", "down_proj"))
    assert_base_logits(out, base, "Qwen2MoeForCausalLM")


def test_llama_as_qwen2_moe_gets_zero_qkv_biases(tmp_path, family_bases):
    """vLLM's Qwen2-MoE attention always has q/k/v biases: a Llama base gets zero ones, which change nothing."""
    base = family_bases["llama"]
    out = merged(tmp_path, base, [base, base], architecture="qwen2_moe", gate_mode="random")
    assert json.loads((out / "config.json").read_text())["qkv_bias"] is True
    written = read_tensors(out)
    assert written["model.layers.2.self_attn.k_proj.bias"].shape == (16,)
    assert not any(written[f"model.layers.{i}.self_attn.{p}_proj.bias"].any() for i in range(3) for p in "qkv")


def test_hub_style_qwen2_config_with_an_unused_window_is_accepted(tmp_path, family_bases):
    """Qwen2 configs on the Hub carry sliding_window with use_sliding_window false: no window is in force."""
    base = tmp_path / "hub-qwen2"
    shutil.copytree(family_bases["qwen2"], base)
    config = json.loads((base / "config.json").read_text())
    config.update(sliding_window=4096, use_sliding_window=False, max_window_layers=21, max_position_embeddings=131072)
    (base / "config.json").write_text(json.dumps(config))
    out = merged(tmp_path, base, [base, base], gate_mode="random")
    assert json.loads((out / "config.json").read_text())["use_sliding_window"] is False


def test_missing_q_norm_is_named_before_writing(tmp_path, family_bases):
    base = tmp_path / "no-q-norm"
    shutil.copytree(family_bases["qwen3"], base)
    tensors = read_tensors(base)
    del tensors["model.layers.1.self_attn.q_norm.weight"]
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        MoemergeError, match=r"base_model: tensor model\.layers\.1\.self_attn\.q_norm\.weight is missing"
    ):
        merged(tmp_path, base, [base, base], gate_mode="random")
    assert not (tmp_path / "out").exists()


def test_qwen3_keeps_q_and_k_norms(tmp_path, family_bases):
    base = family_bases["qwen3"]
    out = merged(tmp_path, base, [make_expert(base, tmp_path / f"e{s}", seed=s) for s in (1, 2)])
    written, dense = read_tensors(out), read_tensors(base)
    for layer in range(3):
        for norm in ("q_norm", "k_norm"):
            name = f"model.layers.{layer}.self_attn.{norm}.weight"
            assert written[name].shape == (8,) and torch.equal(written[name], dense[name])
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts"] == 2 and config["norm_topk_prob"] is True and config["head_dim"] == 8


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_route_reads_qwen_outputs(tmp_path, family_bases, family):
    base = family_bases[family]
    out = merged(tmp_path, base, [make_expert(base, tmp_path / f"e{s}", seed=s) for s in (1, 2, 3)])
    model, tokenizer, names = load_moe(out, torch.device("cpu"))
    routing = route(model, tokenizer, "abc abc")
    assert names == ["e1", "e2", "e3"]
    card_warns = "llama.cpp does not renormalise Qwen2-MoE's top-k router weights" in (out / "README.md").read_text()
    assert card_warns == (family == "qwen2")
    assert routing.logits.shape == (3, 7, 3) and torch.isfinite(routing.logits).all()
    assert torch.allclose(routing.shares().sum(), torch.tensor(2.0))


REFUSED = [
    ("qwen2", "mixtral", {}, "architecture: a qwen2 base cannot become mixtral: Qwen2 attention has q/k/v biases"),
    ("qwen3", "mixtral", {}, "architecture: a qwen3 base cannot become mixtral: Qwen3 attention normalises q and k"),
    ("qwen3", "qwen2_moe", {}, "architecture: a qwen3 base cannot become qwen2_moe: Qwen3 attention normalises"),
    ("llama", "qwen3_moe", {}, "architecture: a llama base cannot become qwen3_moe: Qwen3-MoE normalises q and k"),
    ("qwen2", "qwen3_moe", {}, "a Qwen2 base has no q_norm/k_norm weights"),
    (
        "qwen3",
        None,
        {"shared_experts": [{"source_model": "x"}]},
        "shared_experts: only qwen2_moe holds a shared expert, and a qwen3 base cannot become qwen2_moe: Qwen3 "
        "attention normalises q and k (q_norm/k_norm), which Qwen2-MoE lacks; remove shared_experts",
    ),
    ("llama3", "qwen2_moe", {}, "rope_type llama3 is lost when llama.cpp converts Qwen2-MoE; use architecture: mix"),
    ("llama", "mixtral", {"shared_experts": [{"source_model": "x"}]}, "shared_experts: mixtral has no shared expert"),
]


@pytest.mark.parametrize(("family", "architecture", "fields", "expected"), REFUSED)
def test_impossible_pairs_are_refused_with_a_reason(tmp_path, family_bases, family, architecture, fields, expected):
    base = family_bases[family]
    if architecture:
        fields = {**fields, "architecture": architecture}
    with pytest.raises(MoemergeError) as info:
        merged(tmp_path, base, [base, base], **fields)
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_mistral_with_a_wide_head_dim_cannot_become_qwen2_moe(tmp_path):
    """Mistral-Nemo-style attention (head_dim × heads ≠ hidden_size) only Mixtral and transformers 5 can size."""
    base = make_base(tmp_path / "nemo", "mistral", head_dim=16)
    with pytest.raises(MoemergeError, match=r"head_dim 16 × 4 heads is not hidden_size 32.*use architecture: mixtral"):
        merged(tmp_path, base, [base, base], architecture="qwen2_moe")


def test_windowed_mistral_cannot_become_qwen2_moe(tmp_path):
    base = make_base(tmp_path / "windowed", "mistral", sliding_window=16)
    with pytest.raises(MoemergeError, match="sliding window of 16 tokens in every layer.*use architecture: mixtral"):
        merged(tmp_path, base, [base, base], architecture="qwen2_moe")


def test_expert_of_another_family_is_refused(tmp_path, family_bases):
    with pytest.raises(MoemergeError, match=r"experts\[1\]: a qwen2 model, but the base is llama"):
        merged(tmp_path, family_bases["llama"], [family_bases["llama"], family_bases["qwen2"]])


def test_sliding_window_qwen2_base_is_refused(tmp_path):
    base = make_base(tmp_path / "windowed", "qwen2", use_sliding_window=True, sliding_window=16)
    with pytest.raises(MoemergeError, match="base_model: use_sliding_window is true"):
        merged(tmp_path, base, [base, base])


def test_route_loss_is_the_texts_likelihood_only(tmp_path, family_bases):
    """Copies of the base give the base's next-token loss exactly: the router's auxiliary loss is not in it."""
    base = family_bases["llama"]
    out = merged(tmp_path, base, [base, base, base], gate_mode="random")
    model, tokenizer, _ = load_moe(out, torch.device("cpu"))
    routing = route(model, tokenizer, "hello world, how are you?")
    ids = tokenizer("hello world, how are you?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        dense_loss = load_model(base)(ids, labels=ids).loss.item()
    assert abs(routing.loss - dense_loss) < 1e-5 and routing.predicted_tokens == ids.shape[1] - 1


def test_shared_expert_without_architecture_picks_qwen2_moe(tmp_path, family_bases, caplog):
    """A Llama recipe with shared_experts (as mergekit's qwen recipes are written) becomes Qwen2-MoE, said so."""
    base = family_bases["llama"]
    with caplog.at_level(logging.INFO, logger="moemerge"):
        out = merged(tmp_path, base, [base, base], shared_experts=[{"source_model": str(base)}], gate_mode="random")
    assert "writing qwen2_moe, the format with a shared expert, instead of mixtral" in caplog.text
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["shared_expert_intermediate_size"] == 48
