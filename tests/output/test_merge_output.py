"""End-to-end checks of what `merge` writes: the Mixtral checkpoint, tensor by tensor, and how transformers reads it.

Every expected value is computed here from the source files (or from the dense model's own forward pass),
never taken from moemerge's output.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from support.tiny_models import (
    assert_same_logits,
    input_ids,
    load_model,
    logits_of,
    make_base,
    make_expert,
    make_lora,
    read_tensors,
    save_model,
    tiny_tokenizer,
    weight_files,
    write_recipe,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, MixtralForCausalLM

from moemerge.errors import MoemergeError
from moemerge.gates.random_gates import random_gates
from moemerge.inputs.gate_modes import GATE_MODE_SPECS, Needs
from moemerge.output import filecopy
from moemerge.output.merge import MergeOptions, merge

GATE_MODES = [name for name, spec in GATE_MODE_SPECS.items() if spec.needs is not Needs.DATASET]  # every mode whose
# recipe needs no labelled dataset: with copies of the base as experts, any routers give the base's logits
FAMILIES = ["llama", "mistral"]
PROJECTION_OF = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
# Mistral base with values that differ from every default, so the config checks can tell copying from guessing.
MISTRAL_OVERRIDES = dict(head_dim=16, sliding_window=16, rope_theta=250000.0)


# ---------------------------------------------------------------------------------------------------------------
# helpers


def shard_header(path: Path) -> dict:
    """Parse a safetensors header by hand and check it describes the file exactly: contiguous, no gaps."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    header.pop("__metadata__", None)
    spans = sorted((entry["data_offsets"][0], entry["data_offsets"][1], name) for name, entry in header.items())
    position = 0
    for start, end, name in spans:
        entry = header[name]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        assert start == position, f"{path.name}: {name} starts at {start}, expected {position}"
        assert end - start == math.prod(entry["shape"]) * dtype.itemsize, f"{path.name}: {name} has the wrong size"
        position = end
    assert 8 + length + position == len(raw), f"{path.name}: file size does not match its header"
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == set(header)
    return header


