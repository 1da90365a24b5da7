"""`non_expert_weights`: where attention, norms, embeddings and lm_head come from.

Expected tensors are computed here from the source files (safetensors and the adapter's A/B matrices read
directly), never with moemerge's own functions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from support.tiny_models import (
    input_ids,
    load_model,
    logits_of,
    make_base,
    make_expert,
    make_lora,
    read_tensors,
    save_model,
    write_recipe,
)
from transformers import AutoModelForCausalLM

from moemerge.errors import MoemergeError
from moemerge.output.merge import MergeOptions, merge

MIXTRAL_SLOT = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def full_finetune(base: Path, path: Path, seed: int, scale: float = 0.05) -> Path:
    """A 'full fine-tune': every weight perturbed, attention, norms and embeddings included."""
    model = AutoModelForCausalLM.from_pretrained(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return save_model(model, path)


def non_expert_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [n for n in tensors if ".mlp." not in n and "block_sparse_moe" not in n]


def test_average_of_identical_copies_of_the_base_is_the_base_bit_for_bit(tmp_path):
    base = make_base(tmp_path / "base")
    copies = [shutil.copytree(base, tmp_path / f"copy{i}") for i in range(3)]
    recipe = write_recipe(tmp_path / "r.yaml", base, copies, non_expert_weights="average")
    merge(recipe, tmp_path / "out")
    out, want = read_tensors(tmp_path / "out"), read_tensors(base)
    names = non_expert_names(want)
    assert len(names) > 10
    for name in names:
        assert torch.equal(out[name], want[name]), name


def test_average_of_identical_finetunes_is_that_finetune_and_its_logits(tmp_path):
    """Three copies of one full fine-tune: its shared weights bit for bit, and (every expert the same MLP,
    Mixtral renormalising the top-k weights) the fine-tune's own logits; `base` gives other logits."""
    base = make_base(tmp_path / "base")
    tuned = full_finetune(base, tmp_path / "tuned", seed=5)
    copies = [shutil.copytree(tuned, tmp_path / f"copy{i}") for i in range(3)]
    recipe = write_recipe(tmp_path / "r.yaml", base, copies, non_expert_weights="average")
    merge(recipe, tmp_path / "out")
    out, want = read_tensors(tmp_path / "out"), read_tensors(tuned)
    for name in non_expert_names(want):
        assert torch.equal(out[name], want[name]), name
    ids = input_ids()
    expected = logits_of(load_model(tuned), ids)
    assert torch.allclose(logits_of(load_model(tmp_path / "out"), ids), expected, atol=1e-5, rtol=0)
    merge(write_recipe(tmp_path / "b.yaml", base, copies), tmp_path / "out_base")
    assert not torch.allclose(logits_of(load_model(tmp_path / "out_base"), ids), expected, atol=1e-3)


def test_average_over_full_and_lora_experts_is_the_documented_mean(tmp_path):
    """One full fine-tune, one adapter that adapts q_proj too, one MLP-only adapter: every shared weight is
    the mean of the three experts' own versions, an adapter's being the base's plus its delta where it has one."""
    base = make_base(tmp_path / "base")
    full = full_finetune(base, tmp_path / "full", seed=3)
    attn = make_lora(base, tmp_path / "attn", seed=4, targets=("gate_proj", "up_proj", "down_proj", "q_proj"))
    make_lora(base, tmp_path / "mlp", seed=6)
    recipe = write_recipe(
        tmp_path / "r.yaml", base, [full, tmp_path / "attn", tmp_path / "mlp"], non_expert_weights="average"
    )
    merge(recipe, tmp_path / "out")
    out, b, f = read_tensors(tmp_path / "out"), read_tensors(base), read_tensors(full)
    scale = 8 / 4  # make_lora's alpha / rank
    changed_by_adapter = 0
    for name in non_expert_names(b):
        own_attn = b[name].double()
        key = f"base_model.model.{name.removesuffix('.weight')}"
        if f"{key}.lora_A.weight" in attn:
            own_attn = own_attn + scale * (
                attn[f"{key}.lora_B.weight"].double() @ attn[f"{key}.lora_A.weight"].double()
            )
            changed_by_adapter += 1
        expected = ((f[name].double() + own_attn + b[name].double()) / 3).float()
        assert torch.allclose(out[name], expected, atol=1e-6, rtol=1e-6), name
    assert changed_by_adapter == 3  # q_proj of each of the 3 layers
    # Expert MLPs are untouched by the policy: the full fine-tune's own, in its slot.
    assert torch.equal(
        out["model.layers.1.block_sparse_moe.experts.0.w1.weight"], f["model.layers.1.mlp.gate_proj.weight"]
    )


