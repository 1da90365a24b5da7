"""Read a safetensors header without touching tensor bytes, and check it tells the truth about sizes.

The merge plan is built from these headers alone, so a truncated or lying file is caught before any byte
of output is written.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from moemerge.errors import MoemergeError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie in a safetensors file, and what they hold."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header; offsets become absolute positions in the file."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) < 8:
            raise MoemergeError(f"{file}: truncated safetensors file (no header); re-download or re-save it")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise MoemergeError(f"{file}: corrupt safetensors header (length {header_len} exceeds the file)")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise MoemergeError(f"{file}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise MoemergeError(f"{file}: corrupt safetensors header (not a JSON object)")
    base = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, finish = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise MoemergeError(f"{file}: tensor {name}: unreadable or unsupported header entry") from None
        count = 1
        for dim in shape:
            count *= dim
        expected = count * torch.empty((), dtype=dtype).element_size()
        if finish - begin != expected or begin < 0:
            raise MoemergeError(
                f"{file}: tensor {name}: header says {finish - begin} bytes but {entry['dtype']}{list(shape)} "
                f"needs {expected}; the file is corrupt"
            )
        if base + finish > size:
            raise MoemergeError(f"{file}: tensor {name} lies past the end of the file; the file is truncated")
        tensors[name] = TensorInfo(file, dtype, shape, base + begin, base + finish)
    return tensors
