"""Tiny random Llama/Mistral/Qwen2/Qwen3 models, experts and adapters written to disk, the way users' folders
look, and the readers tests use to check what a merge wrote."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
SEQ_LEN = 24  # longer than the Mistral test base's sliding window
# Copies of the base must give the base's logits up to float32 rounding: max abs diff over the largest |logit|.
LOGIT_RTOL = 2e-6
MLP_ERROR = 0.999  # an MLP output 0.1% off must fail the same comparison
VOCAB = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [" ", ".", ",", "?", "0", "1"]


def tiny_tokenizer(eos_and_unk: bool = True) -> PreTrainedTokenizerFast:
    """A character-level tokenizer that adds BOS, as Llama's does; without `eos_and_unk` it has no token to
    lend for padding (no pad, eos or unk token)."""
    vocab = {token: i for i, token in enumerate(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    from tokenizers.processors import TemplateProcessing

    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    special = {"eos_token": "</s>", "unk_token": "<unk>"} if eos_and_unk else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", **special)


def tiny_config(family: str = "llama", **overrides) -> PreTrainedConfig:
    sizes = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        initializer_range=0.2,  # 10x the default, so every MLP moves the logits by O(1), not by a few 0.01
    )
    if family == "qwen3":
        sizes["head_dim"] = sizes["hidden_size"] // sizes["num_attention_heads"]  # Qwen3Config's default is 128
    sizes.update(overrides)
    return CONFIGS[family](**sizes)


def save_model(model: torch.nn.Module, path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """save_pretrained plus our tokenizer: a folder like one downloaded from the Hub."""
    model.to(dtype).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def make_base(path: Path, family: str = "llama", seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random init gives norms of 1 and biases of 0; vary them so copies are checkable
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.uniform_(-0.5, 0.5)
    return save_model(model, path)


def make_expert(base: Path, path: Path, seed: int, scale: float = 0.05) -> Path:
    """A 'fine-tune' of the base: its MLP weights perturbed, everything else unchanged."""
    model = AutoModelForCausalLM.from_pretrained(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mlp." in name:
                param.add_(torch.randn(param.shape, generator=generator) * scale)
    return save_model(model, path)


def make_lora(
    base: Path,
    path: Path,
    seed: int,
    rank: int = 4,
    alpha: float = 8,
    targets=("gate_proj", "up_proj", "down_proj"),
    **config_extra,
) -> dict[str, torch.Tensor]:
    """A PEFT-format adapter with random A and B; returns its tensors keyed as PEFT saves them."""
    config = json.loads((base / "config.json").read_text())
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    shapes = {
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
        "q_proj": (hidden, hidden),
    }
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for target in targets:
            out_features, in_features = shapes[target]
            kind = "mlp" if target.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{kind}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.1
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": list(targets),
        "fan_in_fan_out": False,
        "base_model_name_or_path": str(base),
        **config_extra,
    }
    (path / "adapter_config.json").write_text(json.dumps(adapter_config))
    return tensors


def write_recipe(path: Path, base: Path, experts: list, **fields) -> Path:
    """experts: list of source strings or dicts; prompts default to distinct letters."""
    entries = []
    for i, expert in enumerate(experts):
        entry = {"source_model": str(expert)} if not isinstance(expert, dict) else dict(expert)
        entry.setdefault("positive_prompts", [f"{'abcdefgh'[i] * 6} {'stuvwxyz'[i] * 4}"])
        entries.append(entry)
    recipe = {"base_model": str(base), "gate_mode": "hidden", "dtype": "float32", "experts": entries, **fields}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# reading outputs back


def input_ids(vocab: int = 64, batch: int = 2, length: int = SEQ_LEN) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(1234))


def load_model(path: Path, dtype: torch.dtype = torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@contextmanager
def mlp_outputs_scaled(model, factor: float) -> Iterator[None]:
    """Every decoder layer's MLP output multiplied by `factor` while inside (a forward hook per layer)."""
    hooks = [layer.mlp.register_forward_hook(lambda _m, _i, out: out * factor) for layer in model.model.layers]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def assert_same_logits(moe, dense, ids: torch.Tensor, label: str = "") -> float:
    """The MoE gives the dense model's logits up to float32 rounding, and the comparison is sharp enough that
    the dense model with every MLP output 0.1% off would fail it. Returns the relative diff."""
    want, got = logits_of(dense, ids), logits_of(moe, ids)
    scale = want.abs().max().item()
    diff = (got - want).abs().max().item() / scale
    assert diff <= LOGIT_RTOL, f"{label}: max abs logit diff {diff:.2e} of the largest logit (allowed {LOGIT_RTOL})"
    with mlp_outputs_scaled(dense, MLP_ERROR):
        off = (got - logits_of(dense, ids)).abs().max().item() / scale
    assert off > 10 * LOGIT_RTOL, f"{label}: a 0.1% MLP error moves the logits by only {off:.2e}; the check is blind"
    return diff


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files a folder's index lists, or its lone safetensors file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    return sorted(folder.glob("*.safetensors"))


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, read with safetensors itself; a name in two files is an error."""
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                assert name not in tensors, f"{name} is in more than one shard"
                tensors[name] = handle.get_tensor(name)
    return tensors


def base_with_experts(root: Path, experts: int = 3) -> Path:
    """A tiny base in root/base and experts of it in root/e0, root/e1, ... (seeds 1, 2, ...); returns root."""
    base = make_base(root / "base")
    for i in range(experts):
        make_expert(base, root / f"e{i}", seed=i + 1)
    return root
