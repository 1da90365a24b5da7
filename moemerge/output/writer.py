"""Streamed safetensors shards: headers are written from the plan, then tensor bytes one tensor at a time.

Because every shape and dtype is known before the first byte, nothing is held in memory but the tensor
being written, whatever the model's size. A tensor whose source bytes already are its output bytes is not
held at all: the kernel copies its file range into the shard.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from moemerge.device import one_torch_thread
from moemerge.digests import Hasher, file_digest, new_hasher
from moemerge.errors import MoemergeError
from moemerge.files import SAFETENSORS_INDEX as INDEX_NAME
from moemerge.inputs.safetensors_header import DTYPE_NAMES, TensorInfo, read_header
from moemerge.output.filecopy import Writeback, copy_range, truncated


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its name, what it will look like, and how to make it when its turn comes."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]  # the values, in `dtype` or a wider one the writer casts from
    source: str = ""
    verbatim: TensorInfo | None = None  # the source bytes, when they are the output bytes as they are

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


def _finite(value: torch.Tensor) -> bool:
    # aminmax propagates NaN and ±Inf and allocates no tensor-sized mask: 10x cheaper than isfinite().all()
    return (
        not value.is_floating_point()
        or not value.numel()
        or bool(torch.isfinite(torch.stack(torch.aminmax(value))).all())
    )


def _non_finite(tensor: PlannedTensor) -> MoemergeError:
    return MoemergeError(f"{tensor.source}: NaN or Inf values (output tensor {tensor.name}); fix the source weights")


def _overflow(tensor: PlannedTensor, value: torch.Tensor) -> MoemergeError:
    """Finite values that the output dtype cannot hold: the cause is the dtype, not the sources."""
    peak = float(value.detach().abs().max())
    dtype = str(tensor.dtype).removeprefix("torch.")
    return MoemergeError(
        f"{tensor.source}: values up to {peak:.4g} overflow {dtype} (largest {torch.finfo(tensor.dtype).max:.4g}) "
        f"in output tensor {tensor.name}; use dtype: bfloat16 or float32"
    )


def _check_verbatim(tensor: PlannedTensor, info: TensorInfo, digest: Hasher) -> TensorInfo:
    """Check and hash a file range that will be copied as it is, through a private map of the file: the
    values are read from the page cache in place (the copy itself never passes through Python), and only
    the pages of this one tensor are mapped at a time."""
    if info.shape != tensor.shape or info.dtype != tensor.dtype:
        raise RuntimeError(f"internal error: {tensor.name} was planned as {tensor.dtype}{list(tensor.shape)}")
    if info.nbytes == 0:
        return info
    start = info.start - info.start % mmap.ALLOCATIONGRANULARITY
    with info.file.open("rb") as handle:
        try:
            mapped = mmap.mmap(handle.fileno(), info.end - start, offset=start, access=mmap.ACCESS_COPY)
        except ValueError:
            raise truncated(info) from None
    with mapped:  # the views over the map are gone when this block ends, so the map can close
        with memoryview(mapped) as view:
            digest.update(view[info.start - start : info.end - start])
        finite = not info.dtype.is_floating_point or _finite(
            torch.frombuffer(mapped, dtype=info.dtype, count=tensor.numel, offset=info.start - start)
        )
    if not finite:
        raise _non_finite(tensor)
    return info


def _checked(tensor: PlannedTensor, digest: Hasher) -> torch.Tensor | TensorInfo:
    """Make one tensor, check it is what the plan promised, and finite, and add its bytes to its shard's
    digest; a verbatim tensor is only checked and hashed, and its file range returned for copying."""
    if tensor.verbatim is not None:
        return _check_verbatim(tensor, tensor.verbatim, digest)
    value = tensor.produce()
    if tuple(value.shape) != tensor.shape or value.dtype.is_floating_point != tensor.dtype.is_floating_point:
        raise RuntimeError(
            f"internal error: {tensor.name} was planned as {tensor.dtype}{list(tensor.shape)} "
            f"but produced {value.dtype}{list(value.shape)}"
        )
    if not _finite(value):
        raise _non_finite(tensor)
    if value.dtype != tensor.dtype:
        cast = value.to(tensor.dtype)
        if not _finite(cast):
            raise _overflow(tensor, value)
        value = cast
    value = value.contiguous()
    digest.update(_bytes(value))
    return value


def _result(future: Future[torch.Tensor | TensorInfo]) -> torch.Tensor | TensorInfo:
    """The future's result, waited for in short slices: a Ctrl-C that the kernel delivers to another thread
    (the gate pass's, torch's) does not interrupt a blocking wait, and Python only raises it in the main thread
    once that thread runs again."""
    while True:
        try:
            return future.result(timeout=0.05)
        except TimeoutError:
            continue


def _prefetched(jobs: list[tuple[PlannedTensor, Hasher]]) -> Iterator[torch.Tensor | TensorInfo]:
    """Tensors in order, each made (or checked) and hashed on a helper thread while the previous one is
    written: reading, converting, checking and hashing overlap with writing (all release the GIL), at most
    two tensors are in memory, and one thread hashes every tensor in write order. That thread computes on one
    core: the gate pass runs beside it (moemerge.device.one_torch_thread)."""
    pool = ThreadPoolExecutor(max_workers=1, initializer=one_torch_thread)
    try:
        pending = pool.submit(_checked, *jobs[0]) if jobs else None
        for following in [*jobs[1:], None]:
            value = _result(pending)
            pending = pool.submit(_checked, *following) if following is not None else None
            yield value
    finally:
        # A failed or interrupted write does not wait for the tensor in hand: a router may be waiting for a
        # gate pass that only stops once the merge does (moemerge.gates.background).
        pool.shutdown(wait=False, cancel_futures=True)


def _bytes(value: torch.Tensor) -> memoryview:
    return value.reshape(-1).view(torch.uint8).numpy().data


def _write(value: torch.Tensor | TensorInfo, handle: BinaryIO) -> None:
    if isinstance(value, TensorInfo):
        copy_range(value, handle)
    else:
        handle.write(_bytes(value))


def shard_name(number: int, total: int) -> str:
    return f"model-{number:05d}-of-{total:05d}.safetensors"


def write_shards(
    plan: list[PlannedTensor], folder: Path, shard_size: int, on_tensor: Callable[[int], None] | None = None
) -> tuple[dict[str, object], dict[str, str]]:
    """Write every planned tensor into shards in `folder`, fsync each, and write the index; returns it and
    each shard's digest (moemerge.digests), computed from the bytes where they already are in memory or in the
    page cache as they are written (the output is never read back)."""
    shards = assign_shards(plan, shard_size)
    headers = [_header(tensors) for tensors in shards]
    digests = [new_hasher(header) for header in headers]
    weight_map: dict[str, str] = {}
    values = _prefetched([(tensor, digest) for digest, shard in zip(digests, shards, strict=True) for tensor in shard])
    for number, tensors in enumerate(shards, start=1):
        name = shard_name(number, len(shards))
        try:
            with (folder / name).open("wb") as handle:
                header = headers[number - 1]
                handle.write(header)
                position = len(header)
                writeback = Writeback(handle)
                for tensor in tensors:
                    _write(next(values), handle)
                    position += tensor.nbytes
                    writeback.reached(position)
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
    return index, {shard_name(n, len(shards)): d.hexdigest() for n, d in enumerate(digests, start=1)}


def rewrite_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Overwrite tensors of the shards written in `folder`, in place, each in the dtype and shape it already
    has; returns the digest of each shard changed, which replaces the one recorded when it was first written.
    """
    weight_map: dict[str, str] = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
    digests = {}
    for name in sorted({weight_map[tensor] for tensor in tensors}):
        file = folder / name
        infos = read_header(file)
        with file.open("r+b") as handle:
            for tensor in (tensor for tensor in tensors if weight_map[tensor] == name):
                info = infos[tensor]
                handle.seek(info.start)
                handle.write(_bytes(tensors[tensor].to(info.dtype).reshape(info.shape).contiguous()))
            handle.flush()
            os.fsync(handle.fileno())
        digests[name] = file_digest(file)
    return digests


def write_json(path: Path, data: object) -> None:
    """Strict JSON: a NaN or Infinity (which json.dumps would write bare, and other readers refuse) is an error."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
