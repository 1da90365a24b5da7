"""`moemerge verify`: check an output folder is complete and self-consistent before anyone relies on it.

The cheap part (index, shard headers, names, shapes, dtypes against config.json) runs inside every merge
before the output is renamed into place; `deep` also reads every value and loads the model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from moemerge.errors import MoemergeError
from moemerge.files import CONFIG, DIGESTS, MANIFEST, read_json
from moemerge.files import SAFETENSORS_INDEX as INDEX_NAME
from moemerge.formats import config_tensors, format_of_config
from moemerge.hf import load_model
from moemerge.inputs.safetensors_header import TensorInfo, read_weights
from moemerge.inputs.sources import TensorStore
from moemerge.inputs.weight_index import read_weight_index


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise MoemergeError(f"{path}: missing; the output is incomplete")
    return read_json(path)


def check_structure(out: Path) -> dict[str, TensorInfo]:
    """Config, index, shard headers, names, shapes and dtypes: everything but the values. Returns the
    tensors. The config is read first: a dense model is named as such, not as an output missing its index."""
    config = _read_json(out / CONFIG)
    format_of_config(config, str(out / CONFIG))
    if not (out / INDEX_NAME).is_file():
        raise MoemergeError(f"{out / INDEX_NAME}: missing; the output is incomplete")
    index = read_weight_index(out / INDEX_NAME)
    weight_map, shards = index.weight_map, index.shards
    for shard in shards:
        if not (out / shard).is_file():
            raise MoemergeError(f"{out / INDEX_NAME}: lists {shard}, which is missing")
    tensors = read_weights([out / shard for shard in shards], weight_map, out / INDEX_NAME)
    unlisted = sorted(p.name for p in out.glob("*.safetensors") if p.name not in set(weight_map.values()))
    if unlisted:
        raise MoemergeError(f"{out / unlisted[0]}: shard not listed in {INDEX_NAME}")
    expected = config_tensors(config, str(out / CONFIG), len(weight_map))[1]
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        what = f"missing tensor {missing[0]}" if missing else f"unexpected tensor {extra[0]}"
        raise MoemergeError(f"{out}: {what} for the config's sizes")
    dtype = getattr(torch, str(config.get("torch_dtype") or config.get("dtype") or "float32"), None)
    for name, shape in expected.items():
        info = tensors[name]
        if info.shape != shape:
            raise MoemergeError(f"{out}: tensor {name} is {list(info.shape)}, config.json implies {list(shape)}")
        if dtype is not None and info.dtype != dtype:
            raise MoemergeError(f"{out}: tensor {name} is {info.dtype}, config.json says {dtype}")
    return tensors


def check_digests(out: Path, tensors: dict[str, TensorInfo]) -> None:
    """Each shard's bytes are those written: a flipped bit in a finite value passes every other check. An
    output without recorded digests (written by an older moemerge) has nothing to compare with."""
    manifest = _read_json(out / MANIFEST) if (out / MANIFEST).is_file() else {}
    recorded = manifest.get(DIGESTS) if isinstance(manifest, dict) else None
    if recorded is None:
        return
    shards = sorted({info.file.name for info in tensors.values()})
    if not isinstance(recorded, dict) or sorted(recorded) != shards:
        raise MoemergeError(f"{out / MANIFEST}: {DIGESTS} does not list the shards of {INDEX_NAME}")
    for shard in shards:
        with (out / shard).open("rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        if digest != recorded[shard]:
            raise MoemergeError(
                f"{out / shard}: sha256 {digest[:16]}… is not the {str(recorded[shard])[:16]}… recorded when it was "
                "written; the file has changed since (re-download or re-merge it)"
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
    want = format_of_config(_read_json(out / CONFIG), str(out / CONFIG)).class_name
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
