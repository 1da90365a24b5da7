"""Pick the gate mode's recipe and return router weights for every layer."""

from __future__ import annotations

import gc

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moemerge.gates.cheap_embed import embedding_prototypes
from moemerge.gates.hidden import hidden_prototypes
from moemerge.gates.random_gates import random_gates
from moemerge.gates.rows import router_rows, warn_parallel
from moemerge.progress import Progress
from moemerge.recipe import Recipe
from moemerge.router_inputs import pad_ready
from moemerge.sources import ModelSource


def _prompts(recipe: Recipe) -> tuple[list[list[str]], list[list[str]]]:
    positive = [[p for p in e.positive_prompts if p.strip()] for e in recipe.experts]
    negative = [[p for p in e.negative_prompts if p.strip()] for e in recipe.experts]
    return positive, negative


def _load_base(base: ModelSource, device: torch.device, dtype: torch.dtype):
    """The dense base, frozen, in eval mode: on CUDA in the output dtype and placed by accelerate (so a base
    larger than the GPU spills to CPU); on CPU in float32, where half precision is slow and less exact."""
    load_dtype = dtype if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        base.path,
        dtype=load_dtype,
        device_map="auto" if device.type == "cuda" else None,
        trust_remote_code=False,
    )
    return model.eval()


def compute_gates(
    recipe: Recipe,
    base: ModelSource,
    num_layers: int,
    hidden_size: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    batch_size: int,
    progress: Progress,
) -> torch.Tensor:
    """float32 router weights [layers, experts, hidden]; the base model is freed before this returns."""
    experts = len(recipe.experts)
    if recipe.gate_mode in ("random", "uniform_random"):
        return random_gates(recipe.gate_mode, num_layers, experts, hidden_size, seed)
    tokenizer = pad_ready(AutoTokenizer.from_pretrained(base.path, trust_remote_code=False))
    positive, negative = _prompts(recipe)
    if recipe.gate_mode == "cheap_embed":
        embed = base.tensors.load("model.embed_tokens.weight")
        prototypes = embedding_prototypes(embed, tokenizer, positive, negative, num_layers)
        # Without a forward pass, estimate the router input's norm from each post-attention norm's weight.
        token_norm = torch.stack(
            [
                base.tensors.load(f"model.layers.{i}.post_attention_layernorm.weight").float().norm()
                for i in range(num_layers)
            ]
        )
    else:
        model = _load_base(base, device, dtype)
        total = sum(len(g) for g in (*positive, *negative))
        advance = progress.task(f"hidden states on {device.type}", total)
        try:
            prototypes, token_norm = hidden_prototypes(model, tokenizer, positive, negative, batch_size, advance)
        finally:
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    rows = router_rows(prototypes, token_norm, recipe.gate_scale)
    warn_parallel(rows, recipe.expert_names())
    return rows
