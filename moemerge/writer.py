"""Streamed safetensors shards: headers are written from the plan, then tensor bytes one tensor at a time.

Because every shape and dtype is known before the first byte, nothing is held in memory but the tensor
being written, whatever the model's size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from moemerge.errors import MoemergeError
from moemerge.safetensors_header import DTYPE_NAMES

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its name, what it will look like, and how to make it when its turn comes."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]
    source: str = ""

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def assign_shards(plan: list[PlannedTensor], shard_size: int) -> list[list[PlannedTensor]]:
    """Fill shards in plan order; a tensor larger than shard_size gets a shard of its own."""
    shards: list[list[PlannedTensor]] = [[]]
    used = 0
    for tensor in plan:
        if shards[-1] and used + tensor.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(tensor)
        used += tensor.nbytes
    return shards


def _header(tensors: list[PlannedTensor]) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        entries[tensor.name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _checked(tensor: PlannedTensor) -> torch.Tensor:
    """Make one tensor and check it is what the plan promised, and finite."""
    value = tensor.produce()
    if tuple(value.shape) != tensor.shape or value.dtype != tensor.dtype:
        raise RuntimeError(
            f"internal error: {tensor.name} was planned as {tensor.dtype}{list(tensor.shape)} "
            f"but produced {value.dtype}{list(value.shape)}"
        )
    # aminmax propagates NaN and ±Inf and allocates no tensor-sized mask: 10x cheaper than isfinite().all()
    if value.is_floating_point() and value.numel() and not torch.isfinite(torch.stack(torch.aminmax(value))).all():
        raise MoemergeError(f"{tensor.source}: NaN or Inf values (output tensor {tensor.name}); fix the source weights")
    return value.contiguous()


def _prefetched(tensors: list[PlannedTensor]) -> Iterator[torch.Tensor]:
    """Tensors in order, each made on a helper thread while the previous one is written: reading and
    converting overlap with writing (all release the GIL), and at most two tensors are in memory."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_checked, tensors[0]) if tensors else None
        for following in [*tensors[1:], None]:
            value = pending.result()
            pending = pool.submit(_checked, following) if following is not None else None
            yield value


def shard_name(number: int, total: int) -> str:
    return f"model-{number:05d}-of-{total:05d}.safetensors"


def write_shards(
    plan: list[PlannedTensor], folder: Path, shard_size: int, on_tensor: Callable[[int], None] | None = None
) -> dict[str, object]:
    """Write every planned tensor into shards in `folder`, fsync each, and write the index; returns it."""
    shards = assign_shards(plan, shard_size)
    weight_map: dict[str, str] = {}
    values = _prefetched([tensor for shard in shards for tensor in shard])
    for number, tensors in enumerate(shards, start=1):
        name = shard_name(number, len(shards))
        try:
            with (folder / name).open("wb") as handle:
                handle.write(_header(tensors))
                for tensor in tensors:
                    handle.write(next(values).reshape(-1).view(torch.uint8).numpy().data)
                    weight_map[tensor.name] = name
                    if on_tensor:
                        on_tensor(tensor.nbytes)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise MoemergeError(
                f"could not write {name}: {exc.strerror or exc}; free disk space or write elsewhere"
            ) from None
    index = {"metadata": {"total_size": sum(t.nbytes for t in plan)}, "weight_map": weight_map}
    write_json(folder / INDEX_NAME, index)
    return index


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
