"""Streamed safetensors shards: headers are written from the plan, then tensor bytes one tensor at a time.

Because every shape and dtype is known before the first byte, nothing is held in memory but the tensor
being written, whatever the model's size. A tensor whose source bytes already are its output bytes is not
held at all: the kernel copies its file range into the shard.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from moemerge.errors import MoemergeError
from moemerge.safetensors_header import DTYPE_NAMES, TensorInfo

INDEX_NAME = "model.safetensors.index.json"
# copy_file_range fails with these where the kernel cannot copy between the two files (other file systems,
# older kernels) or a sandbox forbids the call; the bytes then go through user space.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM}
_CHUNK = 16 * 2**20
# Every this many bytes the disk is asked to start writing a shard's new bytes (see _Writeback).
WRITEBACK_STEP = 256 * 2**20
_SYNC_FILE_RANGE_WRITE = 2


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its name, what it will look like, and how to make it when its turn comes."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]
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


def _check_verbatim(tensor: PlannedTensor, info: TensorInfo) -> TensorInfo:
    """Check a file range that will be copied as it is, through a private map of the file: the values are
    read from the page cache in place, and only the pages of this one tensor are mapped at a time."""
    if info.shape != tensor.shape or info.dtype != tensor.dtype:
        raise RuntimeError(f"internal error: {tensor.name} was planned as {tensor.dtype}{list(tensor.shape)}")
    if not info.dtype.is_floating_point or info.nbytes == 0:
        return info
    start = info.start - info.start % mmap.ALLOCATIONGRANULARITY
    with info.file.open("rb") as handle:
        try:
            mapped = mmap.mmap(handle.fileno(), info.end - start, offset=start, access=mmap.ACCESS_COPY)
        except ValueError:
            raise _truncated(info) from None
    with mapped:  # the tensor over the map is gone when _finite returns, so the map can close
        finite = _finite(torch.frombuffer(mapped, dtype=info.dtype, count=tensor.numel, offset=info.start - start))
    if not finite:
        raise _non_finite(tensor)
    return info


def _checked(tensor: PlannedTensor) -> torch.Tensor | TensorInfo:
    """Make one tensor and check it is what the plan promised, and finite; a verbatim tensor is only
    checked, and its file range returned for copying."""
    if tensor.verbatim is not None:
        return _check_verbatim(tensor, tensor.verbatim)
    value = tensor.produce()
    if tuple(value.shape) != tensor.shape or value.dtype != tensor.dtype:
        raise RuntimeError(
            f"internal error: {tensor.name} was planned as {tensor.dtype}{list(tensor.shape)} "
            f"but produced {value.dtype}{list(value.shape)}"
        )
    if not _finite(value):
        raise _non_finite(tensor)
    return value.contiguous()


def _prefetched(tensors: list[PlannedTensor]) -> Iterator[torch.Tensor | TensorInfo]:
    """Tensors in order, each made (or checked) on a helper thread while the previous one is written:
    reading, converting and checking overlap with writing (all release the GIL), and at most two tensors
    are in memory."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_checked, tensors[0]) if tensors else None
        for following in [*tensors[1:], None]:
            value = pending.result()
            pending = pool.submit(_checked, following) if following is not None else None
            yield value


def _truncated(info: TensorInfo) -> MoemergeError:
    return MoemergeError(f"{info.file}: truncated; it ends before byte {info.end}")


def _copy_chunk(source: BinaryIO, target: int, offset: int, count: int) -> int:
    """Copy up to `count` bytes from `offset` in `source` to the file descriptor `target` at its position;
    0 at the source's end."""
    if hasattr(os, "copy_file_range"):
        try:
            return os.copy_file_range(source.fileno(), target, count, offset)
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
    source.seek(offset)
    return os.write(target, source.read(min(count, _CHUNK)))


def _copy_range(info: TensorInfo, handle: BinaryIO) -> None:
    """Append a source file's byte range to the output inside the kernel, from page cache to page cache:
    no user-space buffer is allocated, filled and written back."""
    handle.flush()
    with info.file.open("rb") as source:
        offset = info.start
        while offset < info.end:
            copied = _copy_chunk(source, handle.fileno(), offset, info.end - offset)
            if copied == 0:
                raise _truncated(info)
            offset += copied


def _write(value: torch.Tensor | TensorInfo, handle: BinaryIO) -> None:
    if isinstance(value, TensorInfo):
        _copy_range(value, handle)
    else:
        handle.write(value.reshape(-1).view(torch.uint8).numpy().data)


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range (Linux only, and not in os); None where there is none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


_START_WRITEBACK = _sync_file_range()


class _Writeback:
    """Starts writeback of a shard's bytes in steps while later tensors are still being copied, so that
    the disk is busy from the start rather than from when the kernel's dirty threshold is reached, and the
    closing fsync finds little left to wait for. Only a request: errors are left to fsync to report."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.started = 0

    def reached(self, position: int) -> None:
        """`position` bytes of the shard are written: start writing back those not yet asked for."""
        if _START_WRITEBACK is None or position - self.started < WRITEBACK_STEP:
            return
        self.handle.flush()
        _START_WRITEBACK(self.handle.fileno(), self.started, position - self.started, _SYNC_FILE_RANGE_WRITE)
        self.started = position


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
                header = _header(tensors)
                handle.write(header)
                position = len(header)
                writeback = _Writeback(handle)
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
    return index


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
