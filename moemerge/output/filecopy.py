"""Moving bytes from file to file inside the kernel, and asking the disk to write early.

Both are only ways to go faster: where the kernel cannot copy between two files, bytes go through user space
with the same result; where there is no sync_file_range, writeback simply starts later.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from typing import BinaryIO

from moemerge.errors import MoemergeError
from moemerge.inputs.safetensors_header import TensorInfo

# copy_file_range fails with these where the kernel cannot copy between the two files (other file systems,
# older kernels) or a sandbox forbids the call; the bytes then go through user space.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM}
_CHUNK = 16 * 2**20
# Every this many bytes the disk is asked to start writing a shard's new bytes (see Writeback).
WRITEBACK_STEP = 256 * 2**20
_SYNC_FILE_RANGE_WRITE = 2


def truncated(info: TensorInfo) -> MoemergeError:
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


def copy_range(info: TensorInfo, handle: BinaryIO) -> None:
    """Append a source file's byte range to the output inside the kernel, from page cache to page cache:
    no user-space buffer is allocated, filled and written back."""
    handle.flush()
    with info.file.open("rb") as source:
        offset = info.start
        while offset < info.end:
            copied = _copy_chunk(source, handle.fileno(), offset, info.end - offset)
            if copied == 0:
                raise truncated(info)
            offset += copied


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range (Linux only, and not in os); None where there is none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


_START_WRITEBACK = _sync_file_range()


class Writeback:
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