def classic_mixtral_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The exact tensor names and shapes of a classic Hub Mixtral checkpoint, from config sizes alone."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    experts = config["num_local_experts"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        shapes[prefix + "input_layernorm.weight"] = (hidden,)
        shapes[prefix + "post_attention_layernorm.weight"] = (hidden,)
        shapes[prefix + "self_attn.q_proj.weight"] = (heads * head_dim, hidden)
        shapes[prefix + "self_attn.k_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[prefix + "self_attn.v_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[prefix + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        shapes[prefix + "block_sparse_moe.gate.weight"] = (experts, hidden)
        for expert in range(experts):
            shapes[f"{prefix}block_sparse_moe.experts.{expert}.w1.weight"] = (inter, hidden)
            shapes[f"{prefix}block_sparse_moe.experts.{expert}.w2.weight"] = (hidden, inter)
            shapes[f"{prefix}block_sparse_moe.experts.{expert}.w3.weight"] = (inter, hidden)
    return shapes


def expert_key(layer: int, expert: int, w: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"


def mlp_key(layer: int, projection: str) -> str:
    return f"model.layers.{layer}.mlp.{projection}.weight"


def shared_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names an output shares with its base: everything but the MoE blocks (lm_head is checked on its own)."""
    return [name for name in tensors if "block_sparse_moe" not in name and name != "lm_head.weight"]


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {file.name: file.read_bytes() for file in sorted(folder.glob("*.safetensors"))}


def cli_executable() -> str:
    beside = Path(sys.executable).parent / "moemerge"
    found = str(beside) if beside.is_file() else shutil.which("moemerge")
    assert found, "the moemerge console script is not installed"
    return found


def lora_with_ranks(base: Path, path: Path, seed: int, ranks: dict[str, int], **config) -> dict[str, torch.Tensor]:
    """A PEFT adapter on the MLP whose rank differs per projection, as rank_pattern adapters really are."""
    base_config = json.loads((base / "config.json").read_text())
    hidden, inter = base_config["hidden_size"], base_config["intermediate_size"]
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(base_config["num_hidden_layers"]):
        for projection, rank in ranks.items():
            out_features, in_features = shapes[projection]
            prefix = f"base_model.model.model.layers.{layer}.mlp.{projection}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.1
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    adapter_config = {"peft_type": "LORA", "target_modules": list(ranks), "fan_in_fan_out": False, **config}
    (path / "adapter_config.json").write_text(json.dumps(adapter_config))
    return tensors


def lora_delta(tensors: dict[str, torch.Tensor], layer: int, projection: str, scale: float) -> torch.Tensor:
    prefix = f"base_model.model.model.layers.{layer}.mlp.{projection}"
    return scale * (tensors[f"{prefix}.lora_B.weight"].float() @ tensors[f"{prefix}.lora_A.weight"].float())


# ---------------------------------------------------------------------------------------------------------------
# shared sources and merges (built once per module)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sources")


@pytest.fixture(scope="module")
def bases(root) -> dict[str, Path]:
    return {
        "llama": make_base(root / "llama", "llama", seed=0),
        "mistral": make_base(root / "mistral", "mistral", seed=1, **MISTRAL_OVERRIDES),
        "tied": make_base(root / "tied", "llama", seed=2, tie_word_embeddings=True),
    }


@pytest.fixture(scope="module")
def experts(root, bases) -> list[Path]:
    """Three distinct fine-tunes of the llama base."""
    return [make_expert(bases["llama"], root / f"expert{seed}", seed=seed) for seed in (1, 2, 3)]


@pytest.fixture(scope="module")
def distinct_merge(tmp_path_factory, bases, experts) -> Path:
    """llama base + three distinct experts, hidden gates, one shard."""
    folder = tmp_path_factory.mktemp("distinct")
    recipe = write_recipe(folder / "recipe.yaml", bases["llama"], experts)
    merge(recipe, folder / "out", MergeOptions(device="cpu"))
    return folder / "out"


@pytest.fixture(scope="module")
def random_recipe(tmp_path_factory, bases, experts) -> Path:
    folder = tmp_path_factory.mktemp("random")
    return write_recipe(folder / "recipe.yaml", bases["llama"], experts, gate_mode="random")


@pytest.fixture(scope="module")
def random_merge(random_recipe) -> Path:
    """The random-gate recipe, seed 7, one shard."""
    out = random_recipe.parent / "out"
    merge(random_recipe, out, MergeOptions(device="cpu", seed=7))
    return out


# ---------------------------------------------------------------------------------------------------------------
# 1. N copies of the base is the base


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("gate_mode", GATE_MODES)
def test_copies_of_base_give_base_logits(tmp_path, bases, family, gate_mode):
    base = bases[family]
    recipe = write_recipe(tmp_path / "recipe.yaml", base, [base, base, base], gate_mode=gate_mode, experts_per_token=2)
    merge(recipe, tmp_path / "out", MergeOptions(device="cpu", seed=5))

    moe, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, output_loading_info=True)
    moe.eval()
    assert isinstance(moe, MixtralForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert moe.config.num_local_experts == 3 and moe.config.num_experts_per_tok == 2
    dense = load_model(base)
    ids = input_ids()
    assert_same_logits(moe, dense, ids, f"{family}/{gate_mode}")
    # Greedy decoding follows the same path.
    prompt = ids[:1, :8]
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(moe.generate(prompt, **kwargs), dense.generate(prompt, **kwargs))


def test_tied_base_gets_explicit_lm_head_and_same_logits(tmp_path, bases):
    base = bases["tied"]
    with safe_open(str(base / "model.safetensors"), framework="pt") as handle:
        assert "lm_head.weight" not in set(handle.keys()), "the fixture should be a base saved without lm_head"
    recipe = write_recipe(tmp_path / "recipe.yaml", base, [base, base, base])
    merge(recipe, tmp_path / "out", MergeOptions(device="cpu"))

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    out = read_tensors(tmp_path / "out")
    assert torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], read_tensors(base)["model.embed_tokens.weight"])

    moe, dense = load_model(tmp_path / "out"), load_model(base)
    assert isinstance(moe, MixtralForCausalLM)
    assert_same_logits(moe, dense, input_ids(), "tied")


# ---------------------------------------------------------------------------------------------------------------
# 2. distinct experts are copied bit for bit


def test_distinct_experts_copied_bit_for_bit(distinct_merge, bases, experts):
    out = read_tensors(distinct_merge)
    base = read_tensors(bases["llama"])
    sources = [read_tensors(path) for path in experts]
    config = json.loads((distinct_merge / "config.json").read_text())
    for layer in range(config["num_hidden_layers"]):
        for index, source in enumerate(sources):
            for w, projection in PROJECTION_OF.items():
                got, want = out[expert_key(layer, index, w)], source[mlp_key(layer, projection)]
                assert got.dtype == want.dtype and torch.equal(got, want), expert_key(layer, index, w)
        gate = out[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        assert gate.shape == (3, config["hidden_size"]) and gate.dtype == torch.float32
        assert torch.isfinite(gate).all()
    # The experts really are distinct, so a mix-up of indices could not pass the loop above.
    assert not torch.equal(sources[0][mlp_key(0, "up_proj")], sources[1][mlp_key(0, "up_proj")])
    shared = shared_keys(out)
    assert len(shared) == 2 + 6 * config["num_hidden_layers"]  # embed, final norm, 2 norms + 4 attention per layer
    for name in shared:
        assert torch.equal(out[name], base[name]), name
    assert torch.equal(out["lm_head.weight"], base["lm_head.weight"])


# ---------------------------------------------------------------------------------------------------------------
# 3. layout, index, shard headers, config, generation


def test_key_set_is_exactly_classic_mixtral(distinct_merge):
    config = json.loads((distinct_merge / "config.json").read_text())
    shapes = {name: tuple(t.shape) for name, t in read_tensors(distinct_merge).items()}
    assert shapes == classic_mixtral_shapes(config)


def test_index_and_shard_headers(distinct_merge):
    index = json.loads((distinct_merge / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in distinct_merge.glob("*.safetensors"))
    assert files == ["model-00001-of-00001.safetensors"]
    listed: dict[str, str] = {}
    total = 0
    for name in files:
        header = shard_header(distinct_merge / name)
        for tensor, entry in header.items():
            assert tensor not in listed
            listed[tensor] = name
            total += entry["data_offsets"][1] - entry["data_offsets"][0]
    assert index["weight_map"] == listed
    assert index["metadata"]["total_size"] == total


def test_config_values(distinct_merge, tmp_path, bases):
    config = json.loads((distinct_merge / "config.json").read_text())
    llama = json.loads((bases["llama"] / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert config["num_local_experts"] == 3 and config["num_experts_per_tok"] == 2
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "rms_norm_eps",
        "max_position_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert config[key] == llama[key], key
    assert config["head_dim"] == llama["hidden_size"] // llama["num_attention_heads"]
    assert config["tie_word_embeddings"] is False
    assert config["rope_theta"] == 10000.0
    assert config["sliding_window"] is None
    assert config["torch_dtype"] == "float32"

    # A Mistral base with a non-default head_dim, sliding window and rope theta: all three are carried over.
    mistral = bases["mistral"]
    recipe = write_recipe(tmp_path / "recipe.yaml", mistral, [mistral] * 4, gate_mode="random", experts_per_token=3)
    merge(recipe, tmp_path / "out", MergeOptions(device="cpu"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_local_experts"] == 4 and config["num_experts_per_tok"] == 3
    assert config["head_dim"] == MISTRAL_OVERRIDES["head_dim"]
    assert config["sliding_window"] == MISTRAL_OVERRIDES["sliding_window"]
    assert config["rope_theta"] == MISTRAL_OVERRIDES["rope_theta"]
    assert config["tie_word_embeddings"] is False


def test_merged_model_generates(distinct_merge):
    tokenizer = AutoTokenizer.from_pretrained(distinct_merge)
    model = load_model(distinct_merge)
    assert isinstance(model, MixtralForCausalLM)
    prompt = tokenizer("hello world", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 5)
    assert torch.equal(generated[:, : prompt["input_ids"].shape[1]], prompt["input_ids"])
    assert int(generated.max()) < model.config.vocab_size


# ---------------------------------------------------------------------------------------------------------------
# 4. LoRA experts


def test_lora_experts_equal_base_plus_scaled_delta(tmp_path, bases, experts):
    base_dir = bases["llama"]
    plain = make_lora(base_dir, tmp_path / "plain", seed=11, rank=4, alpha=8)
    rslora = make_lora(base_dir, tmp_path / "rslora", seed=12, rank=4, alpha=8, use_rslora=True)
    with_attention = make_lora(
        base_dir, tmp_path / "attn", seed=13, rank=2, alpha=6, targets=("q_proj", "gate_proj", "up_proj", "down_proj")
    )
    patterned = lora_with_ranks(
        base_dir,
        tmp_path / "patterned",
        seed=14,
        ranks={"gate_proj": 4, "up_proj": 4, "down_proj": 2},
        r=4,
        lora_alpha=8,
        rank_pattern={"down_proj": 2},
        # "p_proj" ends "up_proj" but is no dotted suffix of it: PEFT matches (.*\.)?pattern, so it changes nothing
        alpha_pattern={"down_proj": 32, "model.layers.1.mlp.up_proj": 16, "p_proj": 99},
    )
    sources = [
        tmp_path / "plain",
        f"{base_dir}+{tmp_path / 'plain'}",  # mergekit's form, same adapter
        tmp_path / "rslora",
        tmp_path / "attn",
        tmp_path / "patterned",
        f"{experts[0]}+{tmp_path / 'plain'}",  # an adapter on a fine-tune, not on the base
    ]
    recipe = write_recipe(tmp_path / "recipe.yaml", base_dir, sources, gate_mode="random")
    merge(recipe, tmp_path / "out", MergeOptions(device="cpu"))

    out = read_tensors(tmp_path / "out")
    base = read_tensors(base_dir)
    fine_tune = read_tensors(experts[0])

    def patterned_scale(layer: int, projection: str) -> float:
        if projection == "down_proj":
            return 32 / 2
        if projection == "up_proj" and layer == 1:
            return 16 / 4
        return 8 / 4

    plan = [
        (base, plain, lambda layer, projection: 8 / 4),
        (base, plain, lambda layer, projection: 8 / 4),
        (base, rslora, lambda layer, projection: 8 / math.sqrt(4)),
        (base, with_attention, lambda layer, projection: 6 / 2),
        (base, patterned, patterned_scale),
        (fine_tune, plain, lambda layer, projection: 8 / 4),
    ]
    for index, (model, adapter, scale) in enumerate(plan):
        for layer in range(3):
            for w, projection in PROJECTION_OF.items():
                want = model[mlp_key(layer, projection)].float() + lora_delta(
                    adapter, layer, projection, scale(layer, projection)
                )
                key = expert_key(layer, index, w)
                got = out[key]
                assert got.dtype == torch.float32 and got.shape == want.shape, key
                error = (got - want).abs().max().item()
                assert error <= 1e-6, f"{key}: max abs error {error}"
    # The deltas are large enough that a wrong scale could not hide inside atol.
    assert lora_delta(plain, 0, "up_proj", 1.0).abs().max() > 1e-3
    # The attention adapter's q_proj delta is ignored: attention is the base's, bit for bit.
    for name in shared_keys(out):
        assert torch.equal(out[name], base[name]), name
    # Experts 0 and 1 name the same adapter in two forms.
    assert torch.equal(out[expert_key(2, 0, "w2")], out[expert_key(2, 1, "w2")])


@pytest.mark.parametrize("square", [True, False], ids=["square_mlp", "rectangular_mlp"])
def test_fan_in_fan_out_is_read_as_peft_reads_it(tmp_path, square, caplog):
    """A hand-set `fan_in_fan_out: true` on nn.Linear MLPs: PEFT resets it and adds B @ A untransposed. On a square
    MLP the shape cannot tell the two layouts apart, so only the flag's meaning decides. Expected weights come from
    PEFT itself (merge_and_unload)."""
    from peft import PeftModel

    base = make_base(tmp_path / "base", intermediate_size=32 if square else 48)
    make_lora(base, tmp_path / "adapter", seed=21, fan_in_fan_out=True)
    recipe = write_recipe(tmp_path / "recipe.yaml", base, [tmp_path / "adapter", base], gate_mode="random")
    with caplog.at_level("WARNING", logger="moemerge"):
        merge(recipe, tmp_path / "out", MergeOptions(device="cpu"))
    assert any("fan_in_fan_out" in r.getMessage() for r in caplog.records)

    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), tmp_path / "adapter")
    want = {n: t.detach() for n, t in peft.merge_and_unload().state_dict().items()}
    out, plain = read_tensors(tmp_path / "out"), read_tensors(base)
    for layer in range(3):
        for w, projection in PROJECTION_OF.items():
            got, expected = out[expert_key(layer, 0, w)], want[mlp_key(layer, projection)]
            assert (got - expected).abs().max() <= 1e-6, expert_key(layer, 0, w)
            # the delta is large, and transposing it (possible when square) would be far off
            delta = expected - plain[mlp_key(layer, projection)]
            assert delta.abs().max() > 1e-2
            if square:
                assert (plain[mlp_key(layer, projection)] + delta.T - got).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# 5. noise_scale and residual_scale


def test_noise_and_residual_scale(tmp_path, bases):
    base_dir = bases["llama"]
    noise = 0.01
    specs = [
        {"source_model": str(base_dir), "noise_scale": noise},
        {"source_model": str(base_dir), "noise_scale": noise},
        {"source_model": str(base_dir), "residual_scale": 0.7},
    ]
    recipe = write_recipe(tmp_path / "recipe.yaml", base_dir, specs)
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        merge(recipe, tmp_path / name, MergeOptions(device="cpu", seed=seed))

    out, base = read_tensors(tmp_path / "a"), read_tensors(base_dir)
    deltas = []
    for layer in range(3):
        for w, projection in PROJECTION_OF.items():
            source = base[mlp_key(layer, projection)]
            for index in (0, 1):
                delta = out[expert_key(layer, index, w)] - source
                assert abs(delta.std().item() / noise - 1) < 0.1, (layer, index, w, delta.std().item())
                assert abs(delta.mean().item()) < 2e-3
                deltas.append(delta)
            # residual_scale multiplies w2 only; w1 and w3 stay the base's bits.
            got = out[expert_key(layer, 2, w)]
            if w == "w2":
                torch.testing.assert_close(got, source * 0.7, atol=1e-7, rtol=1e-6)
                assert not torch.equal(got, source)
            else:
                assert torch.equal(got, source)
    # Every noised tensor got noise of its own (experts, layers and projections do not share a draw).
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            if deltas[i].shape == deltas[j].shape:
                assert not torch.allclose(deltas[i], deltas[j]), (i, j)
    for name in shared_keys(out):
        assert torch.equal(out[name], base[name]), name

    # Same seed: the same bytes. Another seed: other noise, nothing else changes.
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    other = read_tensors(tmp_path / "c")
    assert set(other) == set(out)
    for name, tensor in other.items():
        noised = ".experts.0." in name or ".experts.1." in name
        assert torch.equal(tensor, out[name]) != noised, name


# ---------------------------------------------------------------------------------------------------------------
# 6. dtypes


def test_recipe_bfloat16_gives_bfloat16_everywhere(tmp_path, bases, experts):
    recipe = write_recipe(tmp_path / "recipe.yaml", bases["llama"], experts, dtype="bfloat16", gate_mode="cheap_embed")
    merge(recipe, tmp_path / "out", MergeOptions(device="cpu"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    for file in weight_files(tmp_path / "out"):
        assert {entry["dtype"] for entry in shard_header(file).values()} == {"BF16"}
    out, base = read_tensors(tmp_path / "out"), read_tensors(bases["llama"])
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    for name in [*shared_keys(out), "lm_head.weight"]:
        assert torch.equal(out[name], base[name].to(torch.bfloat16)), name
    source = read_tensors(experts[2])
    assert torch.equal(out[expert_key(1, 2, "w2")], source[mlp_key(1, "down_proj")].to(torch.bfloat16))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert model.dtype == torch.bfloat16
    assert torch.isfinite(logits_of(model, input_ids()).float()).all()


def test_bfloat16_base_is_copied_bit_exact(tmp_path, bases):
    bf16_base = save_model(LlamaForCausalLM.from_pretrained(bases["llama"]), tmp_path / "bf16", torch.bfloat16)
    base = read_tensors(bf16_base)
    assert {t.dtype for t in base.values()} == {torch.bfloat16}
    recipe = write_recipe(tmp_path / "recipe.yaml", bf16_base, [bf16_base, bf16_base], dtype=None)
    merge(recipe, tmp_path / "out", MergeOptions(device="cpu"))

    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    out = read_tensors(tmp_path / "out")
    for name, tensor in out.items():
        assert tensor.dtype == torch.bfloat16, name
        match = re.fullmatch(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.\d+\.(w\d)\.weight", name)
        if match:
            want = base[mlp_key(int(match.group(1)), PROJECTION_OF[match.group(2)])]
        elif "block_sparse_moe.gate" in name:
            continue
        else:
            want = base[name]
        assert torch.equal(tensor.view(torch.int16), want.view(torch.int16)), name


# ---------------------------------------------------------------------------------------------------------------
# 7. sharding


def test_small_shards_hold_every_tensor_once_and_load_identically(random_recipe, random_merge):
    out = random_recipe.parent / "sharded"
    merge(random_recipe, out, MergeOptions(device="cpu", seed=7, shard_size=20_000))
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 2
    count = len(files)
    assert [f.name for f in files] == [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]

    index = json.loads((out / "model.safetensors.index.json").read_text())
    seen: dict[str, str] = {}
    total = 0
    for file in files:
        header = shard_header(file)
        sizes = [entry["data_offsets"][1] - entry["data_offsets"][0] for entry in header.values()]
        assert sum(sizes) <= 20_000 or len(sizes) == 1, f"{file.name} holds {sum(sizes)} bytes"
        total += sum(sizes)
        for name in header:
            assert name not in seen, f"{name} in {seen.get(name)} and {file.name}"
            seen[name] = file.name
    assert index["weight_map"] == seen
    assert index["metadata"]["total_size"] == total

    sharded, single = read_tensors(out), read_tensors(random_merge)
    assert set(sharded) == set(single)
    for name, tensor in sharded.items():
        assert torch.equal(tensor, single[name]), name
    ids = input_ids()
    assert torch.equal(logits_of(load_model(out), ids), logits_of(load_model(random_merge), ids))


# ---------------------------------------------------------------------------------------------------------------
# 8. streamed output equals a reference built in memory


def test_streamed_output_equals_in_memory_reference(random_merge, bases, experts):
    config = json.loads((random_merge / "config.json").read_text())
    layers, hidden, count = config["num_hidden_layers"], config["hidden_size"], len(experts)
    base = read_tensors(bases["llama"])
    sources = [read_tensors(path) for path in experts]

    # Random gates are a seeded draw of [layers, experts, hidden]; layer i's router gets slice i.
    gates = random_gates("random", layers, count, hidden, 7)
    assert not torch.equal(gates[0], gates[1])
    expected: dict[str, torch.Tensor] = {name: base[name] for name in base if ".mlp." not in name}
    for layer in range(layers):
        expected[f"model.layers.{layer}.block_sparse_moe.gate.weight"] = gates[layer]
        for index, source in enumerate(sources):
            for w, projection in PROJECTION_OF.items():
                expected[expert_key(layer, index, w)] = source[mlp_key(layer, projection)]

    out = read_tensors(random_merge)
    assert set(out) == set(expected)
    for name, tensor in out.items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("failure", [errno.EXDEV, errno.ENOSYS, None], ids=["EXDEV", "ENOSYS", "absent"])
def test_without_kernel_copy_the_bytes_are_the_same(random_recipe, random_merge, tmp_path, monkeypatch, failure):
    """Tensors that are copied as they are go through copy_file_range; where the kernel refuses it (across
    file systems, old kernels) or has none (other systems), plain reads and writes give the same bytes."""
    calls = []

    def refuse(*args):
        calls.append(args)
        raise OSError(failure, os.strerror(failure))

    if failure is None:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    else:
        monkeypatch.setattr(os, "copy_file_range", refuse)
    merge(random_recipe, tmp_path / "out", MergeOptions(device="cpu", seed=7, shard_size=20_000))
    assert bool(calls) == (failure is not None)
    merged = {n: t.view(torch.uint8) for n, t in read_tensors(tmp_path / "out").items()}
    reference = {n: t.view(torch.uint8) for n, t in read_tensors(random_merge).items()}
    assert merged.keys() == reference.keys()
    assert all(torch.equal(merged[n], reference[n]) for n in merged)


@pytest.mark.skipif(filecopy._START_WRITEBACK is None, reason="no sync_file_range on this system")
def test_writeback_is_requested_in_steps_over_each_shard(random_recipe, tmp_path, monkeypatch):
    """Each shard asks the disk to write its bytes in consecutive ranges of at least a step, in order."""
    requests: list[tuple[int, int, int]] = []
    start_writeback = filecopy._START_WRITEBACK

    def record(fd: int, offset: int, count: int, flags: int) -> int:
        requests.append((os.fstat(fd).st_ino, offset, count))
        return start_writeback(fd, offset, count, flags)

    monkeypatch.setattr(filecopy, "WRITEBACK_STEP", 4096)
    monkeypatch.setattr(filecopy, "_START_WRITEBACK", record)
    merge(random_recipe, tmp_path / "out", MergeOptions(device="cpu", seed=7, shard_size=20_000))
    shards = {file.stat().st_ino: file.stat().st_size for file in (tmp_path / "out").glob("*.safetensors")}
    assert {inode for inode, _, _ in requests} == set(shards)
    for inode, size in shards.items():
        ranges = [(offset, count) for node, offset, count in requests if node == inode]
        assert ranges[0][0] == 0 and all(count >= 4096 for _, count in ranges)
        assert all(a + n == b for (a, n), (b, _) in zip(ranges, ranges[1:], strict=False))
        assert size - 4096 <= ranges[-1][0] + ranges[-1][1] <= size


def test_nan_in_a_copied_base_tensor_is_refused(tmp_path, bases, experts):
    """Base tensors copied file to file are still checked for NaN and Inf, in place in the source file."""
    broken = tmp_path / "base"
    shutil.copytree(bases["llama"], broken)
    tensors = read_tensors(broken)
    tensors["model.layers.1.self_attn.k_proj.weight"][2, 3] = float("inf")
    for file in weight_files(broken):
        file.unlink()
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    recipe = write_recipe(tmp_path / "recipe.yaml", broken, experts, gate_mode="random")
    with pytest.raises(MoemergeError, match=r"base model\.layers\.1\.self_attn\.k_proj\.weight: NaN or Inf"):
        merge(recipe, tmp_path / "out", MergeOptions(device="cpu"))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# 9. a sharded base


def test_sharded_base_merges_like_single_file_base(tmp_path, bases, experts, distinct_merge):
    sharded = tmp_path / "sharded_base"
    LlamaForCausalLM.from_pretrained(bases["llama"]).save_pretrained(sharded, max_shard_size="20KB")
    tiny_tokenizer().save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1

    recipe = write_recipe(tmp_path / "recipe.yaml", sharded, experts)
    merge(recipe, tmp_path / "out", MergeOptions(device="cpu"))
    got, want = read_tensors(tmp_path / "out"), read_tensors(distinct_merge)
    assert set(got) == set(want)
    for name, tensor in got.items():
        assert torch.equal(tensor, want[name]), name

    # The sharded base as an expert, too.
    recipe = write_recipe(tmp_path / "recipe2.yaml", sharded, [sharded, experts[0]], gate_mode="random")
    merge(recipe, tmp_path / "out2", MergeOptions(device="cpu"))
    out, base = read_tensors(tmp_path / "out2"), read_tensors(bases["llama"])
    for layer in range(3):
        for w, projection in PROJECTION_OF.items():
            assert torch.equal(out[expert_key(layer, 0, w)], base[mlp_key(layer, projection)])


# ---------------------------------------------------------------------------------------------------------------
# 10. the CLI and the Python API agree


def test_cli_and_api_write_identical_shards(tmp_path, bases, experts):
    specs = [str(experts[0]), {"source_model": str(experts[1]), "noise_scale": 0.02}, str(experts[2])]
    recipe = write_recipe(tmp_path / "recipe.yaml", bases["llama"], specs, gate_mode="random")
    merge(recipe, tmp_path / "api", MergeOptions(seed=11))
    result = subprocess.run(
        [cli_executable(), str(recipe), str(tmp_path / "cli"), "--seed", "11"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    api, cli = shard_bytes(tmp_path / "api"), shard_bytes(tmp_path / "cli")
    assert api and api == cli
    for name in ("model.safetensors.index.json", "config.json"):
        assert (tmp_path / "api" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes(), name
    # The summary names the output folder (whitespace removed: the console may wrap long lines).
    flat = re.sub(r"\s+", "", result.stderr)
    assert f"wrote{tmp_path / 'cli'}:" in flat, result.stderr

    # A different seed changes the random gates and the noise, so the bytes differ.
    merge(recipe, tmp_path / "api12", MergeOptions(seed=12))
    assert shard_bytes(tmp_path / "api12") != api
