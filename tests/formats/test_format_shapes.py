"""Shape-only tests of every output format and of the plan: no weights, no merge, milliseconds each.

The expected tensors are written out here from the published checkpoint layouts (Mixtral-8x7B's
`block_sparse_moe.experts.E.w1/w2/w3`, Qwen1.5-MoE's `mlp.experts.E.*` with `shared_expert` and
`shared_expert_gate`, Qwen3-MoE's `mlp.experts.E.*` with q/k norms), with shapes from the config's own keys,
and compared with what each format declares (`expected_tensors`) and with the plan built for a base whose
files hold only zero-filled tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moemerge.formats import FORMATS
from moemerge.formats.common import MoeLayout
from moemerge.inputs.experts import Expert
from moemerge.inputs.families import dense_shape
from moemerge.inputs.recipe import ExpertSpec
from moemerge.inputs.sources import ModelSource
from moemerge.output.plan import build_plan

LAYERS, HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 3, 16, 24, 4, 2, 8, 40
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# (output format, input family, shared expert, dense layers)
CASES = [
    ("mixtral", "llama", False, ()),
    ("mixtral", "llama", False, (1,)),
    ("qwen2_moe", "qwen2", False, ()),
    ("qwen2_moe", "llama", False, ()),  # Qwen2-MoE attention has q/k/v biases: zero ones for a Llama base
    ("qwen2_moe", "qwen2", True, ()),
    ("qwen2_moe", "qwen2", True, (0, 2)),
    ("qwen3_moe", "qwen3", False, ()),
    ("qwen3_moe", "qwen3", False, (2,)),
]


def base_config(family: str) -> dict:
    return {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "num_hidden_layers": LAYERS,
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def attention(family: str, prefix: str) -> dict[str, tuple[int, ...]]:
    """A layer's attention and norms; `family` is the dense family, or the MoE whose attention it mirrors."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = {
        f"{prefix}.self_attn.q_proj.weight": (q, HIDDEN),
        f"{prefix}.self_attn.k_proj.weight": (kv, HIDDEN),
        f"{prefix}.self_attn.v_proj.weight": (kv, HIDDEN),
        f"{prefix}.self_attn.o_proj.weight": (HIDDEN, q),
        f"{prefix}.input_layernorm.weight": (HIDDEN,),
        f"{prefix}.post_attention_layernorm.weight": (HIDDEN,),
    }
    if family in ("qwen2", "qwen2_moe"):
        shapes |= {f"{prefix}.self_attn.{p}_proj.bias": (n,) for p, n in (("q", q), ("k", kv), ("v", kv))}
    if family in ("qwen3", "qwen3_moe"):
        shapes |= {f"{prefix}.self_attn.{p}_norm.weight": (HEAD_DIM,) for p in ("q", "k")}
    return shapes


