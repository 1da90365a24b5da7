"""Random dense Llama models for merge_speed.py: sharded bf16 safetensors, config.json and a tokenizer.

Tensors are written straight from torch (no transformers model is built), one input shard (1 GB) in memory
at a time. Experts are the base with other MLP weights. A folder is reused when its marker matches.

    python benchmarks/make_models.py SIZE WORKDIR EXPERTS
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import torch
from merge_speed import SIZES, ModelSize, model_folders, numel, vocabulary
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

INPUT_SHARD_BYTES = 1_000_000_000
SEED = 1234
MARKER = "generated.json"


def write_tokenizer(folder: Path, words: list[str]) -> None:
    """A word-level tokenizer over `words` that prepends BOS, as Llama's does: tokenizer.json + config."""
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)


def tensor_seed(model_seed: int, name: str) -> int:
    """One seed per tensor, so a tensor's values do not depend on which shard or order it is written in."""
    return model_seed * 1_000_003 + zlib.crc32(name.encode())


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """bf16 weights: N(0, 0.02) for matrices, around 1 for norm weights."""
    generator = torch.Generator().manual_seed(seed)
    if len(shape) == 1:
        return (1.0 + 0.1 * torch.randn(shape, generator=generator)).to(torch.bfloat16)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=generator)


def shard_groups(shapes: list[tuple[str, tuple[int, ...]]], limit: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split tensors, in order, into groups of at most `limit` bytes of bf16 (one tensor may exceed it)."""
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in shapes:
        nbytes = 2 * numel(shape)
        if groups[-1] and used + nbytes > limit:
            groups.append([])
            used = 0
        groups[-1].append((name, shape))
        used += nbytes
    return groups


def write_weights(folder: Path, size: ModelSize, mlp_seed: int) -> None:
    """Sharded safetensors and their index; one shard's tensors are in memory at a time.

    Non-MLP tensors are seeded from SEED, MLP tensors from `mlp_seed`: experts share the base's attention,
    norms and embeddings, as the fine-tunes a MoE is built from do, and differ in their MLPs.
    """
    groups = shard_groups(size.tensor_shapes(), INPUT_SHARD_BYTES)
    weight_map: dict[str, str] = {}
    for number, group in enumerate(groups, start=1):
        file_name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {
            name: random_tensor(name, shape, tensor_seed(mlp_seed if ".mlp." in name else SEED, name))
            for name, shape in group
        }
        save_file(tensors, str(folder / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file_name))
        del tensors
    total = sum(2 * numel(shape) for _, shape in size.tensor_shapes())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def ensure_model(folder: Path, size: ModelSize, mlp_seed: int, words: list[str]) -> Path:
    """Generate one model folder unless a complete one for the same size and seed is already there."""
    stamp = {"size": asdict(size), "mlp_seed": mlp_seed, "seed": SEED}
    marker = folder / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    write_weights(folder, size, mlp_seed)
    (folder / "config.json").write_text(json.dumps(size.config(), indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    write_tokenizer(folder, words)
    marker.write_text(json.dumps(stamp) + "\n")
    print(f"generated {folder} in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return folder


def main() -> None:
    size_name, workdir, experts = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    size = SIZES[size_name]
    words = vocabulary(size.vocab)
    base, expert_folders = model_folders(workdir, size, experts)
    ensure_model(base, size, SEED, words)
    for i, folder in enumerate(expert_folders):
        ensure_model(folder, size, SEED + 1 + i, words)


if __name__ == "__main__":
    main()
