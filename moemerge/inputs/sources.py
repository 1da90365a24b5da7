"""A model reference in a recipe → a local folder with lazy, one-tensor-at-a-time access to its weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from moemerge.errors import MoemergeError, OptionError
from moemerge.files import ADAPTER_CONFIG, CONFIG, WEIGHT_INDEXES, read_json
from moemerge.inputs.model_files import DenseConfig, typed
from moemerge.inputs.safetensors_header import TensorInfo, read_weights
from moemerge.inputs.weight_index import read_weight_index


class Fetcher(Protocol):
    """Where a reference that is no local path comes from, and the record of what each recipe key resolved
    to: moemerge.hub.download.HubFetcher (passed in, so that reading inputs does not depend on the Hub)."""

    def fetch(self, text: str, key: str, role: str) -> Path | None: ...

    def note(self, key: str, model: Path, adapter: Path | None = None) -> None: ...


@dataclass(frozen=True)
class Reference:
    """What a recipe's model string points at: a model folder, optionally with a LoRA adapter on top."""

    model: Path
    adapter: Path | None = None


def find_path(text: str, recipe_dir: Path) -> Path | None:
    """Paths are tried as written (relative to the working directory, as mergekit does), then next to the recipe."""
    for candidate in (Path(text).expanduser(), recipe_dir / text):
        if candidate.exists():
            return candidate
    return None


def split_adapter(text: str, recipe_dir: Path) -> tuple[str, str]:
    """mergekit's `model+adapter`, where either path may hold a '+' itself: the split whose two parts both
    exist locally, else the last '+' (Hub ids hold no '+')."""
    splits = [(text[:i], text[i + 1 :]) for i, char in enumerate(text) if char == "+"]
    for model, adapter in splits:
        if find_path(model, recipe_dir) and find_path(adapter, recipe_dir):
            return model, adapter
    return splits[-1]


def resolve_reference(text: str, key: str, recipe_dir: Path, base: Path | None, hub: Fetcher) -> Reference:
    """Turn `path`, `adapter_dir` (applied to the base), mergekit's `model+adapter`, or a Hub id
    `org/name[@revision]` (when no such local path exists; see moemerge.hub.download) into folders.
    `hub` downloads, and records what each key resolved to."""
    found = find_path(text, recipe_dir) or hub.fetch(text, key, "base" if base is None else "expert")
    if found is None and "+" in text:
        model_text, adapter_text = split_adapter(text, recipe_dir)
        model = resolve_reference(model_text, key, recipe_dir, base, hub)
        adapter = find_path(adapter_text, recipe_dir) or hub.fetch(adapter_text, key, "adapter")
        if adapter is None:
            raise MoemergeError(f"{key}: adapter {adapter_text!r} not found")
        if not (adapter / ADAPTER_CONFIG).is_file():
            raise MoemergeError(f"{key}: {adapter} has no {ADAPTER_CONFIG}; the part after '+' must be a LoRA adapter")
        hub.note(key, model.model, adapter)
        return Reference(model.model, adapter)
    if found is None:
        raise MoemergeError(
            f"{key}: {text!r} not found (looked in the working directory and next to the recipe); "
            "give a local model folder or a Hub id (org/name)"
        )
    if not found.is_dir():
        raise MoemergeError(f"{key}: {found} is a file; give the model's folder (with config.json and weights)")
    hub.note(key, found)
    if (found / ADAPTER_CONFIG).is_file():
        if base is None:
            raise MoemergeError(f"{key}: {found} is a LoRA adapter; base_model must be a full model")
        return Reference(base, found)
    return Reference(found)


class TensorStore:
    """Tensors spread over weight files, read lazily: only the tensor asked for is ever resident. With an
    index (`weight_map`, read from the file `index`), each tensor must be in the shard it names."""

    def __init__(
        self,
        files: list[Path],
        label: str,
        allow_pickle: bool,
        weight_map: dict[str, str] | None = None,
        index: Path | None = None,
    ) -> None:
        self.label = label
        self._infos: dict[str, TensorInfo] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        if files[0].suffix == ".safetensors":
            self._infos = read_weights(files, weight_map, index)
        elif allow_pickle:
            for file in files:
                self._pickled.update(torch.load(file, map_location="cpu", mmap=True, weights_only=True))
        else:
            raise OptionError(
                "{label}: {folder} has only pickled .bin weights, which can run code when loaded; "
                "convert them to safetensors or pass {allow_pickle} if you trust the source",
                label=label,
                folder=files[0].parent,
            )

    def names(self) -> list[str]:
        return list(self._infos or self._pickled)

    def has(self, name: str) -> bool:
        return name in self._infos or name in self._pickled

    def _missing(self, name: str) -> MoemergeError:
        return MoemergeError(f"{self.label}: tensor {name} is missing")

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._infos:
            return self._infos[name].shape
        if name in self._pickled:
            return tuple(self._pickled[name].shape)
        raise self._missing(name)

    def dtype(self, name: str) -> torch.dtype:
        if name in self._infos:
            return self._infos[name].dtype
        if name in self._pickled:
            return self._pickled[name].dtype
        raise self._missing(name)

    def byte_range(self, name: str, dtype: torch.dtype) -> TensorInfo | None:
        """Where the tensor's bytes lie in its safetensors file, when they are already `dtype`: such a tensor
        can be copied file to file instead of read and written back (pickled weights have no such range)."""
        info = self._infos.get(name)
        return info if info is not None and info.dtype == dtype else None

    def load(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh memory, straight from its byte range in the file."""
        if name in self._pickled:
            return self._pickled[name].clone()
        if name not in self._infos:
            raise self._missing(name)
        info = self._infos[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        with info.file.open("rb") as handle:
            handle.seek(info.start)
            if handle.readinto(buffer.numpy()) != info.nbytes:
                raise MoemergeError(f"{info.file}: tensor {name} is truncated")
        return buffer.view(info.dtype).reshape(info.shape)


class ModelSource:
    """One local model folder: its config.json and its lazily read tensors."""

    def __init__(self, path: Path, label: str, allow_pickle: bool = False) -> None:
        self.path = path
        self.label = label
        config_file = path / CONFIG
        if not config_file.is_file():
            raise MoemergeError(f"{label}: {path} has no {CONFIG}; is it a Hugging Face model folder?")
        self.config: dict = read_json(config_file)
        typed(DenseConfig, self.config, config_file)
        files, weight_map, index = self._weight_files()
        self.tensors = TensorStore(files, label, allow_pickle, weight_map, index)

    def _weight_files(self) -> tuple[list[Path], dict[str, str] | None, Path | None]:
        """The weight files, and the index's weight map and path where the folder has an index."""
        for index_name in WEIGHT_INDEXES:
            index = self.path / index_name
            if index.is_file():
                read = read_weight_index(index)
                files = [self.path / name for name in read.shards]
                missing = [f.name for f in files if not f.is_file()]
                if missing:
                    raise MoemergeError(f"{index}: lists shard {missing[0]}, which is missing from {self.path}")
                return files, read.weight_map, index
        for pattern in ("*.safetensors", "pytorch_model*.bin"):
            files = sorted(self.path.glob(pattern))
            if files:
                return files, None, None
        raise MoemergeError(f"{self.label}: {self.path} holds no .safetensors weights")