def mlp(prefix: str, size: int, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> dict:
    """gate and up are [size, hidden], down is [hidden, size], whatever they are called."""
    gate, up, down = names
    return {
        f"{prefix}.{gate}.weight": (size, HIDDEN),
        f"{prefix}.{up}.weight": (size, HIDDEN),
        f"{prefix}.{down}.weight": (HIDDEN, size),
    }


def dense_model(family: str) -> dict[str, tuple[int, ...]]:
    """A dense Llama/Qwen2/Qwen3 checkpoint's tensors."""
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    for layer in range(LAYERS):
        shapes |= attention(family, f"model.layers.{layer}") | mlp(f"model.layers.{layer}.mlp", INTER)
    return shapes


def published(output: str, config: dict, experts: int, dense: tuple[int, ...]) -> dict:
    """The MoE checkpoint's tensors as the published models of `output` lay them out."""
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        shapes |= attention(output, prefix)
        if output == "mixtral":
            block = f"{prefix}.block_sparse_moe"
            shapes[f"{block}.gate.weight"] = (experts, HIDDEN)
            for e in range(experts):  # a dense layer too: the same MLP in every slot behind a zero router
                shapes |= mlp(f"{block}.experts.{e}", config["intermediate_size"], ("w1", "w3", "w2"))
            continue
        if layer in dense:
            shapes |= mlp(f"{prefix}.mlp", config["intermediate_size"])
            continue
        shapes[f"{prefix}.mlp.gate.weight"] = (experts, HIDDEN)
        for e in range(experts):
            shapes |= mlp(f"{prefix}.mlp.experts.{e}", config["moe_intermediate_size"])
        if output == "qwen2_moe":
            shapes |= mlp(f"{prefix}.mlp.shared_expert", config["shared_expert_intermediate_size"])
            shapes[f"{prefix}.mlp.shared_expert_gate.weight"] = (1, HIDDEN)
    return shapes


def layout(family: str, shared: bool, dense: tuple[int, ...], experts: int = 3) -> MoeLayout:
    return MoeLayout(family, experts, 2, shared, "float32", dense)


@pytest.mark.parametrize(("output", "family", "shared", "dense"), CASES)
def test_each_format_declares_the_published_layout(output, family, shared, dense):
    fmt = FORMATS[output]
    config = fmt.config(base_config(family), layout(family, shared, dense))
    assert config["num_experts_per_tok"] == 2
    assert config[fmt.experts_key] == 3
    assert fmt.expected_tensors(config) == published(output, config, 3, dense)


def test_the_sizes_in_the_config_are_the_base_s():
    """The expert MLPs are the dense MLP's size; a Qwen2-MoE shared expert made from a model is too."""
    assert FORMATS["mixtral"].config(base_config("llama"), layout("llama", False, ()))["intermediate_size"] == INTER
    qwen3 = FORMATS["qwen3_moe"].config(base_config("qwen3"), layout("qwen3", False, ()))
    assert qwen3["moe_intermediate_size"] == INTER
    qwen2 = FORMATS["qwen2_moe"].config(base_config("qwen2"), layout("qwen2", True, ()))
    assert qwen2["moe_intermediate_size"] == qwen2["shared_expert_intermediate_size"] == INTER


def zero_base(folder: Path, family: str) -> ModelSource:
    """A base folder whose weights are zero-filled tensors of a dense checkpoint's names and shapes."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(base_config(family)))
    save_file({n: torch.zeros(s) for n, s in dense_model(family).items()}, str(folder / "model.safetensors"))
    return ModelSource(folder, "base_model")


@pytest.mark.parametrize(("output", "family", "shared", "dense"), CASES)
def test_the_plan_holds_the_published_layout(tmp_path, output, family, shared, dense):
    base = zero_base(tmp_path / "base", family)
    fmt = FORMATS[output]
    spec = ExpertSpec(source_model="base")
    experts = [Expert(i, spec, base, None, seed=0) for i in range(3)]
    shared_expert = Expert(3, spec, base, None, seed=0, label="shared_experts[0]") if shared else None
    config = fmt.config(base.config, layout(family, shared, dense))
    plan = build_plan(
        fmt, base, dense_shape(base), experts, shared_expert, torch.float32, None, "base", frozenset(dense)
    )
    assert {t.name: t.shape for t in plan} == published(output, config, 3, dense)
    assert len(plan) == len({t.name for t in plan}), "a tensor is planned twice"
    assert all(t.dtype == torch.float32 for t in plan)
    waiting = [t for t in plan if t.source == "gates"]  # the routers, made from the gate pass's rows
    assert len(waiting) == LAYERS - len(dense) and plan[len(plan) - len(waiting) :] == waiting, "routers come last"


def test_a_plan_without_gates_cannot_be_written(tmp_path):
    base = zero_base(tmp_path / "base", "llama")
    experts = [Expert(i, ExpertSpec(source_model="base"), base, None, seed=0) for i in range(2)]
    plan = build_plan(FORMATS["mixtral"], base, dense_shape(base), experts, None, torch.float32, None)
    router = next(t for t in plan if t.name == "model.layers.0.block_sparse_moe.gate.weight")
    with pytest.raises(RuntimeError, match="names and shapes only"):
        router.produce()
    rows = torch.arange(LAYERS * 2 * HIDDEN, dtype=torch.float32).reshape(LAYERS, 2, HIDDEN)
    plan = build_plan(FORMATS["mixtral"], base, dense_shape(base), experts, None, torch.float32, lambda: rows)
    router = next(t for t in plan if t.name == "model.layers.2.block_sparse_moe.gate.weight")
    assert torch.equal(router.produce(), rows[2])