def peft_adapter(base: Path, path: Path, seed: int) -> dict[str, torch.Tensor]:
    """An adapter made and saved by PEFT itself, with a LoRA on the embedding and lm_head in modules_to_save,
    every trainable tensor randomised; returns the weights PEFT's own merge_and_unload gives (the expert's
    own version of every tensor, computed without moemerge)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["up_proj", "embed_tokens"], modules_to_save=["lm_head"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in ((n, p) for n, p in model.named_parameters() if p.requires_grad):
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(path)
    return {name: tensor.clone() for name, tensor in model.merge_and_unload().state_dict().items()}


def test_average_takes_an_adapters_embedding_lora_and_saved_lm_head(tmp_path):
    """`lora_embedding_A/B` and a `modules_to_save` lm_head are part of the adapter's expert: under average
    the output embedding and lm_head are the mean of the experts' own (as PEFT merges them), not the base's."""
    base = make_base(tmp_path / "base")
    own = [peft_adapter(base, tmp_path / f"a{i}", seed=i) for i in range(2)]
    recipe = write_recipe(tmp_path / "r.yaml", base, [tmp_path / "a0", tmp_path / "a1"], non_expert_weights="average")
    merge(recipe, tmp_path / "out")
    out, b = read_tensors(tmp_path / "out"), read_tensors(base)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        expected = ((own[0][name].double() + own[1][name].double()) / 2).float()
        assert not torch.allclose(expected, b[name], atol=1e-3), name  # the adapters do change it
        torch.testing.assert_close(out[name], expected, atol=1e-6, rtol=1e-6)


def test_average_of_mlp_only_adapters_copies_the_base(tmp_path):
    base = make_base(tmp_path / "base")
    for i in range(2):
        make_lora(base, tmp_path / f"a{i}", seed=i)
    recipe = write_recipe(tmp_path / "r.yaml", base, [tmp_path / "a0", tmp_path / "a1"], non_expert_weights="average")
    merge(recipe, tmp_path / "out")
    out, want = read_tensors(tmp_path / "out"), read_tensors(base)
    for name in non_expert_names(want):
        assert torch.equal(out[name], want[name]), name


def test_average_refuses_an_expert_with_other_embedding_rows(tmp_path):
    base = make_base(tmp_path / "base")
    expert = make_expert(base, tmp_path / "e", seed=1)
    bigger = make_base(tmp_path / "bigger", vocab_size=72)
    recipe = write_recipe(tmp_path / "r.yaml", base, [expert, bigger], non_expert_weights="average")
    with pytest.raises(MoemergeError, match=r"experts\[1\]: tensor model.embed_tokens.weight is \[72, 32\]"):
        merge(recipe, tmp_path / "out", MergeOptions(allow_vocab_mismatch=True))
    assert not (tmp_path / "out").exists()


def test_unknown_policy_is_refused_in_one_line(tmp_path):
    base = make_base(tmp_path / "base")
    recipe = write_recipe(tmp_path / "r.yaml", base, [base, base], non_expert_weights="mean")
    with pytest.raises(MoemergeError, match="non_expert_weights") as error:
        merge(recipe, tmp_path / "out")
    assert "\n" not in str(error.value)


def test_manifest_records_the_policy(tmp_path):
    base = make_base(tmp_path / "base")
    recipe = write_recipe(tmp_path / "r.yaml", base, [base, base], non_expert_weights="average")
    merge(recipe, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "moemerge.json").read_text())
    assert manifest["recipe"]["non_expert_weights"] == "average"
