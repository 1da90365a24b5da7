"""The structure of an output folder checked against its format: config, index, shard headers, names, shapes and
dtypes, everything but the values. Every merge runs it before the output is renamed into place, and
`moemerge verify` runs it first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moemerge.errors import MoemergeError
from moemerge.files import CONFIG, read_json
from moemerge.files import SAFETENSORS_INDEX as INDEX_NAME
from moemerge.formats import config_tensors, format_of_config
from moemerge.inputs.safetensors_header import TensorInfo, read_weights
from moemerge.inputs.weight_index import read_weight_index


def read_output_json(path: Path) -> Any:
    if not path.is_file():
        raise MoemergeError(f"{path}: missing; the output is incomplete")
    return read_json(path)


def check_structure(out: Path) -> dict[str, TensorInfo]:
    """Config, index, shard headers, names, shapes and dtypes: everything but the values. Returns the
    tensors. The config is read first: a dense model is named as such, not as an output missing its index."""
    config = read_output_json(out / CONFIG)
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
