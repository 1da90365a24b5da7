"""`moemerge verify`: check an output folder is complete and self-consistent before anyone relies on it.

The cheap part (index, shard headers, names, shapes, dtypes against config.json) runs inside every merge
before the output is renamed into place; `--deep` also reads every value and loads the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moemerge.errors import MoemergeError
from moemerge.formats import config_tensors, format_of_config
from moemerge.hf import load_model
from moemerge.safetensors_header import TensorInfo, read_header
from moemerge.sources import TensorStore
from moemerge.writer import INDEX_NAME


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise MoemergeError(f"{path}: missing; the output is incomplete")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MoemergeError(f"{path}: not valid JSON") from None


def check_structure(out: Path) -> dict[str, TensorInfo]:
    """Index, shard headers, names, shapes and dtypes: everything but the values. Returns the tensors."""
    config = _read_json(out / "config.json")
    weight_map = _read_json(out / INDEX_NAME).get("weight_map") or {}
    tensors: dict[str, TensorInfo] = {}
    for shard in sorted(set(weight_map.values())):
        if not (out / shard).is_file():
            raise MoemergeError(f"{out / INDEX_NAME}: lists {shard}, which is missing")
        for name, info in read_header(out / shard).items():
            if name in tensors:
                raise MoemergeError(f"{out / shard}: tensor {name} is also in {tensors[name].file.name}")
            if weight_map.get(name) != shard:
                raise MoemergeError(f"{out / shard}: tensor {name} is not listed for this shard in the index")
            tensors[name] = info
    unlisted = sorted(p.name for p in out.glob("*.safetensors") if p.name not in set(weight_map.values()))
    if unlisted:
        raise MoemergeError(f"{out / unlisted[0]}: shard not listed in {INDEX_NAME}")
    expected = config_tensors(config, str(out / "config.json"))[1]
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


def check_values(tensors: dict[str, TensorInfo]) -> None:
    """Every value finite, read one tensor at a time."""
    files = sorted({info.file for info in tensors.values()})
    store = TensorStore(files, "output", allow_pickle=False)
    for name in tensors:
        if not torch.isfinite(store.load(name).float()).all():
            raise MoemergeError(f"{tensors[name].file}: tensor {name} holds NaN or Inf values")


def check_loads(out: Path) -> None:
    """transformers loads it as its format's class (MixtralForCausalLM, ...) and gives finite logits."""
    want = format_of_config(_read_json(out / "config.json"), str(out / "config.json")).class_name
    model = load_model(out)
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
        check_values(tensors)
        check_loads(out)
    return len(tensors)
