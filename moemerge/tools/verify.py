"""`moemerge verify`: check an output folder is complete and self-consistent before anyone relies on it.

The cheap part (index, shard headers, names, shapes, dtypes against config.json: moemerge.formats.structure)
runs inside every merge before the output is renamed into place; `deep` also reads every value, compares the
shards' digests with those recorded, and loads the model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moemerge.digests import file_digest, recorded_digests
from moemerge.errors import MoemergeError
from moemerge.files import CONFIG, MANIFEST
from moemerge.files import SAFETENSORS_INDEX as INDEX_NAME
from moemerge.formats import format_of_config
from moemerge.formats.structure import check_structure, read_output_json
from moemerge.hf import load_model
from moemerge.inputs.safetensors_header import TensorInfo
from moemerge.inputs.sources import TensorStore


def check_digests(out: Path, tensors: dict[str, TensorInfo]) -> None:
    """Each shard's bytes are those written: a flipped bit in a finite value passes every other check. The
    manifest names the algorithm (xxh3_128 now, sha256 before); an output without recorded digests (written
    by an older moemerge still) has nothing to compare with."""
    manifest = read_output_json(out / MANIFEST) if (out / MANIFEST).is_file() else {}
    recorded = recorded_digests(manifest, str(out / MANIFEST)) if isinstance(manifest, dict) else None
    if recorded is None:
        return
    algorithm, digests = recorded
    shards = sorted({info.file.name for info in tensors.values()})
    if not isinstance(digests, dict) or sorted(digests) != shards:
        raise MoemergeError(f"{out / MANIFEST}: the shard digests do not list the shards of {INDEX_NAME}")
    for shard in shards:
        digest = file_digest(out / shard, algorithm)
        if digest != digests[shard]:
            raise MoemergeError(
                f"{out / shard}: {algorithm} {digest[:16]}… is not the {str(digests[shard])[:16]}… recorded when it "
                "was written; the file has changed since (re-download or re-merge it)"
            )


def check_values(tensors: dict[str, TensorInfo]) -> None:
    """Every value finite, read one tensor at a time."""
    files = sorted({info.file for info in tensors.values()})
    store = TensorStore(files, "output", allow_pickle=False)
    for name in tensors:
        if not torch.isfinite(store.load(name).float()).all():
            raise MoemergeError(f"{tensors[name].file}: tensor {name} holds NaN or Inf values")


def check_loads(out: Path) -> None:
    """transformers loads it as its format's class (MixtralForCausalLM, ...) and gives finite logits."""
    want = format_of_config(read_output_json(out / CONFIG), str(out / CONFIG)).class_name
    try:
        model = load_model(out)
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises, the answer is "it does not load"
        reason = " ".join(f"{exc.__class__.__name__}: {exc}".split())[:300]
        raise MoemergeError(f"{out}: transformers cannot load it ({reason})") from None
    if type(model).__name__ != want:
        raise MoemergeError(f"{out}: transformers loaded {type(model).__name__}, not {want}")
    with torch.inference_mode():
        logits = model(torch.tensor([[model.config.bos_token_id or 0, 1, 2]])).logits
    if not torch.isfinite(logits.float()).all():
        raise MoemergeError(f"{out}: the model's logits are not finite")


def verify(out: Path, deep: bool = False) -> int:
    """Raise MoemergeError on the first problem; returns the number of tensors checked."""
    if not out.is_dir():
        raise MoemergeError(f"{out}: not a folder")
    tensors = check_structure(out)
    if deep:
        check_values(tensors)  # first: a NaN is named as such, not only as changed bytes
        check_digests(out, tensors)
        check_loads(out)
    return len(tensors)
