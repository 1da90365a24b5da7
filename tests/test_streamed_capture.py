"""The layer-streamed router inputs equal the whole transformers model's, on every input family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import make_base, tiny_tokenizer
from transformers import AutoModelForCausalLM

from moemerge.router_inputs import CaptureOptions, RouterInputs, pad_ready
from moemerge.sources import ModelSource

# Llama 3.1's rope scaling, with an original context shorter than the prompts below.
LLAMA3 = dict(
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    rope_theta=500000.0,
)
FAMILIES = {
    "llama": ("llama", {}),
    "llama3": ("llama", LLAMA3),
    "mistral": ("mistral", dict(sliding_window=4)),  # shorter than most prompts
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),  # q/k/v biases
    "qwen3": ("qwen3", {}),  # q/k norms
}
PROMPTS = [
    "a quick brown fox jumps over the lazy dog",
    "",  # BOS only: the one token kept
    "zz yy",
    "hello, world. is this long enough? 0101",
    "q",
    "the sliding window is shorter than this",
]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def base(request, tmp_path_factory) -> Path:
    family, overrides = FAMILIES[request.param]
    return make_base(tmp_path_factory.mktemp(request.param) / "base", family, seed=3, **overrides)


def whole_model_router_inputs(base: Path, prompt: str) -> torch.Tensor:
    """One prompt alone (no padding) through the whole transformers model, with forward hooks on every
    post_attention_layernorm: [layers, tokens, hidden] over its tokens other than BOS (all, if BOS is all)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tokenizer = tiny_tokenizer()
    seen: list[torch.Tensor] = []
    hooks = [
        layer.post_attention_layernorm.register_forward_hook(lambda _m, _i, out: seen.append(out[0]))
        for layer in model.model.layers
    ]
    encoded = tokenizer(prompt, return_tensors="pt", return_special_tokens_mask=True)
    with torch.no_grad():
        model(input_ids=encoded["input_ids"])
    for hook in hooks:
        hook.remove()
    real = ~encoded["special_tokens_mask"][0].bool()
    real = real if real.any() else ~real
    return torch.stack([hidden[real] for hidden in seen])


def streamed(base: Path, prompts: list[str], batch_size: int = 3, **kwargs) -> tuple[list[torch.Tensor], torch.Tensor]:
    options = CaptureOptions(torch.device("cpu"), torch.float32, batch_size, **kwargs)
    inputs = RouterInputs(ModelSource(base, "base"), pad_ready(tiny_tokenizer()), prompts, options, max_tokens=None)
    return list(inputs.layers()), inputs.owners


def test_streamed_router_inputs_equal_the_whole_model(base):
    """Padded batches of mixed lengths, layer by layer, against each prompt alone through the whole model."""
    layers, owners = streamed(base, PROMPTS)
    assert len(layers) == 3
    for p, prompt in enumerate(PROMPTS):
        expected = whole_model_router_inputs(base, prompt)
        got = torch.stack([features[owners == p] for features in layers])
        assert got.shape == expected.shape, prompt
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_activations_on_disk_give_the_same_router_inputs(base):
    """A zero activation budget sends the hidden states between layers through a temporary file."""
    in_memory, owners = streamed(base, PROMPTS, batch_size=2)
    on_disk, disk_owners = streamed(base, PROMPTS, batch_size=2, activation_budget=0)
    assert torch.equal(owners, disk_owners)
    for memory_layer, disk_layer in zip(in_memory, on_disk, strict=True):
        assert torch.equal(memory_layer, disk_layer)


def test_kept_tokens_and_layer_count(base):
    """`keep` selects tokens of the full capture; `count` stops the stream early."""
    full, owners = streamed(base, PROMPTS)
    keep = torch.arange(len(owners)) % 3 == 1
    options = CaptureOptions(torch.device("cpu"), torch.float32, 3)
    inputs = RouterInputs(ModelSource(base, "base"), pad_ready(tiny_tokenizer()), PROMPTS, options, max_tokens=None)
    partial = list(inputs.layers(count=2, keep=keep))
    assert len(partial) == 2
    for layer in range(2):
        assert torch.equal(partial[layer], full[layer][keep])
